"""Atomic file writes, one implementation for every artifact the project writes (checkpoints, ONNX graphs and
their external data files, quantized graphs, TensorRT plans): write to a temporary name beside the target,
then rename into place, so a crash, a Ctrl-C or a failed verification never leaves half a file or replaces a
good one.

Some artifacts are several files that name one another: an ONNX graph past the 2 GB protobuf limit keeps its
weights in `model.onnx.data` and records that name inside `model.onnx`; a TensorRT plan has a JSON sidecar.
Those are staged in a private folder under their final names (so the graph finds its data file while it is
verified), and `commit` moves the companions into place first and the main file last.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path


def _as_ordinary_file(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # mkstemp creates 0600; an artifact is an ordinary file


def staged_file(final: str | os.PathLike, suffix: str = ".partial", folder: bool = False
                ) -> AbstractContextManager[Path]:
    """A new empty file to write `final`'s content to, on the same filesystem (so `commit` is an atomic rename),
    with an ordinary file's permissions; deleted if the block raises. The block commits it once the content is
    good (or hands it to a caller that verifies first).

    folder=False: the file is a hidden temporary name beside `final`.
    folder=True: the file is named `final.name` inside a private hidden folder beside `final`, so companion files
    that the artifact refers to by name (ONNX external data) can be written next to it under their final names,
    and scratch files (a trace, a quantizer's intermediates) can go there too. The folder and whatever is left
    in it are removed when the block ends, whether it succeeded or not.
    """
    return _staged(final, suffix, folder)


def _stage(final: str | os.PathLike, suffix: str, folder: bool) -> Iterator[Path]:
    """The generator behind `staged_file` (undecorated, so mutation testing can reach its lines)."""
    final = Path(final)
    if folder:
        stage_dir = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=suffix))
        staged = stage_dir / final.name
        try:
            staged.touch()
            _as_ordinary_file(staged)
            yield staged
        finally:
            shutil.rmtree(stage_dir, ignore_errors=True)
        return
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=suffix)
    os.close(fd)
    staged = Path(tmp)
    try:
        _as_ordinary_file(staged)
        yield staged
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def commit(staged: str | os.PathLike, final: str | os.PathLike, companions: Sequence[str] = ()) -> Path:
    """Move a verified staged file over `final` (atomic on one filesystem); first the named companion files that
    sit beside the staged file (each moved to the same name beside `final`), then the file itself, so a reader
    that finds the new `final` also finds what it refers to."""
    staged, final = Path(staged), Path(final)
    for name in companions:
        if Path(name).name != name:
            raise ValueError(f"companion {name!r} must be a bare file name")
        os.replace(staged.parent / name, final.parent / name)
    os.replace(staged, final)
    return final


@contextmanager
def remove_new_dirs_on_error(path: str | os.PathLike) -> Iterator[Path]:
    """Around work that creates `path` (and missing parents): if the block raises, the folders that did not exist
    before are removed again when they are empty, so a failed command leaves no empty output folder behind
    (a folder that holds anything, such as a model written before a later step failed, is kept)."""
    path = Path(path)
    new = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    try:
        yield path
    except BaseException:
        for p in new:
            try:
                p.rmdir()
            except OSError:  # not empty, or already gone: keep everything above it too
                break
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints and data files are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_staged = contextmanager(_stage)
