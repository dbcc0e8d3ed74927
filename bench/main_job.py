"""The main job, end to end on the bundled default (CPU, a few minutes):

1. train a small model for a short budget with cfr-train (ICL + SUEM) on shared/data/train, proving the loop;
2. export the shipped default checkpoint with cfr-export and verify it against torch;
3. evaluate it with the official NoC protocol on GrabCut (cfr-eval), with StdInfer and A-CFR-4;
4. embed it: a Session segments one image from three clicks, and the mask is written as a PNG.

    python bench/main_job.py [--train-steps 150] [--out out/main_job] [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(*cmd: str) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "main_job")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--eval-limit", type=int, default=50, help="GrabCut instances to evaluate (50 = all)")
    args = ap.parse_args()
    out, data = args.out.resolve(), args.data_root.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    print("== 1. cfr-train: a short ICL + SUEM run (the shipped default used the same command, longer)")
    sh("cfr-train", "--data", str(data / "train" / "ECSSD"), "--data", str(data / "train" / "COCO128-seg"),
       "--run-dir", str(out / "train"), "--size", "224", "--batch-size", "8", "--lr", "3e-4",
       "--steps", str(args.train_steps), "--ckpt-every", "50", "--log-every", "10")

    print("== 2. cfr-export: the shipped default checkpoint -> ONNX, verified against torch")
    from trainer.default_model import default_checkpoint

    sh("cfr-export", str(default_checkpoint()), "--engine", "onnx", "-o", str(out / "onnx"), "--size", "224")
    sh("cfr-export", str(out / "train" / "model.pth"), "--engine", "onnx", "-o", str(out / "onnx_short"),
       "--size", "224")

    print("== 3. cfr-eval on GrabCut (official protocol)")
    grabcut = data / "GrabCut"
    sh("cfr-eval", str(out / "onnx" / "model.onnx"), "--dataset", str(grabcut), "--limit", str(args.eval_limit),
       "--json", str(out / "grabcut_std.json"))
    sh("cfr-eval", str(out / "onnx" / "model.onnx"), "--dataset", str(grabcut), "--limit", str(args.eval_limit),
       "--cfr", "4", "--acfr", "--json", str(out / "grabcut_acfr4.json"))

    print("== 4. embedding: three clicks on one image")
    import cv2
    import numpy as np

    from cfr_runtime import Engine, Session, default_model
    from cfr_runtime.clicker import Clicker
    from cfr_runtime.datasets import open_dataset
    from cfr_runtime.metrics import iou

    image, gt = open_dataset(grabcut)[0].load()
    session = Session(Engine(default_model()), cfr=4, adaptive=True)
    session.set_image(image)
    clicker, mask = Clicker(gt), np.zeros(gt.shape, bool)
    for _ in range(3):
        y, x, positive = clicker.next_click(mask)
        mask = session.add_click(x, y, positive)
        sign = "+" if positive else "-"
        print(f"  click ({x}, {y}) {sign} -> IoU {iou(gt, mask):.3f}, forwards {session.forwards[-1]}")
    overlay = image.copy()
    overlay[mask] = (0.5 * overlay[mask] + [0, 127, 0]).astype(np.uint8)
    cv2.imwrite(str(out / "overlay.png"), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
    print(f"wrote {out / 'overlay.png'}; main job done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
