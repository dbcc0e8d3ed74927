"""Issue 11: every bad input a clear error, nothing lost, nothing silently wrong (export, eval, Session)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from cfr_runtime import CfrError, ContractError, Engine, InputError, ModelOutputError, Session
from cfr_runtime.cli_eval import main as eval_main
from cfr_runtime.contract import META_KEY, Contract
from cfr_runtime.engine import alloc_buffers
from export.cli import main as export_main
from tests.conftest import blob_dataset, blob_scene
from trainer.checkpoint import load_model, read_checkpoint, save_checkpoint
from trainer.default_model import default_checkpoint
from trainer.models import arch_config, build_model


def _ckpt_with(tmp_path: Path, name: str, edit) -> Path:
    """The bundled default checkpoint with its params / state edited by `edit(params, state)`."""
    params, state, _ = read_checkpoint(default_checkpoint())
    edit(params, state)
    model = build_model(arch_config("tiny", 224))
    path = save_checkpoint(tmp_path / name, model, params)
    raw = torch.load(path, weights_only=True)
    raw["state_dict"] = state
    torch.save(raw, path)
    return path


# ---- export ---------------------------------------------------------------------------------------------

def test_export_refuses_nan_weights(tmp_path):
    ckpt = _ckpt_with(tmp_path, "nan.pth", lambda p, s: s["head.conv_seg.weight"].fill_(float("nan")))
    result = CliRunner().invoke(export_main, [str(ckpt), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "NaN" in result.output and "max |onnx - torch| = 0" not in result.output
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_nan_outputs_fail_verification():
    """max(worst, nan) kept the old worst: the running max must keep NaN, and NaN outputs are refused."""
    from export.verify import check_output_range, worst_diff

    assert np.isnan(worst_diff(0.0, np.array([np.nan], np.float32), np.zeros(1, np.float32)))
    assert np.isnan(worst_diff(float("nan"), np.zeros(1, np.float32), np.zeros(1, np.float32)))
    assert worst_diff(0.1, np.array([0.5]), np.array([0.2])) == pytest.approx(0.3)
    for bad in (np.array([np.nan]), np.array([1.5]), np.array([-0.1])):
        with pytest.raises(ModelOutputError, match=r"outside \[0, 1\]"):
            check_output_range(bad, "model")


def test_failed_verification_keeps_the_old_model(tmp_path, monkeypatch):
    out = tmp_path / "out"
    ok = CliRunner().invoke(export_main, [str(default_checkpoint()), "-o", str(out), "--verify-seed", "1"])
    assert ok.exit_code == 0, ok.output
    before = (out / "model.onnx").read_bytes()
    import export.verify

    monkeypatch.setitem(export.verify.TOLERANCE, "fp32", -1.0)  # every verification now fails
    bad = CliRunner().invoke(export_main, [str(default_checkpoint()), "-o", str(out), "--no-flip", "--overwrite"])
    assert bad.exit_code == 2 and "not written (the existing one was kept)" in bad.output, bad.output
    assert (out / "model.onnx").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]  # no staged leftovers


def test_config_checked_before_building(tmp_path, monkeypatch):
    """A config that does not match its state_dict is refused without building the network for real."""
    import trainer.checkpoint as ck

    devices = []
    real_build = ck.build_model

    def spy(params):
        devices.append(str(torch.get_default_device()))
        return real_build(params)

    monkeypatch.setattr(ck, "build_model", spy)

    def widen(p, s):
        p["backbone_params"]["embed_dim"] = 1024
        p["neck_params"]["in_dim"] = 1024

    with pytest.raises(CfrError, match="wrong shape"):
        load_model(_ckpt_with(tmp_path, "wide.pth", widen))
    assert devices == ["meta"]


@pytest.mark.parametrize("field,value,match", [
    ("patch_size", [0, 0], "patch_size"),
    ("embed_dim", -5, "embed_dim"),
    ("img_size", [10**6, 10**6], "img_size"),
    ("num_heads", 3, "num_heads"),
    ("depth", "8", "depth"),
])
def test_absurd_config_is_a_checkpoint_error(tmp_path, field, value, match):
    ckpt = _ckpt_with(tmp_path, "bad.pth", lambda p, s: p["backbone_params"].__setitem__(field, value))
    result = CliRunner().invoke(export_main, [str(ckpt), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "cfr-export: error:" in result.output and match in result.output, result.output


@pytest.mark.parametrize("size", ["100", "230"])
def test_size_not_a_multiple_of_the_patch(tmp_path, size):
    result = CliRunner().invoke(export_main, [str(default_checkpoint()), "-o", str(tmp_path), "--size", size])
    assert result.exit_code == 2 and "multiple of the patch (16)" in result.output, result.output


@pytest.mark.parametrize("args", [["--size", "0"], ["--size", "-3"], ["--max-points", "0"], ["--size", "100000"]])
def test_export_argument_ranges(tmp_path, args):
    result = CliRunner().invoke(export_main, [str(default_checkpoint()), "-o", str(tmp_path), *args])
    assert result.exit_code == 2 and "Invalid value" in result.output, result.output


def test_output_dir_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(export_main, [str(default_checkpoint()), "-o", str(tmp_path / "file" / "sub")])
    assert result.exit_code == 2 and "cannot write the export there" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_size_defaults_to_the_checkpoints_and_a_resize_is_announced(tmp_path):
    result = CliRunner().invoke(export_main, [str(default_checkpoint()), "-o", str(tmp_path / "a")])
    assert result.exit_code == 0 and "note:" not in result.output, result.output
    assert Engine(tmp_path / "a" / "model.onnx").contract.input_size == 224
    result = CliRunner().invoke(export_main, [str(default_checkpoint()), "-o", str(tmp_path / "b"), "--size", "448"])
    assert result.exit_code == 0 and "trained at 224 px; exported at --size 448" in result.output, result.output


def test_trt_refused_before_exporting(tmp_path):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("TensorRT and a GPU are present on this machine, so the export would succeed")
    except ImportError:
        pass
    result = CliRunner().invoke(export_main, [str(default_checkpoint()), "-o", str(tmp_path), "--engine", "trt"])
    assert result.exit_code == 2 and ("TensorRT" in result.output or "CUDA" in result.output), result.output
    assert not (tmp_path / "model.onnx").exists()  # refused before the export, not after it


def test_aoti_cuda_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda is valid")
    result = CliRunner().invoke(export_main, [str(default_checkpoint()), "-o", str(tmp_path), "--engine", "aoti",
                                              "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA GPU" in result.output, result.output
    assert not (tmp_path / "model.onnx").exists()


# ---- hostile model metadata -----------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("max_points", "24"), ("threshold", None), ("input_size", 100000),
                                       ("flip", "yes"), ("threshold", 1.5), ("input_size", True)])
def test_hostile_metadata(tmp_path, tiny_onnx, key, value):
    model = onnx.load(str(tiny_onnx))
    meta = {p.key: p.value for p in model.metadata_props}
    data = json.loads(meta[META_KEY])
    data[key] = value
    for p in model.metadata_props:
        if p.key == META_KEY:
            p.value = json.dumps(data)
    onnx.save(model, str(tmp_path / "hostile.onnx"))
    with pytest.raises(ContractError, match=f"'{key}'"):
        Engine(tmp_path / "hostile.onnx")
    with pytest.raises(ContractError, match=f"'{key}'"):
        Contract.from_json(json.dumps(data))


# ---- run-time output check ------------------------------------------------------------------------------

class _BadRunner:
    def __init__(self, contract, value):
        bufs = alloc_buffers(contract)
        self.image, self.prev_mask, self.disk_rows, self._probs = (bufs[k] for k in ("image", "prev_mask",
                                                                                     "disk_rows", "probs"))
        self._probs.fill(value)
        self.image_dirty = True

    def run(self):
        return self._probs


@pytest.mark.parametrize("value", [float("nan"), 1.5, -0.25, float("inf")])
def test_session_refuses_bad_model_outputs(value):
    contract = Contract(input_size=32, max_points=4)
    engine = Engine.from_runner_factory(contract, lambda: _BadRunner(contract, value), "fake", "bad outputs")
    s = Session(engine)
    s.set_image(np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(ModelOutputError, match=r"outside \[0, 1\]"):
        s.add_click(5, 5)
    assert s.clicks == [] and s.forwards == [] and not s.mask.any()  # the failed click left no trace


# ---- Session / API --------------------------------------------------------------------------------------

def test_session_accepts_a_model_path(tiny_onnx):
    for model in (tiny_onnx, str(tiny_onnx)):
        s = Session(model)
        s.set_image(np.zeros((20, 30, 3), np.uint8))
        assert s.add_click(5, 5).shape == (20, 30)
    with pytest.raises(InputError, match="Engine or the path"):
        Session(42)
    with pytest.raises(ContractError, match="no such model"):
        Session("missing.onnx")


@pytest.mark.parametrize("kw", [dict(positive="false"), dict(positive="True"), dict(positive=2),
                                dict(positive=None), dict(x=True), dict(y=np.bool_(False))])
def test_click_types(tiny_engine, kw):
    s = Session(tiny_engine)
    s.set_image(np.zeros((20, 30, 3), np.uint8))
    args = dict(x=3, y=4, positive=True)
    args.update(kw)
    with pytest.raises(InputError):
        s.add_click(**args)
    assert s.clicks == []


def test_click_sign_accepts_bools_and_0_1(tiny_engine):
    s = Session(tiny_engine)
    s.set_image(np.zeros((20, 30, 3), np.uint8))
    for value, want in ((True, True), (np.bool_(False), False), (1, True), (0, False)):
        s.add_click(3, 4, value)
        assert s.clicks[-1].positive is want


# ---- cfr-eval ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,match", [
    (["--max-clicks", "0"], "--max-clicks"), (["--max-clicks", "-1"], "--max-clicks"),
    (["--target-iou", "1.5"], "--target-iou"), (["--target-iou", "-1"], "--target-iou"),
    (["--limit", "-1"], "--limit"), (["--limit", "0"], "--limit"), (["--cfr", "-2"], "--cfr"),
    (["--acfr"], "give --cfr N"), (["--cfr-clicks", "0"], "--cfr-clicks"), (["--cfr-clicks", "x"], "--cfr-clicks"),
    (["--resume"], "--json"), (["--max-clicks", "30"], "click capacity"), (["--json", "r.jsonl"], "journal"),
])
def test_eval_argument_ranges(tiny_onnx, tmp_path, args, match):
    data = blob_dataset(tmp_path / "ds", 1)
    result = CliRunner().invoke(eval_main, [str(tiny_onnx), "--dataset", str(data), *args])
    assert result.exit_code == 2 and match in result.output, result.output
    assert "NoC@85" not in result.output


def test_eval_checkpoint_points_to_export(tmp_path):
    data = blob_dataset(tmp_path / "ds", 1)
    result = CliRunner().invoke(eval_main, [str(default_checkpoint()), "--dataset", str(data)])
    assert result.exit_code == 2 and "cfr-export" in result.output, result.output


def test_eval_empty_dataset(tiny_onnx, tmp_path):
    data = blob_dataset(tmp_path / "ds", 0)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(eval_main, [str(tiny_onnx), "--dataset", str(data), "--json", str(out)])
    assert result.exit_code == 2 and "no instances" in result.output, result.output
    assert not out.exists()


def test_eval_keeps_finished_work_and_resumes(tiny_onnx, tmp_path):
    """An unreadable image stops the run (exit 2) with the finished instances saved; --resume completes it,
    with the same results as an uninterrupted run."""
    data = blob_dataset(tmp_path / "ds")
    good = (data / "images" / "2.png").read_bytes()
    (data / "images" / "2.png").write_bytes(b"not an image")
    out = tmp_path / "r" / "r.json"
    args = [str(tiny_onnx), "--dataset", str(data), "--max-clicks", "3", "--json", str(out)]
    result = CliRunner().invoke(eval_main, args)
    assert result.exit_code == 2 and "2.png: not a readable image" in result.output, result.output
    assert "2 finished instances are saved" in result.output and "--resume" in result.output
    lines = out.with_suffix(".jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines[1:]] == ["0", "1"]
    assert not out.exists()
    (data / "images" / "2.png").write_bytes(good)
    with out.with_suffix(".jsonl").open("a") as f:
        f.write('{"id": "2", "ious": [0.1')  # a torn line from a run killed mid-write
    resumed = CliRunner().invoke(eval_main, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming: 2 instances already done" in resumed.output
    fresh_out = tmp_path / "fresh.json"
    fresh = CliRunner().invoke(eval_main, [*args[:-1], str(fresh_out)])
    assert fresh.exit_code == 0, fresh.output
    a, b = json.loads(out.read_text()), json.loads(fresh_out.read_text())
    assert [i["id"] for i in a["instances"]] == ["0", "1", "2", "3"]
    assert [i["ious"] for i in a["instances"]] == [i["ious"] for i in b["instances"]]
    assert a["noc"] == b["noc"]


def test_eval_resume_refuses_other_settings(tiny_onnx, tmp_path):
    data = blob_dataset(tmp_path / "ds", 1)
    out = tmp_path / "r.json"
    base = [str(tiny_onnx), "--dataset", str(data), "--json", str(out)]
    assert CliRunner().invoke(eval_main, [*base, "--max-clicks", "2"]).exit_code == 0
    result = CliRunner().invoke(eval_main, [*base, "--max-clicks", "3", "--resume"])
    assert result.exit_code == 2 and "max_clicks: 2 then, 3 now" in result.output, result.output


def test_eval_ctrl_c_keeps_work(tiny_onnx, tmp_path, monkeypatch):
    import cfr_runtime.evaluate as ev

    real, calls = ev.evaluate_instance, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(ev, "evaluate_instance", interrupted)
    data = blob_dataset(tmp_path / "ds")
    out = tmp_path / "r.json"
    result = CliRunner().invoke(eval_main, [str(tiny_onnx), "--dataset", str(data), "--max-clicks", "2",
                                            "--json", str(out)])
    assert result.exit_code == 130 and "2 finished instances are saved" in result.output, result.output
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 3  # header + 2 instances


def test_truncated_jpeg_is_refused(tmp_path):
    from cfr_runtime.datasets import read_rgb

    img, _ = blob_scene(0, 90, 120)
    ok, buf = cv2.imencode(".jpg", img)
    (tmp_path / "full.jpg").write_bytes(buf.tobytes())
    (tmp_path / "cut.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    assert read_rgb(tmp_path / "full.jpg").shape == (90, 120, 3)
    with pytest.raises(InputError, match="truncated JPEG"):
        read_rgb(tmp_path / "cut.jpg")


def test_eval_json_is_strict(tiny_onnx, tmp_path):
    """The summary parses with a strict JSON reader (no bare NaN) and the table header names --max-clicks."""
    data = blob_dataset(tmp_path / "ds", 2)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(eval_main, [str(tiny_onnx), "--dataset", str(data), "--max-clicks", "3",
                                            "--json", str(out)])
    assert result.exit_code == 0, result.output
    json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert ">=3@85" in result.output
    assert os.path.exists(out.with_suffix(".jsonl"))


# ---- first use ------------------------------------------------------------------------------------------

def test_readme_embedding_snippet_runs(data_dir, monkeypatch):
    """The README's embedding example runs as written, from the repository root."""
    from tests.conftest import ROOT

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Embedding the runtime"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python") + 9)]
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["mask"].dtype == bool and scope["probs"].shape == scope["rgb"].shape[:2]
    assert len(scope["session"].clicks) == 1  # two clicks, one undone


