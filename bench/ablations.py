"""The paper's ablations at small scale: evaluate trained runs with the official NoC protocol.

    python bench/ablations.py icl=RUN_A ritm=RUN_B nosuem=RUN_C icl_seed1=RUN_D \\
        --cfr-model trainer/assets/default.pth --size 224

Each run's `model.pth` is exported to ONNX (verified) and evaluated on GrabCut and Berkeley; the CFR
ablation evaluates one model with StdInfer, CFR-1 and A-CFR-4. Writes bench/results/ablations.{json,md}
(or -o): rows of other runs stay; a row for a run and mode already there is replaced only with --overwrite.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfr_runtime.cli_options import CHECKPOINT, command, option, out_option, overwrite_option  # noqa: E402
from cfr_runtime.errors import InputError  # noqa: E402

MODES = {"StdInfer": dict(cfr=0), "CFR-1": dict(cfr=1), "A-CFR-4": dict(cfr=4, adaptive=True)}


def evaluate(onnx_path: Path, dataset: Path, **kw) -> dict:
    from cfr_runtime import Engine, Session
    from cfr_runtime.datasets import open_dataset
    from cfr_runtime.evaluate import evaluate_dataset

    res = evaluate_dataset(Session(Engine(onnx_path), **kw), open_dataset(dataset))
    return {"noc": res["noc"], "over_max": res["over_max"], "fwd_per_click": res["mean_forwards_per_click"],
            "seconds": res["seconds"], "miou_per_click": res["miou_per_click"]}


@command("ablations.py")
@click.argument("runs", nargs=-1, metavar="[NAME=RUN_DIR...]")
@option("--runs", "runs_flag", is_flag=True, hidden=True)  # old spelling: --runs NAME=DIR ... (the list follows)
@option("--cfr-model", type=CHECKPOINT, default=None, metavar="CHECKPOINT",
        help="Checkpoint evaluated with StdInfer, CFR-1 and A-CFR-4 (the CFR ablation).")
@option("--size", type=click.IntRange(16, 4096), default=224, show_default=True, help="Input size of the exports.")
@option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=ROOT.parent / "shared" / "data",
        show_default="../shared/data", help="Folder holding the evaluation datasets.")
@option("--datasets", default="GrabCut,Berkeley", show_default=True, help="Comma list of datasets in --data-root.")
@out_option(default=ROOT / "bench" / "results", shown="bench/results",
            help="Folder of ablations.json/.md; rows of other runs already there are kept.")
@overwrite_option("rows of ablations.json for the same run and mode")
def main(runs, runs_flag, cfr_model, size, data_root, datasets, out, overwrite) -> None:
    """Evaluate trained runs (NAME=RUN_DIR: RUN_DIR/model.pth with StdInfer) and the CFR modes of --cfr-model with
    the official NoC protocol; see the module docstring."""
    for spec in runs:
        if "=" not in spec:
            raise click.UsageError(f"{spec!r}: runs are given as NAME=RUN_DIR")
    planned = ([("cfr", m) for m in MODES] if cfr_model else []) + [(r.partition("=")[0], "StdInfer") for r in runs]
    previous = out / "ablations.json"
    if previous.exists() and not overwrite:
        done = [(r["run"], r["mode"]) for r in json.loads(previous.read_text())]
        again = [f"{n} {m}" for n, m in planned if (n, m) in done]
        if again:
            raise InputError(f"{previous} already has rows for {', '.join(again)}; pass --overwrite to replace them, "
                             "or choose another -o")
    args = SimpleNamespace(runs=list(runs), cfr_model=cfr_model, size=size, data_root=data_root, datasets=datasets,
                           out=out)
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
