"""`staged_file`, the one atomic-write helper: where the staged file (or staged folder) lives, its permissions,
and that a failed block never leaves it behind; `commit` (companions, then the file) and `file_sha256` (issue 21:
pinned line by line, so a mutation of any of them fails a test; bench/mutation.toml's fileio selection is this
file, real files in tmp_path only, a few seconds in all)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import threading

import numpy as np
import pytest

from cfr_runtime.fileio import commit, file_sha256, staged_file


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


# ---- folder=True: the artifact and its companions staged under their final names (issue 21, round 5) ---------

def test_folder_stage_is_a_private_hidden_folder_beside_the_target(tmp_path, umask):
    umask(0o022)
    final = tmp_path / "model.onnx"
    with staged_file(final, folder=True) as staged:
        stage_dir = staged.parent
        assert staged.name == "model.onnx"  # its final name, so a graph finds its data file by name
        assert stage_dir.parent == tmp_path  # same filesystem as the target: commit is a rename
        assert stage_dir.name.startswith(".model.onnx.") and stage_dir.name.endswith(".partial")
        assert staged.is_file() and staged.stat().st_size == 0
        assert stat.S_IMODE(staged.stat().st_mode) == 0o644
        (stage_dir / "model.onnx.data").write_bytes(b"weights")
    assert not stage_dir.exists() and list(tmp_path.iterdir()) == []  # scratch and companions gone too
    with staged_file(final, suffix=".int8", folder=True) as other:
        assert other.parent.name.startswith(".model.onnx.") and other.parent.name.endswith(".int8")


def test_folder_stage_is_removed_when_the_block_fails(tmp_path):
    final = tmp_path / "model.onnx"
    final.write_bytes(b"old model")
    with pytest.raises(ValueError, match="bad graph"):
        with staged_file(final, folder=True) as staged:
            staged.write_bytes(b"half a model")
            (staged.parent / "model.onnx.data").write_bytes(b"half the weights")
            raise ValueError("bad graph")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"] and final.read_bytes() == b"old model"


@pytest.mark.parametrize("fail", [False, True])
def test_folder_cleanup_never_raises_over_the_blocks_outcome(tmp_path, fail):
    """A block that removed the folder itself (or a folder that cannot be removed) must not turn a committed
    write into an error, nor replace the block's own exception with a cleanup error."""
    final = tmp_path / "model.onnx"

    def block():
        with staged_file(final, folder=True) as staged:
            staged.write_bytes(b"new")
            os.replace(staged, final)
            shutil.rmtree(staged.parent)
            if fail:
                raise RuntimeError("after the commit")

    if fail:
        with pytest.raises(RuntimeError, match="after the commit"):
            block()
    else:
        block()
    assert final.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


# ---- commit: companions first, then the file ------------------------------------------------------------------

@pytest.mark.parametrize("as_str", [False, True])
def test_commit_moves_the_companions_and_the_file_into_place(tmp_path, as_str):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old graph")
    (out / "model.onnx.data").write_bytes(b"old weights")
    final = out / "model.onnx"
    with staged_file(final, folder=True) as staged:
        staged.write_bytes(b"new graph")
        (staged.parent / "model.onnx.data").write_bytes(b"new weights")
        (staged.parent / "trace.tmp").write_bytes(b"scratch")
        args = (str(staged), str(final)) if as_str else (staged, final)
        assert commit(*args, companions=["model.onnx.data"]) == final
        assert not staged.exists() and not (staged.parent / "model.onnx.data").exists()
    assert (out / "model.onnx").read_bytes() == b"new graph"
    assert (out / "model.onnx.data").read_bytes() == b"new weights"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]  # the scratch file is not


def test_commit_without_companions_replaces_only_the_file(tmp_path):
    final = tmp_path / "plan.engine"
    final.write_bytes(b"old")
    with staged_file(final) as staged:
        staged.write_bytes(b"new")
        assert commit(staged, final) == final
    assert final.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["plan.engine"]


@pytest.mark.parametrize("name", ["../model.onnx.data", "sub/model.onnx.data", "/etc/passwd"])
def test_commit_refuses_a_companion_that_is_not_a_bare_name(tmp_path, name):
    final = tmp_path / "model.onnx"
    final.write_bytes(b"old graph")
    with staged_file(final, folder=True) as staged:
        staged.write_bytes(b"new graph")
        with pytest.raises(ValueError, match=f"companion {name!r} must be a bare file name"):
            commit(staged, final, companions=[name])
        assert staged.read_bytes() == b"new graph"  # nothing moved
    assert final.read_bytes() == b"old graph"


# ---- file_sha256 -----------------------------------------------------------------------------------------------

@pytest.fixture
def deadline():
    """A looping mutant of a chunked read must fail in seconds, not at the mutation runner's minute timeout."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise TimeoutError("file_sha256 did not return within 5 s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, 5)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("size", [0, 5, (1 << 20) + 12345])
def test_file_sha256_is_the_sha256_of_the_whole_file(tmp_path, deadline, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "model.onnx.data"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(path)) == hashlib.sha256(data).hexdigest()
