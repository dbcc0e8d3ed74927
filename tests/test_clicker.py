"""The RITM clicker against a brute-force exact distance transform over click sequences (issue 21): the
larger error wins (a tie is negative), the first pixel in row-major order holding the maximum, clicked pixels
never again, ignore pixels never an error, the image border counted as background (1 px zero padding)."""

from __future__ import annotations

import numpy as np

from cfr_runtime.clicker import Clicker


def exact_dt(region: np.ndarray) -> np.ndarray:
    """Euclidean distance of each region pixel to the nearest non-region pixel, the image outside counting as
    non-region (float32, as OpenCV's precise transform returns it)."""
    padded = np.pad(region, 1)
    zeros = np.argwhere(~padded)
    out = np.zeros(region.shape, np.float64)
    for y, x in np.argwhere(region):
        out[y, x] = np.sqrt(((zeros - (y + 1, x + 1)) ** 2).sum(1).min())
    return out.astype(np.float32)


def reference_click(gt, pred, clicked):
    valid = gt != -1
    fn = (gt == 1) & ~pred & valid
    fp = (gt == 0) & pred & valid
    fn_dt, fp_dt = exact_dt(fn) * ~clicked, exact_dt(fp) * ~clicked
    positive = fn_dt.max() > fp_dt.max()
    dt = fn_dt if positive else fp_dt
    y, x = np.argwhere(dt == dt.max())[0]
    return int(y), int(x), bool(positive)


def test_click_sequences_match_the_reference():
    rng = np.random.default_rng(8)
    signs = set()
    for _ in range(40):
        h, w = int(rng.integers(3, 14)), int(rng.integers(3, 14))
        gt = (rng.random((h, w)) < 0.5).astype(np.int32)
        gt[rng.random((h, w)) < 0.1] = -1
        clicker, clicked = Clicker(gt), np.zeros((h, w), bool)
        for _ in range(4):
            pred = rng.random((h, w)) < 0.5
            want = reference_click(gt, pred, clicked)
            got = clicker.next_click(pred)
            assert got == want, (gt, pred, clicked)
            assert isinstance(got[2], bool) and type(got[0]) is int and type(got[1]) is int
            clicked[want[0], want[1]] = True
            signs.add(want[2])
    assert signs == {True, False}


def test_error_only_in_the_ignore_band_gives_no_error_click():
    gt = np.zeros((6, 6), np.int32)
    gt[2:4, 2:4] = 1
    gt[0] = -1
    pred = gt == 1
    pred[0] = True  # wrong only where ignored
    c = Clicker(gt)
    y, x, positive = c.next_click(pred)
    assert not positive and (y, x) == (0, 0)  # no error anywhere: the tie of zeros is a negative at (0, 0)
    assert not c.not_clicked[0, 0] and c.not_clicked.sum() == 35


def test_gt_values_other_than_one_are_background():
    gt = np.array([[2, 2, 2], [2, 1, 2], [2, 2, 2]], np.int32)
    assert Clicker(gt).next_click(np.zeros((3, 3), bool)) == (1, 1, True)
    assert Clicker(gt).next_click(np.ones((3, 3), bool)) == (0, 0, False)  # 2 is background: 8 false positives
