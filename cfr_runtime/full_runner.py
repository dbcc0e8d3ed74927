"""The host side of a full-resolution engine, shared by every backend (ONNX Runtime, TensorRT, torch).

A full runner keeps, per image, the uint8 image and two probability maps in the backend's memory. Forward k
reads map `cur` as `prev_probs` and writes the other one (ping-pong), so CFR / A-CFR inner steps never move
the map: the host sees only the box of probs > 0.5 and the A-CFR change count (a few bytes). The map is
copied out once per click (`probs()`, for the app's mask) and written back only on undo.

Backends implement six primitives on their own buffers; this class owns the small host inputs (the clicks'
disk rows, thresholds, crop/paste tables) and which of them changed since the last upload. The disk rows
depend on the clicks and the zoom-in box: they are decided here with the official float64 arithmetic
(`cfr_runtime.disks`) whenever either changed, exactly as the square Session decides them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .contract import (
    FULL_CROP_INDEX,
    FULL_CROP_WEIGHT,
    FULL_DISK_ROWS,
    FULL_PASTE_COL_W,
    FULL_PASTE_COLS,
    FULL_PASTE_ROW_W,
    FULL_PASTE_ROWS,
    FULL_SMALL_INPUTS,
    FULL_THRESHOLDS,
    Contract,
)
from .disks import write_disk_rows
from .errors import StateError
from .resample import crop_tables, paste_axis
from .zoom import Box


class FullRunner(ABC):
    """Per-session buffers of a full-graph engine. Subclasses implement the `_`-prefixed primitives."""

    def __init__(self, contract: Contract):
        self.contract = contract
        self.shape: tuple[int, int] | None = None
        self.small: dict[str, np.ndarray] = {}
        self._dirty: set[str] = set()
        self._cur = 0  # which map buffer holds the current probabilities
        self._roi: Box | None = None
        self._yx = np.zeros((0, 2), np.float64)  # the clicks (y, x) in image pixels, in click order
        self._positive = np.zeros(0, bool)
        self._disks_stale = False

    # ---- what the Session calls -------------------------------------------------------------------
    def set_image(self, rgb: np.ndarray) -> None:
        """Upload the image once; zero both maps; size the per-image tables."""
        h, w = rgb.shape[:2]
        self.contract.check_image_size(h, w)
        io = self.contract.io(h, w)
        self.small = {name: np.zeros(io[name][0], io[name][1]) for name in FULL_SMALL_INPUTS}
        self.small[FULL_DISK_ROWS].fill(-1)
        self.shape, self._cur, self._roi = (h, w), 0, None
        self.set_clicks(np.zeros((0, 2)), np.zeros(0, bool))
        self._bind(np.ascontiguousarray(rgb)[None])
        self._dirty = set(FULL_SMALL_INPUTS)

    def set_roi(self, roi: Box) -> None:
        """Zoom-in box of the next forwards; rebuilds the float64 crop/paste tables only when it changes."""
        if roi == self._roi:
            return
        s, sm = self.contract.input_size, self.small
        crop_tables(roi, s, sm[FULL_CROP_INDEX], sm[FULL_CROP_WEIGHT])
        paste_axis(roi[0], roi[1], s, sm[FULL_PASTE_ROWS], sm[FULL_PASTE_ROW_W])
        paste_axis(roi[2], roi[3], s, sm[FULL_PASTE_COLS], sm[FULL_PASTE_COL_W])
        self._roi = roi
        self._disks_stale = True
        self._dirty |= {FULL_CROP_INDEX, FULL_CROP_WEIGHT, FULL_PASTE_ROWS, FULL_PASTE_ROW_W, FULL_PASTE_COLS,
                        FULL_PASTE_COL_W}

    def set_clicks(self, yx: np.ndarray, positive: np.ndarray) -> None:
        """The clicks so far: (n, 2) (y, x) in image pixels and (n,) positive flags, in click order."""
        self._yx = np.asarray(yx, np.float64).reshape(-1, 2)
        self._positive = np.asarray(positive, bool).reshape(-1)
        self._disks_stale = True

    def set_thresholds(self, mask_threshold: float, zoom_threshold: float) -> None:
        self.small[FULL_THRESHOLDS][...] = (mask_threshold, zoom_threshold)
        self._dirty.add(FULL_THRESHOLDS)

    def run(self) -> tuple[Box | None, int]:
        """One forward: prev map -> new map (swapped in place); returns (box of probs > 0.5 or None, changed)."""
        if self.shape is None:
            raise StateError("full runner: set_image() before run()")
        if self._roi is None:
            raise StateError("full runner: set_roi() before run()")
        if self._disks_stale:
            c = self.contract
            write_disk_rows(self.small[FULL_DISK_ROWS], self._yx, self._positive, self._roi, c.input_size,
                            c.disk_radius)
            self._disks_stale = False
            self._dirty.add(FULL_DISK_ROWS)
        if self._dirty:
            self._upload(sorted(self._dirty))
            self._dirty.clear()
        self._execute(self._cur)
        self._cur ^= 1
        box, changed = self._fetch_small()
        r0, r1, c0, c1 = (int(v) for v in box)
        return ((r0, r1, c0, c1) if r0 <= r1 else None), int(changed)

    def probs(self) -> np.ndarray:
        """The current H x W map on the host (a view on CPU backends, one device-to-host copy otherwise)."""
        return self._read_map(self._cur)

    def net_probs(self) -> np.ndarray:
        """A copy of the last forward's S x S probabilities (before paste-back)."""
        return np.array(self._read_net(), copy=True)

    def load_probs(self, probs: np.ndarray | None) -> None:
        """Make `probs` (H x W float32; None: zeros) the current map (undo / reset)."""
        self._write_map(self._cur, probs)

    # ---- backend primitives -----------------------------------------------------------------------
    @abstractmethod
    def _bind(self, image: np.ndarray) -> None:
        """Allocate the per-image buffers for image (1, H, W, 3) uint8, upload it, zero both maps."""

    @abstractmethod
    def _upload(self, names: list[str]) -> None:
        """Copy these small host inputs (self.small) to the backend's buffers."""

    @abstractmethod
    def _execute(self, cur: int) -> None:
        """Run the graph reading map `cur` as prev_probs and writing map `1 - cur`."""

    @abstractmethod
    def _fetch_small(self) -> tuple[np.ndarray, int]:
        """(mask_box (4,), changed) of the last run."""

    @abstractmethod
    def _read_map(self, k: int) -> np.ndarray:
        """Map k on the host."""

    @abstractmethod
    def _write_map(self, k: int, probs: np.ndarray | None) -> None:
        """Overwrite map k with probs (None: zeros)."""

    @abstractmethod
    def _read_net(self) -> np.ndarray:
        """The last forward's (S, S) net_probs output (may be a view)."""
