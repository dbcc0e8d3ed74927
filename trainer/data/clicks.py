"""Click simulation as RITM/SimpleClick train: random initial clicks, then clicks from the error regions."""

from __future__ import annotations

import cv2
import numpy as np


def _count(rng: np.random.Generator, low: int, high: int, gamma: float = 0.8) -> int:
    """A count in [low, high] with probability decaying as gamma**k (the multi-point sampler's prior)."""
    ks = np.arange(low, high + 1)
    p = gamma ** (ks - low)
    return int(rng.choice(ks, p=p / p.sum()))


def initial_points(target: np.ndarray, ignore: np.ndarray | None, max_points: int, rng: np.random.Generator,
                   max_init: int = 12, neg_band: int = 40) -> np.ndarray:
    """(2P, 3) rows (y, x, order): 1+ positives from the object (the first near its interior), some negatives
    from the background near it; padding -1. Orders: the first click 0, the rest shuffled."""
    pts = np.full((2 * max_points, 3), -1, np.float32)
    if not target.any():
        return pts
    valid = ~ignore if ignore is not None else np.ones_like(target)
    dt = cv2.distanceTransform(np.pad(target, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    inner = np.argwhere(dt >= 0.5 * dt.max())
    obj = np.argwhere(target & valid)
    n_pos = _count(rng, 1, min(max_init, max_points))
    positives = [inner[rng.integers(len(inner))]] + [obj[rng.integers(len(obj))] for _ in range(n_pos - 1)]
    band = cv2.dilate(target.astype(np.uint8), np.ones((2 * neg_band + 1,) * 2, np.uint8)) > 0
    bg = np.argwhere(band & ~target & valid)
    n_neg = _count(rng, 0, min(max_init, max_points)) if len(bg) else 0
    negatives = [bg[rng.integers(len(bg))] for _ in range(n_neg)]
    orders = np.concatenate([[0], rng.permutation(np.arange(1, n_pos + n_neg))]).astype(np.float32)
    for i, (y, x) in enumerate(positives):
        pts[i] = (y, x, orders[i])
    for j, (y, x) in enumerate(negatives):
        pts[max_points + j] = (y, x, orders[n_pos + j])
    return pts


def add_error_clicks(probs: np.ndarray, gt: np.ndarray, points: np.ndarray, rng: np.random.Generator,
                     thresh: float = 0.49) -> np.ndarray:
    """One click per sample in the larger error region, at a random pixel deeper than half its maximum
    distance (official `get_next_points`). probs, gt: (B, H, W), gt in {1, 0, -1}; points (B, 2P, 3)."""
    points = points.copy()
    p = points.shape[1] // 2
    for b in range(probs.shape[0]):
        valid = gt[b] != -1
        fn = (gt[b] == 1) & (probs[b] < thresh) & valid
        fp = (gt[b] == 0) & (probs[b] > thresh) & valid
        fn_dt = cv2.distanceTransform(np.pad(fn, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
        fp_dt = cv2.distanceTransform(np.pad(fp, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
        positive = fn_dt.max() > fp_dt.max()
        dt = fn_dt if positive else fp_dt
        idx = np.argwhere(dt > max(fn_dt.max(), fp_dt.max()) / 2.0)
        if len(idx) == 0:
            continue
        y, x = idx[rng.integers(len(idx))]
        order = max(points[b, :, 2].max(), 0) + 1
        rows = points[b, :p] if positive else points[b, p:]
        free = np.flatnonzero(rows[:, 2] < 0)
        slot = free[0] if len(free) else p - 1
        rows[slot] = (y, x, order)
    return points
