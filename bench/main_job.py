"""The main job, end to end on the bundled default (CPU; 1:52 on an idle 2-core AMD EPYC, see README):

1. train a small model for a short budget with cfr-train (ICL + SUEM) on shared/data/train, proving the loop;
2. export the shipped default checkpoint with cfr-export and verify it against torch;
3. evaluate it with the official NoC protocol on GrabCut (cfr-eval), with StdInfer and A-CFR-4;
4. embed it: a Session segments one image from three clicks, and the mask is written as a PNG.

    python bench/main_job.py [--train-steps 150] [-o out/main_job] [--data-root ../shared/data] [--threads N]

Every step runs with --threads N (training, evaluation; OMP_NUM_THREADS for the exports' torch), N = the cores
this process may use unless given, so a busy machine is not oversubscribed further. Each step's time, the
machine and its load average at the start and the end go to OUT/timing.json and the last line printed.
A second run into the same folder is refused unless --overwrite is given.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe, machine  # noqa: E402
from cfr_runtime.cli_options import (  # noqa: E402
    command,
    fail,
    limit_option,
    option,
    out_option,
    overwrite_option,
    refuse_existing,
    threads_option,
)


def sh(*cmd: str, threads: int) -> None:
    """Run one step; a failed step ends the job with the project's error format (its own message is above)."""
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    if done.returncode != 0:
        fail("main_job.py", f"the step `{' '.join(cmd[:2])} ...` exited with status {done.returncode}; see its "
                            "message above")


@command("main_job.py")
@option("--train-steps", type=click.IntRange(min=1), default=150, show_default=True,
        help="Steps of the short cfr-train run.")
@out_option(default=ROOT / "out" / "main_job", shown="out/main_job", help="Folder for everything the job writes.")
@overwrite_option("the results of an earlier main job in --out")
@option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=ROOT.parent / "shared" / "data",
        show_default="../shared/data", help="Folder with train/ECSSD, train/COCO128-seg and GrabCut.")
@limit_option(old=["--eval-limit"], default=50, help="GrabCut instances to evaluate (50 = all).")
@threads_option(default=len(os.sched_getaffinity(0)),
                help="CPU threads of every step (training, exports, evaluation) [default: the cores this process "
                     "may use].")
def main(train_steps: int, out: Path, overwrite: bool, data_root: Path, limit: int, threads: int) -> None:
    """The main job: a short cfr-train run, export + verify + NoC evaluation of the shipped default model on
    GrabCut (StdInfer and A-CFR-4), and a 3-click embedding demo; see bench/main_job.py's docstring."""
    out, data = out.resolve(), data_root.resolve()
    results = [out / "train" / "model.pth", out / "onnx" / "model.onnx", out / "onnx_short" / "model.onnx",
               out / "grabcut_std.json", out / "grabcut_acfr4.json", out / "overlay.png", out / "timing.json"]
    if not overwrite:
        refuse_existing(results, "pass --overwrite to replace that run, or choose another -o")
    again = ["--overwrite"] if overwrite else []
    out.mkdir(parents=True, exist_ok=True)
    start, t0, steps = machine(), time.time(), {}
    print(f"main job: {describe(start)}; {threads} threads per step", flush=True)

    def step(name: str, t: float) -> None:
        steps[name] = round(time.time() - t, 1)

    print("== 1. cfr-train: a short ICL + SUEM run (the shipped default used the same command, longer)")
    t = time.time()
    sh("cfr-train", "--data", str(data / "train" / "ECSSD"), "--data", str(data / "train" / "COCO128-seg"),
       "-o", str(out / "train"), "--size", "224", "--batch-size", "8", "--lr", "3e-4",
       "--steps", str(train_steps), "--ckpt-every", "50", "--log-every", "10", "--threads", str(threads), *again,
       threads=threads)
    step("train", t)

    print("== 2. cfr-export: the shipped default checkpoint -> ONNX, verified against torch")
    from trainer.default_model import default_checkpoint

    t = time.time()
    sh("cfr-export", str(default_checkpoint()), "--engine", "onnx", "-o", str(out / "onnx"), "--size", "224", *again,
       threads=threads)
    sh("cfr-export", str(out / "train" / "model.pth"), "--engine", "onnx", "-o", str(out / "onnx_short"),
       "--size", "224", *again, threads=threads)
    step("export", t)

    print("== 3. cfr-eval on GrabCut (official protocol)")
    grabcut = data / "GrabCut"
    t = time.time()
    common = ["--dataset", str(grabcut), "--limit", str(limit), "--threads", str(threads), *again]
    sh("cfr-eval", str(out / "onnx" / "model.onnx"), *common, "--json", str(out / "grabcut_std.json"), threads=threads)
    sh("cfr-eval", str(out / "onnx" / "model.onnx"), *common, "--mode", "A-CFR-4",
       "--json", str(out / "grabcut_acfr4.json"), threads=threads)
    step("eval", t)

    print("== 4. embedding: three clicks on one image")
    import cv2
    import numpy as np

    from cfr_runtime import Engine, Session, default_model
    from cfr_runtime.clicker import Clicker
    from cfr_runtime.datasets import open_dataset
    from cfr_runtime.metrics import iou

    t = time.time()
    image, gt = open_dataset(grabcut)[0].load()
    session = Session(Engine(default_model(), threads=threads), cfr=4, adaptive=True)
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
    step("embed", t)
    end = machine()
    total = time.time() - t0
    timing = {"seconds": round(total, 1), "steps_s": steps, "threads": threads, "train_steps": train_steps,
              "eval_limit": limit, "machine": {"start": start, "end": end},
              "command": "python bench/main_job.py " + " ".join(sys.argv[1:])}
    (out / "timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    print(f"wrote {out / 'overlay.png'}; main job done in {total:.0f}s ({int(total // 60)}:{int(total % 60):02d}; "
          + ", ".join(f"{k} {v:.0f}s" for k, v in steps.items()) + f") on {describe(start, end)}")


if __name__ == "__main__":
    main()
