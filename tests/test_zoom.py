"""The zoom-in box against an independent restatement of the official ZoomIn (issue 21).

The official-style torch loop (export/reference_loop.py) reuses `cfr_runtime.zoom.next_roi`, so the parity
tests cannot see a bug in it: a wrong box is wrong on both sides. Here the official transform is restated from
design/OFFICIAL_FORMAT.md the way the official code computes it (positive clicks painted into the mask, the
box of the mask, expanded x1.4 about its centre to at least 200 px, clamped; kept unless a positive click
leaves it (upper bounds exclusive) or the new box's IoU with it is < 0.5), and compared on random masks and
click lists, plus the boundary cases one by one.
"""

from __future__ import annotations

import numpy as np
import pytest

from cfr_runtime.disks import net_clicks
from cfr_runtime.zoom import (
    ZoomParams,
    box_iou,
    expand_box,
    mask_box,
    next_roi,
    next_roi_from_box,
    object_roi,
    roi_from_box,
    roi_holds,
)

P = ZoomParams()


# ---- the restatement ------------------------------------------------------------------------------------

def official_object_roi(mask: np.ndarray, positives, ratio=1.4, min_crop=200):
    mask = mask.copy()
    for y, x in positives:
        mask[int(y), int(x)] = True
    rows, cols = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
    rmin, rmax, cmin, cmax = rows[0], rows[-1], cols[0], cols[-1]
    rc, cc = 0.5 * (rmin + rmax), 0.5 * (cmin + cmax)
    h, w = max(ratio * (rmax - rmin + 1), min_crop), max(ratio * (cmax - cmin + 1), min_crop)
    box = (int(round(rc - 0.5 * h)), int(round(rc + 0.5 * h)), int(round(cc - 0.5 * w)), int(round(cc + 0.5 * w)))
    return max(0, box[0]), min(mask.shape[0] - 1, box[1]), max(0, box[2]), min(mask.shape[1] - 1, box[3])


def official_iou(a, b):
    def seg(s1, s2):
        inter = max(0, min(s1[1], s2[1]) - max(s1[0], s2[0]) + 1)
        return inter / max(1e-6, max(s1[1], s2[1]) - min(s1[0], s2[0]) + 1)
    return seg(a[:2], b[:2]) * seg(a[2:], b[2:])


def official_next_roi(current, probs, positives, thresh=0.5):
    mask = probs > thresh
    h, w = probs.shape
    candidate = official_object_roi(mask, positives) if mask.any() else (0, h - 1, 0, w - 1)
    if current is None:
        return candidate
    for y, x in positives:
        if y < current[0] or y >= current[1] or x < current[2] or x >= current[3]:
            return candidate
    return candidate if official_iou(candidate, current) < 0.5 else current


def _scene(rng, h, w):
    probs = np.zeros((h, w), np.float32)
    if rng.random() < 0.9:
        r0, c0 = rng.integers(0, h), rng.integers(0, w)
        r1, c1 = rng.integers(r0, min(h, r0 + rng.integers(1, h + 1))), rng.integers(c0, min(w, c0 + w))
        probs[r0:r1 + 1, c0:c1 + 1] = rng.uniform(0.3, 1.0, (r1 - r0 + 1, c1 - c0 + 1))
    positives = [(float(rng.uniform(0, h - 1)), float(rng.uniform(0, w - 1))) for _ in range(rng.integers(0, 4))]
    return probs, positives


def test_next_roi_matches_the_official_transform_on_random_scenes():
    rng = np.random.default_rng(21)
    kept = changed = 0
    for _ in range(400):
        h, w = int(rng.integers(1, 700)), int(rng.integers(1, 700))
        probs, positives = _scene(rng, h, w)
        current = None
        if rng.random() < 0.8:  # an earlier box: often the object's own box, so it is kept
            r0, c0 = int(rng.integers(0, h)), int(rng.integers(0, w))
            current = (r0, int(rng.integers(r0, h)), c0, int(rng.integers(c0, w)))
            if rng.random() < 0.5 and (probs > 0.5).any():  # the object's box, moved a little (IoU near 1)
                box = official_object_roi(probs > 0.5, positives)
                dy, dx = (int(v) for v in rng.integers(-3, 4, 2))
                current = (max(0, box[0] + dy), max(0, box[1] + dy), max(0, box[2] + dx), max(0, box[3] + dx))
        want = official_next_roi(current, probs, positives)
        assert next_roi(current, probs, positives, P) == want, (h, w, current, positives)
        box = mask_box(probs > P.prob_thresh)
        assert next_roi_from_box(current, box, (h, w), positives, P) == want
        candidate = official_next_roi(None, probs, positives)
        kept += want == current != candidate
        changed += current is not None and want != current
    assert kept > 30 and changed > 50  # both branches exercised, the kept box differing from the new one


def test_object_roi_matches_the_official_function():
    rng = np.random.default_rng(3)
    for _ in range(300):
        h, w = int(rng.integers(1, 900)), int(rng.integers(1, 900))
        probs, positives = _scene(rng, h, w)
        mask = probs > 0.5
        if not mask.any():
            assert object_roi(mask, positives, P) is None
            continue
        assert object_roi(mask, positives, P) == official_object_roi(mask, positives)


# ---- boundaries, one by one -----------------------------------------------------------------------------

def test_mask_box_is_inclusive_and_none_when_empty():
    m = np.zeros((10, 12), bool)
    assert mask_box(m) is None
    m[3, 4] = m[7, 9] = True
    assert mask_box(m) == (3, 7, 4, 9)
    m[:] = False
    m[0, 11] = True
    assert mask_box(m) == (0, 0, 11, 11)


