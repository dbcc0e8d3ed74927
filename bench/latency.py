"""Per-click latency of the runtime vs the official-style torch loop, for StdInfer / CFR-1 / CFR-4 / A-CFR-4.

    python bench/latency.py                       # bundled default model, CPU
    python bench/latency.py --checkpoint M.pth --dataset ../shared/data/GrabCut --images 5
    python bench/latency.py --arch vit_base --images 1 --clicks 3   # random-init ViT-B at 448
    python bench/latency.py --graph square,full --no-reference      # both exported contracts, same clicks

Per click it also reports the host's share: the click's time minus the time inside engine calls (ONNX
Runtime's run), i.e. what the Session itself costs (zoom-in, resampling, pasting, A-CFR counting).

Clicks come from the RITM clicker on real images (or synthetic scenes), so every backend sees the same
click sequence. Prints a table and writes JSON + Markdown under bench/results/ (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {"StdInfer": dict(cfr=0), "CFR-1": dict(cfr=1), "CFR-4": dict(cfr=4), "A-CFR-4": dict(cfr=4, adaptive=True)}


def pct(values: list[float]) -> dict:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "n": 0}
    a = np.asarray(values) * 1000
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "n": len(values)}


def workload(dataset: Path | None, images: int, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    if dataset is not None:
        from cfr_runtime.datasets import iter_loaded, open_dataset

        return [(inst.id, img, gt) for inst, img, gt in iter_loaded(open_dataset(dataset)[:images])]
    from trainer.data.synthetic import synthetic_scene

    rng = np.random.default_rng(seed)
    out = []
    for i in range(images):
        img, masks = synthetic_scene(rng, 320, 480)
        out.append((f"synthetic{i}", img, masks[0].astype(np.int32)))
    return out


def click_trace(gt: np.ndarray, session, n: int) -> list[tuple[int, int, bool]]:
    """The clicks the RITM clicker makes against this session's own predictions."""
    from cfr_runtime.clicker import Clicker

    clicker, pred, trace = Clicker(gt), np.zeros(gt.shape, bool), []
    for _ in range(n):
        y, x, p = clicker.next_click(pred)
        pred = session.add_click(x, y, p)
        trace.append((y, x, p))
    return trace


def instrument(session) -> list[float] | None:
    """Accumulate the seconds spent inside engine calls of a runtime Session (None for other predictors).

    The square runner's `run` is the engine call; a full-graph runner's `_execute` is (its `run` also
    uploads the small tables and reads back four numbers, which count as host work)."""
    runner = getattr(session, "_runner", None)
    if runner is None:
        return None
    spent = [0.0]
    name = "_execute" if hasattr(runner, "_execute") else "run"
    call = getattr(runner, name)

    def timed(*args):
        t = time.perf_counter()
        try:
            return call(*args)
        finally:
            spent[0] += time.perf_counter() - t

    setattr(runner, name, timed)
    return spent


def time_sessions(makers: dict, work, traces, sync=lambda: None) -> dict:
    """Per-click timings of several backends, interleaved click by click so that machine noise hits
    them alike (the ratios are what is compared)."""
    times = {name: {"first": [], "later": [], "fwd": [], "host": [], "click_sum": 0.0, "host_sum": 0.0}
             for name in makers}
    for make in makers.values():  # untimed warm-up: first-call allocations and lazy initialisation
        s = make()
        s.set_image(work[0][1])
        for y, x, p in traces[0][:2]:
            s.add_click(x, y, p)
    for (_, img, _), trace in zip(work, traces):
        sessions = {name: make() for name, make in makers.items()}
        spent = {name: instrument(s) for name, s in sessions.items()}
        for s in sessions.values():
            s.set_image(img)
        for k, (y, x, p) in enumerate(trace):
            for name, s in sessions.items():
                sync()
                engine_before = spent[name][0] if spent[name] else 0.0
                t = time.perf_counter()
                s.add_click(x, y, p)
                sync()
                dt = time.perf_counter() - t
                times[name]["first" if k == 0 else "later"].append(dt)
                times[name]["fwd"].append(dt / s.forwards[-1])
                if spent[name] is not None:
                    host = dt - (spent[name][0] - engine_before)
                    times[name]["host"].append(host)
                    times[name]["click_sum"] += dt
                    times[name]["host_sum"] += host
    out = {}
    for name, t in times.items():
        out[name] = {"first_click_ms": pct(t["first"]), "later_click_ms": pct(t["later"]),
                     "per_forward_ms": pct(t["fwd"])}
        if t["host"]:
            out[name]["host_ms"] = pct(t["host"])
            out[name]["host_share"] = t["host_sum"] / t["click_sum"]
    return out


