"""The training set: sources -> augmentation -> SUEM -> one target object -> initial clicks -> arrays.

Randomness comes from one generator re-seeded per optimisation step (`reseed`), so a run resumed from a
checkpoint draws exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import zlib

import numpy as np

from .augment import augment, train_augmentator
from .clicks import initial_points
from .sources import Sample, Source
from .suem import Suem, SuemConfig


class TrainSet:
    def __init__(self, sources: list[Source], crop: int, max_points: int = 24, suem: SuemConfig | None = None,
                 min_object_area: int = 80, seed: int = 0):
        if not sources or not any(len(s) for s in sources):
            raise ValueError("no training samples: give at least one non-empty source")
        self.sources, self.crop, self.max_points, self.min_area = sources, crop, max_points, min_object_area
        self.aug = train_augmentator(crop)
        self.suem = Suem(suem or SuemConfig(), self._draw)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def reseed(self, *keys: int) -> None:
        self.rng = np.random.default_rng([self.seed, *keys])
        self.aug.set_random_seed(zlib.crc32(repr((self.seed, *keys)).encode()))

    def _draw(self) -> Sample:
        """A random augmented sample with at least one object of min_object_area pixels."""
        for _ in range(50):
            src = self.sources[self.rng.choice(len(self.sources), p=self._weights())]
            sample = augment(src.get(int(self.rng.integers(len(src)))), self.aug)
            sample.objects = [m for m in sample.objects if m.sum() >= self.min_area]
            if sample.objects:
                return sample
        raise RuntimeError("50 draws in a row gave no object; check the sources and the crop size")

    def _weights(self) -> np.ndarray:
        n = np.array([len(s) for s in self.sources], float)
        return n / n.sum()

    def example(self) -> dict:
        """image (3, S, S) float32 in [0, 1], target (1, S, S) float32 in {1, 0, -1}, points (2P, 3)."""
        sample = self._draw()
        target = sample.objects[int(self.rng.integers(len(sample.objects)))]
        image, target, ignore, modes = self.suem(sample, target, self.rng)
        gt = target.astype(np.float32)
        if ignore is not None:
            gt[ignore & ~target] = -1
        points = initial_points(target, ignore, self.max_points, self.rng)
        return {"image": image.transpose(2, 0, 1).astype(np.float32) / 255, "target": gt[None],
                "points": points, "modes": modes}

    def batch(self, size: int) -> dict:
        items = [self.example() for _ in range(size)]
        return {k: np.stack([it[k] for it in items]) for k in ("image", "target", "points")}
