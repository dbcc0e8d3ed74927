"""bench/timed.py, the recorder behind the duration figures of README.md and docs/ (docs/figures.md): it keeps
the command, its exit status, the machine and its load, and refuses to replace a committed record."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "bench" / "timed.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_records_the_command_its_status_the_machine_and_its_output(tmp_path):
    child = [sys.executable, "-c", "import time; time.sleep(0.3); print('last line'); raise SystemExit(3)"]
    done = _run("--name", "t", "-o", str(tmp_path), "--", *child)
    assert done.returncode == 3, done.stderr  # the command's status, not the recorder's
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["returncode"] == 3
    assert record["command"].endswith("raise SystemExit(3)'")
    assert 0.3 <= record["seconds"] < 60
    for when in ("start", "end"):
        assert record["machine"][when]["cores"] >= 1
        assert record["machine"][when]["load_average"] >= 0
    assert record["output_tail"] == ["last line"]
    markdown = (tmp_path / "t.md").read_text()
    assert "exit status 3" in markdown and "load average" in markdown and "last line" in markdown


def test_refuses_to_replace_a_record_without_overwrite(tmp_path):
    (tmp_path / "t.json").write_text("{}")
    done = _run("--name", "t", "-o", str(tmp_path), "--", sys.executable, "-c", "pass")
    assert done.returncode == 2
    assert "t.json exists" in done.stderr and "--overwrite" in done.stderr
    assert (tmp_path / "t.json").read_text() == "{}"
    done = _run("--name", "t", "-o", str(tmp_path), "--overwrite", "--", sys.executable, "-c", "pass")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "t.json").read_text())["returncode"] == 0


def test_a_command_that_cannot_start_is_a_clear_error(tmp_path):
    done = _run("--name", "t", "-o", str(tmp_path), "--", "no-such-program-here")
    assert done.returncode == 2
    assert "timed.py: error: cannot start 'no-such-program-here'" in done.stderr
    assert not (tmp_path / "t.json").exists()


def test_random_checkpoint_writes_a_loadable_checkpoint_of_the_named_arch(tmp_path, capsys):
    """bench/random_checkpoint.py makes the checkpoint that the ViT-B export figure's command exports."""
    import torch

    from bench.random_checkpoint import main
    from trainer.checkpoint import load_model

    out = tmp_path / "tiny.pth"
    main(["tiny", "-o", str(out)])
    model, _ = load_model(out)
    again = tmp_path / "again.pth"
    main(["tiny", "-o", str(again)])
    second, _ = load_model(again)
    for (name, a), (_, b) in zip(model.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), f"{name}: the same seed gave other weights"
    with pytest.raises(SystemExit) as refused:  # the overwrite policy: an existing file is refused by name
        main(["tiny", "-o", str(out)])
    assert refused.value.code == 2
    assert "tiny.pth exists" in capsys.readouterr().err
