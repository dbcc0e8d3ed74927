"""What the serve tests build alike, in one place: a clock the test moves by hand, and an image's encoded bytes.

The Engine they share is the `engine` fixture of tests/conftest.py (the bundled default model, one per module)."""

from __future__ import annotations

import io

import numpy as np


class FakeClock:
    """A store's clock (`SessionStore(..., clock=...)`) that stands still until a test sets `now`, so expiry and
    idle times are decided by the test, not by how long the machine took."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def encode(rgb: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    """`rgb` as an image file's bytes in `fmt` (PIL's format name; `kw` go to its save, e.g. quality=)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **kw)
    return buf.getvalue()
