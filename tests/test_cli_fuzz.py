"""Property-based fuzz of the three CLIs: random argument combinations and corrupted input files.

Every case must end cleanly: exit 0 (with a finite result), or exit 2 from a CfrError / click usage error with a
message, never a raw traceback (click reports an uncaught exception as exit code 1 with `result.exception`).
Each test prints how many cases ran and how many ended otherwise (the report issue 11 asks for).

Each case is also classified from its inputs (issue 21): every input valid -> it must exit 0; one input surely
invalid -> it must exit 2; undecidable inputs (a corrupted file that may still parse, NaN where a range check
may let it through) -> either. Without that, a CLI that refused everything with exit 2 passed the fuzz.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfr_runtime.cli_eval import main as eval_main
from export.cli import main as export_main
from tests.conftest import blob_scene
from trainer.cli import main as train_main
from trainer.default_model import default_checkpoint

FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)


def _classify(result) -> str:
    """'ok' (exit 0), 'clean' (exit 2 with a message), or 'bad: ...' (anything else)."""
    if result.exit_code == 0 and result.exception is None:
        return "ok" if "nan" not in result.output.lower().replace("nano", "") else "bad: NaN in a successful output"
    if result.exit_code == 2 and isinstance(result.exception, SystemExit) and result.output.strip():
        return "clean"
    exc = result.exception
    return f"bad: exit {result.exit_code} {type(exc).__name__}: {exc}"


def _expected(verdicts: list[bool | None]) -> str | None:
    """'ok' when every input is valid (True), 'clean' when one is surely invalid (False), else None (unsure)."""
    if any(v is False for v in verdicts):
        return "clean"
    return "ok" if all(v is True for v in verdicts) else None


def _verdict(value: str | None, valid: set[str], unsure: set[str] = frozenset()) -> bool | None:
    """An option's value: absent or valid -> True, in `unsure` -> None, anything else -> False."""
    if value is None or value in valid:
        return True
    return None if value in unsure else False


def _judge(kind: str, expected: str | None) -> str:
    """The outcome, or a 'bad:' one when it contradicts the inputs' classification."""
    if kind.startswith("bad") or expected is None or kind == expected:
        return kind
    return f"bad: expected {'exit 0' if expected == 'ok' else 'a clean exit 2'}, got {kind}"


def _report(name: str, outcomes: Counter) -> None:
    bad = {k: v for k, v in outcomes.items() if k.startswith("bad")}
    total = sum(outcomes.values())
    print(f"\n{name} fuzz: {total} cases, {outcomes['ok']} exit 0, {outcomes['clean']} clean exit 2, "
          f"{sum(bad.values())} other: {bad}")
    assert not bad, bad
    assert outcomes["ok"] and outcomes["clean"], f"the draw must reach both exits: {dict(outcomes)}"


def _corrupt(data: bytes, cut: float, flips: list[tuple[float, int]]) -> bytes:
    out = bytearray(data[: max(0, int(len(data) * cut))])
    for pos, value in flips:
        if out:
            out[int(pos * (len(out) - 1))] = value
    return bytes(out)


def _options(table: dict[str, list[str]], absent: int = 4) -> st.SearchStrategy[list[str]]:
    """Each option absent (weight `absent`) or one of its listed values; flattened to an argument list."""
    per = {k: st.sampled_from([None] * absent + v) for k, v in table.items()}
    return st.fixed_dictionaries(per).map(lambda d: [a for k, v in d.items() if v is not None for a in (k, v)])


# (fraction of the file kept, [(relative position, new byte value)])
corruption = st.tuples(st.one_of(st.just(1.0), st.floats(0, 1)),
                       st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=6))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def small_model(workdir) -> Path:
    """The bundled default at its own size (224): fast forwards for the eval fuzz."""
    out = workdir / "model"
    result = CliRunner().invoke(export_main, [str(default_checkpoint()), "-o", str(out), "--verify-seed", "0"])
    assert result.exit_code == 0, result.output
    return out / "model.onnx"


def _dataset(root: Path, n: int, corrupt: tuple | None = None, mismatch: bool = False) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img, gt = blob_scene(i, 48, 64)
        ok, png = cv2.imencode(".png", img[..., ::-1])
        data = png.tobytes()
        if corrupt is not None and i == n - 1:
            data = _corrupt(data, *corrupt)
        (root / "images" / f"{i}.png").write_bytes(data)
        mask = (gt * 255).astype(np.uint8)
        if mismatch and i == 0:
            mask = mask[:-3]
        assert cv2.imwrite(str(root / "masks" / f"{i}.png"), mask)
    return root


# ---- cfr-eval --------------------------------------------------------------------------------------------

