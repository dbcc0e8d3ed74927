"""`cfr-eval MODEL.onnx --dataset DIR`: NoC@85/90/95 with the official protocol, JSON + plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import CfrError


def _plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["miou_per_click"]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(range(1, len(curve) + 1), curve, marker="o", ms=3)
    ax.set_xlabel("clicks")
    ax.set_ylabel("mIoU")
    ax.set_ylim(0, 1)
    ax.set_xticks(range(0, len(curve) + 1, 2))
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(name: str, result: dict) -> str:
    noc, over = result["noc"], result["over_max"]
    head = f"| {'dataset':<12} | NoC@85 | NoC@90 | NoC@95 | >=20@85 | >=20@90 | >=20@95 | fwd/click |"
    rule = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
    row = (f"| {name:<12} | {noc['0.85']:6.2f} | {noc['0.9']:6.2f} | {noc['0.95']:6.2f} | "
           f"{over['0.85']:7d} | {over['0.9']:7d} | {over['0.95']:7d} | {result['mean_forwards_per_click']:9.2f} |")
    return "\n".join([head, rule, row])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dataset", "dataset_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Dataset folder (released layout or images/ + masks/).")
@click.option("--mask-encoding", type=click.Choice(["grabcut", "anynonzero"]), default=None,
              help="Override the mask encoding guessed from the folder name.")
@click.option("--backend", default="auto", show_default=True, help="Engine backend: auto, ort or trt.")
@click.option("--cfr", "cfr_n", type=int, default=0, show_default=True, help="CFR-n: extra forwards per click.")
@click.option("--acfr", is_flag=True, help="Adaptive CFR: stop when <= --acfr-threshold pixels change.")
@click.option("--acfr-threshold", type=int, default=20, show_default=True)
@click.option("--cfr-clicks", default="1", show_default=True, help="Apply CFR to the first K clicks, or 'all'.")
@click.option("--no-zoom", is_flag=True, help="Disable zoom-in (whole image resized to the input size).")
@click.option("--max-clicks", type=int, default=20, show_default=True)
@click.option("--target-iou", type=float, default=0.95, show_default=True)
@click.option("--limit", type=int, default=None, help="Evaluate only the first N instances.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="mIoU-vs-clicks PNG (default: next to --json).")
def main(model: Path, dataset_dir: Path, mask_encoding: str | None, backend: str, cfr_n: int, acfr: bool,
         acfr_threshold: int, cfr_clicks: str, no_zoom: bool, max_clicks: int, target_iou: float,
         limit: int | None, json_out: Path | None, plot_out: Path | None) -> None:
    """Evaluate MODEL (exported by cfr-export) on a dataset with the official NoC protocol."""
    from tqdm import tqdm

    from .datasets import open_dataset
    from .engine import Engine
    from .evaluate import evaluate_dataset
    from .session import Session

    try:
        k = None if cfr_clicks == "all" else int(cfr_clicks)
    except ValueError:
        raise click.BadParameter("--cfr-clicks takes a positive integer or 'all'") from None
    try:
        engine = Engine(model, backend=backend)
        session = Session(engine, cfr=cfr_n, adaptive=acfr, cfr_threshold=acfr_threshold, cfr_clicks=k,
                          zoom_in=not no_zoom)
        instances = open_dataset(dataset_dir, mask_encoding)[:limit]
        result = evaluate_dataset(session, instances, max_clicks, target_iou,
                                  progress=lambda it: tqdm(it, total=len(instances), desc=dataset_dir.name,
                                                           file=sys.stderr))
    except CfrError as exc:
        click.echo(f"cfr-eval: error: {exc}", err=True)
        sys.exit(2)
    mode = f"CFR-{cfr_n}" if cfr_n else "StdInfer"
    mode = ("A-" + mode) if acfr and cfr_n else mode
    result.update(model=str(model), dataset=dataset_dir.name, engine=repr(engine), mode=mode,
                  cfr_clicks=cfr_clicks, zoom_in=not no_zoom)
    click.echo(f"{engine!r}  mode={mode}  instances={len(result['instances'])}  {result['seconds']:.1f}s")
    click.echo(format_table(dataset_dir.name, result))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1))
        json_out.with_suffix(".md").write_text(f"{engine!r}, mode {mode}\n\n{format_table(dataset_dir.name, result)}\n")
        click.echo(f"wrote {json_out} and {json_out.with_suffix('.md').name}")
        plot_out = plot_out or json_out.with_suffix(".png")
    if plot_out is not None:
        _plot(result, plot_out, f"{dataset_dir.name}: {mode}, {model.name}")
        click.echo(f"wrote {plot_out}")


if __name__ == "__main__":
    main()
