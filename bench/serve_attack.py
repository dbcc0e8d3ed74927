"""cfr-serve under attack: every case of issue 16 replayed against a server on this machine, with its answer.

    python bench/serve_attack.py --url http://127.0.0.1:8000 [--dataset ../shared/data/GrabCut]
    python bench/serve_attack.py --spawn [--max-memory-mb 2048]     # starts `cfr-serve` itself, then stops it

Loopback only: the URL's host must resolve to loopback addresses, or the tool refuses to start. Bounded:
every attack sends a fixed, small number of requests with timeouts, and the whole run stops starting new
attacks after --budget-s seconds. Clients are told apart by their source address (cfr-serve's default
identity): the attacker connects from 127.0.0.2, the victim from 127.0.0.3, the /health monitor from
127.0.0.1 (Linux routes all of 127/8 to the loopback interface; elsewhere everything comes from 127.0.0.1
and the fairness rows say so).

For each attack a monitor process polls /health every 10 ms from its own address and records how long each
answer took and the server's RSS (/health reports its own RSS), so each row shows whether the server stalled
(/health p99, only from >= 100 samples; max otherwise) and its peak memory against the cap. The monitor is a
separate process and the big frames are encoded before any monitored window: measured from a thread of this
tool, /health latency included waits for this tool's own GIL (p99 322 ms instead of 20 ms on 4 MP frames).
A row's verdict is "ok" when every answer is the expected one (a clear 4xx, or served correctly), "FAIL"
otherwise.

Writes attack_<tag>.json/.md under --out only when --out is given, and never over an existing file.
"""

from __future__ import annotations

import base64
import functools
import io
import ipaddress
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfr_runtime.cli_options import (  # noqa: E402
    POSITIVE_FLOAT,
    POSITIVE_INT,
    command,
    dataset_option,
    fail,
    merge_alias,
    model_argument,
    option,
    out_option,
    refuse_existing,
)
from cfr_runtime.errors import InputError  # noqa: E402

PROG = "serve_attack.py"

ATTACKER, VICTIM, MONITOR = "127.0.0.2", "127.0.0.3", "127.0.0.1"
JSON = {"Content-Type": "application/json"}


# ---- guards ------------------------------------------------------------------------------------------------
def loopback_url(url: str) -> tuple[str, int]:
    """(host, port) of an http:// URL whose host resolves only to loopback addresses; InputError otherwise."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "http" or not parts.hostname or not port:
        raise InputError(f"the URL must be http://HOST:PORT, got {url!r}")
    try:
        infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise InputError(f"cannot resolve {parts.hostname}: {exc}") from None
    addrs = {ipaddress.ip_address(info[4][0]) for info in infos}
    if not addrs or not all(a.is_loopback for a in addrs):
        raise InputError(f"refusing {url}: it resolves to {sorted(map(str, addrs))}, not only loopback "
                         "addresses; this tool attacks servers on this machine only")
    return parts.hostname, port


class LoopbackURL(click.ParamType):
    """--url: http://HOST:PORT whose host resolves only to loopback addresses (`loopback_url`)."""

    name = "url"

    def convert(self, value, param, ctx) -> str:
        try:
            loopback_url(value)
        except InputError as exc:
            self.fail(str(exc), param, ctx)
        return value


class PositiveInts(click.ParamType):
    """A comma-separated list of positive integers, e.g. 4,12,36."""

    name = "list"

    def convert(self, value, param, ctx) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            out = [int(x) for x in str(value).split(",") if x.strip()]
        except ValueError:
            out = []
        if not out or min(out) < 1:
            self.fail(f"{value!r} is not a comma-separated list of positive integers (e.g. 4,12,36)", param, ctx)
        return out


