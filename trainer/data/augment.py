"""The official training augmentations (RITM/SimpleClick configs), built with albumentations."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from .sources import Sample


def train_augmentator(crop: int) -> A.Compose:
    """UniformRandomResize(0.75, 1.40), flip, pad + random crop to crop x crop, brightness/contrast, RGB shift."""
    return A.Compose([
        A.RandomScale(scale_limit=(-0.25, 0.40), p=1.0),
        A.HorizontalFlip(),
        A.PadIfNeeded(min_height=crop, min_width=crop, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
        A.RandomCrop(crop, crop),
        A.RandomBrightnessContrast(brightness_limit=(-0.25, 0.25), contrast_limit=(-0.15, 0.4), p=0.75),
        A.RGBShift(r_shift_limit=10, g_shift_limit=10, b_shift_limit=10, p=0.75),
    ])


def augment(sample: Sample, aug: A.Compose) -> Sample:
    masks = [m.astype(np.uint8) for m in sample.objects]
    if sample.ignore is not None:
        masks.append(sample.ignore.astype(np.uint8))
    out = aug(image=sample.image, masks=masks)
    new = [np.asarray(m) > 0 for m in out["masks"]]
    ignore = new.pop() if sample.ignore is not None else None
    return Sample(out["image"], new, ignore, sample.id)
