"""ViT-H end to end on the CPU: a random-weight checkpoint in the official layout, `cfr-export --fp16 --int8`
(graphs past 2 GB: ONNX external data), every graph verified against torch, then 3 clicks on a GrabCut image
with each graph. Records wall time and peak RSS of the export, its memory over time by stage, and the clicks.

    python bench/vith_smoke.py --dataset ../shared/data/GrabCut                     # results in a new temp folder
    python bench/vith_smoke.py --dataset ../shared/data/GrabCut --out bench/results/vith   # the committed run

Needs about 12 GB of free memory and 12 GB of disk (checkpoint 2.6 GB, fp32 2.6 GB, fp16 1.3 GB, int8 0.7 GB,
staging); run it alone, under `nice`. Not part of CI (tens of minutes on 2 cores); tests/test_external_data.py
sends a tiny model down the same code path in seconds.

How it measures (memory in GiB, 2**30 bytes): `cfr-export` runs as a child process (the console script's
own `main`, with the export's stage log switched on); a thread samples the child's resident memory
(/proc/PID/status VmRSS) every 0.2 s, and the peak is the kernel's high-water mark of the child (getrusage
RUSAGE_CHILDREN ru_maxrss, what /usr/bin/time -v prints as "Maximum resident set size"). Each sample is
attributed to the last stage the export logged before it, so the report says in which stage the peak was reached.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import write_results  # noqa: E402
from bench.pareto import cpu_info, versions  # noqa: E402

CHILD = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr, "
         "format='%(relativeCreated)d %(name)s %(message)s'); sys.argv[0] = 'cfr-export'; "
         "from export.cli import main; main()")


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def make_checkpoint(path: Path, arch: str) -> Path:
    """A random-weight checkpoint in the official layout (trainer.checkpoint.save_checkpoint), in a child
    process so that its 2.6 GB do not stay in this one."""
    code = ("import sys, torch; from trainer.checkpoint import save_checkpoint; "
            "from trainer.models import arch_config, build_model; torch.manual_seed(0); "
            f"p = arch_config({arch!r}); save_checkpoint(sys.argv[1], build_model(p), p)")
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, check=True)
    return path


class Sampler(threading.Thread):
    """VmRSS of one process every `period` seconds, with the time of each sample."""

    def __init__(self, pid: int, period: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.period, self.samples, self.done = pid, period, [], threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.done.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.samples.append((time.monotonic() - t0, int(line.split()[1]) / 2**20))
            except OSError:
                break
            time.sleep(self.period)


def run_export(ckpt: Path, out: Path, extra: list[str]) -> dict:
    """cfr-export in a child: exit code, wall time, peak RSS, the stage log and the RSS peak of each stage."""
    args = [str(ckpt), "-o", str(out), "--fp16", "--int8", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    stages: list[tuple[float, str]] = [(0.0, "start (imports, checkpoint load)")]
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip())
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0].isdigit() and parts[1].startswith("export."):
            stages.append((time.monotonic() - t0, parts[2].strip()))
    code = proc.wait()
    wall = time.monotonic() - t0
    sampler.done.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    per_stage = []
    for i, (start, name) in enumerate(stages):
        end = stages[i + 1][0] if i + 1 < len(stages) else wall
        rss = [r for t, r in sampler.samples if start <= t < end]
        per_stage.append({"stage": name, "start_s": round(start, 1), "seconds": round(end - start, 1),
                          "peak_rss_gb": round(max(rss), 2) if rss else None})
    peak_stage = max((s for s in per_stage if s["peak_rss_gb"] is not None), key=lambda s: s["peak_rss_gb"],
                     default=None)
    sampled = max((r for _, r in sampler.samples), default=0.0)
    return {"command": "cfr-export " + " ".join(shlex.quote(a) for a in args), "exit_code": code,
            "wall_s": round(wall, 1), "peak_rss_gb": round(peak, 2), "peak_rss_sampled_gb": round(sampled, 2),
            "earlier_children_peak_gb": round(before / 2**20, 2),
            "peak_stage": peak_stage and peak_stage["stage"], "stages": per_stage, "output": lines,
            "rss_samples": [(round(t, 1), round(r, 3)) for t, r in sampler.samples[::5]]}


def three_clicks(model: Path, image: np.ndarray, gt: np.ndarray, clicks: int = 3) -> dict:
    """Load the graph in an Engine and run `clicks` clicks of the RITM clicker on its own predictions."""
    from cfr_runtime import Engine, Session
    from cfr_runtime.clicker import Clicker
    from cfr_runtime.metrics import iou

    t = time.perf_counter()
    engine = Engine(model, backend="ort")
    load_s = time.perf_counter() - t
    session = Session(engine)
    session.set_image(image)
    clicker, pred, times, ious = Clicker(gt), np.zeros(gt.shape, bool), [], []
    for _ in range(clicks):
        y, x, positive = clicker.next_click(pred)
        t = time.perf_counter()
        pred = session.add_click(x, y, positive)
        times.append(time.perf_counter() - t)
        ious.append(iou(gt, pred))
    result = {"model": model.name, "engine": repr(engine), "load_s": round(load_s, 2),
              "click_s": [round(s, 2) for s in times], "ious": [round(v, 4) for v in ious]}
    del session, engine
    gc.collect()
    return result


def render(result: dict) -> str:
    e = result["export"]
    lines = [f"# ViT-H smoke test: random-weight `{result['arch']}` exported, verified and clicked on the CPU", "",
             f"CPU: {result['cpu']['name']}, {result['cpu']['cores']} cores; memory available at start "
             f"{result['mem_available_gb_start']:.1f} GiB; load average {result['load_average'][0][0]:.1f} -> "
             f"{result['load_average'][1][0]:.1f} (shared machine). {result['date']}.",
             f"`{result['command']}`", "",
             f"## Export: `{e['command']}`", "",
             f"exit code {e['exit_code']}, wall {e['wall_s'] / 60:.1f} min, **peak RSS {e['peak_rss_gb']:.2f} GiB** "
             f"(reached in: {e['peak_stage']})", "",
             "| stage (as the export logs it) | starts at s | seconds | peak RSS GiB in stage (sampled) |",
             "|---|---|---|---|"]
    for s in e["stages"]:
        lines.append(f"| {s['stage']} | {s['start_s']} | {s['seconds']} | {s['peak_rss_gb']} |")
    lines += ["", "Files written:", ""] + [f"- {name}: {size / 1e9:.3f} GB" for name, size in result["files"].items()]
    lines += ["", "Verification (cfr-export's own report):", ""] + [f"- {x.strip()}" for x in e["output"]
                                                                  if x.strip().startswith(("fp32:", "fp16:", "int8:"))]
    lines += ["", f"## 3 clicks on GrabCut `{result['image']}` (RITM clicker; random weights, so IoU means nothing)",
              "", "| graph | engine | load s | click s | IoU |", "|---|---|---|---|---|"]
    for c in result["clicks"]:
        lines.append(f"| {c['model']} | {c['engine']} | {c['load_s']} | {', '.join(map(str, c['click_s']))} | "
                     f"{', '.join(map(str, c['ious']))} |")
    lines += ["", f"Peak RSS of the clicking process (all engines, one after another): "
              f"{result['click_process_peak_rss_gb']:.2f} GiB."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True, help="a GrabCut folder (data_GT, boundary_GT)")
    ap.add_argument("--arch", default="vit_huge")
    ap.add_argument("--checkpoint", type=Path, default=None, help="reuse a checkpoint (default: a fresh random one)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for checkpoint and export "
                    "(default: a new one under /tmp, removed at the end)")
    ap.add_argument("--image", type=int, default=0, help="index of the GrabCut instance")
    ap.add_argument("--click-models", default="model.onnx,model_int8.onnx,model_fp16.onnx")
    ap.add_argument("--export-args", default="", help="more cfr-export options, e.g. '--size 224'")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: a new temporary folder)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="cfr-vith-smoke-"))
    stem = out / f"vith_smoke_cpu_{args.arch}"
    if not args.overwrite and any(stem.with_suffix(x).exists() for x in (".json", ".md")):
        ap.error(f"{stem}.* exists; pass --overwrite or another --out")
    from cfr_runtime.datasets import open_dataset

    instance = open_dataset(args.dataset)[args.image]
    image, gt = instance.load()
    work = args.work or Path(tempfile.mkdtemp(prefix="cfr-vith-"))
    work.mkdir(parents=True, exist_ok=True)
    load = [os.getloadavg()]
    started = time.time()
    mem0 = mem_available_gb()
    ckpt = args.checkpoint or make_checkpoint(work / f"{args.arch}.pth", args.arch)
    export = run_export(ckpt, work / "out", shlex.split(args.export_args))
    files = {p.name: p.stat().st_size for p in sorted((work / "out").iterdir())} if (work / "out").is_dir() else {}
    clicks = []
    if export["exit_code"] == 0:
        for name in args.click_models.split(","):
            print(f"clicking {name} ...", flush=True)
            clicks.append(three_clicks(work / "out" / name, image, gt))
            print(clicks[-1], flush=True)
    load.append(os.getloadavg())
    result = {"arch": args.arch, "image": instance.id, "export": export, "files": files, "clicks": clicks,
              "click_process_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "mem_available_gb_start": mem0, "cpu": cpu_info(), "versions": versions(), "load_average": load,
              "total_s": round(time.time() - started, 1), "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": "python bench/vith_smoke.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))}
    write_results(stem, result, render(result) + "\n")
    if args.work is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