def test_expand_box_ratio_minimum_and_rounding():
    assert expand_box((100, 199, 10, 309), 1.4, 0) == (80, 220, -50, 370)  # 100 x 300 -> 140 x 420
    assert expand_box((100, 199, 10, 309), 1.0, 200) == (50, 250, 10, 310)  # the minimum applies per side
    assert expand_box((5, 5, 5, 5), 1.4, 1) == (4, 6, 4, 6)  # 1 px -> 1.4 px about the centre: round(4.3) = 4
    assert expand_box((0, 3, 0, 0), 2.0, 0) == (-2, 6, -1, 1)  # rows: centre 1.5, height 8; cols: width 2


def test_roi_from_box_adds_positive_clicks_and_clamps():
    p = ZoomParams(expansion_ratio=1.0, min_crop_size=1)
    assert roi_from_box(None, (50, 60), [(1, 1)], p) is None  # an empty mask has no object box
    # ratio 1: centre +- half the pixel count, rounded half to even (round(9.5) = 10, round(20.5) = 20)
    assert roi_from_box((10, 20, 10, 20), (50, 60), [], p) == (10, 20, 10, 20)
    assert roi_from_box((10, 20, 10, 20), (50, 60), [(30.9, 5.2)], p) == (10, 30, 4, 20)  # int() of the click
    assert roi_from_box((10, 20, 10, 20), (50, 60), [(2.5, 40.0)], p) == (2, 20, 10, 40)
    assert roi_from_box((0, 49, 0, 59), (50, 60), [], ZoomParams()) == (0, 49, 0, 59)  # clamped on every side


def test_roi_holds_upper_bounds_are_exclusive():
    roi = (10, 20, 30, 40)
    assert roi_holds(roi, [(10, 30), (19.9, 39.9)])
    assert roi_holds(roi, [])
    for y, x in ((20, 35), (15, 40), (9.9, 35), (15, 29.9)):
        assert not roi_holds(roi, [(15, 35), (y, x)]), (y, x)


def test_box_iou_counts_inclusive_pixels():
    assert box_iou((0, 9, 0, 9), (0, 9, 0, 9)) == 1.0
    assert box_iou((0, 9, 0, 9), (5, 14, 0, 9)) == pytest.approx(5 / 15)
    assert box_iou((0, 9, 0, 9), (0, 9, 5, 14)) == pytest.approx(5 / 15)
    assert box_iou((0, 9, 0, 9), (10, 19, 0, 9)) == 0.0  # touching, not overlapping
    assert box_iou((3, 3, 3, 3), (3, 3, 3, 3)) == 1.0  # one pixel
    assert box_iou((0, 3, 0, 9), (0, 9, 0, 3)) == pytest.approx(0.4 * 0.4)


def test_next_roi_keeps_the_box_at_iou_one_half():
    """Recompute only when IoU < 0.5: at exactly 0.5 the old box stays, just under it the box moves."""
    shape, p = (400, 400), ZoomParams(expansion_ratio=1.0, min_crop_size=1)
    box = (0, 99, 0, 99)
    candidate = roi_from_box(box, shape, [], p)
    assert candidate == (0, 100, 0, 100)
    half, under = (0, 100, 0, 201), (0, 100, 0, 202)  # 101 of 202 columns; 101 of 203
    assert box_iou(candidate, half) == 0.5 and box_iou(candidate, under) < 0.5
    assert next_roi_from_box(half, box, shape, [], p) == half
    assert next_roi_from_box(under, box, shape, [], p) == candidate


def test_next_roi_first_click_and_empty_mask_take_the_whole_image():
    probs = np.zeros((30, 40), np.float32)
    assert next_roi(None, probs, [(5, 5)], P) == (0, 29, 0, 39)
    probs[10:12, 10:12] = 0.5  # not > 0.5: still empty
    assert next_roi(None, probs, [(5, 5)], P) == (0, 29, 0, 39)
    assert next_roi(None, probs, [], ZoomParams(expansion_ratio=1.0, min_crop_size=1)) == (0, 29, 0, 39)
    assert next_roi((3, 20, 3, 20), probs, [(5, 5)], P) == (0, 29, 0, 39)  # an empty mask: the whole image
    probs[10:12, 10:12] = 0.51
    assert next_roi(None, probs, [], ZoomParams(expansion_ratio=1.0, min_crop_size=1)) == (10, 12, 10, 12)
    assert next_roi(None, probs, [], ZoomParams(expansion_ratio=1.0, min_crop_size=1, prob_thresh=0.6)) == \
        (0, 29, 0, 39)


def test_next_roi_recomputes_when_a_positive_click_leaves_the_box():
    probs = np.zeros((300, 300), np.float32)
    probs[100:150, 100:150] = 0.9
    current = official_object_roi(probs > 0.5, [])
    assert next_roi(current, probs, [(120, 120)], P) == current
    outside = (current[1], 120)  # on the exclusive lower edge of the box
    assert next_roi(current, probs, [outside], P) == official_object_roi(probs > 0.5, [outside])
    assert next_roi(current, probs, [(120, 120), (5, 5)], P) != current
    assert next_roi(current, probs, [], P) == current  # negatives do not move it (they are not passed)


def test_net_clicks_official_mapping():
    """Clicks map into the crop as the official `_transform_clicks` does, in float64 (contract 3)."""
    yx = np.array([[10.0, 20.0], [109.0, 219.0], [60.5, 70.25]])
    out = net_clicks(yx, (10, 109, 20, 219), 448)
    assert out.dtype == np.float64
    want = np.stack([(448 * (yx[:, 0] - 10)) / 100, (448 * (yx[:, 1] - 20)) / 200], 1)
    assert np.array_equal(out, want)
    assert out[0].tolist() == [0.0, 0.0] and out[1, 0] == 448 * 99 / 100
