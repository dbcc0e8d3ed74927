"""Per-click latency of the runtime vs the official-style torch loop, for StdInfer / CFR-1 / CFR-4 / A-CFR-4.

    python bench/latency.py                       # bundled default model, CPU
    python bench/latency.py --checkpoint M.pth --dataset ../shared/data/GrabCut --images 5
    python bench/latency.py --arch vit_base --images 1 --clicks 3   # random-init ViT-B at 448
    python bench/latency.py --graph square,full --no-reference      # both exported contracts, same clicks

Per click it also reports the host's share: the click's time minus the time inside engine calls (ONNX
Runtime's run), i.e. what the Session itself costs (zoom-in, resampling, pasting, A-CFR counting).

Clicks come from the RITM clicker on real images (or synthetic scenes), so every backend sees the same
click sequence. Prints a table and writes JSON + Markdown under out/bench/ (or --out; the committed results
in bench/results/ are rewritten only with an explicit --out bench/results). p99 is reported from 100 samples up.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_backends import CUDA_ENGINES, available, cuda_engine, forward_flops, matrix_rate_tflops  # noqa: E402

MODES = {"StdInfer": dict(cfr=0), "CFR-1": dict(cfr=1), "CFR-4": dict(cfr=4), "A-CFR-4": dict(cfr=4, adaptive=True)}


MIN_SAMPLES_P99 = 100  # below this a "p99" is just the maximum of a handful of samples


def pct(values: list[float]) -> dict:
    """p50/p90 in ms, and p99 only with enough samples to mean something (None otherwise)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "n": 0}
    a = np.asarray(values) * 1000
    p99 = float(np.percentile(a, 99)) if len(values) >= MIN_SAMPLES_P99 else None
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": p99, "n": len(values)}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}" if v < 10 else f"{v:.1f}"


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
    uploads the small tables and reads back four numbers, which count as host work). Engines lend their
    runners to the next Session, so the untimed method is kept once and wrapped afresh, never twice."""
    runner = getattr(session, "_runner", None)
    if runner is None:
        return None
    spent = [0.0]
    name = "_execute" if hasattr(runner, "_execute") else "run"
    call = runner.__dict__.setdefault("_untimed", {}).setdefault(name, getattr(runner, name))

    def timed(*args):
        t = time.perf_counter()
        try:
            return call(*args)
        finally:
            spent[0] += time.perf_counter() - t

    setattr(runner, name, timed)
    return spent


def time_sessions(makers: dict, work, traces, sync=lambda: None, reference: str | None = None) -> dict:
    """Per-click timings of several backends, interleaved click by click so that machine noise hits
    them alike (the ratios are what is compared): click time, the host's share of it (click time minus
    the engine calls), and with `reference` the share of mask pixels each backend agrees on with it."""
    times = {name: {"first": [], "later": [], "fwd": [], "host": [], "click_sum": 0.0, "host_sum": 0.0}
             for name in makers}
    agree = {name: [0, 0] for name in makers}
    for make in makers.values():  # untimed warm-up: first-call allocations, lazy initialisation, compilation
        s = make()
        s.set_image(work[0][1])
        for y, x, p in traces[0][:2]:
            s.add_click(x, y, p)
        del s
    for (_, img, _), trace in zip(work, traces):
        sessions = {name: make() for name, make in makers.items()}
        spent = {name: instrument(s) for name, s in sessions.items()}
        for s in sessions.values():
            s.set_image(img)
        for k, (y, x, p) in enumerate(trace):
            masks = {}
            for name, s in sessions.items():
                sync()
                engine_before = spent[name][0] if spent[name] else 0.0
                t = time.perf_counter()
                masks[name] = s.add_click(x, y, p)
                sync()
                dt = time.perf_counter() - t
                t_ = times[name]
                t_["first" if k == 0 else "later"].append(dt)
                t_["fwd"].append(dt / s.forwards[-1])
                if spent[name] is not None:
                    host = dt - (spent[name][0] - engine_before)
                    t_["host"].append(host)
                    t_["click_sum"] += dt
                    t_["host_sum"] += host
            if reference in masks:
                for name, m in masks.items():
                    agree[name][0] += int(np.count_nonzero(m == masks[reference]))
                    agree[name][1] += m.size
        del sessions
    out = {}
    for name, t in times.items():
        row = {"first_click_ms": pct(t["first"]), "later_click_ms": pct(t["later"]),
               "per_forward_ms": pct(t["fwd"])}
        if t["host"]:
            row["host_ms"] = pct(t["host"])
            row["host_share"] = t["host_sum"] / t["click_sum"]
        if reference in makers:
            row["mask_agreement_vs_" + reference] = agree[name][0] / max(1, agree[name][1])
        out[name] = row
    return out


def bare_forward_ms(engine, repeats: int = 10, image: np.ndarray | None = None) -> float:
    """Median time of one engine call without the Session (synchronised); a full-graph engine runs on
    `image` with a whole-image ROI."""
    runner = engine.new_runner()
    if engine.contract.full:
        runner.set_image(image)
        runner.set_roi((0, image.shape[0] - 1, 0, image.shape[1] - 1))
    runner.run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        runner.run()
        times.append(time.perf_counter() - t)
    engine.release_runner(runner)
    return float(np.median(times) * 1000)


def build_parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--engines", default=None,
                    help="comma list; cpu: ort; cuda: any of " + ", ".join(CUDA_ENGINES) + " (and ort) "
                         "(default: ort on cpu, every cuda engine that can run on cuda)")
    ap.add_argument("--no-reference", action="store_true", help="skip the torch reference loop")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--graph", default="square",
                    help="exported contracts to compare on cpu: square, full or square,full (engines 'ort', "
                         "'ort-full')")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench",
                    help="where JSON + Markdown go (default out/bench; pass bench/results to update the committed "
                         "results on purpose)")
    ap.add_argument("--stem", default=None, help="result file name stem (default: from device, arch, size)")
    return ap


def main(argv: list[str] | None = None) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        ap.error(f"--modes: unknown mode(s) {unknown}; choose from {','.join(MODES)}")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA GPU on this machine (CPU-only torch build or no driver); "
                 "use --device cpu")

    from cfr_runtime import Engine, Session
    from export.onnx_export import export_onnx
    from export.reference_loop import ReferencePredictor
    from trainer.checkpoint import load_model, save_checkpoint
    from trainer.models import arch_config, build_model

    tmp = Path(tempfile.mkdtemp(prefix="cfr-bench-"))
    if args.arch:
        torch.manual_seed(0)
        params = arch_config(args.arch)
        base = build_model(params).eval()
        info = {"arch": args.arch, "params": params}
        ckpt = None
        args.size = args.size or 448
        if args.size != 448:
            from trainer.checkpoint import set_input_size

            set_input_size(base, args.size)
    else:
        from trainer.default_model import default_checkpoint

        ckpt = args.checkpoint or default_checkpoint()
        if args.size is None:
            from trainer.checkpoint import read_checkpoint

            args.size = read_checkpoint(ckpt)[0]["backbone_params"]["img_size"][0]
        base, info = load_model(ckpt, input_size=args.size)
    graphs = args.graph.split(",")
    if not graphs or not set(graphs) <= {"square", "full"}:
        ap.error("--graph takes square, full or square,full")

    def fresh_model():
        return copy.deepcopy(base)

    exported: dict[tuple[bool, str], Path] = {}

    def onnx_for(fp16: bool, graph: str = "square") -> Path:
        nonlocal ckpt
        if (fp16, graph) not in exported:
            if ckpt is None:
                ckpt = save_checkpoint(tmp / f"{args.arch}.pth", base, info["params"])
            exported[fp16, graph] = export_onnx(ckpt, tmp, size=args.size, fp16=fp16, graph=graph)[0]
        return exported[fp16, graph]

    if args.engines:
        kinds = args.engines.split(",")
    elif args.device == "cpu":
        kinds = [{"square": "ort", "full": "ort-full"}[g] for g in graphs]
    else:
        kinds = [k for k in CUDA_ENGINES if available(k) is None]
    engines, skipped = {}, {}
    for kind in kinds:
        if kind in ("ort", "ort-full"):
            engines[kind] = Engine(onnx_for(False, "full" if kind == "ort-full" else "square"), threads=args.threads)
            continue
        if args.device != "cuda":
            raise SystemExit(f"engine {kind} needs --device cuda")
        why = available(kind)
        if why:
            skipped[kind] = why
            continue
        t = time.perf_counter()
        engines[kind] = cuda_engine(kind, fresh_model, args.size, onnx_for)
        print(f"{kind}: ready in {time.perf_counter() - t:.1f} s ({engines[kind].description})", flush=True)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    ref_model = fresh_model().to(args.device) if not args.no_reference else None
    work = workload(args.dataset, args.images)
    # one click trace per image from the first engine's StdInfer session, shared by every backend and mode
    traces = []
    first = next(iter(engines.values()))
    for _, img, gt in work:
        s = Session(first)
        s.set_image(img)
        traces.append(click_trace(gt, s, args.clicks))
        del s

    rows = []
    ref_name = f"torch-loop-{args.device}"
    for mode in args.modes.split(","):
        kw = MODES[mode]
        makers = {name: (lambda e=engine, kw=kw: Session(e, **kw)) for name, engine in engines.items()}
        if ref_model is not None:
            makers[ref_name] = lambda kw=kw: ReferencePredictor(ref_model, size=args.size, device=args.device, **kw)
        results = time_sessions(makers, work, traces, sync, ref_name if ref_model is not None else None)
        for name, res in results.items():
            desc = repr(engines[name]) if name in engines else "official-style eager fp32 loop"
            rows.append({"backend": name, "engine": desc, "mode": mode, **res})
    bare = {name: bare_forward_ms(e, 50 if args.device == "cuda" else 10, image=work[0][1])
            for name, e in engines.items()}
    flops = forward_flops(base, args.size)
    for r in rows:
        if r["backend"] in bare:
            r["overhead"] = r["per_forward_ms"]["p50"] / bare[r["backend"]]
            r["tflops_per_s"] = flops / (bare[r["backend"]] / 1000) / 1e12
    for r in rows:
        base_row = next((b for b in rows if b["backend"] == ref_name and b["mode"] == r["mode"]), None)
        if base_row is not None and r is not base_row:
            r["speedup_vs_torch_loop"] = {
                k: base_row[k]["p50"] / r[k]["p50"] for k in ("first_click_ms", "later_click_ms")}

    meta = {"checkpoint": str(ckpt) if ckpt else f"random-init {args.arch}", "arch": info["arch"],
            "size": args.size, "flip": True, "device": args.device, "device_name": device_name(args.device),
            "images": len(work), "clicks": args.clicks, "dataset": str(args.dataset) if args.dataset else "synthetic",
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort_version(),
            "bare_forward_ms": bare, "forward_gflop": flops / 1e9, "skipped_engines": skipped}
    if args.device == "cuda":
        meta["matrix_rate_tflops"] = {d: matrix_rate_tflops(d) for d in ("bf16", "fp16")}
        meta["cuda"] = torch.version.cuda
        meta["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
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
    rate = meta.get("matrix_rate_tflops")
    lines = [f"# Per-click latency: {meta['arch']} at {meta['size']} (flip={meta['flip']}), {meta['device_name']}",
             f"{meta['images']} images x {meta['clicks']} clicks ({meta['dataset']}); times in ms; "
             f"one forward = {meta['forward_gflop']:.0f} GFLOP; bare forward p50: "
             + ", ".join(f"{k} {v:.2f}" for k, v in meta["bare_forward_ms"].items())]
    if rate:
        lines.append(f"measured matrix rate of this card (8192^3 products): bf16 {rate['bf16']:.0f}, "
                     f"fp16 {rate['fp16']:.0f} TFLOP/s")
    if meta.get("skipped_engines"):
        lines.append("not run: " + "; ".join(f"{k} ({v})" for k, v in meta["skipped_engines"].items()))
    lines += ["", "| backend | mode | first p50 | first p90 | first p99 | later p50 | later p90 | later p99 "
              "| per-fwd p50 | host p50 | host share | TFLOP/s | mask agree | vs torch loop (first / later) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, la, pf = r["first_click_ms"], r["later_click_ms"], r["per_forward_ms"]
        sp = r.get("speedup_vs_torch_loop")
        ratio = f"{sp['first_click_ms']:.2f}x / {sp['later_click_ms']:.2f}x" if sp else "-"
        host = [_ms(r["host_ms"]["p50"]), f"{100 * r['host_share']:.1f}%"] if "host_ms" in r else ["-", "-"]
        tf = f"{r['tflops_per_s']:.3g}" if "tflops_per_s" in r else "-"
        agree = next((v for k, v in r.items() if k.startswith("mask_agreement")), None)
        ag = f"{100 * agree:.3f}%" if agree is not None else "-"
        cells = [_ms(f["p50"]), _ms(f["p90"]), _ms(f["p99"]), _ms(la["p50"]), _ms(la["p90"]), _ms(la["p99"]),
                 _ms(pf["p50"]), *host, tf, ag]
        lines.append(f"| {r['backend']} | {r['mode']} | {' | '.join(cells)} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
