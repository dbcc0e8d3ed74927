"""SUEM copy-paste (CFR-ICL): Simple, Union, Exclusion and Mixing, as a wrapper over augmented samples.

Each mode is a pure function of (image, target, other image/object) so its effect is testable:
- simple:    the source object is pasted (alpha in [0.5, 1]) onto another image; target = source object
- union:     an unrelated object is pasted into the sample; target = source | pasted
- exclusion: an unrelated object is pasted over the source; target = source & ~pasted
- mixing:    an unrelated object is alpha-blended in (object mixing), or the whole image is blended with
             another image (image mixing, weight in [0.5, 1]); target = source
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .sources import Sample


def blend(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    return np.clip(alpha * a.astype(np.float32) + (1 - alpha) * b.astype(np.float32), 0, 255).astype(np.uint8)


def simple(src_image: np.ndarray, src_obj: np.ndarray, dst_image: np.ndarray, alpha: float):
    image = dst_image.copy()
    image[src_obj] = blend(src_image, dst_image, alpha)[src_obj]
    return image, src_obj.copy()


def union(image: np.ndarray, target: np.ndarray, other_image: np.ndarray, other_obj: np.ndarray):
    out = image.copy()
    out[other_obj] = other_image[other_obj]
    return out, target | other_obj


def exclusion(image: np.ndarray, target: np.ndarray, other_image: np.ndarray, other_obj: np.ndarray):
    out = image.copy()
    out[other_obj] = other_image[other_obj]
    return out, target & ~other_obj


def object_mixing(image: np.ndarray, target: np.ndarray, other_image: np.ndarray, other_obj: np.ndarray,
                  alpha: float):
    out = image.copy()
    out[other_obj] = blend(image, other_image, alpha)[other_obj]
    return out, target.copy()


def image_mixing(image: np.ndarray, target: np.ndarray, other_image: np.ndarray, alpha: float):
    return blend(image, other_image, alpha), target.copy()


@dataclass(frozen=True)
class SuemConfig:
    """Probabilities as in the official data pipeline (copy_paste_prob 0.5, image_mix_prob 0.5)."""

    p_simple: float = 0.5
    p_paste: float = 0.5
    paste_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # exclusion, union, object mixing
    p_image_mix: float = 0.5

    @classmethod
    def off(cls) -> SuemConfig:
        return cls(0.0, 0.0, (1.0, 1.0, 1.0), 0.0)


class Suem:
    """Apply SUEM to (sample, chosen object); `draw()` returns another augmented sample with objects."""

    def __init__(self, cfg: SuemConfig, draw: Callable[[], Sample]):
        self.cfg, self.draw = cfg, draw

    def __call__(self, sample: Sample, target: np.ndarray, rng: np.random.Generator):
        image, ignore, modes = sample.image, sample.ignore, []
        if rng.random() < self.cfg.p_simple:
            other = self.draw()
            image, target = simple(image, target, other.image, rng.uniform(0.5, 1.0))
            ignore, modes = None, ["simple"]
        if rng.random() < self.cfg.p_paste:
            for _ in range(5):  # an unrelated object that leaves more than 20 px of the target visible
                other = self.draw()
                if not other.objects:
                    continue
                obj = other.objects[rng.integers(len(other.objects))]
                if (target & ~obj).sum() <= 20:
                    continue
                w = np.asarray(self.cfg.paste_weights, float)
                mode = ("exclusion", "union", "mixing")[rng.choice(3, p=w / w.sum())]
                if mode == "exclusion":
                    image, target = exclusion(image, target, other.image, obj)
                elif mode == "union":
                    image, target = union(image, target, other.image, obj)
                else:
                    image, target = object_mixing(image, target, other.image, obj, rng.uniform(0.5, 1.0))
                if ignore is not None:
                    ignore = ignore & ~obj
                modes.append(mode)
                break
        if rng.random() < self.cfg.p_image_mix:
            image, target = image_mixing(image, target, self.draw().image, rng.uniform(0.5, 1.0))
            modes.append("image_mixing")
        return image, target, ignore, modes
