"""Load test of `cfr-serve` on localhost: concurrent annotators, the HTTP overhead per click, memory after expiry.

1. Starts `cfr-serve MODEL` as a subprocess (short idle timeout) and measures its RSS after a warm-up session
   (the baseline: model loaded, ONNX Runtime arenas allocated).
2. Overhead, one client, interleaved click by click: the Session's own `add_click` in this process vs the same
   click over HTTP (POST /sessions/{id}/clicks, PNG and RLE answers), on the RITM clicker's click sequence.
3. Load: N clients at once, each its own GrabCut image and session, M clicks (reset every 10 clicks, the
   clicker's sequence); every answer's mask is checked against a local Session (RLE equality). Reports
   p50/p99 latency, throughput and errors (non-200 answers or wrong masks).
4. Waits for the sessions to expire and reports the server's RSS against the baseline.

    python bench/serve_load.py --dataset ../shared/data/GrabCut --clients 16 --clicks 50

Writes serve_load_<tag>.json/.md under --out (default out/bench/; existing files are never replaced without
--overwrite), with the machine and its load average at the start and the end.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import command_line, describe, machine, write_results  # noqa: E402
from cfr_runtime import Engine, Session, default_model  # noqa: E402
from cfr_runtime.cli_options import (  # noqa: E402
    command,
    dataset_option,
    merge_alias,
    model_argument,
    option,
    out_option,
    overwrite_option,
    refuse_existing,
    threads_option,
)
from cfr_runtime.clicker import Clicker  # noqa: E402
from cfr_runtime.datasets import open_dataset  # noqa: E402
from cfr_runtime.serve.codec import UploadLimits, decode_upload, mask_rle  # noqa: E402

ROUND = 10  # clicks between resets


def pct(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    if a.size == 0:
        return {"n": 0}
    q = {f"p{k}": round(float(np.percentile(a, k)), 3) for k in (50, 90, 99)}
    return {"n": int(a.size), **q, "mean": round(float(a.mean()), 3),
            "max": round(float(a.max()), 3)}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, idle_timeout: float, threads: int | None):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "cfr_runtime.serve", model, "--port", str(self.port),
               "--idle-timeout", str(idle_timeout)]
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cfr-serve did not start: {self.proc.stderr.read()[-2000:]}")
            time.sleep(0.1)

    def rss(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def click_plan(engine: Engine, image_bytes: bytes, gt: np.ndarray, n: int) -> tuple[list, list]:
    """The RITM clicker's first `n` clicks (x, y, positive) and the expected RLE counts after each."""
    s = Session(engine)
    s.set_image(decode_upload(image_bytes, UploadLimits()))
    clicker, pred, clicks, rles = Clicker(gt), np.zeros(gt.shape, bool), [], []
    for _ in range(n):
        y, x, positive = clicker.next_click(pred)
        pred = s.add_click(int(x), int(y), positive)
        clicks.append((int(x), int(y), bool(positive)))
        rles.append(mask_rle(pred)["counts"])
    return clicks, rles


def overhead(server: Server, engine: Engine, plans: list, rounds: int) -> dict:
    """Session.add_click in-process vs the same click over HTTP, interleaved so both see the same machine."""
    import httpx

    local, http = {"png": [], "rle": []}, {"png": [], "rle": []}
    server_ms = {"png": [], "rle": []}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for image_bytes, rgb, clicks, _ in plans:
            sid = client.post("/sessions", content=image_bytes, headers={"Content-Type": "image/jpeg"}).json()[
                "session_id"]
            s = Session(engine)
            s.set_image(rgb)
            for r in range(rounds):
                fmt = "png" if r % 2 == 0 else "rle"
                for x, y, p in clicks:
                    t0 = time.perf_counter()
                    s.add_click(x, y, p)
                    local[fmt].append((time.perf_counter() - t0) * 1000)
                    t0 = time.perf_counter()
                    resp = client.post(f"/sessions/{sid}/clicks?format={fmt}", json={"x": x, "y": y, "positive": p})
                    http[fmt].append((time.perf_counter() - t0) * 1000)
                    resp.raise_for_status()
                    server_ms[fmt].append(resp.json()["server_ms"])
                s.reset()
                client.post(f"/sessions/{sid}/reset")
            client.delete(f"/sessions/{sid}")
    out = {}
    for fmt in ("png", "rle"):
        out[fmt] = {"session_click_ms": pct(local[fmt]), "http_click_ms": pct(http[fmt]),
                    "server_ms": pct(server_ms[fmt]),
                    "overhead_p50_ms": round(float(np.median(http[fmt]) - np.median(local[fmt])), 3)}
    return out


