"""Run the OFFICIAL CFR-ICL evaluation (an `isegm` checkout) on a dataset and record every click.

    # once: a separate venv with what the official evaluation imports (bench/official_env.sh)
    bash bench/official_env.sh /work/official-venv
    # then, per dataset and mode (the official checkout is a clone of TitorX/CFR-ICL-Interactive-Segmentation)
    /work/official-venv/bin/python bench/official_eval.py --official /path/to/CFR-ICL-Interactive-Segmentation \
        --checkpoint trainer/assets/default.pth --dataset ../shared/data/GrabCut --mode A-CFR-4 \
        --out bench/results/parity/official_GrabCut_A-CFR-4.json

This file contains no official code: it imports the checkout given by --official and calls, in order, what
its `scripts/evaluate_model.py` calls for `NoBRS --cpu --cf-n N [--acf] --cf-click 1 --eval-mode cvpr`
(`utils.load_is_model`, `interpolate_pos_embed_inference`, `get_predictor` with the ZoomIn of the SimpleClick
setting, `skip_clicks=-1` and target S x S, then `evaluate_sample` per instance), with S = the checkpoint's
input size instead of the hard-coded 448 (the shipped default runs at 224). `evaluate_dataset` is not used
because it throws the clicks away; `evaluate_sample` returns them, and this script records them.

Two adaptations of the environment, none of the code:
- torchvision: the official predictor imports it only for `transforms.ToTensor`. PyPI has only CUDA builds of
  torchvision, whose compiled ops cannot load against a CPU build of torch; torchvision's pure-Python part
  still imports once the two operator schemas it registers fake kernels for exist, so they are declared
  (never called) when the first import fails.
- Berkeley: the official `BerkeleyDataset` lists images and finds each one's mask by stem (one instance per
  image file). ../shared/data/Berkeley has 96 images for 100 masks (`<id>a.png`, `<id>b.png` share `<id>.jpg`),
  so the dataset is opened on a temporary folder of symlinks with one image name per mask.
The dataset folder is read with the official `GrabCutDataset` class (mask channel 0: 128 -> ignore, > 128 ->
object), images/ + masks/ as ../shared lays them out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {"plain": (0, False), "CFR-4": (4, False), "A-CFR-4": (4, True)}


def _import_torchvision() -> str:
    import torch

    try:
        import torchvision
    except (RuntimeError, OSError) as exc:  # a CUDA torchvision wheel beside a CPU torch
        for name in ("nms", "qnms"):
            torch.library.define(f"torchvision::{name}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        for key in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[key]
        import torchvision
        return f"{torchvision.__version__} (pure-Python part; compiled ops unavailable: {str(exc)[:80]})"
    return torchvision.__version__


def _berkeley_view(root: Path, tmp: Path) -> Path:
    """images/<mask stem>.<ext> -> the image of that mask; masks/ as they are."""
    (tmp / "images").mkdir()
    (tmp / "masks").mkdir()
    images = {p.stem: p for p in (root / "images").iterdir()}
    for mask in sorted((root / "masks").iterdir()):
        stem = mask.stem
        image = images.get(stem) or images[stem[:-1]]
        (tmp / "images" / f"{stem}{image.suffix}").symlink_to(image.resolve())
        (tmp / "masks" / mask.name).symlink_to(mask.resolve())
    return tmp


def dump(result: dict) -> str:
    """JSON with one line per instance (the files are committed: compact, yet diffable per instance)."""
    head = json.dumps({k: v for k, v in result.items() if k != "instances"}, indent=1)[:-2]
    rows = ",\n  ".join(json.dumps(r) for r in result["instances"])
    return f'{head},\n "instances": [\n  {rows}\n ]\n}}\n'


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, type=Path, help="checkout of the official isegm repository")
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--dataset", required=True, type=Path, help="images/ + masks/ folder")
    ap.add_argument("--mode", choices=sorted(MODES), default="plain")
    ap.add_argument("--size", type=int, default=None, help="network input size (default: the checkpoint's)")
    ap.add_argument("--max-clicks", type=int, default=20)
    ap.add_argument("--target-iou", type=float, default=0.95)
    ap.add_argument("--limit", type=int, default=None, help="only the first N instances (by name)")
    ap.add_argument("--only", default=None, help="comma-separated instance names")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)

    official = args.official.resolve()
    checkpoint, root, out_path = args.checkpoint.resolve(), args.dataset.resolve(), args.out.resolve()
    sys.path.insert(0, str(official))
    os.chdir(official)  # the official modules expect to run from the checkout's root
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tv = _import_torchvision()
    from isegm.data.datasets import GrabCutDataset
    from isegm.inference import utils
    from isegm.inference.evaluation import evaluate_sample
    from isegm.inference.predictors import get_predictor
    from isegm.model.modeling.pos_embed import interpolate_pos_embed_inference

    device = torch.device("cpu")
    model = utils.load_is_model(str(checkpoint), device, False)
    size = args.size or int(model.backbone.patch_embed.img_size[0])
    cf_n, acf = MODES[args.mode]
    predictor_params = {"cascade_step": cf_n + 1, "cascade_adaptive": acf, "cascade_clicks": 1}
    zoom_in_params = {"skip_clicks": -1, "target_size": (size, size)}
    interpolate_pos_embed_inference(model.backbone, zoom_in_params["target_size"], device)
    predictor = get_predictor(model, "NoBRS", device, prob_thresh=0.49, predictor_params=predictor_params,
                              zoom_in_params=zoom_in_params)

    with tempfile.TemporaryDirectory() as tmp:
        images = root / "images"
        if len({p.stem for p in images.iterdir()}) < len(list((root / "masks").iterdir())):
            root = _berkeley_view(root, Path(tmp))
        dataset = GrabCutDataset(root, images_dir_name="images", masks_dir_name="masks")
        names = [Path(n).stem for n in dataset.dataset_samples]
        wanted = set(args.only.split(",")) if args.only else None
        order = [i for i in range(len(names)) if wanted is None or names[i] in wanted][:args.limit]
        results, start = [], time.perf_counter()
        for k, index in enumerate(order):
            sample = dataset.get_sample(index)
            t0 = time.perf_counter()
            clicks, ious, _ = evaluate_sample(sample.image, sample.gt_mask(sample.objects_ids[0]), predictor,
                                              max_iou_thr=args.target_iou, pred_thr=0.49, min_clicks=1,
                                              max_clicks=args.max_clicks)
            results.append({"id": names[index], "ious": [float(v) for v in ious],
                            "clicks": [[int(c.coords[0]), int(c.coords[1]), int(bool(c.is_positive))] for c in clicks],
                            "seconds": time.perf_counter() - t0})
            print(f"[{k + 1}/{len(order)}] {names[index]}: {len(clicks)} clicks, last IoU {ious[-1]:.4f}", flush=True)
    all_ious = [np.array(r["ious"]) for r in results]
    thresholds = [0.85, 0.9, 0.95]
    noc, _, over_max = utils.compute_noc_metric(all_ious, iou_thrs=thresholds, max_clicks=args.max_clicks)
    commit = subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    import cv2
    import mmcv

    out = {
        "what": "official isegm evaluation (evaluate_sample per instance), CPU",
        "official_commit": commit or "unknown",
        "checkpoint": str(args.checkpoint), "dataset": str(args.dataset), "mode": args.mode, "size": size,
        "predictor_params": predictor_params, "zoom_in_params": {**zoom_in_params, "target_size": [size, size]},
        "max_clicks": args.max_clicks, "target_iou": args.target_iou,
        "noc": {f"{int(round(t * 100))}": float(v) for t, v in zip(thresholds, noc)},
        "over_max": {f"{int(round(t * 100))}": int(v) for t, v in zip(thresholds, over_max)},
        "seconds": time.perf_counter() - start,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "opencv": cv2.__version__, "mmcv": mmcv.__version__, "torchvision": tv,
                     "torch_threads": torch.get_num_threads()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "instances": results,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(dump(out))
    print(f"NoC@85/90/95 = {noc[0]:.2f} / {noc[1]:.2f} / {noc[2]:.2f} over {len(results)} instances -> {args.out}")
    return out


if __name__ == "__main__":
    main()