def test_train_help_shows_defaults():
    from trainer.cli import main as train_main

    out = CliRunner().invoke(train_main, ["--help"]).output
    for needle in ("[default: 1000]", "[default: 8]", "[default: 5e-05]", "[default: tiny]", "[default: auto]"):
        assert needle in out, needle


@pytest.mark.parametrize("args,match", [(["--accum", "0"], "--accum"), (["--steps", "-1"], "--steps"),
                                        (["--lr", "0"], "--lr"), (["--device", "tpu"], "--device")])
def test_train_argument_ranges(tmp_path, args, match):
    from trainer.cli import main as train_main

    small = ["--size", "32", "--steps", "1", "--batch-size", "1", "--no-progress"]  # a quick run if accepted
    result = CliRunner().invoke(train_main, ["--data", "synthetic:2", "--run-dir", str(tmp_path), *small, *args])
    assert result.exit_code == 2 and match in result.output, result.output


@pytest.mark.parametrize("text,match", [("steps = -4\n", "steps = -4"), ("[broken", "cannot read it as TOML"),
                                        ("stepz = 1\n", "unknown config keys")])
def test_train_config_file_is_validated(tmp_path, text, match):
    from trainer.cli import main as train_main

    (tmp_path / "c.toml").write_text(text)
    args = ["--data", "synthetic:2", "--run-dir", str(tmp_path / "r"), "--size", "32", "--batch-size", "1",
            "--no-progress", "--config", str(tmp_path / "c.toml")]
    result = CliRunner().invoke(train_main, args)
    assert result.exit_code == 2 and match in result.output, result.output


def _latency():
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("latency_bench", ROOT / "bench" / "latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, ROOT


def test_latency_default_output_is_not_the_committed_results():
    latency, root = _latency()
    out = next(p for p in latency.cli.params if p.name == "out").default.resolve()
    assert (root / "bench" / "results").resolve() not in (out, *out.parents)


def test_latency_p99_needs_enough_samples():
    latency, _ = _latency()
    assert latency.pct([0.01, 0.02, 0.03])["p99"] is None
    assert latency.pct([0.001 * i for i in range(1, 101)])["p99"] == pytest.approx(99.01)


@pytest.mark.parametrize("args,match", [(["--modes", "Std"], "unknown mode"), (["--device", "cuda"], "no CUDA GPU")])
def test_latency_argument_errors(args, match, capsys):
    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda is valid")
    latency, _ = _latency()
    with pytest.raises(SystemExit) as info:
        latency.main(args)
    assert info.value.code == 2 and match in capsys.readouterr().err
