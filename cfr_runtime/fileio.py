"""Atomic file writes, one implementation for every artifact the project writes (checkpoints, ONNX graphs,
quantized graphs): write to a temporary file beside the target, then rename it into place, so a crash, a
Ctrl-C or a failed verification never leaves half a file or replaces a good one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path


def staged_file(final: str | os.PathLike, suffix: str = ".partial") -> AbstractContextManager[Path]:
    """A new empty file beside `final` (same filesystem, so `os.replace(staged, final)` is atomic) with an
    ordinary file's permissions; it is deleted if the block raises. The block renames it into place once the
    content is good (or hands it to a caller that verifies first)."""
    return _staged(final, suffix)


def _stage(final: str | os.PathLike, suffix: str) -> Iterator[Path]:
    """The generator behind `staged_file` (undecorated, so mutation testing can reach its lines)."""
    final = Path(final)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=suffix)
    os.close(fd)
    staged = Path(tmp)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staged, 0o666 & ~umask)  # mkstemp creates 0600; an artifact is an ordinary file
        yield staged
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


_staged = contextmanager(_stage)
