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
from .models.configs import ARCHS


def _load_config(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise click.BadParameter(f"{path}: cannot read it as {'TOML' if path.suffix == '.toml' else 'JSON'} "
                                 f"({exc})", param_hint="--config") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: expected a table/object of TrainConfig keys", param_hint="--config")
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(data) - known
    if unknown:
        raise click.BadParameter(f"unknown config keys {sorted(unknown)}", param_hint="--config")
    return data


_DEFAULTS = TrainConfig()

# value ranges, shared by the options and by the keys of a --config file (which click does not see)
RANGES: dict[str, click.ParamType] = {
    "size": click.IntRange(16, 4096), "steps": click.IntRange(min=1), "batch_size": click.IntRange(min=1),
    "accum": click.IntRange(min=1), "lr": click.FloatRange(min=0, min_open=True, max=1),
    "ckpt_every": click.IntRange(min=1), "keep_every": click.IntRange(min=0), "val_every": click.IntRange(min=0),
    "val_limit": click.IntRange(min=1), "log_every": click.IntRange(min=1), "seed": click.IntRange(0, 2**31 - 1),
    "threads": click.IntRange(min=1), "max_points": click.IntRange(1, 4096),
    "device": click.Choice(["auto", "cpu", "cuda"]),
}


def _d(name: str, text: str = "") -> str:
    """Help text with the TrainConfig default (options default to None so that --config can fill them)."""
    default = getattr(_DEFAULTS, name)
    shown = "on" if default is True else "off" if default is False else default
    return f"{text} [default: {shown}]".strip()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML or JSON with TrainConfig keys; command-line options override it.")
@click.option("--data", multiple=True, help="Training source, KIND:PATH or PATH (folder, yolo, coco, sbd, "
              "synthetic:N). Repeatable.")
@click.option("--val", default=None, help="Evaluation-layout folder for periodic NoC validation.")
@click.option("--run-dir", default=None, help=_d("run_dir", "Where checkpoints and metrics.jsonl go."))
@click.option("--arch", type=click.Choice(list(ARCHS)), default=None,
              help=_d("arch", "Architecture when training from scratch."))
@click.option("--init", default=None, help="Fine-tune from this official or cfr-icl checkpoint.")
@click.option("--size", type=RANGES["size"], default=None, help=_d("size", "Crop / input size (448 official)."))
@click.option("--steps", type=RANGES["steps"], default=None, help=_d("steps", "Optimisation steps."))
@click.option("--batch-size", type=RANGES["batch_size"], default=None, help=_d("batch_size"))
@click.option("--accum", type=RANGES["accum"], default=None,
              help=_d("accum", "Gradient accumulation micro-batches per step."))
@click.option("--lr", type=RANGES["lr"], default=None, help=_d("lr"))
@click.option("--iterloss/--ritm", default=None, help=_d("iterloss", "ICL or the RITM baseline loss."))
@click.option("--suem/--no-suem", default=None, help=_d("suem", "SUEM copy-paste augmentation."))
@click.option("--amp/--no-amp", default=None, help=_d("amp", "Mixed precision (fp16 on CUDA, bf16 on CPU)."))
@click.option("--ckpt-every", type=RANGES["ckpt_every"], default=None, help=_d("ckpt_every"))
@click.option("--keep-every", type=RANGES["keep_every"], default=None,
              help=_d("keep_every", "Also keep RUN_DIR/step_N.pth every N steps (0: never)."))
@click.option("--val-every", type=RANGES["val_every"], default=None, help=_d("val_every", "0: never."))
@click.option("--val-limit", type=RANGES["val_limit"], default=None, help=_d("val_limit"))
@click.option("--log-every", type=RANGES["log_every"], default=None, help=_d("log_every"))
@click.option("--seed", type=RANGES["seed"], default=None, help=_d("seed"))
@click.option("--device", type=RANGES["device"], default=None, help=_d("device"))
@click.option("--threads", type=RANGES["threads"], default=None, help="Torch CPU threads [default: torch's]")
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
    for key, ptype in RANGES.items():
        if values.get(key) is not None:
            try:
                ptype.convert(values[key], None, None)
            except click.BadParameter as exc:
                raise click.BadParameter(f"{key} = {values[key]!r}: {exc.message}", param_hint="--config") from None
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
