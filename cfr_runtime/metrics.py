"""IoU with the ignore label, NoC@t and mIoU-per-click, as the official evaluation computes them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE = -1
THRESHOLDS = (0.85, 0.9, 0.95)


def iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """IoU of pred with gt == 1 over pixels not labelled -1; 1.0 when both are empty there."""
    valid = gt != IGNORE
    obj = gt == 1
    inter = np.count_nonzero(pred & obj & valid)
    union = np.count_nonzero((pred | obj) & valid)
    return 1.0 if union == 0 else inter / union


def noc(ious: Sequence[float], threshold: float, max_clicks: int = 20) -> int:
    """1-based index of the first click reaching the threshold, else max_clicks."""
    for i, value in enumerate(ious[:max_clicks]):
        if value >= threshold:
            return i + 1
    return max_clicks


def reached(ious: Sequence[float], threshold: float, max_clicks: int = 20) -> bool:
    return any(v >= threshold for v in ious[:max_clicks])


def summarize(all_ious: Sequence[Sequence[float]], max_clicks: int = 20,
              thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """NoC per threshold, the official '>=max' count, the count never reaching it, and mIoU per click.

    Runs stop once the target IoU is reached; the mIoU curve carries an instance's last IoU forward.
    """
    out: dict = {"noc": {}, "over_max": {}, "never_reached": {}, "instances": len(all_ious)}
    for t in thresholds:
        nocs = [noc(x, t, max_clicks) for x in all_ious]
        key = f"{t:g}"
        out["noc"][key] = float(np.mean(nocs)) if nocs else float("nan")
        out["over_max"][key] = int(sum(n >= max_clicks for n in nocs))
        out["never_reached"][key] = int(sum(not reached(x, t, max_clicks) for x in all_ious))
    curve = np.zeros(max_clicks)
    for x in all_ious:
        padded = list(x[:max_clicks]) + [x[-1] if len(x) else 0.0] * (max_clicks - len(x[:max_clicks]))
        curve += np.asarray(padded)
    out["miou_per_click"] = (curve / max(1, len(all_ious))).tolist()
    return out
