"""Per-click latency of the runtime vs the official-style torch loop, for StdInfer / CFR-1 / CFR-4 / A-CFR-4.

    python bench/latency.py                       # shipped default checkpoint, 3 GrabCut images, CPU
    python bench/latency.py M.pth --dataset ../shared/data/GrabCut --limit 5
    python bench/latency.py --arch vit_base --limit 1 --clicks 3   # random-init ViT-B at 448
    python bench/latency.py --graph square,full --no-reference     # both exported contracts, same clicks

Per click it also reports the host's share: the click's time minus the time inside engine calls (ONNX
Runtime's run), i.e. what the Session itself costs (zoom-in, resampling, pasting, A-CFR counting).

Clicks come from the RITM clicker on real images (or synthetic scenes), so every backend sees the same
click sequence. Prints progress, a table with the machine and its load average, and writes JSON + Markdown
under out/bench/ (or --out); existing files are never replaced without --overwrite, so the committed results
in bench/results/ change only on purpose. p99 is reported from 100 samples up.
"""

from __future__ import annotations

import copy
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_backends import CUDA_ENGINES, available, cuda_engine, forward_flops, matrix_rate_tflops  # noqa: E402
from bench.machine import describe, machine, write_results  # noqa: E402
from cfr_runtime.cli_options import (  # noqa: E402
    checkpoint_argument,
    command,
    dataset_option,
    limit_option,
    merge_alias,
    mode_option,
    option,
    out_option,
    overwrite_option,
    refuse_existing,
    threads_option,
)
from cfr_runtime.modes import Mode  # noqa: E402

MODES = ("StdInfer", "CFR-1", "CFR-4", "A-CFR-4")  # the default set; any name of cfr_runtime.modes runs


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


DEFAULT_DATASET = ROOT.parent / "shared" / "data" / "GrabCut"


@command("latency.py")
@checkpoint_argument(required=False, old=["--checkpoint"])
@option("--arch", default=None, help="Benchmark a random-init named architecture instead (e.g. vit_base; 448 px).")
@option("--size", type=click.IntRange(16, 4096), default=None,
        help="Input size [default: the checkpoint's own; 448 with --arch].")
@dataset_option(default=DEFAULT_DATASET if DEFAULT_DATASET.is_dir() else None,
                help="Images (and the clicker's ground truth) from this dataset, or 'synthetic' for generated "
                     "scenes [default: ../shared/data/GrabCut when present, else synthetic].")
@limit_option(old=["--images"], default=3, help="Images of the dataset to time.")
@option("--clicks", type=click.IntRange(min=1), default=8, show_default=True,
        help="Clicks per image (the RITM clicker's, the same sequence for every backend).")
@mode_option(many=True, default=",".join(MODES), old=["--modes"])
@option("--device", default="cpu", type=click.Choice(["cpu", "cuda"]), show_default=True,
        help="Where the engines and the torch loop run.")
@option("--engines", default=None, metavar="LIST",
        help="Comma list; cpu: ort (and ort-full); cuda: any of " + ", ".join(CUDA_ENGINES) + " and ort "
             "[default: ort on cpu (per --graph), every cuda engine that can run on cuda].")
@option("--no-reference", is_flag=True, help="Skip the official-style torch reference loop.")
@threads_option()
@option("--graph", default="square", show_default=True,
        help="Exported contracts to compare on cpu: square, full or square,full (engines 'ort', 'ort-full').")
@out_option(default=ROOT / "out" / "bench", shown="out/bench",
            help="Folder for the JSON + Markdown (pass bench/results to update the committed results on purpose).")
