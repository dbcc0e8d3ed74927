"""NoC against time per click in one run: engine x precision x CFR mode on a dataset, beside the official-style
torch loop (export/reference_loop.py).

    python bench/pareto.py --dataset ../shared/data/GrabCut      # shipped default: ORT fp32/int8/fp16 + torch loop
    python bench/pareto.py --arch vit_base --dataset ../shared/data/GrabCut --limit 2 --max-clicks 3 \\
        --mode StdInfer --precisions fp32,int8                    # random-init ViT-B at 448: latency only
    python bench/pareto.py --merge A.shard0of2.json A.shard1of2.json   # runs made with --shard 0/2 and 1/2

Every row runs the official protocol (RITM clicker on its own predictions, stop at IoU 0.95, at most
--max-clicks) and is timed click by click. Rows are interleaved instance by instance, so load from other
processes on a shared machine hits them alike; ratios within one run are what is compared. Each ORT variant
is exported from the checkpoint and verified against torch (export/verify.py) before it is timed.

Output: JSON + Markdown + a PNG of NoC@90 against ms per click (one labelled point per row) in --out
(default: a new temporary folder). Existing files there are never replaced unless --overwrite is given.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.latency import _ms, pct  # noqa: E402  (p99 is None below 100 samples)
from bench.machine import write_results  # noqa: E402
from cfr_runtime.cli_options import (  # noqa: E402
    CHECKPOINT,
    checkpoint_problem,
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
from cfr_runtime.errors import InputError  # noqa: E402

MODES = {
    "StdInfer": dict(cfr=0),
    "CFR-1": dict(cfr=1),
    "CFR-4": dict(cfr=4),
    "A-CFR-4": dict(cfr=4, adaptive=True),
    "A-CFR-4-all": dict(cfr=4, adaptive=True, cfr_clicks=None),  # A-CFR on every click, not only the first
}
PRECISIONS = ("fp32", "int8", "fp16")
REFERENCE = "torch-loop"


class Timed:
    """A Session (or the reference predictor) whose add_click calls are timed; the protocol sees no difference."""

    def __init__(self, session):
        self.session = session
        self.first: list[float] = []
        self.later: list[float] = []
        self._k = 0

    def set_image(self, rgb: np.ndarray) -> None:
        self.session.set_image(rgb)
        self._k = 0

    def add_click(self, x: float, y: float, positive: bool = True) -> np.ndarray:
        t = time.perf_counter()
        mask = self.session.add_click(x, y, positive)
        (self.first if self._k == 0 else self.later).append(time.perf_counter() - t)
        self._k += 1
        return mask

    @property
    def forwards(self) -> list[int]:
        return self.session.forwards


def cpu_info() -> dict:
    """CPU model and the instruction-set extensions that decide which precisions can be fast."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8",
              "amx_bf16")
    return {"name": name, "cores": len(os.sched_getaffinity(0)), "flags": [f for f in wanted if f in flags],
            "fp16_arithmetic": "avx512_fp16" in flags or "amx_fp16" in flags}


def versions() -> dict:
    import onnxruntime
    import torch

    import cfr_runtime

    return {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "cfr_runtime": cfr_runtime.__version__}


def build_variants(ckpt: Path, size: int, precisions: list[str], tmp: Path) -> tuple[dict, object, dict]:
    """Export and verify each precision; returns {precision: path}, the torch model and the verify reports."""
    from export.onnx_export import export_onnx
    from export.quantize import quantize_int8, read_contract
    from export.verify import TorchReferences, fresh_seed, verify_onnx

    fp32, contract, graph = export_onnx(ckpt, tmp, size=size)
    paths, reports = {}, {}
    seed, refs = fresh_seed(), TorchReferences()  # every variant on the same fresh inputs: torch runs them once
    for prec in precisions:
        if prec == "fp32":
            path = fp32
        elif prec == "int8":
            path = quantize_int8(fp32)
        elif prec == "fp16":
            path = export_onnx(ckpt, tmp, size=size, fp16=True)[0]
        else:
            raise SystemExit(f"unknown precision {prec!r}; choose from {PRECISIONS}")
        report = verify_onnx(path, graph, read_contract(path), seed=seed, references=refs)
        print(f"{prec}: {path.name}: {report}", flush=True)
        paths[prec], reports[prec] = path, {"max_abs_diff": report.max_abs_diff,
                                            "mask_agreement": 1 - report.mask_disagreement,
                                            "tolerance": report.tolerance, "text": str(report)}
    return paths, graph.model, reports


