"""Session: one image being annotated. Clicks in, masks out, with the official zoom-in and CFR.

Per forward this reproduces the official `BasePredictor.get_prediction` with ZoomIn(skip_clicks=-1):
choose the ROI from the previous probabilities, crop-resize image and previous probabilities to S x S,
map clicks into the crop, run the graph (flip and sigmoid inside), and paste the S x S probabilities back
into the ROI of a zero full-resolution map, which is the next forward's previous mask.

On a square engine (contract graph "square") the crop, paste and A-CFR count run here in numpy. On a
full-resolution engine (graph "full") they run inside the engine: per forward the host only updates the
zoom-in box from the four numbers the engine returned and writes the click rows; the map stays in the
engine's buffers and is copied out once per click.

Undo history: per click the S x S probabilities of its last forward and the ROI they were pasted into.
The full map is exactly that paste (zero outside the ROI), so undo restores it bit for bit from S*S floats
(0.8 MB at S=448) whatever the image size: 48 clicks on a 24-megapixel image keep 38 MB, not 4.6 GB.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass

import numpy as np

from .disks import write_disk_rows
from .engine import Engine
from .errors import InputError, ModelOutputError, StateError
from .resample import Resampler
from .zoom import Box, ZoomParams, next_roi, next_roi_from_box


@dataclass(frozen=True)
class Click:
    """A click in image pixels: x is the column, y the row."""

    x: float
    y: float
    positive: bool


@dataclass
class _Step:
    """The state after one click, for undo(): the full map is the paste of `net` into `roi`."""

    net: np.ndarray  # (S, S) float32 probabilities of the click's last forward
    roi: Box
    box: Box | None  # box of probs > zoom threshold (what the next zoom-in decision reads)


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: object) -> bool:
    """int or float (numpy scalars included), but not bool: `add_click(True, 5)` is a bug, not column 1."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def check_probs(probs: np.ndarray, engine: object = "the engine") -> None:
    """Refuse a forward whose output is NaN/inf or outside [0, 1]: two reductions over S x S, cheap next to
    the forward, and the difference between an error and a silently empty mask (NaN > threshold is False)."""
    lo, hi = float(probs.min()), float(probs.max())
    if not (0.0 <= lo and hi <= 1.0):  # NaN fails both comparisons
        raise ModelOutputError(
            f"{engine!r} returned probabilities outside [0, 1] (min {lo}, max {hi}); the model's weights are "
            "corrupt (NaN/inf) or its precision overflowed: re-export and verify it with cfr-export")


def validate_image(rgb: object) -> np.ndarray:
    """An H x W x 3 uint8 RGB array, or an InputError that says how to get one."""
    if not isinstance(rgb, np.ndarray):
        raise InputError(f"image must be a numpy array (H x W x 3 uint8 RGB), got {type(rgb).__name__}")
    if rgb.ndim == 2:
        raise InputError(f"image is a 2-D (grayscale) array {rgb.shape}; pass H x W x 3 RGB, "
                         "e.g. np.repeat(gray[..., None], 3, axis=2)")
    if rgb.ndim != 3:
        raise InputError(f"image must have shape H x W x 3, got {rgb.shape}")
    if rgb.shape[2] == 4:
        raise InputError("image has 4 channels (RGBA); drop the alpha channel: rgb = rgba[..., :3]")
    if rgb.shape[2] != 3:
        raise InputError(f"image must have 3 channels (RGB), got {rgb.shape[2]} (shape {rgb.shape})")
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise InputError(f"image is empty (shape {rgb.shape})")
    if rgb.dtype != np.uint8:
        hint = " (floats in [0, 1]: (img * 255).round().astype(np.uint8))" if rgb.dtype.kind == "f" else ""
        raise InputError(f"image dtype must be uint8, got {rgb.dtype}{hint}")
    return rgb


