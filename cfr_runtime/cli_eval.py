"""`cfr-eval [MODEL] --dataset DIR`: NoC@85/90/95 with the official protocol, JSON + Markdown + plot.

Options follow the shared vocabulary of `cfr_runtime.cli_options`; results are never replaced without
--overwrite (or continued with --resume)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .cli_options import (
    backend_option,
    command,
    dataset_option,
    limit_option,
    mode_option,
    model_argument,
    option,
    out_option,
    overwrite_option,
    refuse_existing,
    threads_option,
)
from .errors import CfrError, InputError
from .fileio import file_sha256
from .modes import MAX_CFR, Mode


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
    m = f">={result.get('max_clicks', 20)}"
    w = len(m) + 3
    head = f"| {'dataset':<12} | NoC@85 | NoC@90 | NoC@95 | {m}@85 | {m}@90 | {m}@95 | fwd/click |"
    rule = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
    row = (f"| {name:<12} | {noc['0.85']:6.2f} | {noc['0.9']:6.2f} | {noc['0.95']:6.2f} | "
           f"{over['0.85']:{w}d} | {over['0.9']:{w}d} | {over['0.95']:{w}d} | "
           f"{result['mean_forwards_per_click']:9.2f} |")
    return "\n".join([head, rule, row])


class _Journal:
    """`<json>.jsonl`: one header line (the run's settings), then one line per finished instance, flushed and
    fsynced as each instance ends, so a crash, a bad file or Ctrl-C keeps every finished instance and
    `--resume` continues from there. A torn last line (a kill mid-write) is ignored on resume."""

    def __init__(self, path: Path, header: dict, resume: bool):
        self.path, self.done, self.added, self._torn = path, [], 0, False
        if resume and path.is_file():
            self.done = self._read(path, header)
            self._file = path.open("a")
            if self._torn:
                self._file.write("\n")
        else:
            self._file = path.open("w")
            self._write(header)

    def _read(self, path: Path, header: dict) -> list:
        from .evaluate import InstanceResult

        lines = path.read_text().split("\n")
        self._torn = lines[-1] != ""
        try:
            old = json.loads(lines[0])
        except json.JSONDecodeError:
            old = None
        if not isinstance(old, dict):  # valid JSON but not a header (e.g. `42`) is no journal either
            raise CfrError(f"{path}: not a cfr-eval journal; delete it or run without --resume")
        differ = sorted(k for k in header if old.get(k) != header[k])
        if differ:
            raise CfrError(f"{path}: --resume with other settings than the interrupted run ("
                           + ", ".join(f"{k}: {old.get(k)!r} then, {header[k]!r} now" for k in differ)
                           + "); use the same options, or run without --resume to start over")
        done = []
        for line in lines[1:]:
            try:
                done.append(InstanceResult.from_json(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # the torn last line of a killed run
        return done

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def add(self, result) -> None:
        self._write(result.to_json())
        self.added += 1

    @property
    def count(self) -> int:
        return len(self.done) + self.added

    def close(self) -> None:
        self._file.close()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cfr_clicks(ctx, param, value: str) -> int | None:
    if value == "all":
        return None
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1:
        raise click.BadParameter(f"takes a positive integer or 'all', got {value!r}")
    return k


def _mode(ctx: click.Context, mode: Mode, cfr_n: int | None, acfr: bool) -> Mode:
    """--mode, or the old spelling --cfr N [--acfr] (hidden aliases)."""
    if acfr and not cfr_n:
        raise click.UsageError("--acfr adapts the CFR forwards of --cfr N; give --cfr N (e.g. --cfr 4 --acfr), "
                               "or --mode A-CFR-4")
    if cfr_n is None:
        return mode
    if ctx.get_parameter_source("mode") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--cfr/--acfr are the old spelling of --mode; give only --mode (e.g. --mode A-CFR-4)")
    return Mode(cfr_n, acfr and cfr_n > 0)


@command("cfr-eval")
@model_argument(required=False)
@dataset_option(required=True)
@option("--mask-encoding", type=click.Choice(["grabcut", "anynonzero"]), default=None,
        help="Override the mask encoding guessed from the folder name.")
@backend_option()
@threads_option()
@mode_option()
@option("--cfr", "cfr_n", type=click.IntRange(0, MAX_CFR), default=None, hidden=True)  # old: --cfr N [--acfr]
@option("--acfr", is_flag=True, hidden=True)
@option("--acfr-threshold", type=click.IntRange(min=0), default=20, show_default=True,
        help="A-CFR stops once at most this many mask pixels change between two forwards.")
@option("--cfr-clicks", default="1", show_default=True, callback=_cfr_clicks,
        help="Apply CFR to the first K clicks, or 'all' (the same as a mode ending in -all).")
@option("--no-zoom", is_flag=True, help="Disable zoom-in (whole image resized to the input size).")
@option("--max-clicks", type=click.IntRange(1, 1000), default=20, show_default=True,
        help="Clicks per instance at most (the official protocol: 20).")
@option("--target-iou", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
        help="Stop an instance once its IoU reaches this (0 < t <= 1).")
@limit_option()
@out_option(help="Write the results to DIR/<dataset>_<mode>.json (+ .md, .png, .jsonl).")
@option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
        help="Summary JSON under this exact name (+ .md, .png); finished instances go to <json>.jsonl as they end.")
@option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
        help="mIoU-vs-clicks PNG (default: next to the JSON).")
@option("--resume", is_flag=True, help="Continue an interrupted run from <json>.jsonl (same options).")
@overwrite_option("the results of an earlier run (json, md, png, jsonl)")
@click.pass_context
def main(ctx: click.Context, model: Path | None, dataset: Path, mask_encoding: str | None, backend: str,
         threads: int | None, mode: Mode, cfr_n: int | None, acfr: bool, acfr_threshold: int,
         cfr_clicks: int | None, no_zoom: bool, max_clicks: int, target_iou: float, limit: int | None,
         out: Path | None, json_out: Path | None, plot_out: Path | None, resume: bool, overwrite: bool) -> None:
    """Evaluate MODEL (an ONNX graph or TensorRT plan from cfr-export; default: the bundled default model) on a
    dataset with the official NoC protocol."""
    dataset_dir = dataset
    mode = _mode(ctx, mode, cfr_n, acfr)
    if mode.every_click:
        if ctx.get_parameter_source("cfr_clicks") is not click.core.ParameterSource.DEFAULT and cfr_clicks:
            raise click.UsageError(f"--mode {mode} refines every click; drop --cfr-clicks")
        cfr_clicks = None
    if out is not None and json_out is not None:
        raise click.UsageError("give -o/--out DIR (files named after the dataset and mode) or --json FILE, not both")
    if out is not None:
        name = str(Mode(mode.cfr, mode.adaptive, mode.cfr > 0 and cfr_clicks is None))
        if mode.cfr and cfr_clicks not in (None, 1):
            name += f"-first{cfr_clicks}"
        json_out = out / f"{dataset_dir.name}_{name}.json"
    if resume and overwrite:
        raise click.UsageError("--resume continues the earlier run and --overwrite starts over; give one of them")
    if resume and json_out is None:
        raise click.UsageError("--resume continues the <json>.jsonl of a --json run; give the same --json")
    if json_out is not None and json_out.suffix == ".jsonl":
        raise click.UsageError("--json names the summary (e.g. results/grabcut.json); the per-instance journal "
                               "goes beside it as .jsonl")
    if json_out is not None:
        plot_out = plot_out or json_out.with_suffix(".png")
    if not overwrite and not resume:
        targets = [json_out, json_out.with_suffix(".md"), json_out.with_suffix(".jsonl")] if json_out else []
        refuse_existing(targets + ([plot_out] if plot_out else []),
                        "pass --overwrite to replace it" + (", or --resume to continue that run" if json_out else ""))
    if model is None:
        from . import default_model

        model = Path(default_model())
    acfr_mode = mode.adaptive
    cfr_n = mode.cfr
    state: dict = {}
    try:
        result, engine, mode_name = _run(state, model, dataset_dir, mask_encoding, backend, threads, cfr_n,
                                         acfr_mode, acfr_threshold, cfr_clicks, no_zoom, max_clicks, target_iou,
                                         limit, json_out, resume)
    except (CfrError, OSError) as exc:  # OSError: a disk that fills up or a folder removed mid-run
        click.echo(f"cfr-eval: error: {exc}", err=True)
        _kept(state.get("journal"))
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("cfr-eval: interrupted", err=True)
        _kept(state.get("journal"))
        sys.exit(130)
    finally:
        if state.get("journal") is not None:
            state["journal"].close()
    result.update(model=str(model), dataset=dataset_dir.name, engine=repr(engine), mode=mode_name,
                  cfr_clicks="all" if cfr_clicks is None else str(cfr_clicks), zoom_in=not no_zoom)
    click.echo(f"{engine!r}  mode={mode_name}  instances={len(result['instances'])}  {result['seconds']:.1f}s")
    click.echo(format_table(dataset_dir.name, result))
    if json_out is not None:
        _write_atomic(json_out, json.dumps(result, indent=1, allow_nan=False))
        _write_atomic(json_out.with_suffix(".md"),
                      f"{engine!r}, mode {mode_name}\n\n{format_table(dataset_dir.name, result)}\n")
        click.echo(f"wrote {json_out} and {json_out.with_suffix('.md').name}")
    if plot_out is not None:
        _plot(result, plot_out, f"{dataset_dir.name}: {mode_name}, {model.name}")
        click.echo(f"wrote {plot_out}")


def _kept(journal: _Journal | None) -> None:
    if journal is not None and journal.count:
        click.echo(f"cfr-eval: {journal.count} finished instances are saved in {journal.path}; rerun the same "
                   "command with --resume to continue", err=True)


def _run(state: dict, model: Path, dataset_dir: Path, mask_encoding: str | None, backend: str, threads: int | None,
         cfr_n: int, acfr: bool, acfr_threshold: int, cfr_clicks: int | None, no_zoom: bool, max_clicks: int,
         target_iou: float, limit: int | None, json_out: Path | None, resume: bool):
    from tqdm import tqdm

    from .datasets import open_dataset
    from .engine import Engine
    from .evaluate import evaluate_dataset
    from .session import Session

    engine = Engine(model, backend=backend, threads=threads)
    if max_clicks > engine.contract.max_points:
        raise InputError(f"--max-clicks {max_clicks} exceeds the model's click capacity ({engine.contract.max_points} "
                         f"per sign); use --max-clicks <= {engine.contract.max_points}, or re-export with "
                         f"cfr-export --max-points {max_clicks}")
    session = Session(engine, cfr=cfr_n, adaptive=acfr, cfr_threshold=acfr_threshold, cfr_clicks=cfr_clicks,
                      zoom_in=not no_zoom)
    instances = open_dataset(dataset_dir, mask_encoding)[:limit]
    if not instances:
        raise InputError(f"{dataset_dir}: the dataset has no instances (no image/mask pairs found)")
    mode = str(Mode(cfr_n, acfr))
    journal = None
    if json_out is not None:
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"--json {json_out}: cannot create its folder ({exc.strerror or exc})") from None
        header = {"cfr_eval_journal": 1, "model_sha256": file_sha256(model), "dataset": str(dataset_dir.resolve()),
                  "mask_encoding": mask_encoding, "mode": mode, "acfr_threshold": acfr_threshold,
                  "cfr_clicks": cfr_clicks, "zoom_in": not no_zoom, "max_clicks": max_clicks,
                  "target_iou": target_iou}
        try:
            journal = state["journal"] = _Journal(json_out.with_suffix(".jsonl"), header, resume)
        except OSError as exc:
            raise InputError(f"--json {json_out}: cannot write next to it ({exc.strerror or exc})") from None
        if resume:
            click.echo(f"resuming: {len(journal.done)} instances already done in {journal.path}", err=True)
    done = journal.done if journal is not None else []
    todo = len([i for i in instances if i.id not in {r.id for r in done}])
    result = evaluate_dataset(session, instances, max_clicks, target_iou,
                              progress=lambda it: tqdm(it, total=todo, desc=dataset_dir.name, file=sys.stderr),
                              done=done, on_result=journal.add if journal is not None else None)
    return result, engine, mode


if __name__ == "__main__":
    main()
