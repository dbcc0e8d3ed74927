"""The one command-line vocabulary of cfr-icl, shared by cfr-eval, cfr-serve, cfr-train, cfr-export and the
bench scripts, so that the same name means the same thing everywhere, every error prints in one format and
no result is replaced silently. It lives in `cfr_runtime` (click only, no torch) because every other part
may import it.

Vocabulary (what each name means in every tool that has it):

    MODEL           positional: an exported model that a tool runs (.onnx from cfr-export, or a TensorRT
                    .plan); optional where the bundled default model is a sensible default
    CHECKPOINT      positional: a .pth (official SimpleClick / CFR-ICL, or cfr-train's) that a tool exports,
                    fine-tunes or benchmarks against torch
    --dataset DIR   an evaluation dataset folder (released layout, or images/ + masks/)
    --limit N       only the first N instances of the dataset
    --mode MODE     StdInfer, CFR-n, A-CFR-n (cfr_runtime.modes; the server's ?mode= takes the same names);
                    bench scripts take a comma-separated list
    --backend NAME  the runtime Engine's backend: auto, ort or trt
    -o, --out DIR   the folder results are written to
    --overwrite     replace existing results; without it a tool refuses and names the file
    --resume        continue an interrupted run (cfr-eval, cfr-train)
    --threads N     CPU threads of the compute (ONNX Runtime intra-op threads; torch's for training)
    --log-level L   debug, info, warning, error or critical

Errors: `<tool>: error: <message>` on stderr and exit status 2, for a bad option as for bad input (a
`cfr_runtime.CfrError`); Ctrl-C exits 130. Old option spellings stay accepted as hidden aliases (`old=`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import click

from .errors import CfrError, InputError
from .modes import Mode

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
BACKENDS = ("auto", "ort", "trt")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt")
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

F = Callable[..., Any]


def fail(prog: str, message: str, code: int = 2) -> NoReturn:
    """Print `<prog>: error: <message>` on stderr and exit (the one error format of every tool)."""
    click.echo(f"{prog}: error: {message}", err=True)
    sys.exit(code)


class CfrCommand(click.Command):
    """A click command that reports every error in the project's format and with its exit status: usage errors
    (unknown option, value out of range) and `CfrError`s alike print `<tool>: error: ...` and exit 2, Ctrl-C
    prints `<tool>: interrupted` and exits 130. With `standalone_mode=False` a successful run returns the
    callback's value (what the bench scripts' `main(argv)` hand to tests)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        prog = self.name or prog_name or "cfr"
        try:
            rv = super().main(args, prog_name or prog, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            fail(prog, exc.format_message())
        except CfrError as exc:
            fail(prog, str(exc))
        except click.Abort:
            fail(prog, "interrupted", 130)
        if standalone_mode:
            sys.exit(0)
        return rv


def command(name: str, **kwargs) -> Callable[[F], click.Command]:
    """`@command("cfr-eval")`: a CfrCommand with -h/--help and the project's help width."""
    return click.command(name, cls=CfrCommand, context_settings=dict(CONTEXT), **kwargs)


class Option(click.Option):
    """A click option with hidden old spellings: `old=("--images",)` still parses but --help shows only the
    current name, so scripts written against an earlier release keep working for one release."""

    def __init__(self, param_decls, old: Iterable[str] = (), **kwargs):
        self.old_names = tuple(old)
        super().__init__([*param_decls, *self.old_names], **kwargs)

    def _current(self, method, ctx):
        opts = self.opts
        self.opts = [o for o in opts if o not in self.old_names]
        try:
            return method(ctx)
        finally:
            self.opts = opts

    def get_help_record(self, ctx):
        return self._current(super().get_help_record, ctx)

    def get_error_hint(self, ctx):
        return self._current(super().get_error_hint, ctx)


def option(*decls: str, old: Iterable[str] = (), **kwargs) -> Callable[[F], F]:
    """`click.option` with the `old=` hidden aliases of `Option`."""
    return click.option(*decls, cls=Option, old=old, **kwargs)


# ---- what a path on the command line is ------------------------------------------------------------------

def model_problem(path: Path) -> str | None:
    """Why `path` cannot be a MODEL (an exported .onnx / .plan), with what to pass instead; None if it may be
    one. Only the name and kind are checked here: a missing or malformed file is the Engine's to report."""
    suffix = path.suffix.lower()
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.onnx"))
        hint = f"; e.g. {path / inside[0]}" if inside else ""
        return f"{path} is a folder; pass the model file in it{hint}"
    if suffix in CHECKPOINT_SUFFIXES:
        return (f"{path} is a checkpoint; export it first: cfr-export {path} -o DIR, then pass DIR/model.onnx")
    if suffix == ".pt2":
        beside = path.with_name("model_full.onnx" if "full" in path.stem else "model.onnx")
        return (f"{path} is an AOTInductor package (compiled PyTorch, written by cfr-export --engine aoti) and needs "
                "torch to run (export.aoti.aoti_engine); this tool runs the ONNX graph or TensorRT plan: pass "
                f"{beside}, which cfr-export writes beside it")
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be a CHECKPOINT (.pth), with what to pass instead; None if it may be one."""
    if path.is_dir():
        inside = [p for p in (path / "model.pth", path / "last.pth") if p.is_file()]
        hint = f"; e.g. {inside[0]} (a cfr-train run folder)" if inside else ""
        return f"{path} is a folder; pass the checkpoint file{hint}"
    if path.suffix.lower() in (".onnx", ".plan", ".engine", ".pt2"):
        return (f"{path} is an exported model; this tool takes the checkpoint (.pth) it was exported from "
                "(trainer/assets/default.pth is the shipped default's)")
    return None


class _CheckedPath(click.ParamType):
    def __init__(self, problem: Callable[[Path], str | None], name: str):
        self.problem, self.name = problem, name

    def convert(self, value, param, ctx) -> Path:
        path = value if isinstance(value, Path) else Path(value)
        why = self.problem(path)
        if why:  # a plain usage error: the message names the file and says what to pass instead
            raise click.UsageError(why, ctx)
        return path


MODEL = _CheckedPath(model_problem, "model")
CHECKPOINT = _CheckedPath(checkpoint_problem, "checkpoint")


def _positional(name: str, ptype: click.ParamType, required: bool, old: Iterable[str]) -> Callable[[F], F]:
    """A positional argument; `old` names hidden option spellings (e.g. --checkpoint) that still set it: the
    callback gets `<name>_alias` too, to be combined with `merge_alias`."""
    def deco(f: F) -> F:
        f = click.argument(name, type=ptype, required=required and not old)(f)
        for spelling in old:
            f = click.option(spelling, f"{name}_alias", type=ptype, default=None, hidden=True)(f)
        return f
    return deco


def model_argument(required: bool = True, old: Iterable[str] = ()) -> Callable[[F], F]:
    """MODEL: an exported .onnx / .plan (optional where the bundled default stands in)."""
    return _positional("model", MODEL, required, old)


def checkpoint_argument(required: bool = True, old: Iterable[str] = ()) -> Callable[[F], F]:
    """CHECKPOINT: a .pth (optional where the shipped default checkpoint stands in)."""
    return _positional("checkpoint", CHECKPOINT, required, old)


def merge_alias(value, alias, name: str):
    """The positional value or its hidden option spelling (not both)."""
    if value is not None and alias is not None:
        raise click.UsageError(f"{name} given twice (positionally and as an option); give it once")
    return value if value is not None else alias


# ---- the shared options --------------------------------------------------------------------------------

class Positive(click.ParamType):
    """A positive int or float (a size, a count, a time limit): the message says "positive", not a range."""

    def __init__(self, kind: type = int):
        self.kind = kind
        self.name = "integer" if kind is int else "number"

    def convert(self, value, param, ctx):
        try:
            number = self.kind(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a {self.name}", param, ctx)
        if not number > 0:  # NaN included
            self.fail(f"must be positive, got {value}", param, ctx)
        return number


POSITIVE_INT, POSITIVE_FLOAT = Positive(int), Positive(float)


class ModeType(click.ParamType):
    """One mode name (cfr_runtime.modes), or with `many=True` a comma-separated list; `choices` restricts it."""

    name = "mode"

    def __init__(self, many: bool = False, choices: Iterable[str] | None = None):
        self.many, self.choices = many, tuple(choices) if choices is not None else None

    def convert(self, value, param, ctx):
        if isinstance(value, (Mode, list)):
            return value
        names = [v.strip() for v in str(value).split(",")] if self.many else [str(value)]
        out = []
        for name in names:
            try:
                mode = Mode.parse(name)
            except InputError as exc:
                self.fail(str(exc), param, ctx)
            if self.choices is not None and str(mode) not in self.choices:
                self.fail(f"{name!r} is not one of {', '.join(self.choices)}", param, ctx)
            out.append(mode)
        return out if self.many else out[0]


def mode_option(many: bool = False, default: str = "StdInfer", choices: Iterable[str] | None = None,
                old: Iterable[str] = (), help: str | None = None) -> Callable[[F], F]:
    what = "Comma-separated CFR modes" if many else "CFR mode"
    text = help or (f"{what}: StdInfer, CFR-n or A-CFR-n (n extra forwards on the first click; A- stops once "
                    "<= 20 pixels change; -all: on every click).")
    if choices is not None:
        text += f" Choose from {','.join(choices)}."
    return option("--mode", "mode", type=ModeType(many, choices), default=default, show_default=True, old=old,
                  metavar="MODES" if many else "MODE", help=text)


def dataset_option(required: bool = False, default: Path | None = None, help: str | None = None,
                   ) -> Callable[[F], F]:
    return option("--dataset", "dataset", type=click.Path(path_type=Path), required=required, default=default,
                  metavar="DIR",
                  help=help or "Dataset folder (released layout, or images/ + masks/).")


def limit_option(old: Iterable[str] = (), default: int | None = None, help: str | None = None) -> Callable[[F], F]:
    return option("--limit", "limit", type=click.IntRange(min=1), default=default, old=old, metavar="N",
                  show_default=default is not None,
                  help=help or "Only the first N instances of the dataset [default: all].")


def backend_option() -> Callable[[F], F]:
    return option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                  help="Engine backend: auto (a .plan runs on TensorRT, anything else on ONNX Runtime), ort or trt.")


def out_option(default: Path | None = None, required: bool = False, help: str | None = None,
               old: Iterable[str] = (), name: str = "out", shown: str | None = None) -> Callable[[F], F]:
    """-o/--out DIR; `shown` is the default as --help should print it (e.g. relative to the checkout)."""
    return option("-o", "--out", name, type=click.Path(file_okay=False, path_type=Path), default=default,
                  required=required, old=old, metavar="DIR", show_default=shown or default is not None,
                  help=help or "Folder the results are written to.")


def overwrite_option(what: str = "existing results") -> Callable[[F], F]:
    return option("--overwrite", is_flag=True,
                  help=f"Replace {what}; without it the command refuses to replace them and names the file.")


def threads_option(help: str | None = None, default: int | None = None) -> Callable[[F], F]:
    """--threads N; a computed `default` (e.g. the usable cores) is described in `help`, not printed."""
    return option("--threads", type=click.IntRange(min=1), default=default, metavar="N",
                  help=help or "ONNX Runtime intra-op threads [default: ONNX Runtime's, one per core it may use].")


def log_level_option(default: str = "warning") -> Callable[[F], F]:
    return option("--log-level", type=click.Choice(LOG_LEVELS), default=default, show_default=True,
                  help="How much the server logs.")


# ---- the overwrite policy ----------------------------------------------------------------------------------

def refuse_existing(paths: Iterable[Path], remedy: str = "pass --overwrite to replace it") -> None:
    """The overwrite policy: results are never replaced silently. Raises an InputError naming the first existing
    path and what to do (`remedy`, which names the flag: "pass --overwrite to replace it, or --resume to
    continue that run"). Called before the work starts, so a refused run costs nothing."""
    existing = [Path(p) for p in paths if Path(p).exists()]
    if existing:
        more = f" (and {len(existing) - 1} more file{'s' if len(existing) > 2 else ''} of that run)" \
            if len(existing) > 1 else ""
        raise InputError(f"{existing[0]} exists{more}; {remedy}")
