"""The official evaluation protocol driving a Session: RITM clicker, threshold 0.49, stop at the target IoU."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from .clicker import Clicker
from .datasets import Instance, iter_loaded
from .metrics import iou, summarize
from .session import Session


@dataclass
class InstanceResult:
    id: str
    ious: list[float] = field(default_factory=list)
    clicks: list[list[int]] = field(default_factory=list)  # [y, x, is_positive] in image pixels
    forwards: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"id": self.id, "ious": self.ious, "clicks": self.clicks, "forwards": self.forwards,
                "seconds": self.seconds}


def evaluate_instance(session: Session, image: np.ndarray, gt: np.ndarray, instance_id: str = "",
                      max_clicks: int = 20, target_iou: float = 0.95) -> InstanceResult:
    """`isegm.inference.evaluation.evaluate_sample` on a Session."""
    result = InstanceResult(instance_id)
    start = time.perf_counter()
    session.set_image(image)
    clicker = Clicker(gt)
    pred = np.zeros(gt.shape, bool)
    for _ in range(max_clicks):
        y, x, positive = clicker.next_click(pred)
        pred = session.add_click(x, y, positive)
        value = iou(gt, pred)
        result.ious.append(float(value))
        result.clicks.append([int(y), int(x), int(positive)])
        result.forwards.append(session.forwards[-1])
        if value >= target_iou:
            break
    result.seconds = time.perf_counter() - start
    return result


def evaluate_dataset(session: Session, instances: list[Instance], max_clicks: int = 20,
                     target_iou: float = 0.95, progress: Callable[[Iterable], Iterable] | None = None) -> dict:
    """Results of every instance plus the NoC summary, as a JSON-ready dict."""
    loaded = iter_loaded(instances)
    if progress is not None:
        loaded = progress(loaded)
    results = [evaluate_instance(session, image, gt, inst.id, max_clicks, target_iou)
               for inst, image, gt in loaded]
    summary = summarize([r.ious for r in results], max_clicks)
    forwards = [f for r in results for f in r.forwards]
    return {
        **summary,
        "max_clicks": max_clicks,
        "target_iou": target_iou,
        "mean_forwards_per_click": float(np.mean(forwards)) if forwards else 0.0,
        "seconds": float(sum(r.seconds for r in results)),
        "instances": [r.to_json() for r in results],
    }
