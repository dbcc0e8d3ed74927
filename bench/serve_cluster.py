"""cfr-serve on Ray Serve vs plain cfr-serve, in one run on this machine: routing overhead, throughput, batching.

1. The engine's batch-size curve (CPU, ONNX Runtime): the shipped contract has no batch axis, so the default
   model's checkpoint is exported here with one (a bench-local graph: flip averaging per batch item) and timed
   at each batch size; each item's probabilities are compared with the same graph at batch 1 and with the
   shipped graph. Needs torch (the `export` extra); skipped with a note otherwise.
2. A local 2-node Ray cluster (`ray start` of a head and a worker on loopback addresses, as the tests do) and
   a plain `cfr-serve` subprocess, both serving the same model.
3. Routing overhead: one client, one session on each, clicks interleaved (plain, Ray, plain, ...) so both see
   the same machine; p50/p99 per click from >= 100 clicks each, with the server-side time each reports.
4. Load: N clients at once (default 16), each its own image and session, M clicks (reset every 10): plain
   cfr-serve, then Ray with 1 and 2 session replicas, batching off and on. Every answer's mask is checked
   against a local Session (RLE equality); clicks/s, p50/p99 per click, errors.

    python bench/serve_cluster.py --clients 16 --clicks 30 --tag cpu_tiny

Writes <tag>.json/.md under --out (default bench/results/ray/) and refuses to overwrite a committed result
unless --overwrite is given. Records the machine, its load average before and after, and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_load import ROUND, Server, click_plan, pct  # noqa: E402

from cfr_runtime import Engine, default_model  # noqa: E402
from cfr_runtime.serve.codec import UploadLimits, decode_upload  # noqa: E402


# ---- 1. the engine's batch-size curve ------------------------------------------------------------------------
def batch_curve(sizes: list[int], reps: int, threads: int | None, provider: str = "CPUExecutionProvider",
                checkpoint: Path | None = None, size: int | None = None) -> dict:
    """Per-forward time at each batch size, and whether batching changes a result. `provider`:
    CPUExecutionProvider here; CUDAExecutionProvider measures the GPU curve (onnxruntime-gpu). `checkpoint`
    (default: the bundled tiny model's) and `size` pick the network, e.g. an official ViT-B at 448."""
    try:
        import onnxruntime as ort
        import torch

        from export.onnx_export import example_inputs
        from trainer.checkpoint import load_model
        from trainer.models.graph import ContractGraph
        from trainer.models.plainvit import upsample_logits
    except ImportError as exc:
        return {"skipped": f"needs torch and the export/trainer packages ({exc.name} missing)"}

    class BatchAxisGraph(ContractGraph):
        """The contract function with a batch axis: flip averaging per item (bench only; the real change
        belongs to the contract, `trainer/models/graph.py` and the export)."""

        def flip_average(self, x, points, flipped):
            b = x.shape[0]
            logits = self.model.lowres_logits(torch.cat([x, x.flip(3)], 0), torch.cat([points, flipped], 0))
            logits = logits.float()
            return torch.sigmoid(upsample_logits(0.5 * (logits[:b] + logits[b:].flip(3)), x.shape[2:]))

    from dataclasses import replace

    shipped = Engine(default_model())
    own = checkpoint is not None
    contract = replace(shipped.contract, input_size=size or shipped.contract.input_size)
    model, _ = load_model(checkpoint or ROOT / "trainer" / "assets" / "default.pth", contract.input_size)
    names = ("image", "prev_mask", "points")
    cases = [example_inputs(contract, seed=i) for i in range(max(2, *sizes))]  # the export traces a batch of 2

    def stacked(b: int) -> dict:
        return {k: np.concatenate([cases[i][k] for i in range(b)]) for k in names}

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batch_axis.onnx"
        with torch.no_grad():
            torch.onnx.export(BatchAxisGraph(model, flip=contract.flip).eval(),
                              tuple(torch.from_numpy(a) for a in stacked(2).values()), str(path),
                              input_names=list(names), output_names=["probs"], opset_version=17, dynamo=False,
                              dynamic_axes={n: {0: "batch"} for n in (*names, "probs")})
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        if provider not in ort.get_available_providers():
            return {"skipped": f"{provider} is not available in this onnxruntime"}
        batched = ort.InferenceSession(str(path), opts, providers=[provider])
        single = ort.InferenceSession(default_model(), opts, providers=["CPUExecutionProvider"])
        alone = [batched.run(None, {k: cases[i][k] for k in names})[0] for i in range(max(sizes))]
        ref = alone if own else [single.run(None, {k: cases[i][k] for k in names})[0] for i in range(max(sizes))]
        times: dict[int, list[float]] = {b: [] for b in sizes}
        same_graph_equal, diff_vs_shipped = {}, {}
        for b in sizes:
            out = batched.run(None, stacked(b))[0]
            same_graph_equal[b] = all(np.array_equal(out[i:i + 1], alone[i]) for i in range(b))
            diff_vs_shipped[b] = max(float(np.abs(out[i:i + 1] - ref[i]).max()) for i in range(b))
        for _ in range(reps):  # round robin over the sizes, so machine load drifts onto all of them alike
            for b in sizes:
                feed = stacked(b)
                t0 = time.perf_counter()
                batched.run(None, feed)
                times[b].append((time.perf_counter() - t0) * 1000)
    rows = []
    for b in sizes:
        med = float(np.median(times[b]))
        rows.append({"batch": b, "ms_per_call_p50": round(med, 2), "ms_per_item": round(med / b, 2),
                     "items_per_s": round(1000 * b / med, 1), "reps": reps,
                     "item_bit_equal_to_batch_1": same_graph_equal[b],
                     "max_abs_diff_vs_shipped_graph": diff_vs_shipped[b]})
    return {"device": f"{'CPU' if provider.startswith('CPU') else 'GPU'} (ONNX Runtime {provider})",
            "threads": threads or "ORT default", "size": contract.input_size,
            "model": str(checkpoint) if own else repr(shipped), "rows": rows}


# ---- helpers for the HTTP phases -----------------------------------------------------------------------------
def make_plans(engine: Engine, dataset: Path | None, n: int) -> list:
    """(image bytes, clicks, expected RLE counts) per client: the RITM clicker's clicks on each image."""
    plans = []
    if dataset is not None and dataset.is_dir():
        from cfr_runtime.datasets import open_dataset

        for inst in open_dataset(dataset)[:n]:
            _, gt = inst.load()
            data = inst.image_path.read_bytes()
            plans.append((data, *click_plan(engine, data, gt, ROUND)))
    else:
        from PIL import Image

        from tests.conftest import blob_scene

        for i in range(n):
            rgb, gt = blob_scene(i, 480, 640)
            path = Path(tempfile.mkdtemp()) / "blob.png"
            Image.fromarray(rgb).save(path)
            data = path.read_bytes()
            plans.append((data, *click_plan(engine, data, gt, ROUND)))
    return plans


def single_client_overhead(plain_url: str, ray_url: str, plans: list, clicks: int) -> dict:
    """One session on each server, the same click sequence, interleaved click by click."""
    import httpx

    lat = {"plain": [], "ray": []}
    server = {"plain": [], "ray": []}
    hops = {"gateway": [], "replica": [], "app": [], "record": []}  # Ray only: the x-cfr-*-ms headers
    with httpx.Client(timeout=120) as client:
        data, plan, _ = plans[0]
        sids = {}
        for name, url in (("plain", plain_url), ("ray", ray_url)):
            r = client.post(url + "/sessions", content=data, headers={"Content-Type": "image/jpeg"})
            r.raise_for_status()
            sids[name] = r.json()["session_id"]
        for i in range(clicks):
            j = i % ROUND
            x, y, p = plan[j]
            for name, url in (("plain", plain_url), ("ray", ray_url)):
                if i and j == 0:
                    client.post(f"{url}/sessions/{sids[name]}/reset?format=rle").raise_for_status()
                t0 = time.perf_counter()
                r = client.post(f"{url}/sessions/{sids[name]}/clicks?format=rle", json={"x": x, "y": y, "positive": p})
                lat[name].append((time.perf_counter() - t0) * 1000)
                r.raise_for_status()
                server[name].append(r.json()["server_ms"])
                if name == "ray":
                    for hop in ("replica", "app", "record"):
                        hops[hop].append(float(r.headers[f"x-cfr-{hop}-ms"]))
                    if "x-cfr-gateway-ms" in r.headers:  # absent with the direct ingress
                        hops["gateway"].append(float(r.headers["x-cfr-gateway-ms"]))
    out = {name: {"click_ms": pct(lat[name]), "server_ms": pct(server[name]),
                  "outside_app_ms_p50": round(float(np.median(np.subtract(lat[name], server[name]))), 3)}
           for name in lat}

    out["routing_overhead_p50_ms"] = round(out["ray"]["click_ms"]["p50"] - out["plain"]["click_ms"]["p50"], 3)
    # the same without the forward itself, whose time differs between the processes on a contended machine
    out["routing_overhead_outside_app_p50_ms"] = round(out["ray"]["outside_app_ms_p50"]
                                                       - out["plain"]["outside_app_ms_p50"], 3)

    def med(a, b):
        return round(float(np.median(np.subtract(a, b))), 3)

    # where Ray's extra time goes, per click (p50 of the differences)
    gateway = len(hops["gateway"]) == len(lat["ray"])
    rest = np.subtract(np.subtract(hops["replica"], hops["app"]), hops["record"])
    out["ray_breakdown_p50_ms"] = {
        "client to gateway and back (Serve's HTTP proxy)": med(lat["ray"], hops["gateway"]) if gateway else None,
        "gateway to replica and back (handle, router)": med(hops["gateway"], hops["replica"]) if gateway else None,
        "client to replica and back (Serve's HTTP proxy, router)": None if gateway else med(lat["ray"],
                                                                                          hops["replica"]),
        "record store (the commit)": round(float(np.median(hops["record"])), 3),
        "rest of the replica (locks, state checks, ASGI call)": round(float(np.median(rest)), 3),
        "app around the endpoint (FastAPI, JSON; plain cfr-serve has it too)": med(hops["app"], server["ray"]),
    }
    return out


def load(url: str, plans: list, clients: int, clicks: int) -> dict:
    """`clients` annotators at once, each on its own image; every mask checked against the local Session's."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def annotator(k: int) -> None:
        data, plan, rles = plans[k % len(plans)]
        mine, bad = [], []
        try:
            with httpx.Client(base_url=url, timeout=300) as client:
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
    wall = time.perf_counter() - t0
    return {"clients": clients, "clicks_per_client": clicks, "click_ms": pct(latencies),
            "clicks_total": len(latencies), "errors": len(errors), "error_samples": errors[:5],
            "wall_s": round(wall, 2), "clicks_per_s": round(len(latencies) / wall, 2)}


def replica_infos(handle, want: int) -> list[dict]:
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 60
    while len(seen) < want and time.monotonic() < deadline:
        info = handle.info.remote("").result(timeout_s=60)
        seen[info["tag"]] = info
    return [handle.info.remote(tag + ".").result(timeout_s=60) for tag in seen]


def record_store_latency(options, calls: int) -> dict:
    """Round trip of one record store call (a version check) from this driver, on loopback like the replicas."""
    import ray

    actor = ray.get_actor(options.records_name, namespace=options.namespace)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        ray.get(actor.head.remote("no-such-session"))
        times.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()  # its capacity: the one shared component, one call per click
    ray.get([actor.head.remote("no-such-session") for _ in range(10 * calls)])
    return {**pct(times), "calls_per_s_pipelined": round(10 * calls / (time.perf_counter() - t0), 1)}


def session_memory(engine: Engine, plans: list) -> dict:
    """What one session holds on a replica (Session.nbytes) for the first image, fresh and after 10 clicks."""
    from cfr_runtime import Session

    data, plan, _ = plans[0]
    s = Session(engine)
    rgb = decode_upload(data, UploadLimits())
    s.set_image(rgb)
    fresh = s.nbytes
    for x, y, p in plan:
        s.add_click(x, y, p)
    return {"image": f"{rgb.shape[1]}x{rgb.shape[0]}", "upload_bytes": len(data), "fresh_mb": round(fresh / 2**20, 2),
            "after_10_clicks_mb": round(s.nbytes / 2**20, 2), "input_size": engine.contract.input_size}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---- main -----------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="ONNX model (default: the bundled tiny model)")
    ap.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "data" / "GrabCut",
                    help="images for the clients (default GrabCut beside the checkout; synthetic if absent)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--clicks", type=int, default=30, help="clicks per client in the load phases")
    ap.add_argument("--single-clicks", type=int, default=120, help="clicks per server in the overhead phase")
    ap.add_argument("--batch-size", type=int, default=8, help="max_batch_size when batching is on")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="batch_wait_timeout when batching is on")
    ap.add_argument("--curve-sizes", default="1,2,4,8,16")
    ap.add_argument("--curve-reps", type=int, default=8)
    ap.add_argument("--skip-curve", action="store_true")
    ap.add_argument("--curve-provider", default="CPUExecutionProvider",
                    help="ONNX Runtime provider of the batch-size curve (CUDAExecutionProvider on a GPU machine)")
    ap.add_argument("--curve-checkpoint", type=Path, default=None,
                    help="checkpoint of the curve's network (default: the bundled tiny model's); with it, the "
                         "'vs shipped graph' column compares with its own batch-1 run")
    ap.add_argument("--curve-size", type=int, default=None, help="input size S of the curve's network")
    ap.add_argument("--tag", default="cpu_tiny")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ray")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing result with this tag")
    args = ap.parse_args()

    stem = args.out / args.tag
    if stem.with_suffix(".json").exists() and not args.overwrite:
        sys.exit(f"{stem}.json exists; pick another --tag or pass --overwrite")
    cpus = os.cpu_count() or 1
    result = {"machine": f"{platform.machine()}, {cpus} cpus, {platform.system()} {platform.release()}",
              "python": platform.python_version(), "load_avg_before": loadavg(),
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    model = args.model or default_model()
    engine = Engine(model)
    result["engine"] = repr(engine)
    if not args.skip_curve:
        print("batch-size curve ...", file=sys.stderr)
        result["batch_curve"] = batch_curve([int(s) for s in args.curve_sizes.split(",")], args.curve_reps, None,
                                            args.curve_provider, args.curve_checkpoint, args.curve_size)
    plans = make_plans(engine, args.dataset, args.clients)
    result["session_memory"] = session_memory(engine, plans)

    import ray
    from ray import serve

    from cfr_runtime.serve.cluster import APP_NAME, ClusterOptions, build_app, config_from
    from tests.ray_util import LocalRayCluster

    result["versions"] = {"ray": ray.__version__, "onnxruntime": __import__("onnxruntime").__version__}
    config = config_from(idle_timeout=600)
    batch_on = dict(max_batch_size=args.batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000)
    # the same two cores in every case: 1 replica with ONNX Runtime's default threads, 2 replicas with one each
    half = max(1, cpus // 2)
    setups = [("1 replica", dict(replicas=1, threads=None)),
              ("1 replica, batching", dict(replicas=1, threads=None, **batch_on)),
              ("2 replicas", dict(replicas=2, threads=half)),
              ("2 replicas, batching", dict(replicas=2, threads=half, **batch_on)),
              ("1 replica, direct ingress", dict(replicas=1, threads=None, ingress="direct")),
              ("2 replicas, direct ingress", dict(replicas=2, threads=half, ingress="direct"))]
    cluster = LocalRayCluster(cpus_per_node=cpus).start()
    plain = None
    try:
        cluster.connect(namespace=ClusterOptions().namespace)
        serve.start(http_options={"host": "127.0.0.1", "port": cluster.http_port}, proxy_location="HeadOnly")
        ray_url = f"http://127.0.0.1:{cluster.http_port}"
        plain = Server(model, 600, None)
        runs = []
        for i, (name, kw) in enumerate(setups):
            print(f"{name} ...", file=sys.stderr)
            options = ClusterOptions(replica_cpus=cpus / kw["replicas"] / 2, sync_interval_s=5.0,
                                     max_replicas_per_node=1, **kw)
            serve.run(build_app(model, config, options), name=APP_NAME, route_prefix="/")
            handle = serve.get_deployment_handle("sessions", APP_NAME)
            load(ray_url, plans, args.clients, 2)  # warm-up: every replica's arenas and thread pools
            if i == 0:
                result["record_store_call_ms"] = record_store_latency(options, 200)
                load(plain.url, plans, args.clients, 2)
                result["overhead"] = single_client_overhead(plain.url, ray_url, plans, args.single_clicks)
                print("plain cfr-serve load ...", file=sys.stderr)
                result["plain_load"] = load(plain.url, plans, args.clients, args.clicks)
                # the same server with one thread per forward (two forwards at once, its default): what the
                # 2-replica setups do with their cores, on one process
                plain1 = Server(model, 600, 1)
                try:
                    load(plain1.url, plans, args.clients, 2)
                    result["plain_load_1_thread"] = load(plain1.url, plans, args.clients, args.clicks)
                finally:
                    plain1.stop()
            if name == "1 replica, direct ingress":
                result["overhead_direct"] = single_client_overhead(plain.url, ray_url, plans, args.single_clicks)
            run = {"setup": name, "options": {k: v for k, v in kw.items()}, **load(ray_url, plans, args.clients,
                                                                                 args.clicks)}
            infos = replica_infos(handle, kw["replicas"])
            run["replicas"] = [{"tag": x["tag"], "node": x["node_id"][:8], **x["counters"]} for x in infos]
            batches = sum(x["counters"].get("batches", 0) for x in infos)
            if batches:
                run["mean_batch"] = round(sum(x["counters"]["batched_forwards"] for x in infos) / batches, 2)
            runs.append(run)
        result["ray_load"] = runs
    finally:
        if plain is not None:
            plain.stop()
        try:
            serve.shutdown()
            ray.shutdown()
        finally:
            cluster.stop()
    result["load_avg_after"] = loadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {stem}.json and {stem.name}.md")
    bad = (result["plain_load"]["errors"] + result["plain_load_1_thread"]["errors"]
           + sum(r["errors"] for r in result["ray_load"]))
    sys.exit(1 if bad else 0)


def markdown(r: dict) -> str:
    lines = [f"# cfr-serve on Ray Serve vs plain cfr-serve: {r['engine']}", "",
             f"Machine: {r['machine']}; load average before {r['load_avg_before']}, after {r['load_avg_after']}; "
             f"Ray {r['versions']['ray']}, ONNX Runtime {r['versions']['onnxruntime']}.", "", f"`{r['command']}`", ""]
    for key, title in (("overhead", "gateway (default)"), ("overhead_direct", "direct ingress")):
        if key not in r:
            continue
        o = r[key]
        lines += [f"## Routing overhead per click, {title} (1 client, clicks interleaved with plain cfr-serve)", "",
                  "| server | click p50 | click p99 | server_ms p50 | outside the app p50 | clicks |",
                  "|---|---|---|---|---|---|"]
        for name, label in (("plain", "plain cfr-serve"), ("ray", f"Ray Serve, 1 replica, {title}")):
            x = o[name]
            lines.append(f"| {label} | {x['click_ms']['p50']:.2f} ms | {x['click_ms']['p99']:.2f} ms | "
                         f"{x['server_ms']['p50']:.2f} ms | {x['outside_app_ms_p50']:.2f} ms | {x['click_ms']['n']} |")
        parts = "; ".join(f"{k}: {v:.2f} ms" for k, v in o["ray_breakdown_p50_ms"].items() if v is not None)
        lines += ["", f"Ray's routing overhead per click at p50 (target <= 5 ms): **"
                      f"{o['routing_overhead_outside_app_p50_ms']:+.2f} ms** outside the app (client latency minus "
                      f"the app's server_ms, Ray minus plain); {o['routing_overhead_p50_ms']:+.2f} ms in raw click "
                      f"latency, which also carries the difference in forward time between the two processes. "
                      f"Where Ray's time goes (p50 per click): {parts}.", ""]
    if "record_store_call_ms" in r:
        rs = r["record_store_call_ms"]
        lines += [f"One record store call (a version check, driver to actor on loopback): p50 {rs['p50']:.2f} ms, "
                  f"p99 {rs['p99']:.2f} ms ({rs['n']} calls); {rs['calls_per_s_pipelined']} calls/s when "
                  "pipelined. A click makes one call (the commit), so this bounds the clicks/s of the whole "
                  "cluster.", ""]
    p = r["plain_load"]
    lines += [f"## {p['clients']} clients x {p['clicks_per_client']} clicks (masks checked against a local Session)",
              "", "| server | clicks/s | p50 | p99 | errors | mean batch | replicas (node: rebuilds) |",
              "|---|---|---|---|---|---|---|",
              f"| plain cfr-serve | {p['clicks_per_s']} | {p['click_ms']['p50']:.1f} ms | "
              f"{p['click_ms']['p99']:.1f} ms | {p['errors']} | - | - |"]
    if "plain_load_1_thread" in r:
        p1 = r["plain_load_1_thread"]
        lines.append(f"| plain cfr-serve, --threads 1 | {p1['clicks_per_s']} | {p1['click_ms']['p50']:.1f} ms | "
                     f"{p1['click_ms']['p99']:.1f} ms | {p1['errors']} | - | - |")
    for run in r["ray_load"]:
        reps = ", ".join(f"{x['node']}: {x['rebuilds']}" for x in run["replicas"])
        lines.append(f"| Ray, {run['setup']} | {run['clicks_per_s']} | {run['click_ms']['p50']:.1f} ms | "
                     f"{run['click_ms']['p99']:.1f} ms | {run['errors']} | {run.get('mean_batch', '-')} | {reps} |")
    if "batch_curve" in r:
        c = r["batch_curve"]
        lines += ["", f"## Engine batch-size curve ({c.get('device', '')}; bench-local batch-axis export)", ""]
        if "skipped" in c:
            lines.append(f"skipped: {c['skipped']}")
        else:
            lines += ["| batch | ms per call | ms per item | items/s | item == batch-1 item (bitwise) | "
                      "max abs diff vs shipped graph |", "|---|---|---|---|---|---|"]
            for row in c["rows"]:
                lines.append(f"| {row['batch']} | {row['ms_per_call_p50']} | {row['ms_per_item']} | "
                             f"{row['items_per_s']} | {row['item_bit_equal_to_batch_1']} | "
                             f"{row['max_abs_diff_vs_shipped_graph']:.1e} |")
    m = r["session_memory"]
    lines += ["", "## One session on a replica", "",
              f"{m['image']} image ({m['upload_bytes']} bytes uploaded, kept in the record store), S = "
              f"{m['input_size']}: {m['fresh_mb']} MB fresh, {m['after_10_clicks_mb']} MB after 10 clicks.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
