// cfr-serve page: plain JS, no build step. One server session per opened image; clicks go through a
// promise chain so they reach the server in the order they were made.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { sid: null, name: "", width: 0, height: 0, clicks: [], zoom: null, chain: Promise.resolve(),
                pending: 0, lastMs: null, serverMs: null };
window.cfr = state; // read by the browser test

const layers = { image: $("image"), mask: $("mask"), clicks: $("clicks") };

function setStatus(text, isError = false, title = "") {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
  $("status").title = title;
}

// Errors show the server's message (what to do), with the error type in the tooltip.
async function api(method, path, body, headers = {}) {
  const res = await fetch(path, { method, body, headers });
  if (res.status === 204) return null;
  const data = await res.json();
  if (!res.ok) {
    const err = new Error(data.message || `${res.status} ${res.statusText}`);
    err.type = data.error;
    throw err;
  }
  return data;
}

function showLatency(ms, res) {
  state.lastMs = ms; state.serverMs = res ? res.server_ms : null;
  $("latency").textContent = ms === null ? "latency –" :
    `last click ${ms.toFixed(1)} ms (server ${res.server_ms.toFixed(1)} ms, ${res.last_forwards} fwd)`;
}

function resize(w, h) {
  for (const c of Object.values(layers)) { c.width = w; c.height = h; }
}

// Uncompressed COCO RLE (column-major runs, zeros first) -> overlay pixels.
function drawMask(rle) {
  const [h, w] = rle.size;
  const ctx = layers.mask.getContext("2d");
  const img = ctx.createImageData(w, h);
  const px = img.data;
  let pos = 0;
  rle.counts.forEach((n, k) => {
    if (k % 2 === 1) {
      for (let i = pos; i < pos + n; i++) {
        const x = Math.floor(i / h), y = i - x * h, o = 4 * (y * w + x);
        px[o] = 30; px[o + 1] = 144; px[o + 2] = 255; px[o + 3] = 120;
      }
    }
    pos += n;
  });
  ctx.putImageData(img, 0, 0);
}

function drawClicks() {
  const ctx = layers.clicks.getContext("2d");
  ctx.clearRect(0, 0, state.width, state.height);
  const r = Math.max(4, Math.round(Math.min(state.width, state.height) / 100));
  if (state.zoom) {
    const z = state.zoom;
    ctx.setLineDash([6, 4]); ctx.strokeStyle = "rgba(255,255,255,0.7)"; ctx.lineWidth = 1;
    ctx.strokeRect(z.x0 + 0.5, z.y0 + 0.5, z.x1 - z.x0, z.y1 - z.y0);
    ctx.setLineDash([]);
  }
  for (const c of state.clicks) {
    ctx.beginPath();
    ctx.arc(c.x + 0.5, c.y + 0.5, r, 0, 2 * Math.PI);
    ctx.fillStyle = c.positive ? "#3ddc84" : "#ff5050";
    ctx.fill(); ctx.lineWidth = 2; ctx.strokeStyle = "#fff"; ctx.stroke();
  }
}

function show(res, ms) {
  state.clicks = res.clicks; state.zoom = res.zoom_box;
  drawMask(res.mask);
  drawClicks();
  if (ms !== undefined) showLatency(ms, res);
  $("info").textContent = `${res.clicks.length} clicks · ${res.mode} · ${res.area} px`;
}

// Every action goes through the chain; `state.pending` lets tests wait until the page is idle.
function enqueue(fn) {
  state.pending++;
  state.chain = state.chain.then(fn).catch((e) => setStatus(e.message, true, e.type || ""))
    .finally(() => state.pending--);
  return state.chain;
}

function pixelOf(ev) {
  const rect = layers.clicks.getBoundingClientRect();
  const x = Math.floor((ev.clientX - rect.left) * state.width / rect.width);
  const y = Math.floor((ev.clientY - rect.top) * state.height / rect.height);
  return [Math.min(Math.max(x, 0), state.width - 1), Math.min(Math.max(y, 0), state.height - 1)];
}

function click(ev, positive) {
  ev.preventDefault();
  if (!state.sid) return;
  const [x, y] = pixelOf(ev);
  enqueue(async () => {
    const t0 = performance.now();
    const res = await api("POST", `/sessions/${state.sid}/clicks?format=rle`, JSON.stringify({ x, y, positive }),
      { "Content-Type": "application/json" });
    show(res, performance.now() - t0);
    setStatus("");
  });
}

function action(name) {
  if (!state.sid) return;
  enqueue(async () => {
    if (name === "undo" && state.clicks.length === 0) {  // checked in order, after the clicks queued before
      setStatus("Nothing to undo: no clicks yet on this image.");
      return;
    }
    show(await api("POST", `/sessions/${state.sid}/${name}?format=rle`));
    if (name === "reset") showLatency(null);  // the last click's latency belongs to clicks that are gone
    setStatus(name === "reset" ? "Reset: click on the object." : "");
  });
}

async function open(file) {
  setStatus(`uploading ${file.name}…`);
  const res = await api("POST", `/sessions?mode=${encodeURIComponent($("mode").value)}`, file,
    { "Content-Type": file.type || "application/octet-stream" });
  const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  state.sid = res.session_id; state.name = file.name; state.width = res.width; state.height = res.height;
  resize(res.width, res.height);
  layers.image.getContext("2d").drawImage(bitmap, 0, 0, res.width, res.height);
  state.clicks = []; state.zoom = null; drawClicks(); showLatency(null);
  $("download-mask").href = `/sessions/${state.sid}/mask.png`;
  $("download-mask").classList.remove("disabled");
  $("download-clicks").disabled = false;
  $("info").textContent = `${res.width}x${res.height} · ${res.mode}`;
  setStatus(`${file.name}: click on the object`);
}

$("file").addEventListener("change", (ev) => {
  const file = ev.target.files[0];
  if (file) enqueue(() => open(file));
});
layers.clicks.addEventListener("click", (ev) => click(ev, true));
layers.clicks.addEventListener("contextmenu", (ev) => click(ev, false));
$("undo").addEventListener("click", () => action("undo"));
$("reset").addEventListener("click", () => action("reset"));
$("mode").addEventListener("change", () => {
  if (!state.sid) return;
  enqueue(async () => {
    const res = await api("PUT", `/sessions/${state.sid}/mode`, JSON.stringify({ mode: $("mode").value }),
      { "Content-Type": "application/json" });
    $("info").textContent = `${res.clicks.length} clicks · ${res.mode}`;
  });
});
$("download-clicks").addEventListener("click", () => {
  const doc = { image: state.name, width: state.width, height: state.height, mode: $("mode").value,
                clicks: state.clicks };
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([JSON.stringify(doc, null, 1)], { type: "application/json" }));
  a.download = "clicks.json";
  a.click();
  URL.revokeObjectURL(a.href);
});
document.addEventListener("keydown", (ev) => {
  if (ev.target.tagName === "SELECT" || ev.target.tagName === "INPUT") return;
  if (ev.key === "z" || ev.key === "Backspace" || (ev.key === "z" && ev.ctrlKey)) { ev.preventDefault(); action("undo"); }
  else if (ev.key === "r" || ev.key === "Escape") { ev.preventDefault(); action("reset"); }
});
