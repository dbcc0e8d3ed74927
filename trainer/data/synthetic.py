"""Synthetic scenes for tests and benchmarks: textured background with a few coloured shapes."""

from __future__ import annotations

import cv2
import numpy as np


def synthetic_scene(rng: np.random.Generator, h: int = 256, w: int = 256,
                    n_objects: int = 3) -> tuple[np.ndarray, list[np.ndarray]]:
    """(uint8 RGB image, list of bool object masks, front-most last drawn, occlusions applied)."""
    noise = rng.normal(0, 1, (h // 8 + 1, w // 8 + 1, 3))
    background = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    image = np.clip(110 + 35 * background + rng.normal(0, 8, (h, w, 3)), 0, 255)
    owner = np.full((h, w), -1, np.int32)
    for k in range(n_objects):
        canvas = np.zeros((h, w), np.uint8)
        cy, cx = int(rng.uniform(0.2, 0.8) * h), int(rng.uniform(0.2, 0.8) * w)
        size = rng.uniform(0.08, 0.25) * min(h, w)
        if rng.random() < 0.5:
            axes = (int(size), int(size * rng.uniform(0.5, 1.0)))
            cv2.ellipse(canvas, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:
            n = int(rng.integers(3, 8))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            rad = size * rng.uniform(0.6, 1.2, n)
            poly = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).astype(np.int32)
            cv2.fillPoly(canvas, [poly], 1)
        colour = rng.uniform(0, 255, 3)
        texture = rng.normal(0, 12, (h, w, 3))
        on = canvas > 0
        image[on] = np.clip(colour + texture[on], 0, 255)
        owner[on] = k
    masks = [owner == k for k in range(n_objects)]
    masks = [m for m in masks if m.sum() >= 30] or [owner >= 0]
    return image.astype(np.uint8), masks
