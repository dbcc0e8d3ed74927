"""The official ZoomIn transform (SimpleClick/CFR-ICL setting: skip_clicks -1, target S x S) as pure functions.

ROIs are inclusive (rmin, rmax, cmin, cmax) boxes in image pixels, as in `isegm.utils.misc`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class ZoomParams:
    expansion_ratio: float = 1.4
    min_crop_size: int = 200
    recompute_thresh_iou: float = 0.5
    prob_thresh: float = 0.5


def _segment_iou(a: tuple[int, int], b: tuple[int, int]) -> float:
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0]) + 1)
    union = max(1e-6, max(a[1], b[1]) - min(a[0], b[0]) + 1)
    return inter / union


def box_iou(a: Box, b: Box) -> float:
    return _segment_iou(a[:2], b[:2]) * _segment_iou(a[2:], b[2:])


def expand_box(box: Box, ratio: float, min_size: int) -> Box:
    rmin, rmax, cmin, cmax = box
    rc, cc = 0.5 * (rmin + rmax), 0.5 * (cmin + cmax)
    h = max(ratio * (rmax - rmin + 1), min_size)
    w = max(ratio * (cmax - cmin + 1), min_size)
    return (int(round(rc - 0.5 * h)), int(round(rc + 0.5 * h)), int(round(cc - 0.5 * w)), int(round(cc + 0.5 * w)))


def mask_box(mask: np.ndarray) -> Box | None:
    """Inclusive bounding box (rmin, rmax, cmin, cmax) of a bool map; None when it is empty.

    The full-resolution graph returns this box itself (output `mask_box`), so the host never reads the map.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def object_roi(mask: np.ndarray, positives: Sequence[tuple[float, float]], p: ZoomParams) -> Box | None:
    """Bounding box of mask plus positive clicks (y, x), expanded and clamped; None for an empty mask."""
    return roi_from_box(mask_box(mask), mask.shape, positives, p)


def roi_from_box(box: Box | None, shape: tuple[int, int], positives: Sequence[tuple[float, float]],
                 p: ZoomParams) -> Box | None:
    """`object_roi` from the mask's bounding box alone (four numbers instead of the map)."""
    if box is None:
        return None
    rmin, rmax, cmin, cmax = box
    for y, x in positives:
        rmin, rmax = min(rmin, int(y)), max(rmax, int(y))
        cmin, cmax = min(cmin, int(x)), max(cmax, int(x))
    r0, r1, c0, c1 = expand_box((rmin, rmax, cmin, cmax), p.expansion_ratio, p.min_crop_size)
    h, w = shape
    return max(0, r0), min(h - 1, r1), max(0, c0), min(w - 1, c1)


def roi_holds(roi: Box, positives: Sequence[tuple[float, float]]) -> bool:
    """Official `check_object_roi` (its upper bounds are exclusive)."""
    return all(roi[0] <= y < roi[1] and roi[2] <= x < roi[3] for y, x in positives)


def next_roi(current: Box | None, prev_probs: np.ndarray, positives: Sequence[tuple[float, float]],
             p: ZoomParams) -> Box:
    """The ROI for the next forward, kept unless a click leaves it or the object box moved too much."""
    return next_roi_from_box(current, mask_box(prev_probs > p.prob_thresh), prev_probs.shape, positives, p)


def next_roi_from_box(current: Box | None, box: Box | None, shape: tuple[int, int],
                      positives: Sequence[tuple[float, float]], p: ZoomParams) -> Box:
    """`next_roi` from the box of (prev_probs > prob_thresh) (None: empty), as the full graph reports it."""
    h, w = shape
    candidate = roi_from_box(box, shape, positives, p) or (0, h - 1, 0, w - 1)
    if current is None or not roi_holds(current, positives) or box_iou(candidate, current) < p.recompute_thresh_iou:
        return candidate
    return current

