"""One vocabulary across every command line (issue 20): the same option names and meanings in cfr-eval,
cfr-serve, cfr-train, cfr-export and the bench scripts, every option described in --help, old spellings kept
as hidden aliases, one error format, and the messages a new user met first."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cfr_runtime.cli_eval import main as eval_main
from cfr_runtime.cli_options import CfrCommand, ModeType
from cfr_runtime.modes import Mode
from cfr_runtime.serve.cli import main as serve_main
from export.cli import main as export_main
from trainer.cli import main as train_main


def _bench(name: str) -> click.Command:
    module = importlib.import_module(f"bench.{name}")
    return module.cli if isinstance(getattr(module, "cli", None), click.Command) else module.main


COMMANDS = {"cfr-eval": eval_main, "cfr-serve": serve_main, "cfr-train": train_main, "cfr-export": export_main,
            "latency.py": _bench("latency"), "pareto.py": _bench("pareto"), "serve_load.py": _bench("serve_load"),
            "main_job.py": _bench("main_job"), "ablations.py": _bench("ablations"),
            "gpu_full_graph_check.py": _bench("gpu_full_graph_check")}
# spellings of an earlier release: still parsed, never shown in --help
OLD = {"--images", "--modes", "--checkpoint", "--model", "--run-dir", "--eval-limit", "--cfr", "--acfr", "--runs"}


def _visible(cmd: click.Command) -> list[click.Option]:
    return [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_is_described(name):
    cmd = COMMANDS[name]
    assert isinstance(cmd, CfrCommand) and cmd.name == name  # the shared error format, not a copy of it
    undescribed = [p.opts[0] for p in _visible(cmd) if not (p.help or "").strip()]
    assert not undescribed, f"{name}: options without help: {undescribed}"
    help_text = CliRunner().invoke(cmd, ["--help"], terminal_width=200).output
    for arg in (p for p in cmd.params if isinstance(p, click.Argument)):
        assert (arg.metavar or arg.name).strip("[].").split()[0].upper() in (cmd.help or "").upper(), \
            f"{name}: its docstring does not explain {arg.name}"
    shown = set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))
    assert not shown & OLD, f"{name}: old spellings shown in --help: {shown & OLD}"


def _options_named(opt: str):
    for name, cmd in COMMANDS.items():
        for p in _visible(cmd):
            if opt in p.opts:
                yield name, p


@pytest.mark.parametrize("opt,how", [
    ("--limit", lambda p: isinstance(p.type, click.IntRange) and p.type.min == 1),
    ("--mode", lambda p: isinstance(p.type, ModeType)),
    ("--backend", lambda p: isinstance(p.type, click.Choice) and list(p.type.choices) == ["auto", "ort", "trt"]),
    ("--threads", lambda p: isinstance(p.type, click.IntRange) and p.type.min == 1),
    ("--log-level", lambda p: isinstance(p.type, click.Choice) and "verbose" not in p.type.choices),
    ("--out", lambda p: "-o" in p.opts),
    ("--overwrite", lambda p: p.is_flag),
    ("--dataset", lambda p: p.metavar == "DIR"),
])
def test_one_name_one_meaning(opt, how):
    found = list(_options_named(opt))
    assert found, opt
    bad = [name for name, p in found if not how(p)]
    assert not bad, f"{opt} means something else in {bad}"


def test_every_writer_has_the_overwrite_flag():
    writers = ["cfr-eval", "cfr-train", "cfr-export", "latency.py", "pareto.py", "serve_load.py", "main_job.py",
               "ablations.py", "gpu_full_graph_check.py"]
    assert [n for n in writers if not any("--overwrite" in p.opts for p in _visible(COMMANDS[n]))] == []


def _parse(name: str, args: list[str]) -> dict:
    cmd = COMMANDS[name]
    with cmd.make_context(name, list(args), resilient_parsing=False) as ctx:
        return dict(ctx.params)


def test_old_spellings_still_parse():
    ckpt = "trainer/assets/default.pth"
    lat = _parse("latency.py", ["--checkpoint", ckpt, "--images", "2", "--modes", "StdInfer,A-CFR-4"])
    assert lat["checkpoint_alias"] == Path(ckpt) and lat["limit"] == 2
    assert [str(m) for m in lat["mode"]] == ["StdInfer", "A-CFR-4"]
    par = _parse("pareto.py", ["--checkpoint", ckpt, "--modes", "StdInfer"])
    assert par["checkpoint_alias"] == Path(ckpt) and [str(m) for m in par["mode"]] == ["StdInfer"]
    assert _parse("serve_load.py", ["--model", "m.onnx"])["model_alias"] == Path("m.onnx")
    assert _parse("cfr-train", ["--run-dir", "runs/x"])["run_dir"] == "runs/x"
    assert _parse("main_job.py", ["--eval-limit", "3"])["limit"] == 3
    assert _parse("ablations.py", ["--runs", "a=x", "b=y"])["runs"] == ("a=x", "b=y")
    assert _parse("gpu_full_graph_check.py", ["-o", "x", "--cfr", "1", "--images", "1"])["cfr_n"] == 1
    ev = _parse("cfr-eval", ["--dataset", "d", "--cfr", "4", "--acfr"])
    assert (ev["cfr_n"], ev["acfr"]) == (4, True)


def test_modes_are_one_grammar():
    assert Mode.parse("A-CFR-4") == Mode(4, True) and str(Mode(4, True)) == "A-CFR-4"
    assert Mode.parse("StdInfer").session_kwargs() == {"cfr": 0, "adaptive": False}
    assert Mode.parse("A-CFR-4-all").session_kwargs() == {"cfr": 4, "adaptive": True, "cfr_clicks": None}
    for bad in ("Std", "CFR-0", "A-CFR-", "CFR-101", "cfr-4"):
        with pytest.raises(ValueError, match="unknown mode"):
            Mode.parse(bad)


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("args", [["--no-such-option"], ["--threads", "0"]])
def test_one_error_format(name, args):
    if args[0] == "--threads" and not any("--threads" in p.opts for p in COMMANDS[name].params):
        args = ["--help-me"]
    result = CliRunner().invoke(COMMANDS[name], args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"{name}: error: ") and result.output.count("\n") == 1, result.output
    assert "Usage:" not in result.output and "Traceback" not in result.output


# ---- the messages a new user met first ----------------------------------------------------------------------

def test_train_missing_data_says_no_such_path(tmp_path):
    result = CliRunner().invoke(train_main, ["--data", "/nope", "-o", str(tmp_path / "run")])
    assert result.exit_code == 2 and "/nope: no such path" in result.output, result.output
    assert not (tmp_path / "run").exists()  # refused before a run folder was made


def test_train_refuses_a_size_the_model_cannot_run(tmp_path):
    """As cfr-export refuses it: a multiple of the patch (16) in whole 224 px windows."""
    result = CliRunner().invoke(train_main, ["--data", "synthetic:2", "--size", "100", "-o", str(tmp_path / "r"),
                                             "--steps", "1", "--batch-size", "1", "--no-progress"])
    assert result.exit_code == 2 and "multiple of the patch (16)" in result.output, result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["model.pt2", "model_full_fp16.pt2"])
def test_eval_pt2_says_what_it_is(tmp_path, name):
    (tmp_path / name).write_bytes(b"PK\x03\x04 an AOTInductor package")
    result = CliRunner().invoke(eval_main, [str(tmp_path / name), "--dataset", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "AOTInductor" in result.output and "model" in result.output and ".onnx" in result.output
    assert "Protobuf" not in result.output


def test_eval_folder_names_the_model_inside(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    result = CliRunner().invoke(eval_main, [str(tmp_path), "--dataset", str(tmp_path)])
    assert result.exit_code == 2 and f"{tmp_path / 'model.onnx'}" in result.output, result.output


def test_export_takes_a_checkpoint_not_a_model(tmp_path):
    result = CliRunner().invoke(export_main, ["cfr_runtime/assets/default.onnx", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "exported model" in result.output and ".pth" in result.output, result.output


def test_eval_mode_and_its_old_spelling_agree(tmp_path):
    """--mode A-CFR-4 and --cfr 4 --acfr name one run (the same file name under -o)."""
    assert _parse("cfr-eval", ["--dataset", "d", "--mode", "A-CFR-4"])["mode"] == Mode(4, True)
    result = CliRunner().invoke(eval_main, ["--dataset", "d", "--mode", "CFR-2", "--cfr", "4"])
    assert result.exit_code == 2 and "old spelling of --mode" in result.output
