"""The RITM evaluation clicker: the next click goes to the centre of the largest error region."""

from __future__ import annotations

import cv2
import numpy as np

IGNORE = -1


class Clicker:
    """gt: H x W int mask, 1 = object, 0 = background, -1 = ignore (never clicked, never scored)."""

    def __init__(self, gt: np.ndarray):
        self.gt = gt == 1
        self.valid = gt != IGNORE
        self.not_clicked = np.ones(gt.shape, bool)

    def next_click(self, pred: np.ndarray) -> tuple[int, int, bool]:
        """(y, x, positive) for the current bool prediction, as `isegm.inference.clicker.Clicker`."""
        fn = self.gt & ~pred & self.valid
        fp = ~self.gt & pred & self.valid
        fn_dt = self._dt(fn)
        fp_dt = self._dt(fp)
        fn_max, fp_max = fn_dt.max(), fp_dt.max()
        positive = bool(fn_max > fp_max)  # a tie is a negative click
        dt, best = (fn_dt, fn_max) if positive else (fp_dt, fp_max)
        flat = int(np.argmax(dt == best))  # first pixel in row-major order holding the maximum
        y, x = divmod(flat, dt.shape[1])
        self.not_clicked[y, x] = False
        return y, x, positive

    def _dt(self, region: np.ndarray) -> np.ndarray:
        padded = np.pad(region, 1).astype(np.uint8)
        dt = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
        return dt * self.not_clicked
