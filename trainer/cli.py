"""`cfr-train`: train or fine-tune a CFR-ICL model; options, or a TOML/JSON config file they override.

Options follow the shared vocabulary (`cfr_runtime.cli_options`): `-o/--out` is the run folder (old spelling
`--run-dir`), an earlier run there is continued with `--resume` or replaced with `--overwrite`, never silently."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import click
import tomllib

from cfr_runtime.cli_options import command, option, overwrite_option, refuse_existing
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


@command("cfr-train")
@option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
        help="TOML or JSON with TrainConfig keys; command-line options override it.")
@option("--data", multiple=True, metavar="[KIND:]PATH", help="Training source, KIND:PATH or PATH (folder, yolo, "
        "coco:ANN.json:IMAGES, sbd, eval, synthetic:N; the kind is guessed from a bare PATH). Repeatable.")
@option("--val", default=None, metavar="DIR", help="Evaluation-layout folder for periodic NoC validation "
        "(see --val-every).")
@option("-o", "--out", "run_dir", default=None, old=["--run-dir"], metavar="DIR",
        help=_d("run_dir", "Run folder: last.pth (resumable), model.pth (for cfr-export), metrics.jsonl."))
@option("--arch", type=click.Choice(list(ARCHS)), default=None,
        help=_d("arch", "Architecture when training from scratch."))
@option("--init", default=None, metavar="CHECKPOINT", help="Fine-tune from this official or cfr-icl checkpoint.")
@option("--size", type=RANGES["size"], default=None,
        help=_d("size", "Crop / input size in px: a multiple of the patch (16) in whole 224 px windows "
                "(224, 448, 672, ...; 448 official)."))
@option("--steps", type=RANGES["steps"], default=None, help=_d("steps", "Optimisation steps."))
@option("--batch-size", type=RANGES["batch_size"], default=None, help=_d("batch_size", "Samples per micro-batch."))
@option("--accum", type=RANGES["accum"], default=None,
        help=_d("accum", "Gradient accumulation micro-batches per step."))
@option("--lr", type=RANGES["lr"], default=None, help=_d("lr", "Adam learning rate."))
@option("--iterloss/--ritm", default=None, help=_d("iterloss", "ICL or the RITM baseline loss."))
@option("--suem/--no-suem", default=None, help=_d("suem", "SUEM copy-paste augmentation."))
@option("--amp/--no-amp", default=None, help=_d("amp", "Mixed precision (fp16 on CUDA, bf16 on CPU)."))
@option("--ckpt-every", type=RANGES["ckpt_every"], default=None,
        help=_d("ckpt_every", "Write the resumable last.pth every N steps."))
@option("--keep-every", type=RANGES["keep_every"], default=None,
        help=_d("keep_every", "Also keep step_N.pth in the run folder every N steps (0: never)."))
@option("--val-every", type=RANGES["val_every"], default=None,
        help=_d("val_every", "NoC validation on --val every N steps (0: never)."))
@option("--val-limit", type=RANGES["val_limit"], default=None,
        help=_d("val_limit", "Instances of --val used per validation."))
@option("--log-every", type=RANGES["log_every"], default=None,
        help=_d("log_every", "Append mean loss and IoU to metrics.jsonl every N steps."))
@option("--seed", type=RANGES["seed"], default=None, help=_d("seed", "Seed of initial weights, data and clicks."))
@option("--device", type=RANGES["device"], default=None,
        help=_d("device", "auto: CUDA when torch sees a GPU, else the CPU."))
@option("--threads", type=RANGES["threads"], default=None, metavar="N",
        help="Torch CPU threads [default: torch's, one per core]; fewer than the cores keeps a shared machine usable.")
@option("--resume", is_flag=True, default=None, help="Continue the run in the run folder (-o) from its last.pth.")
@overwrite_option("an earlier run in the run folder (its checkpoints and metrics.jsonl)")
@option("--no-progress", is_flag=True, default=False, help="No progress bar (logs, CI).")
def main(config_path: Path | None, no_progress: bool, overwrite: bool, **opts) -> None:
    """Train with ICL + SUEM; writes DIR/last.pth (resumable) and DIR/model.pth (for cfr-export) into the run
    folder DIR (-o)."""
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
    if cfg.resume and overwrite:
        raise click.UsageError("--resume continues the run in the run folder and --overwrite starts it over; give one")
    _check(cfg, overwrite)
    final = train(cfg)  # a CfrError from the data or the checkpoint prints as cfr-train: error: ... (exit 2)
    click.echo(f"wrote {final}")


def _check(cfg: TrainConfig, overwrite: bool) -> None:
    """What can be refused before a model is built or RUN_DIR created: sources that do not exist, an input size
    the architecture cannot run, and an earlier run in the run folder (the overwrite policy)."""
    from .checkpoint import check_input_size
    from .data.sources import check_source

    for spec in cfg.data:
        check_source(spec)
    if cfg.val is not None and not Path(cfg.val).is_dir():
        raise CfrError(f"--val {cfg.val}: no such folder")
    if cfg.init is None:
        check_input_size(cfg.size, ARCHS[cfg.arch]["backbone_params"]["patch_size"][0])
    run = Path(cfg.run_dir)
    if not (cfg.resume or overwrite):
        refuse_existing([run / "model.pth", run / "last.pth", run / "metrics.jsonl"],
                        "pass --resume to continue that run, --overwrite to start it over, or choose another --out")


if __name__ == "__main__":
    main()
