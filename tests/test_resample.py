"""Bilinear resampling (align_corners=True) against a direct float64 restatement, including the window
offsets, one-sample axes, reused scratch buffers and the full graph's crop and paste tables (issue 21)."""

from __future__ import annotations

import numpy as np
import pytest

from cfr_runtime.resample import Axis, Resampler, crop_tables, paste_axis, resize_bilinear


def reference(src: np.ndarray, r0: int, h: int, c0: int, w: int, oh: int, ow: int) -> np.ndarray:
    """out[i, j] = bilinear sample of the window at (r0 + i (h-1)/(oh-1), c0 + j (w-1)/(ow-1)), in float64."""
    win = src[r0:r0 + h, c0:c0 + w].astype(np.float64)
    ys = np.arange(oh) * ((h - 1) / (oh - 1)) if oh > 1 else np.zeros(1)
    xs = np.arange(ow) * ((w - 1) / (ow - 1)) if ow > 1 else np.zeros(1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = ys - y0, xs - x0
    if win.ndim == 3:
        fy, fx = fy[:, None, None], fx[None, :, None]
    else:
        fy, fx = fy[:, None], fx[None, :]
    top = win[y0][:, x0] * (1 - fx) + win[y0][:, x1] * fx
    bottom = win[y1][:, x0] * (1 - fx) + win[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


CASES = [(0, 37, 0, 53, 64, 64), (5, 20, 7, 30, 17, 90), (0, 1, 0, 53, 4, 9), (3, 30, 2, 1, 5, 6),
         (0, 37, 0, 53, 1, 1), (10, 27, 40, 13, 27, 13), (1, 2, 1, 2, 7, 3), (4, 9, 6, 2, 2, 2)]


@pytest.mark.parametrize("case", CASES)
def test_resampler_matches_the_restatement(case):
    rng = np.random.default_rng(sum(case))
    src = rng.random((37, 53, 3), dtype=np.float32)
    rs = Resampler(*case)
    want = reference(src, *case)
    for _ in range(2):  # the second call reuses the scratch buffers
        got = rs(src)
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.abs(got - want).max() < 1e-6
    gray = rs(src[..., 1])  # a 2-D source on the same Resampler (other scratch buffers)
    assert gray.shape == want.shape[:2] and np.abs(gray - want[..., 1]).max() < 1e-6
    out = np.full(want.shape, 7.0, np.float32)
    assert rs(src, out=out) is out and np.abs(out - want).max() < 1e-6  # fills, does not accumulate


def test_axis_tables():
    a = Axis(5, 9, offset=10)
    assert a.i0.tolist() == [10, 10, 11, 11, 12, 12, 13, 13, 14] and a.i1.tolist() == [11, 11, 12, 12, 13, 13, 14,
                                                                                         14, 14]
    assert np.allclose(a.w1, [0, 0.5] * 4 + [0]) and np.allclose(a.w0 + a.w1, 1)
    assert a.w0.dtype == a.w1.dtype == np.float32
    one = Axis(4, 1, offset=3)
    assert one.i0.tolist() == [3] and one.i1.tolist() == [4] and one.w1.tolist() == [0.0] and one.w0.tolist() == [1.0]
    two = Axis(9, 2, offset=1)  # two samples: the window's first and last row
    assert two.i0.tolist() == [1, 9] and two.i1.tolist() == [2, 9] and two.w1.tolist() == [0.0, 0.0]
    single = Axis(1, 3)
    assert single.i0.tolist() == single.i1.tolist() == [0, 0, 0] and single.w0.tolist() == [1.0, 1.0, 1.0]


def test_resize_bilinear_takes_any_float_input():
    src = np.arange(12, dtype=np.float64).reshape(3, 4)
    out = resize_bilinear(src, 5, 7)
    assert out.dtype == np.float32 and np.abs(out - reference(src, 0, 3, 0, 4, 5, 7)).max() < 1e-5
    assert out[0, 0] == 0 and out[-1, -1] == 11  # corners align


def test_crop_tables_reproduce_the_host_crop():
    rng = np.random.default_rng(5)
    img = rng.random((60, 80), dtype=np.float32)
    for roi, size in (((5, 44, 10, 69), 32), ((0, 59, 0, 79), 17), ((7, 7, 3, 50), 9)):
        index, weight = np.zeros((4, size), np.int64), np.zeros((4, size), np.float32)
        crop_tables(roi, size, index, weight)
        r0, r1, c0, c1 = roi
        rows = img[index[0]] * weight[0][:, None] + img[index[1]] * weight[1][:, None]
        crop = rows[:, index[2]] * weight[2][None] + rows[:, index[3]] * weight[3][None]
        want = reference(img, r0, r1 - r0 + 1, c0, c1 - c0 + 1, size, size)
        assert np.abs(crop - want).max() < 1e-5, roi


def test_paste_axis_is_zero_outside_the_box():
    size, n = 16, 50
    index, weight = np.full((2, n), 9, np.int64), np.full((2, n), 9.0, np.float32)
    paste_axis(10, 29, size, index, weight)
    v = np.random.default_rng(0).random(size)
    pasted = v[index[0]] * weight[0] + v[index[1]] * weight[1]
    assert not pasted[:10].any() and not pasted[30:].any()
    assert not index[:, :10].any() and not index[:, 30:].any()
    assert np.abs(pasted[10:30] - reference(v[:, None], 0, size, 0, 1, 20, 1)[:, 0]).max() < 1e-6


def test_one_resampler_on_maps_of_different_widths():
    """Scratch buffers are kept per source shape: the same window resampled from two maps of different widths
    (and a 3-channel one) gives each its own result."""
    rng = np.random.default_rng(9)
    rs = Resampler(2, 10, 3, 12, 7, 5)
    for src in (rng.random((20, 30), dtype=np.float32), rng.random((20, 41), dtype=np.float32),
                rng.random((20, 30, 3), dtype=np.float32), rng.random((20, 30), dtype=np.float32)):
        assert np.abs(rs(src) - reference(src, 2, 10, 3, 12, 7, 5)).max() < 1e-6
