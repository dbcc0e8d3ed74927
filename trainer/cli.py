"""`cfr-train`: train or fine-tune a CFR-ICL model; options, or a TOML/JSON config file they override."""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

import click
import tomllib

from cfr_runtime.errors import CfrError

from .loop import TrainConfig


def _load_config(path: Path | None) -> dict:
    if path is None:
        return {}
    text = path.read_text()
    data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(data) - known
    if unknown:
        raise click.BadParameter(f"unknown config keys {sorted(unknown)}", param_hint="--config")
    return data


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML or JSON with TrainConfig keys; command-line options override it.")
@click.option("--data", multiple=True, help="Training source, KIND:PATH or PATH (folder, yolo, coco, sbd, "
              "synthetic:N). Repeatable.")
@click.option("--val", default=None, help="Evaluation-layout folder for periodic NoC validation.")
@click.option("--run-dir", default=None, help="Where checkpoints and metrics.jsonl go.")
@click.option("--arch", default=None, help="tiny, xtiny, vit_base, vit_large, vit_huge (from scratch).")
@click.option("--init", default=None, help="Fine-tune from this official or cfr-icl checkpoint.")
@click.option("--size", type=int, default=None, help="Crop / input size (448 official).")
@click.option("--steps", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--accum", type=int, default=None, help="Gradient accumulation micro-batches per step.")
@click.option("--lr", type=float, default=None)
@click.option("--iterloss/--ritm", default=None, help="ICL (default) or the RITM baseline loss.")
@click.option("--suem/--no-suem", default=None, help="SUEM copy-paste augmentation (default on).")
@click.option("--amp/--no-amp", default=None, help="Mixed precision (fp16 on CUDA, bf16 on CPU).")
@click.option("--ckpt-every", type=int, default=None)
@click.option("--keep-every", type=int, default=None, help="Also keep RUN_DIR/step_N.pth every N steps.")
@click.option("--val-every", type=int, default=None)
@click.option("--val-limit", type=int, default=None)
@click.option("--log-every", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--device", default=None, help="auto, cpu or cuda.")
@click.option("--threads", type=int, default=None)
@click.option("--resume", is_flag=True, default=None, help="Continue from RUN_DIR/last.pth if present.")
@click.option("--no-progress", is_flag=True, default=False)
def main(config_path: Path | None, no_progress: bool, **opts) -> None:
    """Train with ICL + SUEM; writes RUN_DIR/last.pth (resumable) and RUN_DIR/model.pth (for cfr-export)."""
    from .loop import train

    values = _load_config(config_path)
    values.update({k: v for k, v in opts.items() if v is not None and v != ()})
    if "data" in values:
        values["data"] = list(values["data"])
    if no_progress:
        values["progress"] = False
    cfg = TrainConfig(**values)
    if not cfg.data:
        raise click.UsageError("give at least one --data source (or 'data' in --config)")
    try:
        final = train(cfg)
    except CfrError as exc:
        click.echo(f"cfr-train: error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"wrote {final}")


if __name__ == "__main__":
    main()