def drive(url: str, plans: list, clients: int, clicks: int, timeout: float = 120, delete: bool = False
          ) -> tuple[list[float], list[str], float]:
    """`clients` annotators at once (released together by a barrier), annotator k on plans[k % len(plans)] =
    (image bytes, its clicks, the local Session's RLE after each): a session, then `clicks` clicks, a reset every
    ROUND clicks, every answer's mask compared with the local Session's. Returns (click latencies in ms, error
    descriptions, wall seconds). The one client loop of serve_load.py and serve_cluster.py."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def annotator(k: int) -> None:
        data, plan, rles = plans[k % len(plans)]
        mine, bad = [], []
        try:
            with httpx.Client(base_url=url, timeout=timeout) as client:
                barrier.wait()
                r = client.post("/sessions", content=data, headers={"Content-Type": "image/jpeg"})
                if r.status_code != 201:
                    bad.append(f"create {r.status_code} {r.text[:200]}")
                    return
                sid = r.json()["session_id"]
                for i in range(clicks):
                    j = i % ROUND
                    if i and j == 0:
                        client.post(f"/sessions/{sid}/reset?format=rle").raise_for_status()
                    x, y, p = plan[j]
                    t0 = time.perf_counter()
                    r = client.post(f"/sessions/{sid}/clicks?format=rle", json={"x": x, "y": y, "positive": p})
                    mine.append((time.perf_counter() - t0) * 1000)
                    if r.status_code != 200:
                        bad.append(f"click {r.status_code} {r.text[:200]}")
                    elif r.json()["mask"]["counts"] != rles[j]:
                        bad.append(f"client {k} click {i}: mask differs from the local Session's")
                if delete:
                    client.delete(f"/sessions/{sid}")
        except Exception as exc:  # a transport error is an error of the run, not of the script
            bad.append(f"client {k}: {type(exc).__name__}: {exc}")
        finally:
            with lock:
                latencies.extend(mine)
                errors.extend(bad)

    threads = [threading.Thread(target=annotator, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - t0


def load(server: Server, plans: list, clients: int, clicks: int) -> dict:
    peak = [server.rss()]
    stop = threading.Event()

    def monitor():
        while not stop.is_set():
            peak.append(server.rss())
            time.sleep(0.05)

    mon = threading.Thread(target=monitor, daemon=True)
    mon.start()
    latencies, errors, wall = drive(server.url, [(data, plan, rles) for data, _, plan, rles in plans], clients, clicks)
    stop.set()
    mon.join()
    return {"clients": clients, "clicks_per_client": clicks, "click_ms": pct(latencies),
            "clicks_total": len(latencies), "errors": len(errors), "error_samples": errors[:5],
            "wall_s": round(wall, 2), "clicks_per_s": round(len(latencies) / wall, 1),
            "peak_rss_mb": round(max(peak), 1)}


def wait_expired(server: Server) -> dict:
    import httpx

    t0 = time.monotonic()
    while httpx.get(server.url + "/health").json()["sessions"] > 0 and time.monotonic() - t0 < 60:
        time.sleep(0.25)
    time.sleep(0.5)
    return httpx.get(server.url + "/health").json()


@command("serve_load.py")
@model_argument(required=False, old=["--model"])
@dataset_option(default=ROOT.parent / "shared" / "data" / "GrabCut",
                help="GrabCut-style dataset whose images the clients annotate [default: ../shared/data/GrabCut].")
@option("--clients", type=click.IntRange(min=1), default=16, show_default=True, help="Concurrent annotators.")
@option("--clicks", type=click.IntRange(min=1), default=50, show_default=True,
        help="Clicks per client (a reset every 10).")
@option("--overhead-images", type=click.IntRange(min=1), default=3, show_default=True,
        help="Images of the one-client overhead measurement.")
@option("--overhead-rounds", type=click.IntRange(min=1), default=4, show_default=True,
        help="Rounds over those images, alternating PNG and RLE answers (at least 2).")
@option("--idle-timeout", type=click.FloatRange(0, min_open=True), default=5.0, show_default=True,
        help="The server's session idle timeout, seconds (the memory check waits for expiry).")
@threads_option(help="ONNX Runtime threads, of the server and of the local Session [default: ONNX Runtime's].")
@option("--tag", default="cpu_tiny", show_default=True, help="Result file name: serve_load_<tag>.json/.md.")
@out_option(default=ROOT / "out" / "bench", shown="out/bench",
            help="Folder for the results (pass bench/results to update the committed results on purpose).")
@overwrite_option("serve_load_<tag>.json/.md in --out")
def main(model, model_alias, dataset, clients, clicks, overhead_images, overhead_rounds, idle_timeout, threads, tag,
         out, overwrite) -> None:
    """Load test of cfr-serve MODEL (default: the bundled tiny model) on localhost: concurrent annotators, the
    HTTP overhead per click and the memory after expiry; see the module docstring of bench/serve_load.py."""
    args = SimpleNamespace(model=merge_alias(model, model_alias, "MODEL"), dataset=dataset, clients=clients,
                           clicks=clicks, overhead_images=overhead_images, overhead_rounds=overhead_rounds,
                           idle_timeout=idle_timeout, threads=threads, tag=tag, out=out)
    stem = args.out / f"serve_load_{args.tag}"
    if not overwrite:  # refused before minutes of load, not after
        refuse_existing([stem.with_suffix(".json"), stem.with_suffix(".md")],
                        "pass --overwrite to replace it, or choose another --out or --tag")
    started = machine()

    model = str(args.model or default_model())
    engine = Engine(model, threads=args.threads)
    instances = open_dataset(args.dataset)
    n_images = max(args.clients, args.overhead_images)
    plans = []
    for inst in instances[:n_images]:
        _, gt = inst.load()
        data = inst.image_path.read_bytes()
        clicks, rles = click_plan(engine, data, gt, ROUND)
        plans.append((data, decode_upload(data, UploadLimits()), clicks, rles))

    server = Server(model, args.idle_timeout, args.threads)
    try:
        # warm-up at the test's concurrency (ONNX Runtime's arena, thread pools, first requests), then wait
        # for those sessions to expire: the baseline is a served, idle server
        overhead(server, engine, plans[:1], 2)
        load(server, plans, args.clients, 3)
        wait_expired(server)
        baseline = server.rss()
        over = overhead(server, engine, plans[: args.overhead_images], max(2, args.overhead_rounds))  # png, rle
        loaded = load(server, plans, args.clients, args.clicks)
        after_load = server.rss()
        expired = wait_expired(server)
        after = server.rss()
    finally:
        server.stop()

    result = {
        "model": str(model), "engine": repr(engine), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "load_average": {"start": started, "end": machine()},
        "overhead": over, "load": loaded,
        "memory": {"baseline_rss_mb": round(baseline, 1), "after_load_rss_mb": round(after_load, 1),
                   "after_expiry_rss_mb": round(after, 1), "after_expiry_vs_baseline": round(after / baseline, 3),
                   "sessions_after_expiry": expired["sessions"], "evicted": expired["evicted"]},
        "command": command_line(),
    }
    write_results(stem, result, markdown(result))
    if loaded["errors"]:
        sys.exit(1)


def markdown(r: dict) -> str:
    o, ld, m = r["overhead"], r["load"], r["memory"]
    lines = [f"# cfr-serve load test: {r['engine']} ({r['machine']})", "",
             *([f"machine: {describe(r['load_average']['start'], r['load_average']['end'])}", ""]
               if "load_average" in r else []),
             f"`{r['command']}`", "",
             "## Overhead of one click over HTTP (1 client, interleaved with the in-process Session)", "",
             "| answer | Session.add_click p50 | HTTP round trip p50 | overhead p50 | server_ms p50 | HTTP p99 |",
             "|---|---|---|---|---|---|"]
    for fmt in ("png", "rle"):
        x = o[fmt]
        lines.append(f"| {fmt} | {x['session_click_ms']['p50']:.2f} ms | {x['http_click_ms']['p50']:.2f} ms | "
                     f"+{x['overhead_p50_ms']:.2f} ms | {x['server_ms']['p50']:.2f} ms | "
                     f"{x['http_click_ms']['p99']:.2f} ms |")
    c = ld["click_ms"]
    lines += ["", f"## {ld['clients']} concurrent clients x {ld['clicks_per_client']} clicks (RLE answers, "
                  "masks checked against a local Session)", "",
              "| clicks | errors | p50 | p90 | p99 | max | clicks/s | wall | peak RSS |",
              "|---|---|---|---|---|---|---|---|---|",
              f"| {ld['clicks_total']} | {ld['errors']} | {c['p50']:.1f} ms | {c['p90']:.1f} ms | {c['p99']:.1f} ms | "
              f"{c['max']:.1f} ms | {ld['clicks_per_s']} | {ld['wall_s']} s | {ld['peak_rss_mb']} MB |",
              "", "## Server memory (RSS)", "",
              "| baseline (after warm-up) | after the load | after the sessions expired | ratio to baseline |",
              "|---|---|---|---|",
              f"| {m['baseline_rss_mb']} MB | {m['after_load_rss_mb']} MB | {m['after_expiry_rss_mb']} MB | "
              f"{m['after_expiry_vs_baseline']:.3f} |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
