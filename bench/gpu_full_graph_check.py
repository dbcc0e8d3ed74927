"""Check the full-resolution graph on ONNX Runtime's CUDA provider against ONNX Runtime CPU, click by click.

    python bench/gpu_full_graph_check.py -o /tmp/fullcheck               # tiny reference model, 224
    python bench/gpu_full_graph_check.py M.pth -o DIR --size 448 --clicks 8 --mode A-CFR-4

Exports the checkpoint with `--graph full`, replays the RITM clicker's clicks of the CPU session on every
CUDA variant (device OrtValues through IO binding; with and without ONNX Runtime's CUDA graphs) and
reports the max |probability difference|, mask pixels that disagree, the zoom-in boxes, forwards per click
and per-click times. Without onnxruntime-gpu or a GPU it runs the CPU part and says what is missing.
Writes `gpu_full_graph_check.json` under -o (never over an earlier one without --overwrite); exits 1 when a
CUDA variant disagrees past --tolerance.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

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
)
from cfr_runtime.modes import Mode  # noqa: E402


def load_work(dataset: Path | None, images: int):
    from cfr_runtime.datasets import iter_loaded, open_dataset

    if dataset is not None and dataset.exists():
        return [(inst.id, img, gt) for inst, img, gt in iter_loaded(open_dataset(dataset)[:images])]
    from tests.conftest import blob_scene

    return [(f"blob{i}", *blob_scene(i, 300, 400)) for i in range(images)]


def run_clicks(engine, image, gt, clicks, n: int, session_kw: dict) -> dict:
    """Clicks from the clicker when `clicks` is None, else replay them; per-click probs, roi, forwards, ms."""
    from cfr_runtime import Session
    from cfr_runtime.clicker import Clicker

    s = Session(engine, **session_kw)
    s.set_image(image)
    clicker, pred = Clicker(gt), np.zeros(gt.shape, bool)
    out = {"clicks": [], "probs": [], "roi": [], "forwards": [], "ms": []}
    for k in range(n if clicks is None else len(clicks)):
        y, x, p = clicker.next_click(pred) if clicks is None else clicks[k]
        t = time.perf_counter()
        pred = s.add_click(x, y, p)
        out["ms"].append((time.perf_counter() - t) * 1000)
        out["clicks"].append((int(y), int(x), bool(p)))
        out["probs"].append(s.probs.copy())
        out["roi"].append(s.roi)
        out["forwards"].append(s.forwards[-1])
    return out


def compare(ref: dict, got: dict, threshold: float) -> dict:
    diffs = [float(np.abs(a - b).max()) for a, b in zip(ref["probs"], got["probs"])]
    masks = [int(np.count_nonzero((a > threshold) != (b > threshold))) for a, b in zip(ref["probs"], got["probs"])]
    return {"max_abs_diff": max(diffs), "per_click_max_abs_diff": diffs, "mask_pixels_differing": masks,
            "same_rois": ref["roi"] == got["roi"], "same_forwards": ref["forwards"] == got["forwards"],
            "ms_p50": float(np.median(got["ms"][1:] or got["ms"]))}


@command("gpu_full_graph_check.py")
@checkpoint_argument(required=False, old=["--checkpoint"])
@option("--size", type=click.IntRange(16, 4096), default=224, show_default=True, help="Input size of the export.")
@dataset_option(default=SHARED / "data" / "GrabCut", help="Images and ground truth for the clicker "
                "[default: ../shared/data/GrabCut; generated scenes when it is absent].")
@limit_option(old=["--images"], default=2, help="Images to check.")
@option("--clicks", type=click.IntRange(min=1), default=5, show_default=True, help="RITM clicks per image.")
@mode_option(default="A-CFR-4")
@option("--cfr", "cfr_n", type=click.IntRange(0, 100), default=None, hidden=True)  # old spelling of --mode A-CFR-n
@option("--tolerance", type=click.FloatRange(min=0), default=1e-3, show_default=True,
        help="Largest |probability difference| a CUDA variant may show against ONNX Runtime CPU.")
@out_option(required=True, help="Folder for gpu_full_graph_check.json.")
@overwrite_option("gpu_full_graph_check.json in --out")
def cli(checkpoint, checkpoint_alias, size, dataset, limit, clicks, mode, cfr_n, tolerance, out, overwrite) -> int:
    """The full-resolution graph of CHECKPOINT [default: the official-format reference model
    ../shared/reference/official/tiny_d8_s1/model.pth] on ONNX Runtime CUDA against ONNX Runtime CPU, click by
    click; exit status 1 when a CUDA variant disagrees. See the module docstring."""
    checkpoint = merge_alias(checkpoint, checkpoint_alias, "CHECKPOINT") or \
        SHARED / "reference" / "official" / "tiny_d8_s1" / "model.pth"
    if not overwrite:
        refuse_existing([out / "gpu_full_graph_check.json"], "pass --overwrite to replace it, or choose another -o")
    if cfr_n is not None:
        mode = Mode(cfr_n, cfr_n > 0)
    args = SimpleNamespace(checkpoint=checkpoint, size=size, dataset=dataset, images=limit, clicks=clicks,
                           session_kw=mode.session_kwargs(), tolerance=tolerance, out=out)
    return run(args)


def main(argv: list[str] | None = None) -> int:
    """Run as from the command line; returns the exit status (1: a CUDA variant disagrees)."""
    return cli.main(argv, standalone_mode=False)


def run(args) -> int:
    import onnxruntime as ort

    from cfr_runtime import Engine
    from export.onnx_export import export_onnx

    tmp = Path(tempfile.mkdtemp(prefix="cfr-fullcheck-"))
    path, contract, _ = export_onnx(args.checkpoint, tmp, size=args.size, graph="full")
    kw = args.session_kw
    available = ort.get_available_providers()
    report = {"onnxruntime": ort.__version__, "providers_available": available, "checkpoint": str(args.checkpoint),
              "size": args.size, "session": kw, "python": platform.python_version(), "images": {}}
    variants = {}
    if "CUDAExecutionProvider" in available:
        variants["ort-cuda"] = lambda: Engine(path, providers=["CUDAExecutionProvider"])
        variants["ort-cuda-graphs"] = lambda: Engine(path)  # default providers: CUDA graphs requested
    else:
        report["cuda"] = ("absent: onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu on a "
                          "machine with an NVIDIA GPU); only the CPU part ran")
    cpu = Engine(path, providers=["CPUExecutionProvider"])
    failed = False
    for name, image, gt in load_work(args.dataset, args.images):
        ref = run_clicks(cpu, image, gt, None, args.clicks, kw)
        entry = {"shape": list(image.shape), "clicks": ref["clicks"], "rois": ref["roi"], "forwards": ref["forwards"],
                 "cpu_ms_p50": float(np.median(ref["ms"][1:] or ref["ms"]))}
        for variant, make in variants.items():
            try:
                engine = make()
                res = compare(ref, run_clicks(engine, image, gt, ref["clicks"], 0, kw), contract.threshold)
                res["engine"] = repr(engine)
                failed |= not (res["max_abs_diff"] <= args.tolerance and res["same_forwards"])
            except Exception as exc:  # report, keep checking the other variants
                res, failed = {"error": f"{type(exc).__name__}: {exc}"}, True
            entry[variant] = res
        report["images"][name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if k not in ("clicks", "rois")}, default=str))
    report["ok"] = not failed
    if "cuda" in report:
        print(f"CUDA: {report['cuda']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_full_graph_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out / 'gpu_full_graph_check.json'}; ok={report['ok']}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