class Session:
    """Interactive segmentation of one image at a time on a shared Engine.

    Defaults are the official SimpleClick/CFR-ICL evaluation: zoom-in on, flip as exported, threshold
    0.49, no CFR. `cfr=n` runs n extra forwards on the first `cfr_clicks` clicks (None: every click);
    `adaptive=True` (A-CFR) stops once at most `cfr_threshold` pixels change between two forwards.
    """

    def __init__(self, engine: Engine | str | os.PathLike, *, cfr: int = 0, adaptive: bool = False,
                 cfr_threshold: int = 20, cfr_clicks: int | None = 1, zoom_in: bool = True,
                 zoom: ZoomParams | None = None, threshold: float | None = None):
        if isinstance(engine, (str, os.PathLike)):
            engine = Engine(engine)  # Session("model.onnx"): a private engine for this session
        elif not (hasattr(engine, "contract") and hasattr(engine, "new_runner")):
            raise InputError(f"Session takes an Engine or the path of a model file, got {type(engine).__name__}")
        for name, value in (("cfr", cfr), ("cfr_threshold", cfr_threshold), ("cfr_clicks", cfr_clicks)):
            if value is not None and not _is_int(value):
                raise InputError(f"{name} must be an integer, got {value!r}")
        if cfr < 0 or cfr_threshold < 0 or (cfr_clicks is not None and cfr_clicks < 1):
            raise InputError("cfr and cfr_threshold must be >= 0 and cfr_clicks >= 1 (or None for every click)")
        if threshold is not None and not (_is_number(threshold) and 0 < threshold < 1):
            raise InputError(f"threshold must be a probability strictly between 0 and 1, got {threshold!r}")
        self.engine = engine
        self.cfr, self.adaptive, self.cfr_threshold, self.cfr_clicks = cfr, adaptive, cfr_threshold, cfr_clicks
        self.zoom_in = zoom_in
        self.zoom = zoom or ZoomParams()
        self.threshold = engine.contract.threshold if threshold is None else threshold
        self._size = engine.contract.input_size
        self._max_points = engine.contract.max_points
        self._full = engine.contract.full
        self._runner = engine.new_runner()
        # the runner (device buffers, a captured CUDA graph) goes back to the engine with this Session
        weakref.finalize(self, engine.release_runner, self._runner)
        self._image: np.ndarray | None = None
        self._clicks: list[Click] = []
        self._history: list[_Step] = []
        self.forwards: list[int] = []

    # ---- public API -------------------------------------------------------------------------------
    def set_image(self, rgb: np.ndarray) -> None:
        """Start annotating a new image (uint8 H x W x 3 RGB); clears clicks and history."""
        rgb = validate_image(rgb)
        h, w = rgb.shape[:2]
        if self._full:  # the engine keeps the image and both maps; the host keeps nothing image-sized
            self._runner.set_image(rgb)
            self._runner.set_thresholds(self.threshold, self.zoom.prob_thresh)
            self._image, self._shape = rgb, (h, w)
            self.reset()
            return
        self._image = rgb.astype(np.float32) * np.float32(1 / 255)
        self._shape = (h, w)
        self._probs = np.zeros((h, w), np.float32)
        self._spare = np.zeros((h, w), np.float32)  # ping-pong partner of _probs
        self._masks = (np.zeros((h, w), bool), np.zeros((h, w), bool))  # A-CFR's consecutive masks
        self._roi_hwc = np.empty((self._size, self._size, 3), np.float32)
        self.reset()

    def add_click(self, x: float, y: float, positive: bool = True) -> np.ndarray:
        """Add a click at column x, row y (image pixels); returns the new bool H x W mask."""
        self._clicks.append(self.check_click(x, y, positive))
        try:
            steps = self._predict_full() if self._full else self._predict()
        except BaseException:  # e.g. ModelOutputError or Ctrl-C: leave the session as it was before the click
            self._clicks.pop()
            self._restore_last()
            raise
        self.forwards.append(steps)
        if self._full:
            self._host = self._runner.probs()  # the one copy out per click (a view on CPU backends)
            net = self._runner.net_probs()
        else:
            net = self._net.copy()
        self._history.append(_Step(net, self._roi, self._box))
        return self.mask

    def check_click(self, x: float, y: float, positive: bool = True) -> Click:
        """The click `add_click(x, y, positive)` would record, or the InputError it would raise, without running
        anything: a server that must act before the forward (the cluster commits the click while it runs)
        learns here whether the click will be taken."""
        self._require_image()
        h, w = self._shape
        if not (_is_number(x) and _is_number(y)):
            raise InputError(f"click coordinates must be numbers, got x={x!r}, y={y!r}")
        if not (math.isfinite(x) and math.isfinite(y) and 0 <= x < w and 0 <= y < h):
            raise InputError(f"click (x={x}, y={y}) is outside the {w}x{h} image (0 <= x < {w}, 0 <= y < {h})")
        if not isinstance(positive, (bool, np.bool_)) and not (_is_int(positive) and positive in (0, 1)):
            raise InputError(f"positive must be True or False, got {positive!r}")
        positive = bool(positive)
        if sum(c.positive == positive for c in self._clicks) >= self._max_points:
            kind = "positive" if positive else "negative"
            raise InputError(f"this engine takes at most {self._max_points} {kind} clicks; re-export with a "
                             "larger --max-points, or undo()/reset()")
        return Click(float(x), float(y), positive)

    def undo(self) -> np.ndarray:
        """Remove the last click and restore the mask before it."""
        self._require_image()
        if not self._clicks:
            raise StateError("undo() with no clicks to undo")
        self._history.pop()
        self._clicks.pop()
        self.forwards.pop()
        self._restore_last()
        return self.mask

    def _restore_last(self) -> None:
        """Probabilities, box and ROI as they were after the last click in the history (exact: the map is
        that click's S x S output pasted into its ROI, as the forward wrote it)."""
        if not self._history:
            self._clear_probs()
            return
        step = self._history[-1]
        r0, r1, c0, c1 = self._roi = step.roi
        self._box = step.box
        s = self._size
        probs = np.zeros(self._shape, np.float32) if self._full else self._probs
        probs.fill(0)
        Resampler(0, s, 0, s, r1 - r0 + 1, c1 - c0 + 1)(step.net, out=probs[r0:r1 + 1, c0:c1 + 1])
        if self._full:
            self._runner.load_probs(probs)
            self._host = self._runner.probs()

    def reset(self) -> None:
        """Remove every click of the current image."""
        self._require_image()
        self._clicks.clear()
        self._history.clear()
        self.forwards.clear()
        self._clear_probs()
        self._cached_roi: Box | None = None
        self._disks_key: tuple | None = None

    def _clear_probs(self) -> None:
        self._roi: Box | None = None
        self._box: Box | None = None
        if self._full:
            self._runner.load_probs(None)
            self._host = self._runner.probs()
        else:
            self._probs.fill(0)

    @property
    def clicks(self) -> list[Click]:
        return list(self._clicks)

    @property
    def probs(self) -> np.ndarray:
        """Probability map at image resolution (read-only view; copy it to keep it)."""
        self._require_image()
        view = (self._host if self._full else self._probs).view()
        view.flags.writeable = False
        return view

    @property
    def mask(self) -> np.ndarray:
        self._require_image()
        return (self._host if self._full else self._probs) > self.threshold

    @property
    def roi(self) -> Box | None:
        """The current zoom-in box (rmin, rmax, cmin, cmax), inclusive, or None before the first click."""
        return self._roi

    @property
    def nbytes(self) -> int:
        """Memory this session holds (image, probability maps, undo history, runner buffers), for services
        that cap the memory of many sessions."""
        arrays: list[np.ndarray] = []
        if self._image is not None:
            arrays = [self._image, *(step.net for step in self._history)]
            if self._full:
                arrays += [a for a in (getattr(self, "_host", None),) if isinstance(a, np.ndarray)]
            else:
                arrays += [self._probs, self._spare, *self._masks, self._roi_hwc]
        runner = self._runner
        arrays += [a for a in (getattr(runner, n, None) for n in ("image", "prev_mask", "disk_rows"))
                   if isinstance(a, np.ndarray)]
        return int(sum(a.nbytes for a in arrays))

    # ---- internals --------------------------------------------------------------------------------
    def _require_image(self) -> None:
        if self._image is None:
            raise StateError("call set_image(rgb) before clicking")

    def _predict(self) -> int:
        n = len(self._clicks)
        steps = 1
        if self.cfr > 0 and (self.cfr_clicks is None or n <= self.cfr_clicks):
            steps += self.cfr
        now, before = self._masks
        for i in range(steps):
            self._forward()
            if self.adaptive and steps > 1:
                np.greater(self._probs, self.threshold, out=now)
                if i > 0 and np.count_nonzero(now != before) <= self.cfr_threshold:
                    return i + 1
                now, before = before, now
        return steps

    def _forward(self) -> None:
        h, w = self._probs.shape
        s = self._size
        positives = [(c.y, c.x) for c in self._clicks if c.positive]
        whole = (0, h - 1, 0, w - 1)
        roi = next_roi(self._roi, self._probs, positives, self.zoom) if self.zoom_in else whole
        self._roi = roi
        r0, r1, c0, c1 = roi
        runner = self._runner
        if roi != self._cached_roi:  # resampling tables and the image crop change only with the ROI
            self._to_net = Resampler(r0, r1 - r0 + 1, c0, c1 - c0 + 1, s, s)
            self._from_net = Resampler(0, s, 0, s, r1 - r0 + 1, c1 - c0 + 1)
            self._to_net(self._image, out=self._roi_hwc)
            runner.image[0] = self._roi_hwc.transpose(2, 0, 1)
            runner.image_dirty = True  # device backends upload the image only when this is set
            self._cached_roi = roi
        self._to_net(self._probs, out=runner.prev_mask[0, 0])
        self._write_disks(roi)
        probs = self._net = runner.run()[0, 0]
        check_probs(probs, self.engine)
        out = self._spare  # ping-pong: the new map goes into the spare buffer, the old becomes spare
        out.fill(0)
        self._from_net(probs, out=out[r0:r1 + 1, c0:c1 + 1])
        self._spare, self._probs = self._probs, out

    def _predict_full(self) -> int:
        """The same loop on a full-resolution engine: per forward, the ROI from four numbers and one call."""
        n = len(self._clicks)
        steps = 1
        if self.cfr > 0 and (self.cfr_clicks is None or n <= self.cfr_clicks):
            steps += self.cfr
        runner, (h, w) = self._runner, self._shape
        runner.set_clicks(*self._click_arrays())
        positives = [(c.y, c.x) for c in self._clicks if c.positive]
        for i in range(steps):
            if self.zoom_in:
                roi = next_roi_from_box(self._roi, self._box, (h, w), positives, self.zoom)
            else:
                roi = (0, h - 1, 0, w - 1)
            self._roi = roi
            runner.set_roi(roi)
            self._box, changed = runner.run()
            if self.adaptive and steps > 1 and i > 0 and changed <= self.cfr_threshold:
                return i + 1
        return steps

    def _click_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(n, 2) float64 (y, x) in image pixels and (n,) positive flags, in click order."""
        yx = np.array([(c.y, c.x) for c in self._clicks], np.float64).reshape(-1, 2)
        return yx, np.array([c.positive for c in self._clicks], bool)

    def _write_disks(self, roi: Box) -> None:
        """The runner's disk rows for the clicks in this ROI, decided with the official float64 arithmetic
        (`cfr_runtime.disks`); rewritten only when the clicks or the ROI changed (CFR steps reuse them)."""
        key = (roi, tuple(self._clicks))
        if key == self._disks_key:
            return
        c = self.engine.contract
        write_disk_rows(self._runner.disk_rows, *self._click_arrays(), roi, self._size, c.disk_radius)
        self._disks_key = key