def can_bind(address: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


# ---- images ------------------------------------------------------------------------------------------------
@functools.cache
def frame(fmt: str, h: int, w: int, seed: int, **kw) -> bytes:
    """An encoded scene, built once per run: `run` builds the big ones before any monitored window, so
    encoding frames never competes with the server while it is measured."""
    return encode(scene(h, w, seed), fmt, **kw)


def frame_size(mp: int) -> tuple[int, int]:
    h = int(round((mp * 1e6 * 3 / 4) ** 0.5))
    return h, int(round(h * 4 / 3))


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB frame with one elliptic object (compresses like a photo of a plain scene)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    rgb = np.dstack([40 + 30 * xx / w, 50 + 30 * yy / h, np.full((h, w), 60, np.float32)])
    obj = ((yy - h / 2) / (0.3 * h)) ** 2 + ((xx - w / 2) / (0.3 * w)) ** 2 <= 1
    rgb[obj] = (210, 140, 60)
    rgb += rng.normal(0, 2, (h, w, 1)).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def encode(rgb: np.ndarray, fmt: str, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(np.full((16, 16, 3), 128, np.uint8), "JPEG"))
    at = data.index(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def png_claiming(width: int, height: int) -> bytes:
    import zlib

    raw = encode(np.zeros((4, 4, 3), np.uint8), "PNG")
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def mpo(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="MPO", save_all=True, append_images=[Image.fromarray(rgb[::-1].copy())])
    return buf.getvalue()


def cvat_body(frame: bytes, pos, neg=(), **extra) -> bytes:
    return json.dumps({"image": base64.b64encode(frame).decode(), "pos_points": [list(p) for p in pos],
                       "neg_points": [list(p) for p in neg], "obj_bbox": None, **extra}).encode()


def cvat_mask(answer: dict, shape: tuple[int, int]) -> np.ndarray:
    rows = np.asarray(answer["mask"], np.uint8)
    left, top, right, bottom = answer.get("bounds", (0, 0, rows.shape[1] - 1, rows.shape[0] - 1))
    full = np.zeros(shape, bool)
    full[top:bottom + 1, left:right + 1] = rows > 0
    return full


# ---- the harness -------------------------------------------------------------------------------------------
@dataclass
class Row:
    case: str
    attack: str
    expected: str
    answers: dict = field(default_factory=dict)
    ok: bool = False
    note: str = ""
    seconds: float = 0.0
    health: dict = field(default_factory=dict)
    rss_peak_mb: float | None = None
    health_p99_ms: float | None = None  # a target on /health's p99 during the attack (needs >= 100 samples)


class Target:
    def __init__(self, url: str, separate: bool, timeout: float):
        import httpx

        self.url, self.separate, self.timeout = url, separate, timeout
        self._httpx = httpx

    def client(self, source: str = MONITOR):
        transport = self._httpx.HTTPTransport(local_address=source if self.separate else None)
        return self._httpx.Client(base_url=self.url, timeout=self.timeout, transport=transport)

    def health(self) -> dict:
        with self.client() as c:
            return c.get("/health").json()


class Monitor:
    """Polls /health every 10 ms while an attack runs, from its own process (so neither the attack's threads
    nor this tool's frame encoding hold its GIL): latency of each answer, and the server's RSS."""

    def __init__(self, target: Target):
        self.target, self.latency, self.rss, self.errors = target, [], [], 0

    def __enter__(self) -> Monitor:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--monitor", self.target.url,
               "--monitor-source", MONITOR if self.target.separate else ""]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout.readline().strip() == "ready"
        return self

    def __exit__(self, *exc):
        out, _ = self._proc.communicate("", timeout=120)  # closing stdin stops it
        data = json.loads(out or "{}")
        self.latency, self.rss, self.errors = data.get("latency", []), data.get("rss", []), data.get("errors", 0)

    def summary(self) -> dict:
        a = np.asarray(self.latency)
        out = {"n": int(a.size), "errors": self.errors}
        if a.size:
            out.update(p50=round(float(np.percentile(a, 50)), 1), max=round(float(a.max()), 1))
            out["p99"] = round(float(np.percentile(a, 99)), 1) if a.size >= 100 else None
        return out


def run_monitor(url: str, source: str) -> None:
    """The monitor process: poll until stdin closes, then print the samples as JSON."""
    import select

    import httpx

    latency, rss, errors = [], [], 0
    transport = httpx.HTTPTransport(local_address=source or None)
    with httpx.Client(base_url=url, timeout=30, transport=transport) as c:
        print("ready", flush=True)
        while not select.select([sys.stdin], [], [], 0)[0]:
            t0 = time.perf_counter()
            try:
                r = c.get("/health")
                latency.append((time.perf_counter() - t0) * 1000)
                if r.status_code == 200 and r.json().get("rss_mb") is not None:
                    rss.append(r.json()["rss_mb"])
            except Exception:  # noqa: BLE001 - a failed /health is what the row reports
                errors += 1
            time.sleep(0.01)
    print(json.dumps({"latency": latency, "rss": rss, "errors": errors}))


def count(codes) -> dict:
    out: dict = {}
    for c in codes:
        out[str(c)] = out.get(str(c), 0) + 1
    return dict(sorted(out.items()))


def parallel(fn, items, workers: int) -> list:
    """fn(item) for each item on `workers` threads at once; results in item order."""
    results: list = [None] * len(items)

    def run(i):
        try:
            results[i] = fn(items[i])
        except Exception as exc:  # noqa: BLE001 - a transport error is an answer of the row
            results[i] = f"{type(exc).__name__}"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    for k in range(0, len(threads), workers):
        batch = threads[k:k + workers]
        for t in batch:
            t.start()
        for t in batch:
            t.join(600)
    return results


# ---- the attacks -------------------------------------------------------------------------------------------
def frame_repeats(mp: int) -> int:
    return max(3, 24 // max(mp, 1))  # small frames: more calls, for the monitor's 100 samples


def attack_cvat_frame(t: Target, mp: int) -> Row:
    """`repeat` CVAT calls one after the other, each on a new frame (a full decode each time), so that the
    /health monitor gets its 100 samples while one request at a time runs."""
    h, w = frame_size(mp)
    repeat = frame_repeats(mp)
    row = Row("1", f"{repeat} CVAT calls in turn, each on a new {w}x{h} ({mp} MP) JPEG frame",
              "200, mask cropped to its box, /health p99 <= 100 ms", health_p99_ms=100)
    codes, notes, ok = [], [], True
    for k in range(repeat):
        body = cvat_body(frame("JPEG", h, w, 100 * mp + k, quality=90), [(w // 2, h // 2)])
        with t.client(ATTACKER) as c:
            r = c.post("/cvat/interactor", content=body, headers=JSON)
        codes.append(r.status_code)
        if r.status_code != 200:
            ok, notes = False, [*notes, r.text[:160]]
            continue
        ans = r.json()
        left, top, right, bottom = ans["bounds"]
        box = (right - left + 1) * (bottom - top + 1)
        ok = ok and len(r.content) < 2 * (box + (bottom - top + 1)) + 200
        if k == 0:
            notes.append(f"answer {len(r.content) / 2**20:.1f} MB (box {box / 1e6:.1f} MP of {w * h / 1e6:.1f}; "
                         f"the full frame as 0/255: >= {3.5 * w * h / 2**20:.0f} MB)")
        notes.append(f"server_ms {ans['server_ms']:.0f}")
    row.answers, row.ok, row.note = count(codes), ok, ", ".join(notes)
    return row


def attack_bombs(t: Target) -> Row:
    row = Row("2", "8 x 629-byte JPEG + 8 x 69-byte PNG claiming 6000x6000, at once", "400 each, nothing decoded")
    bombs = [jpeg_claiming(6000, 6000)] * 8 + [png_claiming(6000, 6000)] * 8
    before = t.health()

    def send(data):
        with t.client(ATTACKER) as c:
            ctype = "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png"
            return c.post("/sessions", content=data, headers={"Content-Type": ctype}).status_code

    codes = parallel(send, bombs, 16)
    after = t.health()
    row.answers = count(codes)
    row.ok = all(c == 400 for c in codes) and after["sessions"] == before["sessions"]
    row.note = f"{sum(map(len, bombs))} bytes sent; sessions {before['sessions']} -> {after['sessions']}"
    return row


def attack_big_flood(t: Target, mp: int) -> Row:
    h, w = frame_size(mp)
    row = Row("2", f"8 x {mp} MP PNG uploads at once (real data), a victim session open",
              "201 or 429 each; victim kept; RSS <= cap + 25 %")
    big = frame("PNG", h, w, 7)
    small = frame("PNG", 120, 160, 1)
    with t.client(VICTIM) as v:
        victim = v.post("/sessions", content=small, headers={"Content-Type": "image/png"}).json()["session_id"]

    def send(_):
        with t.client(ATTACKER) as c:
            r = c.post("/sessions", content=big, headers={"Content-Type": "image/png"})
            if r.status_code == 201:
                c.delete(f"/sessions/{r.json()['session_id']}")
            return r.status_code

    codes = parallel(send, list(range(8)), 8)
    with t.client(VICTIM) as v:
        kept = v.get(f"/sessions/{victim}").status_code == 200
        v.delete(f"/sessions/{victim}")
    row.answers = count(codes)
    row.ok = all(c in (201, 429) for c in codes) and kept
    row.note = f"frame {len(big) / 2**20:.1f} MB; victim session {'kept' if kept else 'LOST'}"
    return row


def attack_tiny_flood(t: Target) -> Row:
    row = Row("3", "64 uploads of a 1x1 PNG from one address, a victim session open", "201 each; victim kept")
    tiny = encode(np.zeros((1, 1, 3), np.uint8), "PNG")
    with t.client(VICTIM) as v:
        victim = v.post("/sessions", content=encode(scene(120, 160), "PNG"),
                        headers={"Content-Type": "image/png"}).json()["session_id"]
    codes, ids = [], []
    with t.client(ATTACKER) as c:
        for _ in range(64):
            r = c.post("/sessions", content=tiny, headers={"Content-Type": "image/png"})
            codes.append(r.status_code)
            if r.status_code == 201:
                ids.append(r.json()["session_id"])
        live = sum(c.get(f"/sessions/{i}").status_code == 200 for i in ids)
        for i in ids:
            c.delete(f"/sessions/{i}")
    with t.client(VICTIM) as v:
        kept = v.get(f"/sessions/{victim}").status_code == 200
        v.delete(f"/sessions/{victim}")
    row.answers = count(codes)
    row.ok = all(c == 201 for c in codes) and kept and t.separate
    row.note = (f"attacker keeps {live} of its 64; victim session {'kept' if kept else 'LOST'}"
                + ("" if t.separate else "; one loopback address only: not a test of fairness"))
    return row


def attack_cfr32_burst(t: Target) -> Row:
    row = Row("3", "44 simultaneous CFR-32 first clicks from one address; a victim's click meanwhile",
              "victim served within ~2 CFR-32 clicks; excess 429")
    small = frame("PNG", 480, 640, 3)
    with t.client(ATTACKER) as c:
        sids = [c.post("/sessions?mode=CFR-32", content=small, headers={"Content-Type": "image/png"}).json()[
            "session_id"] for _ in range(32)]
        t0 = time.perf_counter()
        c.post(f"/sessions/{sids[0]}/clicks?format=rle", json={"x": 320, "y": 240}).raise_for_status()
        alone = time.perf_counter() - t0  # one CFR-32 first click on an idle server
        c.post(f"/sessions/{sids[0]}/reset")
    with t.client(VICTIM) as v:
        victim = v.post("/sessions", content=small, headers={"Content-Type": "image/png"}).json()["session_id"]
    result: dict = {}

    def victim_click():
        time.sleep(0.5)
        with t.client(VICTIM) as v:
            t0 = time.perf_counter()
            r = v.post(f"/sessions/{victim}/clicks?format=rle", json={"x": 320, "y": 240})
            result["victim"] = (r.status_code, time.perf_counter() - t0)
            v.delete(f"/sessions/{victim}")

    def attack(i):
        with t.client(ATTACKER) as c:
            return c.post(f"/sessions/{sids[i % len(sids)]}/clicks?format=rle",
                          json={"x": 300 + i % 40, "y": 240}).status_code

    vt = threading.Thread(target=victim_click)
    vt.start()
    codes = parallel(attack, list(range(44)), 44)
    vt.join(600)
    with t.client(ATTACKER) as c:
        for s in sids:
            c.delete(f"/sessions/{s}")
    status, took = result.get("victim", ("none", float("nan")))
    row.answers = {**count(codes), "victim": status}
    row.ok = status == 200 and took <= 3 * alone + 0.5 and all(c in (200, 429) for c in codes) and t.separate
    row.note = (f"victim's click {took:.2f} s (one CFR-32 first click alone: {alone:.2f} s; before the fix "
                "34.3 s)" + ("" if t.separate else "; one loopback address only: not a test of fairness"))
    return row


def attack_cross_site(t: Target) -> Row:
    row = Row("4", "text/plain, form, multipart and no-type POSTs; foreign Host; foreign Origin",
              "415 / 400 / 403")
    img = frame("PNG", 120, 160, 0)
    body = cvat_body(img, [(80, 60)])
    codes = []
    with t.client(ATTACKER) as c:
        sid = c.post("/sessions", content=img, headers={"Content-Type": "image/png"}).json()["session_id"]
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
            headers = {"Content-Type": ctype} if ctype else {}
            for path in ("/", "/cvat/interactor"):
                codes.append(("415", c.post(path, content=body, headers=headers).status_code))
            codes.append(("415", c.post(f"/sessions/{sid}/clicks", content=b'{"x": 1, "y": 1}',
                                        headers=headers).status_code))
            codes.append(("415", c.post("/sessions", content=img, headers=headers).status_code))
        codes.append(("400", c.get("/health", headers={"Host": "rebound.attacker.example"}).status_code))
        codes.append(("403", c.post("/sessions", content=img, headers={
            "Content-Type": "image/png", "Origin": "http://attacker.example"}).status_code))
        c.delete(f"/sessions/{sid}")
    row.answers = count(c for _, c in codes)
    row.ok = all(str(got) == want for want, got in codes)
    return row


def attack_cvat_order(t: Target) -> Row:
    row = Row("5", "CVAT [P2], then [P1, P2] on the same frame; [P1, P2] on a fresh copy of it",
              "the two [P1, P2] masks equal")
    rgb = scene(240, 320, 5)
    original, copy = encode(rgb, "PNG"), encode(rgb, "PNG", compress_level=1)  # same pixels, other bytes
    p1, p2 = (160, 120), (200, 140)
    with t.client(ATTACKER) as c:
        a = c.post("/cvat/interactor", content=cvat_body(original, [p2]), headers=JSON)
        b = c.post("/cvat/interactor", content=cvat_body(original, [p1, p2]), headers=JSON)
    with t.client(VICTIM) as v:
        f = v.post("/cvat/interactor", content=cvat_body(copy, [p1, p2]), headers=JSON)
    row.answers = count([a.status_code, b.status_code, f.status_code])
    if {a.status_code, b.status_code, f.status_code} == {200}:
        diff = int(np.count_nonzero(cvat_mask(b.json(), rgb.shape[:2]) != cvat_mask(f.json(), rgb.shape[:2])))
        row.ok, row.note = diff == 0, f"{diff} px differ"
    return row


def attack_formats(t: Target) -> Row:
    from PIL import Image

    row = Row("6", "BMP, TIFF, WebP, MPO, 16-bit gray PNG, RGBA PNG uploads", "201 each")
    rgb = scene(240, 320, 6)
    g16 = io.BytesIO()
    Image.fromarray((np.arange(240 * 320, dtype=np.uint32).reshape(240, 320) % 65536).astype(np.uint16)).save(
        g16, format="PNG")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    files = [("image/bmp", encode(rgb, "BMP")), ("image/tiff", encode(rgb, "TIFF")),
             ("image/webp", encode(rgb, "WEBP")), ("application/octet-stream", mpo(rgb)),
             ("image/png", g16.getvalue()), ("image/png", encode(rgba, "PNG"))]
    codes = []
    with t.client(ATTACKER) as c:
        for ctype, data in files:
            r = c.post("/sessions", content=data, headers={"Content-Type": ctype})
            codes.append(r.status_code)
            if r.status_code == 201:
                c.delete(f"/sessions/{r.json()['session_id']}")
    row.answers = count(codes)
    row.ok = codes == [201] * len(files)
    return row


def attack_errors(t: Target) -> Row:
    row = Row("7", "50,000 nested '[', bad JSON on /clicks, CVAT threshold NaN / -1 / 2",
              "400 / 400 / 422, always {error, message}")
    img = frame("PNG", 120, 160, 0)
    got = []
    with t.client(ATTACKER) as c:
        sid = c.post("/sessions", content=img, headers={"Content-Type": "image/png"}).json()["session_id"]
        for path in ("/cvat/interactor", f"/sessions/{sid}/clicks"):
            got.append((400, c.post(path, content=b"[" * 50_000, headers=JSON)))
        got.append((400, c.post(f"/sessions/{sid}/clicks", content=b"{oops", headers=JSON)))
        for th in (float("nan"), -1, 2):
            got.append((422, c.post("/cvat/interactor", content=cvat_body(img, [(80, 60)], threshold=th),
                                    headers=JSON)))
        c.delete(f"/sessions/{sid}")

    def shaped(r) -> bool:
        try:
            return set(r.json()) == {"error", "message"}
        except ValueError:
            return False

    row.answers = count(r.status_code for _, r in got)
    row.ok = all(r.status_code == want and shaped(r) for want, r in got)
    return row


def attack_memory_accounting(t: Target, dataset: Path | None) -> Row:
    row = Row("8", "64 live GrabCut sessions x 3 clicks (2 addresses): accounted vs RSS growth",
              "accounted >= RSS growth")
    if dataset is None:
        row.note = "skipped: no --dataset"
        return row
    from cfr_runtime.datasets import open_dataset

    images = [i.image_path.read_bytes() for i in open_dataset(dataset)[:32]]
    before = t.health()
    sids: list[tuple[str, str]] = []
    for source in (ATTACKER, VICTIM):
        with t.client(source) as c:
            for data in images:
                r = c.post("/sessions", content=data, headers={"Content-Type": "application/octet-stream"})
                if r.status_code != 201:
                    continue
                s = r.json()
                sids.append((source, s["session_id"]))
                for k in range(3):
                    c.post(f"/sessions/{s['session_id']}/clicks?format=rle",
                           json={"x": s["width"] // 2 + 9 * k, "y": s["height"] // 2})
    time.sleep(1.0)
    after = t.health()
    for source, sid in sids:
        with t.client(source) as c:
            c.delete(f"/sessions/{sid}")
    accounted = after["memory_mb"] - before["memory_mb"]
    grown = None if after.get("rss_mb") is None else after["rss_mb"] - before["rss_mb"]
    row.answers = {"sessions": len(sids)}
    row.ok = grown is not None and accounted >= grown and len(sids) == 2 * len(images)
    row.note = f"accounted +{accounted:.0f} MB, RSS +{grown:.0f} MB" if grown is not None else "no rss_mb in /health"
    return row


def attack_stream(t: Target, host: str, port: int) -> Row:
    import select

    limit = t.health()["upload"]["max_bytes"]
    chunk, total = 64 * 1024, limit + 64 * 2**20
    row = Row("-", f"chunked upload without Content-Length, {total / 2**20:.0f} MB",
              "413 once past the upload limit (+ what the kernel buffers)")
    payload = b"%x\r\n" % chunk + b"\0" * chunk + b"\r\n"
    with socket.create_connection((host, port), timeout=30, source_address=(ATTACKER, 0) if t.separate else None) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        s.sendall(f"POST /sessions HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        s.setblocking(False)
        sent, answer, pending, deadline = 0, b"", memoryview(b""), time.monotonic() + 60
        while time.monotonic() < deadline and not answer:
            readable, writable, _ = select.select([s], [s] if sent < total or len(pending) else [], [], 0.5)
            if readable:
                try:
                    answer = s.recv(4096) or b"closed"
                except OSError:
                    answer = b"reset"
            elif writable:
                if not len(pending):
                    pending, sent = memoryview(payload), sent + chunk
                try:
                    pending = pending[s.send(pending):]
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    pass
    status = answer[9:12].decode(errors="replace") if answer.startswith(b"HTTP/") else answer[:20].decode()
    row.answers = count([status])
    row.ok = status == "413" and sent < limit + 16 * 2**20
    row.note = f"{sent / 2**20:.1f} MB sent before the answer (upload limit {limit / 2**20:.0f} MB)"
    return row


# ---- the run -----------------------------------------------------------------------------------------------
def spawn_server(args) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "cfr_runtime.serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-memory-mb", str(args.max_memory_mb)]
    if args.model:
        cmd.insert(3, args.model)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            fail(PROG, f"cfr-serve did not start: {proc.stderr.read()[-2000:]}", 1)
        time.sleep(0.2)


def attack_plan(t: Target | None, args) -> dict:
    """The attacks by name, in the order they run (`t` is used only when one is called: `attack_plan(None,
    args)` gives the names, to check --only before anything starts)."""
    host, port = (loopback_url(args.url) if t is not None else (None, None))
    return {**{f"frame-{mp}mp": (lambda mp=mp: attack_cvat_frame(t, mp)) for mp in args.frames_mp},
            "bombs": lambda: attack_bombs(t), "big-flood": lambda: attack_big_flood(t, args.flood_mp),
            "tiny-flood": lambda: attack_tiny_flood(t), "cfr32-burst": lambda: attack_cfr32_burst(t),
            "cross-site": lambda: attack_cross_site(t), "cvat-order": lambda: attack_cvat_order(t),
            "formats": lambda: attack_formats(t), "errors": lambda: attack_errors(t),
            "memory": lambda: attack_memory_accounting(t, args.dataset), "stream": lambda: attack_stream(t, host, port)}


def run(args) -> dict:
    loopback_url(args.url)
    separate = can_bind(ATTACKER) and can_bind(VICTIM)
    t = Target(args.url, separate, args.timeout)
    first = t.health()
    cap = first["limits"]["max_memory_mb"]
    plan = attack_plan(t, args)
    if args.only:
        plan = {k: v for k, v in plan.items() if k in args.only}
    for mp in args.frames_mp:  # the big frames, encoded before any monitored window
        h, w = frame_size(mp)
        for k in range(frame_repeats(mp)):
            frame("JPEG", h, w, 100 * mp + k, quality=90)
    if "big-flood" in plan:
        frame("PNG", *frame_size(args.flood_mp), 7)
    rows: list[Row] = []
    start = time.monotonic()
    for name, step in plan.items():
        if time.monotonic() - start > args.budget_s:
            rows.append(Row("-", "(remaining attacks)", "-", note=f"skipped: --budget-s {args.budget_s} spent"))
            break
        t0 = time.perf_counter()
        with Monitor(t) as mon:
            try:
                row = step()
            except Exception as exc:  # noqa: BLE001 - the attack itself broke: a failed row, not a crash
                row = Row("?", name, "-", note=f"{type(exc).__name__}: {exc}")
        row.seconds = round(time.perf_counter() - t0, 2)
        row.health = mon.summary()
        row.rss_peak_mb = max(mon.rss) if mon.rss else None
        if row.health_p99_ms is not None:
            p99 = row.health.get("p99")
            if p99 is None or p99 > row.health_p99_ms:
                row.ok = False
                row.note += f"; /health p99 {p99} ms (target {row.health_p99_ms:.0f}, >= 100 samples)"
        rows.append(row)
        print(line(row, cap), flush=True)
    last = t.health()
    return {"url": args.url, "separate_addresses": separate, "cap_mb": cap, "engine": first["engine"],
            "rss_start_mb": first.get("rss_mb"), "rss_end_mb": last.get("rss_mb"),
            "sessions_end": last["sessions"], "rows": [vars(r) for r in rows]}


def line(r: Row, cap: float) -> str:
    h = r.health
    p99 = "-" if h.get("p99") is None else f"{h['p99']:.0f}"
    health = f"{h.get('p50', 0):.0f} / {p99} / {h.get('max', 0):.0f} ms (n={h.get('n', 0)})" if h.get("n") else "-"
    rss = "-" if r.rss_peak_mb is None else f"{r.rss_peak_mb:.0f} MB ({r.rss_peak_mb / cap:.2f} x cap)"
    answers = ", ".join(f"{k}: {v}" for k, v in r.answers.items())
    verdict = "ok" if r.ok else ("skipped" if r.note.startswith("skipped") else "FAIL")
    return (f"| {r.case} | {r.attack} | {r.expected} | {answers} | {verdict} | {health} | {rss} | {r.seconds} s | "
            f"{r.note} |")


HEADER = ("| case | attack | expected | answers | verdict | /health p50 / p99 / max | peak RSS | time | note |\n"
          "|---|---|---|---|---|---|---|---|---|")


def markdown(result: dict, meta: dict) -> str:
    cap = result["cap_mb"]
    lines = [f"# cfr-serve under attack: {result['engine']}", "",
             f"`{meta['command']}`", "",
             f"Machine: {meta['machine']}; load average before {meta['load_before']}, after {meta['load_after']}. "
             f"Memory cap {cap:.0f} MB (RSS target: <= {1.25 * cap:.0f} MB); server RSS at start "
             f"{result['rss_start_mb']} MB, at the end {result['rss_end_mb']} MB. Clients on separate loopback "
             f"addresses: {result['separate_addresses']}.", "", HEADER]
    for r in result["rows"]:
        lines.append(line(Row(**r), cap))
    return "\n".join(lines) + "\n"


@command(PROG)
@model_argument(required=False, old=["--model"])
@option("--url", type=LoopbackURL(), default=None, metavar="URL",
        help="http://HOST:PORT of a running cfr-serve; HOST must resolve to loopback addresses only.")
@option("--spawn", is_flag=True, help="Start cfr-serve MODEL on a free loopback port instead, and stop it after.")
@option("--max-memory-mb", type=POSITIVE_FLOAT, default=2048.0, show_default=True,
        help="With --spawn: cfr-serve's memory cap.")
@dataset_option(help="GrabCut folder for the memory-accounting row [default: that row is skipped].")
@option("--frames-mp", type=PositiveInts(), default="4,12,36", show_default=True, metavar="LIST",
        help="CVAT frame sizes in megapixels, comma-separated.")
@option("--flood-mp", type=POSITIVE_INT, default=12, show_default=True, metavar="N",
        help="Megapixels of each upload of the big flood.")
@option("--only", default=None, metavar="NAMES",
        help="Comma-separated attacks to run [default: all]: frame-<N>mp (one per --frames-mp), bombs, big-flood, "
             "tiny-flood, cfr32-burst, cross-site, cvat-order, formats, errors, memory, stream.")
@option("--budget-s", type=POSITIVE_FLOAT, default=900.0, show_default=True, metavar="S",
        help="Start no attack after this many seconds.")
@option("--timeout", type=POSITIVE_FLOAT, default=300.0, show_default=True, metavar="S", help="Per request, seconds.")
@out_option(help="Write attack_<tag>.json/.md here, never over an existing file [default: write nothing].")
@option("--tag", default="cpu_tiny", show_default=True, help="Result file name: attack_<tag>.json/.md.")
@option("--monitor", default=None, hidden=True)  # internal: the /health monitor process
@option("--monitor-source", default="", hidden=True)
def main(model, model_alias, url, spawn, max_memory_mb, dataset, frames_mp, flood_mp, only, budget_s, timeout, out,
         tag, monitor, monitor_source) -> None:
    """Replay every attack of issue 16 against a cfr-serve on this machine (--url), or against `cfr-serve MODEL`
    started for the run (--spawn; MODEL defaults to the bundled tiny model), and print a table of the answers
    (see the module docstring of bench/serve_attack.py)."""
    if monitor:
        return run_monitor(monitor, monitor_source)
    model = merge_alias(model, model_alias, "MODEL")
    if bool(url) == spawn:
        raise click.UsageError("give exactly one of --url and --spawn")
    if model is not None and not spawn:
        raise click.UsageError("MODEL is what --spawn serves; with --url the running server's model is attacked")
    args = SimpleNamespace(model=None if model is None else str(model), url=url, max_memory_mb=max_memory_mb,
                           dataset=dataset, frames_mp=frames_mp, flood_mp=flood_mp, budget_s=budget_s,
                           timeout=timeout, only=None, out=out, tag=tag)
    if only is not None:
        args.only = [x.strip() for x in only.split(",") if x.strip()]
        known = list(attack_plan(None, args))
        unknown = [x for x in args.only if x not in known]
        if unknown or not args.only:
            raise click.BadParameter(f"unknown attack(s) {unknown}; choose from {known}", param_hint="'--only'")
    stem = None
    if out is not None:  # refused before anything starts, never over an existing result
        stem = out / f"attack_{tag}"
        refuse_existing([stem.with_suffix(".json"), stem.with_suffix(".md")], "choose another --tag or --out")
    meta = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.platform()}",
            "load_before": [round(x, 2) for x in os.getloadavg()]}
    proc = None
    if spawn:
        proc, args.url = spawn_server(args)
    print(HEADER, flush=True)
    try:
        result = run(args)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    if stem is not None:
        from bench.machine import write_results

        write_results(stem, {**meta, **result}, markdown(result, meta), show=False)
    failed = [r for r in result["rows"] if not r["ok"] and not r["note"].startswith("skipped")]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
