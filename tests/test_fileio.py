"""`staged_file`, the one atomic-write helper: where the staged file lives, its permissions, and that a failed
block never leaves it behind (issue 21: pinned line by line, so a mutation of any of them fails a test)."""

from __future__ import annotations

import os
import stat

import pytest

from cfr_runtime.fileio import staged_file


@pytest.fixture
def umask():
    """Set a umask for the test and restore the process's afterwards."""
    old = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(old)


def test_staged_file_is_an_empty_hidden_sibling(tmp_path):
    final = tmp_path / "model.onnx"
    with staged_file(final) as staged:
        assert staged.parent == tmp_path and staged != final
        assert staged.name.startswith(".model.onnx.") and staged.name.endswith(".partial")
        assert staged.is_file() and staged.stat().st_size == 0
    assert staged.exists() and not final.exists()  # renaming into place is the caller's step
    with staged_file(final, suffix=".int8") as other:
        assert other.name.endswith(".int8") and other != staged


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_staged_file_has_an_ordinary_files_permissions(tmp_path, umask, mask, mode):
    umask(mask)
    with staged_file(tmp_path / "a.bin") as staged:
        assert stat.S_IMODE(staged.stat().st_mode) == mode  # not mkstemp's 0600
    assert os.umask(mask) == mask  # the helper put the process umask back


@pytest.mark.parametrize("exc", [ValueError("bad"), KeyboardInterrupt()])
def test_a_failed_block_removes_the_staged_file_and_re_raises(tmp_path, exc):
    final = tmp_path / "model.onnx"
    final.write_bytes(b"old model")
    with pytest.raises(type(exc)):
        with staged_file(final) as staged:
            staged.write_bytes(b"half a model")
            raise exc
    assert not staged.exists() and final.read_bytes() == b"old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_block_that_already_moved_the_file_may_still_fail(tmp_path):
    final = tmp_path / "model.onnx"
    with pytest.raises(RuntimeError, match="after the rename"):
        with staged_file(final) as staged:
            staged.write_bytes(b"new")
            os.replace(staged, final)
            raise RuntimeError("after the rename")
    assert final.read_bytes() == b"new"


def test_staged_file_in_a_missing_folder_is_an_os_error(tmp_path):
    with pytest.raises(OSError):
        with staged_file(tmp_path / "missing" / "model.onnx"):
            pass
