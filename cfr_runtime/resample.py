"""Bilinear resampling with align_corners=True (torch's semantics), as index/weight tables reused per ROI.

The official predictor crops and resizes with `F.interpolate(..., align_corners=True)` in both
directions; OpenCV's resize uses half-pixel centres, so it would not reproduce published numbers.
"""

from __future__ import annotations

import numpy as np


class Axis:
    """Gather indices and weights mapping n_in samples onto n_out (align_corners=True)."""

    __slots__ = ("i0", "i1", "w1", "w0")

    def __init__(self, n_in: int, n_out: int, offset: int = 0):
        if n_out > 1:
            src = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1))
        else:
            src = np.zeros(n_out)
        i0 = np.minimum(np.floor(src).astype(np.intp), n_in - 1)
        self.i1 = np.minimum(i0 + 1, n_in - 1) + offset
        self.w1 = (src - i0).astype(np.float32)
        self.w0 = (1.0 - self.w1).astype(np.float32)
        self.i0 = i0 + offset


class Resampler:
    """Resize the window rows [r0, r0+h) x cols [c0, c0+w) of a map to out_h x out_w."""

    def __init__(self, r0: int, h: int, c0: int, w: int, out_h: int, out_w: int):
        self.rows = Axis(h, out_h, r0)
        self.cols = Axis(w, out_w, c0)

    def __call__(self, src: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """src: H x W or H x W x C float32; returns out_h x out_w (x C) float32."""
        r, c = self.rows, self.cols
        a = src[r.i0]
        a *= r.w0[:, None] if src.ndim == 2 else r.w0[:, None, None]
        b = src[r.i1]
        b *= r.w1[:, None] if src.ndim == 2 else r.w1[:, None, None]
        a += b
        left = a[:, c.i0]
        left *= c.w0 if src.ndim == 2 else c.w0[:, None]
        right = a[:, c.i1]
        right *= c.w1 if src.ndim == 2 else c.w1[:, None]
        if out is None:
            return np.add(left, right)
        return np.add(left, right, out=out)


def resize_bilinear(src: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    return Resampler(0, src.shape[0], 0, src.shape[1], out_h, out_w)(src.astype(np.float32, copy=False))
