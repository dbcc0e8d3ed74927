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
    """Resize the window rows [r0, r0+h) x cols [c0, c0+w) of a map to out_h x out_w.

    Scratch buffers are kept per source shape, so repeated calls (every forward under one ROI) allocate
    nothing.
    """

    def __init__(self, r0: int, h: int, c0: int, w: int, out_h: int, out_w: int):
        self.rows = Axis(h, out_h, r0)
        self.cols = Axis(w, out_w, c0)
        self._scratch: dict[tuple, tuple[np.ndarray, ...]] = {}

    def _buffers(self, src: np.ndarray) -> tuple[np.ndarray, ...]:
        key = src.shape[1:]
        if key not in self._scratch:
            oh, ow = len(self.rows.i0), len(self.cols.i0)
            tail = src.shape[2:]
            rows = (oh, *src.shape[1:])
            self._scratch[key] = (np.empty(rows, np.float32), np.empty(rows, np.float32),
                                  np.empty((oh, ow, *tail), np.float32))
        return self._scratch[key]

    def __call__(self, src: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """src: H x W or H x W x C float32; returns (or fills) out_h x out_w (x C) float32."""
        r, c = self.rows, self.cols
        a, b, right = self._buffers(src)
        extra = (None,) * (src.ndim - 1)
        np.take(src, r.i0, axis=0, out=a)
        a *= r.w0[(slice(None), *extra)]
        np.take(src, r.i1, axis=0, out=b)
        b *= r.w1[(slice(None), *extra)]
        a += b
        if out is None:
            out = np.empty(right.shape, np.float32)
        cextra = (None,) * (src.ndim - 2)
        np.take(a, c.i0, axis=1, out=out)
        out *= c.w0[(slice(None), *cextra)]
        np.take(a, c.i1, axis=1, out=right)
        right *= c.w1[(slice(None), *cextra)]
        out += right
        return out


def resize_bilinear(src: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    return Resampler(0, src.shape[0], 0, src.shape[1], out_h, out_w)(src.astype(np.float32, copy=False))


def crop_tables(roi: tuple[int, int, int, int], size: int, index: np.ndarray, weight: np.ndarray) -> None:
    """Fill the full graph's (4, S) crop tables for an inclusive ROI: rows i0, i1 / cols i0, i1 and weights.

    The same float64 `Axis` tables as the host `Resampler`, so the graph's gather + lerp is the host crop.
    """
    r0, r1, c0, c1 = roi
    for k, axis in ((0, Axis(r1 - r0 + 1, size, r0)), (2, Axis(c1 - c0 + 1, size, c0))):
        index[k], index[k + 1] = axis.i0, axis.i1
        weight[k], weight[k + 1] = axis.w0, axis.w1


def paste_axis(lo: int, hi: int, size: int, index: np.ndarray, weight: np.ndarray) -> None:
    """Fill one axis of the paste tables ((2, H) or (2, W)): resize S samples onto [lo, hi]; both weights 0
    outside, so the graph's paste is exactly 0 there (the official zero canvas)."""
    axis = Axis(size, hi - lo + 1)
    index.fill(0)
    weight.fill(0)
    index[0, lo:hi + 1], index[1, lo:hi + 1] = axis.i0, axis.i1
    weight[0, lo:hi + 1], weight[1, lo:hi + 1] = axis.w0, axis.w1