EVAL_OPTIONS = {
    "--max-clicks": ["1", "3", "3", "3", "-1", "0", "25", "1001", "x", "nan"],
    "--target-iou": ["0.5", "0.95", "1", "0.9", "-1", "0", "1.5", "nan", "inf", "x"],
    "--limit": ["1", "2", "99", "1", "-1", "0", "x"],
    "--cfr": ["0", "1", "2", "2", "-1", "101", "x"],
    "--acfr-threshold": ["-5", "0", "20", "x"],
    "--cfr-clicks": ["all", "1", "2", "0", "-3", "x", ""],
    "--backend": ["auto", "ort", "trt", "torch", ""],
    "--mask-encoding": ["grabcut", "anynonzero", "voc", "x"],
}
EVAL_FLAGS = ["--acfr", "--no-zoom", "--resume", "--no-zoom"]


@given(
    model_kind=st.sampled_from(["good"] * 5 + ["junk", "missing", "checkpoint", "dir", "corrupt"]),
    data_kind=st.sampled_from(["good"] * 5 + ["empty", "missing", "file", "corrupt", "mismatch"]),
    options=_options(EVAL_OPTIONS, absent=10),
    flags=st.lists(st.sampled_from(EVAL_FLAGS), unique=True, max_size=2).filter(lambda f: len(f) < 2 or
                                                                                  "--acfr" not in f),
    json_kind=st.sampled_from([None, "fresh", "fresh", "under_file"]),
    corrupt=corruption,
)
def _fuzz_eval(small_model, outcomes, model_kind, data_kind, options, flags, json_kind, corrupt):
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-eval-"))
    try:
        model = {"good": small_model, "junk": tmp / "junk.onnx", "missing": tmp / "none.onnx",
                 "checkpoint": default_checkpoint(), "dir": tmp, "corrupt": tmp / "corrupt.onnx"}[model_kind]
        (tmp / "junk.onnx").write_bytes(b"\x00junk" * 10)
        (tmp / "corrupt.onnx").write_bytes(_corrupt(small_model.read_bytes(), *corrupt))
        data = tmp / "ds"
        if data_kind in ("good", "corrupt", "mismatch"):
            _dataset(data, 2, corrupt if data_kind == "corrupt" else None, data_kind == "mismatch")
        elif data_kind == "empty":
            _dataset(data, 0)
        elif data_kind == "file":
            data.write_text("x")
        args = [str(model), "--dataset", str(data)]
        args += options + flags
        if json_kind == "fresh":
            args += ["--json", str(tmp / "out" / "r.json")]
        elif json_kind == "under_file":
            (tmp / "f").write_text("x")
            args += ["--json", str(tmp / "f" / "r.json")]
        result = CliRunner().invoke(eval_main, args)
        opt = dict(zip(options[::2], options[1::2]))
        expected = _expected([
            {"good": True, "corrupt": None}.get(model_kind, False),
            {"good": True, "corrupt": None}.get(data_kind, False),
            json_kind != "under_file", "--resume" not in flags or json_kind == "fresh",
            "--acfr" not in flags or opt.get("--cfr") in ("1", "2"),
            _verdict(opt.get("--max-clicks"), {"1", "3"}),
            _verdict(opt.get("--target-iou"), {"0.5", "0.95", "1", "0.9"}, {"nan"}),
            _verdict(opt.get("--limit"), {"1", "2", "99"}), _verdict(opt.get("--cfr"), {"0", "1", "2"}),
            _verdict(opt.get("--acfr-threshold"), {"0", "20"}),
            _verdict(opt.get("--cfr-clicks"), {"all", "1", "2"}), _verdict(opt.get("--backend"), {"auto", "ort"}),
            _verdict(opt.get("--mask-encoding"), {"grabcut", "anynonzero"}),
        ])
        kind = _judge(_classify(result), expected)
        if kind.startswith("bad"):
            kind += f" args={args[2:]} model={model_kind} data={data_kind}\n{result.output[-600:]}"
        outcomes[kind] += 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_fuzz_cfr_eval(small_model):
    outcomes: Counter = Counter()
    settings(FUZZ, max_examples=int(os.environ.get("CFR_FUZZ_EVAL", 40)))(_fuzz_eval)(small_model, outcomes)
    _report("cfr-eval", outcomes)


# ---- cfr-export ------------------------------------------------------------------------------------------

EXPORT_OPTIONS = {
    "--size": ["-1", "0", "100", "224", "230", "100000", "x"],
    "--max-points": ["-3", "0", "1", "5", "5000", "x"],
    "--engine": ["onnx", "trt", "bogus"],
    "--device": ["auto", "cpu", "cuda", "tpu"],
    "--verify-seed": ["-1", "0", "7", "x"],
}


