"""Click disks decided on the host exactly as the official code decides them; the graphs only place them.

The official predictor maps each click into the zoom-in crop with Python / numpy float64 arithmetic
(`ZoomIn._transform_clicks`: crop_h * (y - rmin) / (rmax - rmin + 1)), flips it the same way
(`AddHorizontalFlip`: x'' = (S - x') - 1), and builds the points tensor from those float64 numbers, so the
points are float64. `DistMaps.get_coord_features` then subtracts them in place from a float32 pixel grid:
PyTorch computes i - y in float64 and rounds once to float32, then squares and sums in float32 and compares
with radius^2:

    pixel (i, j) is in the disk  <=>  fl32(fl32(fl32(i - y)^2) + fl32(fl32(j - x)^2)) <= r^2

A float32 graph that receives float32 click coordinates computes fl32(i - fl32(y)) instead, and on pixels at
exactly the radius (e.g. offsets (1.4, 4.8) from a click mapped to 120.4, 198.8: 25 in real arithmetic) it gets
25.00001 where the official code gets 25.0, and the clicks that follow diverge. No engine has float64
everywhere (TensorRT has none), so the decision is made here, in numpy with the official operations, and the
graph receives integers: per click, for each of the K = 2r + 2 pixel rows around it, the row and the
half-open column interval of its disk pixels (`disk_rows`, see `cfr_runtime.contract`). Every value is an
integer below 2^24 (below 2^11 for S <= 2048), exact in float32 (and in float16), so every engine, precision
and backend places the same pixels. Cost: a few vectorised numpy operations on (clicks x K x K) per forward,
measured in bench/disk_rounding.py.

Why K = 2r + 2 rows from floor(y) - r: a row i < floor(y) - r has i - y <= -(r + 1) and one past
floor(y) + r + 1 has i - y > r + 1; rounding to float32 cannot bring either to |i - y| <= r (r + 1 is exact),
so those rows hold no disk pixel. The same holds for columns, and a row's disk pixels are contiguous
(fl32(j - x) is monotone in j, and squaring and adding round monotonically).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .zoom import Box


def net_clicks(yx: np.ndarray, roi: Box, size: int) -> np.ndarray:
    """Official `ZoomIn._transform_clicks` in float64: image (y, x) -> (y', x') in the S x S crop of `roi`,
    evaluated as the official code does, (S * (y - rmin)) / (rmax - rmin + 1)."""
    rmin, rmax, cmin, cmax = roi
    yx = np.asarray(yx, np.float64).reshape(-1, 2)
    out = np.empty_like(yx)
    out[:, 0] = (size * (yx[:, 0] - rmin)) / (rmax - rmin + 1)
    out[:, 1] = (size * (yx[:, 1] - cmin)) / (cmax - cmin + 1)
    return out


def flipped_x(x: np.ndarray, size: int) -> np.ndarray:
    """Official `AddHorizontalFlip` in float64: x'' = (S - x') - 1, two roundings as Python evaluates it."""
    return (size - np.asarray(x, np.float64)) - 1.0


def stencil_rows(radius: int) -> int:
    """K: rows of one click's disk that `disk_rows` holds (see the module docstring)."""
    return 2 * radius + 2


def click_disk_rows(y: np.ndarray, x: np.ndarray, radius: int, out: np.ndarray | None = None) -> np.ndarray:
    """(n,) float64 click centres in network pixels -> (n, K, 3) float32 rows (row, first col, end col), with
    the official membership of every pixel; a row without disk pixels is (-1, -1, -1)."""
    y = np.asarray(y, np.float64).reshape(-1, 1)
    x = np.asarray(x, np.float64).reshape(-1, 1)
    k = stencil_rows(radius)
    step = np.arange(k, dtype=np.float64)
    rows = np.floor(y) - radius + step  # (n, K) integers
    cols = np.floor(x) - radius + step
    a = (rows - y).astype(np.float32)  # fl32(i - y): the subtraction in float64, one rounding
    b = (cols - x).astype(np.float32)
    a *= a  # float32 squares
    b *= b
    inside = (a[:, :, None] + b[:, None, :]) <= np.float32(radius * radius)  # float32 sum, as DistMaps
    hit = inside.any(axis=2)
    first = inside.argmax(axis=2)
    end = k - inside[:, :, ::-1].argmax(axis=2)
    if out is None:
        out = np.empty((y.shape[0], k, 3), np.float32)
    out[..., 0] = np.where(hit, rows, -1)
    out[..., 1] = np.where(hit, cols[:, :1] + first, -1)
    out[..., 2] = np.where(hit, cols[:, :1] + end, -1)
    return out


def fill_disk_rows(out: np.ndarray, yx_net: np.ndarray, positive: Sequence[bool], radius: int, size: int) -> None:
    """Write `disk_rows` (1, F, 2P, K, 3) for clicks already in network pixels (float64 (n, 2), in click
    order) of an S x S input: positives from row 0, negatives from row P; with F = 2 the second block holds
    the flipped clicks (x'' = (S - x') - 1). Unused rows are -1."""
    _, f, p2, _, _ = out.shape
    p = p2 // 2
    out.fill(-1.0)
    yx_net = np.asarray(yx_net, np.float64).reshape(-1, 2)
    pos = np.asarray(positive, bool).reshape(-1)
    if len(pos) != len(yx_net):
        raise ValueError(f"{len(yx_net)} clicks but {len(pos)} positive flags")
    n_pos = int(pos.sum())
    if n_pos > p or len(pos) - n_pos > p:
        raise ValueError(f"{n_pos} positive / {len(pos) - n_pos} negative clicks; the graph takes {p} of each")
    if not len(pos):
        return
    slots = np.empty(len(pos), np.int64)
    slots[pos] = np.arange(n_pos)
    slots[~pos] = p + np.arange(len(pos) - n_pos)
    y, x = yx_net[:, 0], yx_net[:, 1]
    if f == 2:  # one call for the clicks and the flipped clicks
        y, x = np.concatenate([y, y]), np.concatenate([x, flipped_x(x, size)])
    out[0][:, slots] = click_disk_rows(y, x, radius).reshape(f, len(pos), -1, 3)


def write_disk_rows(out: np.ndarray, yx: np.ndarray, positive: Sequence[bool], roi: Box, size: int,
                    radius: int) -> None:
    """`disk_rows` of clicks in image pixels (y, x) for the zoom-in box `roi`: what one forward of either
    graph takes."""
    fill_disk_rows(out, net_clicks(yx, roi, size), positive, radius, size)


def official_disks(y: float, x: float, rows: int, cols: int, radius: int) -> np.ndarray:
    """The official disk of one float64 click on a rows x cols grid, computed pixel by pixel (a restatement of
    `DistMaps` with use_disks for tests and benchmarks; the runtime uses `click_disk_rows`)."""
    a = (np.arange(rows, dtype=np.float64)[:, None] - np.float64(y)).astype(np.float32)
    b = (np.arange(cols, dtype=np.float64)[None, :] - np.float64(x)).astype(np.float32)
    return (a * a + b * b) <= np.float32(radius * radius)


def place_rows(rows: np.ndarray, height: int, width: int) -> np.ndarray:
    """The bool height x width union of the disks of (n, K, 3) rows: what the graphs compute from them."""
    out = np.zeros((height, width), bool)
    for r, c0, c1 in rows.reshape(-1, 3).astype(np.int64):
        if 0 <= r < height:
            out[r, max(c0, 0):max(min(c1, width), 0)] = True
    return out
