"""The paper's ablations at small scale: evaluate trained runs with the official NoC protocol.

    python bench/ablations.py --runs icl=RUN_A ritm=RUN_B nosuem=RUN_C icl_seed1=RUN_D \\
        --cfr-model trainer/assets/default.pth --size 224

Each run's `model.pth` is exported to ONNX (verified) and evaluated on GrabCut and Berkeley; the CFR
ablation evaluates one model with StdInfer, CFR-1 and A-CFR-4. Writes bench/results/ablations.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {"StdInfer": dict(cfr=0), "CFR-1": dict(cfr=1), "A-CFR-4": dict(cfr=4, adaptive=True)}


def evaluate(onnx_path: Path, dataset: Path, **kw) -> dict:
    from cfr_runtime import Engine, Session
    from cfr_runtime.datasets import open_dataset
    from cfr_runtime.evaluate import evaluate_dataset

    res = evaluate_dataset(Session(Engine(onnx_path), **kw), open_dataset(dataset))
    return {"noc": res["noc"], "over_max": res["over_max"], "fwd_per_click": res["mean_forwards_per_click"],
            "seconds": res["seconds"], "miou_per_click": res["miou_per_click"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=[], help="NAME=RUN_DIR (uses RUN_DIR/model.pth)")
    ap.add_argument("--cfr-model", type=Path, default=None, help="checkpoint for the StdInfer/CFR-1/A-CFR-4 rows")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--datasets", default="GrabCut,Berkeley")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    from export.onnx_export import export_onnx
    from export.verify import verify_onnx

    tmp = Path(tempfile.mkdtemp(prefix="cfr-abl-"))
    datasets = [args.data_root / d for d in args.datasets.split(",")]
    rows = []

    def run(name: str, ckpt: Path, modes: dict) -> None:
        onnx_path, contract, graph = export_onnx(ckpt, tmp / name, size=args.size)
        verify_onnx(onnx_path, graph, contract)
        meta = json.loads((Path(ckpt).parent / "metrics.jsonl").read_text().splitlines()[-1]) \
            if (Path(ckpt).parent / "metrics.jsonl").exists() else {}
        for mode, kw in modes.items():
            row = {"run": name, "checkpoint": str(ckpt), "mode": mode, "final_train_loss": meta.get("loss")}
            for ds in datasets:
                t = time.time()
                row[ds.name] = evaluate(onnx_path, ds, **kw)
                print(f"{name:12s} {mode:9s} {ds.name:9s} NoC@85 {row[ds.name]['noc']['0.85']:.2f} "
                      f"NoC@90 {row[ds.name]['noc']['0.9']:.2f} ({time.time() - t:.0f}s)", flush=True)
            rows.append(row)

    if args.cfr_model:
        run("cfr", args.cfr_model, MODES)
    for spec in args.runs:
        name, _, path = spec.partition("=")
        run(name, Path(path) / "model.pth", {"StdInfer": MODES["StdInfer"]})
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "ablations.json"
    if previous.exists():  # runs evaluated earlier stay, re-evaluated ones are replaced
        done = {(r["run"], r["mode"]) for r in rows}
        rows = [r for r in json.loads(previous.read_text()) if (r["run"], r["mode"]) not in done] + rows
    previous.write_text(json.dumps(rows, indent=1))
    table = render(rows, [d.name for d in datasets])
    (args.out / "ablations.md").write_text(table + "\n")
    print(table)


def render(rows: list[dict], names: list[str]) -> str:
    """NoC saturates at 20 for weak models, so mIoU after 5 clicks is shown beside it."""
    head = " | ".join(f"{n} NoC@85 | {n} NoC@90 | {n} mIoU@5" for n in names)
    lines = [f"| run | inference | {head} | fwd/click |", "|---|---|" + "---|---|---|" * len(names) + "---|"]
    for r in rows:
        cells = " | ".join(f"{r[n]['noc']['0.85']:.2f} | {r[n]['noc']['0.9']:.2f} | {r[n]['miou_per_click'][4]:.3f}"
                           for n in names)
        lines.append(f"| {r['run']} | {r['mode']} | {cells} | {r[names[0]]['fwd_per_click']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