def bare_forward_ms(engine, repeats: int = 10, image: np.ndarray | None = None) -> float:
    """One engine call without the Session; a full-graph engine runs on `image` with a whole-image ROI."""
    runner = engine.new_runner()
    if engine.contract.full:
        runner.set_image(image)
        runner.set_roi((0, image.shape[0] - 1, 0, image.shape[1] - 1))
    runner.run()
    t = time.perf_counter()
    for _ in range(repeats):
        runner.run()
    return (time.perf_counter() - t) / repeats * 1000


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="official or cfr-train checkpoint")
    ap.add_argument("--arch", default=None, help="benchmark a random-init named arch instead (e.g. vit_base)")
    ap.add_argument("--size", type=int, default=None,
                    help="input size (default: the checkpoint's own; 448 with --arch)")
    ap.add_argument("--dataset", type=Path, default=None, help="images + clicks from this dataset")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--clicks", type=int, default=8)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-reference", action="store_true", help="skip the torch reference loop")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--graph", default="square",
                    help="exported contracts to compare: square, full or square,full (engines 'ort', 'ort-full')")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--stem", default=None, help="result file name stem (default: from device, arch, size)")
    args = ap.parse_args(argv)

    import torch

    from cfr_runtime import Engine, Session
    from export.onnx_export import export_onnx
    from export.reference_loop import ReferencePredictor
    from trainer.checkpoint import load_model, save_checkpoint
    from trainer.models import arch_config, build_model

    tmp = Path(tempfile.mkdtemp(prefix="cfr-bench-"))
    if args.arch:
        torch.manual_seed(0)
        params = arch_config(args.arch)
        ckpt = save_checkpoint(tmp / f"{args.arch}.pth", build_model(params), params)
    else:
        from trainer.default_model import default_checkpoint

        ckpt = args.checkpoint or default_checkpoint()
    if args.size is None:
        from trainer.checkpoint import read_checkpoint

        args.size = 448 if args.arch else read_checkpoint(ckpt)[0]["backbone_params"]["img_size"][0]
    graphs = args.graph.split(",")
    if not set(graphs) <= {"square", "full"} or not graphs:
        ap.error("--graph takes square, full or square,full")
    onnx_path, contract, _ = export_onnx(ckpt, tmp, size=args.size)
    engines = {}
    if "square" in graphs:
        engines["ort"] = Engine(onnx_path, threads=args.threads)
    if "full" in graphs:
        full_path, _, _ = export_onnx(ckpt, tmp, size=args.size, graph="full")
        engines["ort-full"] = Engine(full_path, threads=args.threads)
    model, info = load_model(ckpt, input_size=args.size)
    if args.device == "cuda":
        from bench.gpu_backends import cuda_engines

        engines.update(cuda_engines(ckpt, onnx_path, args.size))
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    work = workload(args.dataset, args.images)
    # one click trace per image, from the ORT StdInfer session, shared by every backend and mode
    traces = []
    for _, img, gt in work:
        s = Session(next(iter(engines.values())))
        s.set_image(img)
        traces.append(click_trace(gt, s, args.clicks))

    rows = []
    ref_name = f"torch-loop-{args.device}"
    for mode in args.modes.split(","):
        kw = MODES[mode]
        makers = {name: (lambda e=engine, kw=kw: Session(e, **kw)) for name, engine in engines.items()}
        if not args.no_reference:
            makers[ref_name] = lambda kw=kw: ReferencePredictor(model, size=args.size, device=args.device, **kw)
        for name, res in time_sessions(makers, work, traces, sync).items():
            desc = repr(engines[name]) if name in engines else "official-style eager loop"
            rows.append({"backend": name, "engine": desc, "mode": mode, **res})
    bare = {name: bare_forward_ms(e, image=work[0][1]) for name, e in engines.items()}
    for r in rows:
        if r["backend"] in bare:
            r["overhead"] = r["per_forward_ms"]["p50"] / bare[r["backend"]]
    for r in rows:
        base = next((b for b in rows if b["backend"] == ref_name and b["mode"] == r["mode"]), None)
        if base is not None and r is not base:
            r["speedup_vs_torch_loop"] = {
                k: base[k]["p50"] / r[k]["p50"] for k in ("first_click_ms", "later_click_ms")}

    meta = {"checkpoint": str(ckpt), "arch": info["arch"], "size": args.size, "flip": contract.flip,
            "device": args.device, "device_name": device_name(args.device), "images": len(work),
            "clicks": args.clicks, "dataset": str(args.dataset) if args.dataset else "synthetic",
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort_version(),
            "bare_forward_ms": bare}
    table = render(rows, meta)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or f"latency_{args.device}_{info['arch']}_{args.size}"
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / f"{stem}.md").write_text(table + "\n")
    print(f"wrote {args.out / stem}.json and .md")
    return {"meta": meta, "rows": rows}


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU"


def render(rows: list[dict], meta: dict) -> str:
    lines = [f"# Per-click latency: {meta['arch']} at {meta['size']} (flip={meta['flip']}), {meta['device_name']}",
             f"{meta['images']} images x {meta['clicks']} clicks ({meta['dataset']}); times in ms; "
             f"bare forward p50: " + ", ".join(f"{k} {v:.1f}" for k, v in meta["bare_forward_ms"].items()), "",
             "| backend | mode | first p50 | first p90 | first p99 | later p50 | later p90 | later p99 "
             "| per-fwd p50 | host p50 | host share | vs torch loop (first / later) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, la, pf = r["first_click_ms"], r["later_click_ms"], r["per_forward_ms"]
        sp = r.get("speedup_vs_torch_loop")
        ratio = f"{sp['first_click_ms']:.2f}x / {sp['later_click_ms']:.2f}x" if sp else "-"
        host = f"{r['host_ms']['p50']:.1f} | {100 * r['host_share']:.1f}%" if "host_ms" in r else "- | -"
        lines.append(f"| {r['backend']} | {r['mode']} | {f['p50']:.1f} | {f['p90']:.1f} | {f['p99']:.1f} | "
                     f"{la['p50']:.1f} | {la['p90']:.1f} | {la['p99']:.1f} | {pf['p50']:.1f} | {host} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