def summarize_row(row: dict, raw: dict, max_clicks: int) -> dict:
    """One table row from the raw per-instance IoUs, forwards and click times (kept in the JSON for --merge)."""
    from cfr_runtime.metrics import summarize

    summary = summarize(raw["ious"], max_clicks)
    forwards = [f for fs in raw["forwards"] for f in fs]
    clicks = raw["first_s"] + raw["later_s"]
    miou = summary["miou_per_click"]
    return {**row, "noc": summary["noc"], "over_max": summary["over_max"],
            "miou": {str(k): miou[k - 1] for k in (1, 3, 5) if k <= len(miou)},
            "fwd_per_click": float(np.mean(forwards)) if forwards else 0.0,
            "first_click_ms": pct(raw["first_s"]), "later_click_ms": pct(raw["later_s"]),
            "ms_per_click": 1000 * float(np.sum(clicks)) / max(1, len(clicks)), "clicks": len(clicks),
            "seconds": float(np.sum(clicks)), "instances": len(raw["ious"]), "raw": raw}


def merge(paths: list[Path], out: Path, overwrite: bool) -> dict:
    """Combine shard JSONs (--shard I/N runs of one configuration) into one table, plot and JSON."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    meta = dict(docs[0]["meta"])
    keys = [(r["engine"], r["precision"], r["mode"]) for r in docs[0]["rows"]]
    for d in docs[1:]:
        if [(r["engine"], r["precision"], r["mode"]) for r in d["rows"]] != keys or any(
                d["meta"][k] != meta[k] for k in ("arch", "size", "dataset", "max_clicks", "target_iou")):
            raise InputError("--merge: the files are not shards of one configuration")
    rows = []
    for k, key in enumerate(keys):
        raw = {f: [x for d in docs for x in d["rows"][k]["raw"][f]] for f in ("ious", "forwards", "first_s", "later_s")}
        rows.append(summarize_row(dict(zip(("engine", "precision", "mode"), key)), raw, meta["max_clicks"]))
    compare(rows)
    meta.update(instances=sum(d["meta"]["instances"] for d in docs), shards=[d["meta"].get("shard") for d in docs],
                load_average=[la for d in docs for la in d["meta"]["load_average"]], shard=None,
                shard_commands=[d["meta"]["command"] for d in docs])
    if len(docs) > 1:
        meta["command"] = "python bench/pareto.py --merge " + " ".join(Path(p).name for p in paths)
    return write(rows, meta, out, overwrite)


def write(table: list[dict], meta: dict, out: Path, overwrite: bool) -> dict:
    stem = f"pareto_{meta['dataset']}_{meta['arch']}_{meta['size']}"
    if meta.get("shard"):
        stem += f".shard{meta['shard'].replace('/', 'of')}"
    targets = [out / f"{stem}.{ext}" for ext in ("json", "md", "png")]
    if not overwrite:
        refuse_existing(targets, "pass --overwrite to replace it, or choose another --out")
    text = render(table, meta)
    print(text)
    write_results(out / stem, {"meta": meta, "rows": table}, text + "\n", show=False)
    plot(table, meta, targets[2])
    print(f"wrote {targets[2]}")
    return {"meta": meta, "rows": table}


@command("pareto.py")
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path), metavar="[CHECKPOINT | SHARD.json...]")
@option("--checkpoint", "checkpoint_alias", type=CHECKPOINT, default=None, hidden=True)  # old spelling
@option("--arch", default=None, help="A random-init named architecture instead (e.g. vit_base): latency only.")
@option("--size", type=click.IntRange(16, 4096), default=None,
        help="Input size [default: the checkpoint's; 448 with --arch].")
@dataset_option()
@limit_option()
@option("--shard", default=None, metavar="I/N", help="Only instances I, I+N, I+2N, ... (combine with --merge).")
@option("--merge", is_flag=True, help="Combine the JSONs of --shard runs, given as the positional arguments.")
@option("--max-clicks", type=click.IntRange(1, 1000), default=20, show_default=True,
        help="Clicks per instance at most (the official protocol: 20).")
@option("--target-iou", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
        help="Stop an instance once its IoU reaches this.")
@option("--precisions", default="fp32,int8,fp16", show_default=True, metavar="LIST",
        help=f"ORT variants to export, verify and time, from {','.join(PRECISIONS)}.")
@mode_option(many=True, default=",".join(MODES), choices=MODES, old=["--modes"])
@option("--reference-modes", default=None, metavar="MODES",
        help="Modes of the torch loop rows [default: --mode; 'none' for none].")
@threads_option()
@out_option(help="Output folder [default: a new temporary folder].")
@overwrite_option("result files of the same name in --out")
def cli(inputs, checkpoint_alias, arch, size, dataset, limit, shard, merge, max_clicks, target_iou, precisions, mode,
        reference_modes, threads, out, overwrite) -> dict:
    """NoC against time per click: CHECKPOINT (default: the shipped trainer/assets/default.pth) exported to ORT
    fp32/int8/fp16 and timed in every mode beside the official-style torch loop; with --merge, the shard JSONs
    of --shard runs combined into one table. See the module docstring of bench/pareto.py."""
    ctx = click.get_current_context()
    argv = ctx.obj.get("argv") if isinstance(ctx.obj, dict) else None
    checkpoint = None
    if not merge:
        if len(inputs) > 1:
            raise click.UsageError(f"one CHECKPOINT at most (got {len(inputs)} paths); --merge combines shard JSONs")
        if inputs:
            why = checkpoint_problem(inputs[0])
            if why:
                raise click.UsageError(why)
            checkpoint = inputs[0]
        checkpoint = merge_alias(checkpoint, checkpoint_alias, "CHECKPOINT")
    elif not inputs:
        raise click.UsageError("--merge combines the JSONs of --shard runs: give them as arguments")
    args = SimpleNamespace(checkpoint=checkpoint, arch=arch, size=size, dataset=dataset, limit=limit, shard=shard,
                           merge=list(inputs) if merge else None, max_clicks=max_clicks, target_iou=target_iou,
                           precisions=precisions, modes=",".join(map(str, mode)), reference_modes=reference_modes,
                           threads=threads, out=out, overwrite=overwrite)
    return run(args, argv)


def main(argv: list[str] | None = None) -> dict:
    """Run as from the command line (errors print `pareto.py: error: ...` and exit 2); returns the results."""
    return cli.main(argv, standalone_mode=False, obj={"argv": argv})


def run(args, argv: list[str] | None) -> dict:
    out = args.out or Path(tempfile.mkdtemp(prefix="cfr-pareto-results-"))
    if args.merge:
        return merge(args.merge, out, args.overwrite)
    if args.dataset is None:
        raise click.UsageError("--dataset is required (or --merge)")
    shard = (0, 1)
    if args.shard:
        parts = args.shard.split("/")
        if len(parts) != 2 or not all(x.isdigit() for x in parts) or not 0 <= int(parts[0]) < int(parts[1]):
            raise click.BadParameter("takes I/N with 0 <= I < N", param_hint="--shard")
        shard = (int(parts[0]), int(parts[1]))
    for prec in args.precisions.split(","):
        if prec not in PRECISIONS:
            raise click.BadParameter(f"unknown precision {prec!r}; choose from {', '.join(PRECISIONS)}",
                                     param_hint="--precisions")
    modes = args.modes.split(",")
    ref_modes = modes if args.reference_modes is None else \
        [] if args.reference_modes == "none" else args.reference_modes.split(",")
    for m in modes + ref_modes:
        if m not in MODES:
            raise click.BadParameter(f"unknown mode {m!r}; choose from {', '.join(MODES)}")

    import torch

    from cfr_runtime import Engine, Session
    from cfr_runtime.datasets import iter_loaded, open_dataset
    from cfr_runtime.evaluate import evaluate_instance
    from export.reference_loop import ReferencePredictor
    from trainer.checkpoint import read_checkpoint, save_checkpoint
    from trainer.models import arch_config, build_model

    tmp = Path(tempfile.mkdtemp(prefix="cfr-pareto-"))
    try:  # the random checkpoint and the exported graphs: ViT-H leaves 6 GB there
        if args.arch:
            torch.manual_seed(0)
            params = arch_config(args.arch)
            ckpt = save_checkpoint(tmp / f"{args.arch}.pth", build_model(params), params)
        else:
            from trainer.default_model import default_checkpoint

            ckpt = args.checkpoint or default_checkpoint()
        size = args.size or (448 if args.arch else read_checkpoint(ckpt)[0]["backbone_params"]["img_size"][0])
        arch_name = args.arch or ("default" if args.checkpoint is None else args.checkpoint.stem)
        stem = f"pareto_{args.dataset.name}_{arch_name}_{size}"
        if args.shard:
            stem += f".shard{shard[0]}of{shard[1]}"
        if not args.overwrite:
            refuse_existing([out / f"{stem}.{ext}" for ext in ("json", "md", "png")],
                            "pass --overwrite to replace it, or choose another --out")

        paths, model, reports = build_variants(ckpt, size, args.precisions.split(","), tmp / "onnx")
        engines, load_s = {}, {}
        for prec, path in paths.items():
            t = time.perf_counter()
            engines[prec] = Engine(path, backend="ort", threads=args.threads)
            load_s[prec] = time.perf_counter() - t
        rows: list[tuple[dict, Timed]] = []
        for mode in modes:
            for prec, engine in engines.items():
                rows.append(({"engine": "ort", "precision": prec, "mode": mode},
                             Timed(Session(engine, **MODES[mode]))))
            if mode in ref_modes:
                rows.append(({"engine": REFERENCE, "precision": "fp32", "mode": mode},
                             Timed(ReferencePredictor(model, size=size, **MODES[mode]))))
        instances = open_dataset(args.dataset)[:args.limit][shard[0]::shard[1]]
        load_avg = [os.getloadavg()]
        results: list[list] = [[] for _ in rows]
        started = time.time()
        for i, (inst, image, gt) in enumerate(iter_loaded(instances)):
            if i == 0:  # untimed warm-up on the first image: lazy initialisation, first-call allocations
                for _, timed in rows:
                    evaluate_instance(timed.session, image, gt, max_clicks=2, target_iou=2.0)
            for k, (_, timed) in enumerate(rows):  # rows interleaved per instance
                results[k].append(evaluate_instance(timed, image, gt, inst.id, args.max_clicks, args.target_iou))
            print(f"\r{args.dataset.name}: {i + 1}/{len(instances)} instances, {time.time() - started:.0f}s",
                  end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        load_avg.append(os.getloadavg())
        table = [summarize_row(row, {"ious": [r.ious for r in res], "forwards": [r.forwards for r in res],
                                     "first_s": timed.first, "later_s": timed.later}, args.max_clicks)
                 for (row, timed), res in zip(rows, results)]
        compare(table)
        meta = {"checkpoint": str(ckpt), "arch": arch_name, "size": size, "dataset": args.dataset.name,
                "instances": len(instances), "max_clicks": args.max_clicks, "target_iou": args.target_iou,
                "random_init": bool(args.arch), "cpu": cpu_info(), "versions": versions(),
                "ort_threads": args.threads, "torch_threads": torch.get_num_threads(),
                "engine_load_s": load_s, "verification": reports, "load_average": load_avg,
                "engines": {p: repr(e) for p, e in engines.items()}, "shard": args.shard,
                "command": "python bench/pareto.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                "date": time.strftime("%Y-%m-%d %H:%M")}
        return write(table, meta, out, args.overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare(table: list[dict]) -> None:
    """Per row: NoC@90 change against ORT fp32 of the same mode, speed against the torch loop of the same mode."""
    for r in table:
        fp32 = next((b for b in table if b["engine"] == "ort" and b["precision"] == "fp32" and b["mode"] == r["mode"]),
                    None)
        ref = next((b for b in table if b["engine"] == REFERENCE and b["mode"] == r["mode"]), None)
        if fp32 is not None and r is not fp32:
            r["noc90_vs_fp32"] = r["noc"]["0.9"] - fp32["noc"]["0.9"]
        if ref is not None and r is not ref:
            r["speedup_vs_torch_loop"] = ref["ms_per_click"] / r["ms_per_click"]


def label(r: dict) -> str:
    return f"{r['engine']} {r['precision']} {r['mode']}"


def render(table: list[dict], meta: dict) -> str:
    cpu, v = meta["cpu"], meta["versions"]
    title = f"random-init {meta['arch']} (latency only; NoC is meaningless)" if meta["random_init"] else meta["arch"]
    lines = [
        f"# NoC vs time per click: {title} at {meta['size']}, {meta['dataset']} ({meta['instances']} instances)",
        f"CPU: {cpu['name']}, {cpu['cores']} cores, flags {' '.join(cpu['flags'])}; "
        f"fp16 arithmetic: {'yes' if cpu['fp16_arithmetic'] else 'no (fp16 runs through conversions)'}. "
        f"onnxruntime {v['onnxruntime']}, torch {v['torch']}, python {v['python']}. Load average "
        f"{meta['load_average'][0][0]:.1f} -> {meta['load_average'][1][0]:.1f} (shared machine). "
        f"Engine load: " + ", ".join(f"{k} {s:.2f}s" for k, s in meta["engine_load_s"].items()) + ".",
        f"`{meta['command']}`", "",
        "| engine | prec | mode | NoC@85 | NoC@90 | NoC@95 | >=20 @85/90/95 | NoC@90 vs fp32 | mIoU@1 | mIoU@3 "
        "| mIoU@5 | fwd/click | first p50 | first p99 | later p50 | later p99 | ms/click | vs torch loop |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        n, o, m = r["noc"], r["over_max"], r["miou"]
        d = f"{r['noc90_vs_fp32']:+.2f}" if "noc90_vs_fp32" in r else "-"
        sp = f"{r['speedup_vs_torch_loop']:.2f}x" if "speedup_vs_torch_loop" in r else "-"
        f, la = r["first_click_ms"], r["later_click_ms"]
        lines.append(
            f"| {r['engine']} | {r['precision']} | {r['mode']} | {n['0.85']:.2f} | {n['0.9']:.2f} | {n['0.95']:.2f} "
            f"| {o['0.85']}/{o['0.9']}/{o['0.95']} | {d} | "
            + " | ".join(f"{m[k]:.3f}" if k in m else "-" for k in ("1", "3", "5"))
            + f" | {r['fwd_per_click']:.2f} | {_ms(f['p50'])} | {_ms(f['p99'])} | {_ms(la['p50'])} | {_ms(la['p99'])} "
              f"| {r['ms_per_click']:.1f} | {sp} |")
    lines += ["", "Times in ms of one `add_click` (the engine plus the Session's crop/paste; the clicker and IoU are "
              "not included). ms/click: total click time over all clicks of the run. first: the first click of an "
              "image (CFR modes run their extra forwards there); later: every other click."]
    return "\n".join(lines)


def plot(table: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(MODES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    markers = {"fp32": "o", "int8": "s", "fp16": "^"}
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for i, r in enumerate(table):
        marker = "x" if r["engine"] == REFERENCE else markers.get(r["precision"], "o")
        ax.scatter(r["ms_per_click"], r["noc"]["0.9"], color=colors[r["mode"]], marker=marker, s=40)
        ax.annotate(label(r), (r["ms_per_click"], r["noc"]["0.9"]), fontsize=6, color=colors[r["mode"]],
                    xytext=(4, -9 + 6 * (i % 4)), textcoords="offset points")  # staggered: close points stay legible
    ax.set_xscale("log")
    ax.set_xlabel("ms per click (log scale; whole run)")
    ax.set_ylabel("NoC@90 (lower is better)")
    ax.grid(alpha=0.3, which="both")
    what = ("random-init " if meta["random_init"] else "") + meta["arch"]
    ax.set_title(f"{what} at {meta['size']} on {meta['dataset']} ({meta['instances']} instances), "
                 f"{meta['cpu']['name']}, {meta['cpu']['cores']} cores", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    cli()