@option("--stem", default=None, help="Result file name stem [default: latency_<device>_<arch>_<size>].")
@overwrite_option("result files of the same stem in --out")
def cli(checkpoint, checkpoint_alias, arch, size, dataset, limit, clicks, mode, device, engines, no_reference,
        threads, graph, out, stem, overwrite) -> dict:
    """Per-click latency of the runtime against the official-style torch loop (StdInfer, CFR-n, A-CFR-n) for
    CHECKPOINT (default: the shipped trainer/assets/default.pth), exported and timed click by click; see the
    module docstring of bench/latency.py."""
    if dataset is not None and str(dataset) == "synthetic":
        dataset = None
    args = SimpleNamespace(checkpoint=merge_alias(checkpoint, checkpoint_alias, "CHECKPOINT"), arch=arch, size=size,
                           dataset=dataset, images=limit, clicks=clicks, modes=",".join(map(str, mode)),
                           device=device, engines=engines, no_reference=no_reference, threads=threads, graph=graph,
                           out=out, stem=stem, overwrite=overwrite)
    return run(args)


def main(argv: list[str] | None = None) -> dict:
    """Run as from the command line (errors print `latency.py: error: ...` and exit 2); returns the results."""
    return cli.main(argv, standalone_mode=False)


def run(args) -> dict:
    graphs = args.graph.split(",")
    if not graphs or not set(graphs) <= {"square", "full"}:
        raise click.BadParameter("takes square, full or square,full", param_hint="--graph")
    started = machine()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: torch sees no CUDA GPU on this machine (CPU-only torch build or no "
                               "driver); use --device cpu")

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
    stem = args.stem or f"latency_{args.device}_{info['arch']}_{args.size}"
    if not args.overwrite:  # refused before minutes of work, not after
        refuse_existing([args.out / f"{stem}.json", args.out / f"{stem}.md"],
                        "pass --overwrite to replace it, or choose another --out or --stem")
    flops = forward_flops(base, args.size)
    where = args.dataset or "synthetic scenes (no --dataset)"
    print(f"latency: {info['arch']} at {args.size} px ({flops / 1e9:.3g} GFLOP per forward with flip) on "
          f"{args.device}; {args.images} images from {where} x {args.clicks} clicks; modes {args.modes}; "
          f"{describe(started)}", file=sys.stderr, flush=True)

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
        print(f"latency: preparing engine {kind} (export + load)", file=sys.stderr, flush=True)
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
        kw = Mode.parse(mode).session_kwargs()
        t_mode = time.perf_counter()
        print(f"latency: timing {mode} ({len(work)} images x {args.clicks} clicks, "
              f"{len(engines) + (ref_model is not None)} backends interleaved)", file=sys.stderr, flush=True)
        makers = {name: (lambda e=engine, kw=kw: Session(e, **kw)) for name, engine in engines.items()}
        if ref_model is not None:
            makers[ref_name] = lambda kw=kw: ReferencePredictor(ref_model, size=args.size, device=args.device, **kw)
        results = time_sessions(makers, work, traces, sync, ref_name if ref_model is not None else None)
        for name, res in results.items():
            desc = repr(engines[name]) if name in engines else "official-style eager fp32 loop"
            rows.append({"backend": name, "engine": desc, "mode": mode, **res})
        print(f"latency: {mode} done in {time.perf_counter() - t_mode:.1f} s", file=sys.stderr, flush=True)
    bare = {name: bare_forward_ms(e, 50 if args.device == "cuda" else 10, image=work[0][1])
            for name, e in engines.items()}
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
            "bare_forward_ms": bare, "forward_gflop": flops / 1e9, "skipped_engines": skipped,
            "machine": {"start": started, "end": machine()},
            "command": "python bench/latency.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    if args.device == "cuda":
        meta["matrix_rate_tflops"] = {d: matrix_rate_tflops(d) for d in ("bf16", "fp16")}
        meta["cuda"] = torch.version.cuda
        meta["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    table = render(rows, meta)
    print(table)
    write_results(args.out / stem, {"meta": meta, "rows": rows}, table + "\n", show=False)
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
             f"one forward = {meta['forward_gflop']:.3g} GFLOP; bare forward p50: "
             + ", ".join(f"{k} {v:.2f}" for k, v in meta["bare_forward_ms"].items())]
    if meta.get("machine"):
        lines.append(f"machine: {describe(meta['machine']['start'], meta['machine']['end'])}")
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
    cli()
