"""Click-by-click comparison of `cfr-eval` (square and full-resolution graphs) with the official evaluation.

    python bench/parity_compare.py --official-dir bench/results/parity/official --out bench/results/parity

The official runs are the JSON files written by bench/official_eval.py (one per dataset and mode, named
`<Dataset>_<mode>.json`, modes plain / CFR-4 / A-CFR-4). For each of them this runs the same evaluation with
`cfr-eval` (the CLI, in a subprocess) on the shipped default model: the square graph
(`cfr_runtime/assets/default.onnx`) and the full-resolution graph (exported here from
`trainer/assets/default.pth` with `cfr-export --graph full`), and compares per instance the whole click
sequence (row, column, polarity, count), the IoUs, and NoC@85/90/95. Writes parity.json and parity.md to --out
(a new temporary folder when not given; existing files are not replaced without --overwrite); the cfr-eval
outputs go to --work (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import start_record, write_results  # noqa: E402

MODE_FLAGS = {"plain": [], "CFR-4": ["--cfr", "4"], "A-CFR-4": ["--cfr", "4", "--acfr"]}
THRESHOLDS = ("85", "90", "95")


def compare(official: dict, ours: dict) -> dict:
    """Per-instance agreement of two runs on the same dataset and mode."""
    mine = {r["id"]: r for r in ours["instances"]}
    diverged, worst_iou = [], 0.0
    for ref in official["instances"]:
        got = mine.get(ref["id"])
        if got is None:
            diverged.append({"id": ref["id"], "at_click": None, "why": "missing"})
            continue
        a, b = [list(map(int, c)) for c in ref["clicks"]], [list(map(int, c)) for c in got["clicks"]]
        first = next((k for k, (u, v) in enumerate(zip(a, b)) if u != v), None)
        if first is None and len(a) != len(b):
            first = min(len(a), len(b))
        if first is not None:
            diverged.append({"id": ref["id"], "at_click": first + 1, "official": a[first] if first < len(a) else None,
                             "ours": b[first] if first < len(b) else None})
        else:
            worst_iou = max(worst_iou, max(abs(u - v) for u, v in zip(ref["ious"], got["ious"])))
    noc_official = {t: float(official["noc"][t]) for t in THRESHOLDS}
    noc_ours = {t: float(ours["noc"][f"{int(t) / 100:g}"]) for t in THRESHOLDS}
    return {
        "instances": len(official["instances"]),
        "identical": len(official["instances"]) - len(diverged),
        "diverged": diverged,
        "max_iou_diff_identical": worst_iou,
        "noc_official": noc_official, "noc_ours": noc_ours,
        "noc_equal_2dp": all(f"{noc_official[t]:.2f}" == f"{noc_ours[t]:.2f}" for t in THRESHOLDS),
    }


def run_cfr_eval(model: Path, dataset: Path, mode: str, out: Path, reuse: bool = False) -> dict:
    if reuse and out.is_file():
        return json.loads(out.read_text())
    cmd = ["cfr-eval", str(model), "--dataset", str(dataset), *MODE_FLAGS[mode], "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True)  # quiet: cfr-eval's progress bar is not wanted here
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-dir", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--datasets", default="GrabCut,Berkeley")
    ap.add_argument("--modes", default="plain,CFR-4,A-CFR-4")
    ap.add_argument("--graphs", default="square,full")
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "trainer" / "assets" / "default.pth")
    ap.add_argument("--square-model", type=Path, default=ROOT / "cfr_runtime" / "assets" / "default.onnx")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="use cfr-eval JSONs already in --work (same models)")
    args = ap.parse_args(argv)
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="parity_"))
    targets = [out_dir / "parity.json", out_dir / "parity.md"]
    if not args.overwrite and any(p.exists() for p in targets):
        ap.error(f"{out_dir} already has parity.json/.md; pass --overwrite to replace them")
    work = args.work or Path(tempfile.mkdtemp(prefix="parity_work_"))
    work.mkdir(parents=True, exist_ok=True)
    models = {"square": args.square_model}
    graphs = args.graphs.split(",")
    if "full" in graphs:
        if not (args.reuse and (work / "full" / "model_full.onnx").is_file()):
            subprocess.run(["cfr-export", str(args.checkpoint), "-o", str(work / "full"), "--graph", "full"],
                           check=True, stdout=subprocess.DEVNULL)
        models["full"] = work / "full" / "model_full.onnx"
    result = {**start_record(), "models": {k: str(v) for k, v in models.items()}, "runs": []}
    for ds in args.datasets.split(","):
        for mode in args.modes.split(","):
            official = json.loads((args.official_dir / f"{ds}_{mode}.json").read_text())
            for graph in graphs:
                t = time.perf_counter()
                ours = run_cfr_eval(models[graph], args.data / ds, mode, work / f"{graph}_{ds}_{mode}.json",
                                    args.reuse)
                row = {"dataset": ds, "mode": mode, "graph": graph, **compare(official, ours),
                       "official_commit": official.get("official_commit"), "seconds": time.perf_counter() - t}
                result["runs"].append(row)
                print(f"{ds} {mode} {graph}: {row['identical']}/{row['instances']} identical click sequences; NoC "
                      f"official {row['noc_official']} ours {row['noc_ours']}", flush=True)
    result["load_average_end"] = list(os.getloadavg())
    write_results(out_dir / "parity", result, render_md(result), show=False)
    return result


def render_md(r: dict) -> str:
    lines = ["# cfr-eval against the official evaluation, click by click (shipped default, 224, CPU)", "",
             f"Command: `{r['command']}`  ", f"Machine: {r['machine']}, {r['cpu_count']} cores.", "",
             "| dataset | mode | graph | identical click sequences | first divergence | max IoU diff (identical) "
             "| NoC@85/90/95 official | NoC@85/90/95 cfr-eval | equal to 2 decimals |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["runs"]:
        first = ", ".join(f"{d['id']} at click {d['at_click']}" for d in row["diverged"][:6]) or "-"
        noc = lambda d: " / ".join(f"{d[t]:.2f}" for t in THRESHOLDS)  # noqa: E731
        lines.append(f"| {row['dataset']} | {row['mode']} | {row['graph']} | {row['identical']}/{row['instances']} | "
                     f"{first} | {row['max_iou_diff_identical']:.2g} | {noc(row['noc_official'])} | "
                     f"{noc(row['noc_ours'])} | {'yes' if row['noc_equal_2dp'] else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