@given(
    ckpt_kind=st.sampled_from(["good"] * 3 + ["corrupt"] * 3 + ["junk", "missing", "dir", "empty"]),
    options=_options(EXPORT_OPTIONS, absent=8),
    flags=st.lists(st.sampled_from(["--fp16", "--no-flip"]), unique=True, max_size=1),
    out_kind=st.sampled_from(["fresh", "under_file", "existing_model"]),
    corrupt=corruption,
)
def _fuzz_export(outcomes, ckpt_kind, options, flags, out_kind, corrupt):
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-export-"))
    try:
        good = default_checkpoint()
        paths = {"good": good, "corrupt": tmp / "c.pth", "junk": tmp / "j.pth", "missing": tmp / "m.pth",
                 "dir": tmp, "empty": tmp / "e.pth"}
        paths["corrupt"].write_bytes(_corrupt(good.read_bytes(), *corrupt))
        paths["junk"].write_bytes(b"PK\x03\x04" + b"\x00" * 64)
        paths["empty"].write_bytes(b"")
        out = tmp / "out"
        if out_kind == "under_file":
            (tmp / "f").write_text("x")
            out = tmp / "f" / "out"
        elif out_kind == "existing_model":
            out.mkdir()
            (out / "model.onnx").write_bytes(b"previous model")
        args = [str(paths[ckpt_kind]), "-o", str(out)]
        args += options + flags
        result = CliRunner().invoke(export_main, args)
        opt = dict(zip(options[::2], options[1::2]))
        expected = _expected([
            {"good": True, "corrupt": None}.get(ckpt_kind, False), out_kind != "under_file",
            _verdict(opt.get("--size"), {"224"}), _verdict(opt.get("--max-points"), {"1", "5"}, {"5000"}),
            _verdict(opt.get("--engine"), {"onnx"}, {"trt"}), _verdict(opt.get("--device"), {"auto", "cpu"}, {"cuda"}),
            _verdict(opt.get("--verify-seed"), {"0", "7"}, {"-1"}),
        ])
        kind = _judge(_classify(result), expected)
        if out_kind == "existing_model" and result.exit_code != 0 and (out / "model.onnx").exists() \
                and (out / "model.onnx").read_bytes() != b"previous model":
            kind = "bad: a failed export replaced the existing model"
        if kind.startswith("bad"):
            kind += f" args={args[1:]} ckpt={ckpt_kind}\n{result.output[-600:]}"
        outcomes[kind] += 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_fuzz_cfr_export():
    outcomes: Counter = Counter()
    settings(FUZZ, max_examples=int(os.environ.get("CFR_FUZZ_EXPORT", 30)))(_fuzz_export)(outcomes)
    _report("cfr-export", outcomes)


# ---- cfr-train -------------------------------------------------------------------------------------------

TRAIN_OPTIONS = {
    "--size": ["-1", "0", "32", "5000", "x"],
    "--steps": ["-1", "0", "1", "x"],
    "--batch-size": ["-2", "0", "1", "x"],
    "--accum": ["0", "1", "2", "-1"],
    "--lr": ["0", "-1", "1e-4", "nan", "x"],
    "--arch": ["tiny", "nope"],
    "--device": ["cpu", "tpu"],
    "--data": ["synthetic:2", "synthetic:0", "synthetic:x", "nope:/x", "/definitely/missing", ""],
}


@given(
    options=_options(TRAIN_OPTIONS, absent=8),
    config_kind=st.sampled_from([None, None, None, "garbage", "wrong_types", "unknown_key", "good"]),
    corrupt=corruption,
)
def _fuzz_train(outcomes, options, config_kind, corrupt):
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-train-"))
    try:
        # small, fast defaults that the drawn options override
        chosen = {"--data": "synthetic:2", "--size": "32", "--steps": "1", "--batch-size": "1", "--arch": "tiny",
                  "--device": "cpu"}
        chosen.update(zip(options[::2], options[1::2]))
        if chosen["--size"] != "32" or chosen["--arch"] != "tiny":
            chosen["--steps"] = "0" if chosen["--steps"] == "1" else chosen["--steps"]  # bound the run time
        args = [a for kv in chosen.items() for a in kv]
        args += ["--run-dir", str(tmp / "run"), "--no-progress", "--threads", "1", "--ckpt-every", "1"]
        if config_kind is not None:
            cfg = tmp / "c.toml"
            cfg.write_bytes({"garbage": _corrupt(b'steps = 1\nlr = 0.001\n[x', *corrupt),
                             "wrong_types": b'steps = "many"\nbatch_size = -4\n',
                             "unknown_key": b"stepz = 3\n", "good": b"log_every = 1\n"}[config_kind])
            args += ["--config", str(cfg)]
        result = CliRunner().invoke(train_main, args)
        expected = _expected([
            {None: True, "good": True, "unknown_key": False}.get(config_kind),
            _verdict(chosen["--data"], {"synthetic:2"}), _verdict(chosen["--size"], {"32"}, {"5000"}),
            _verdict(chosen["--steps"], {"1"}, {"0"}), _verdict(chosen["--batch-size"], {"1"}),
            _verdict(chosen.get("--accum"), {"1", "2"}), _verdict(chosen.get("--lr"), {"1e-4"}, {"nan"}),
            _verdict(chosen["--arch"], {"tiny"}), _verdict(chosen["--device"], {"cpu"}),
        ])
        kind = _judge(_classify(result), expected)
        if kind.startswith("bad"):
            kind += f" args={args}\n{result.output[-600:]}"
        outcomes[kind] += 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_fuzz_cfr_train():
    outcomes: Counter = Counter()
    settings(FUZZ, max_examples=int(os.environ.get("CFR_FUZZ_TRAIN", 25)))(_fuzz_train)(outcomes)
    _report("cfr-train", outcomes)
