"""The official evaluation protocol driving a Session: RITM clicker, threshold 0.49, stop at the target IoU."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
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

    @classmethod
    def from_json(cls, data: dict) -> InstanceResult:
        return cls(str(data["id"]), [float(v) for v in data["ious"]], [list(map(int, c)) for c in data["clicks"]],
                   [int(f) for f in data["forwards"]], float(data.get("seconds", 0.0)))


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
                     target_iou: float = 0.95, progress: Callable[[Iterable], Iterable] | None = None,
                     done: Sequence[InstanceResult] = (),
                     on_result: Callable[[InstanceResult], None] | None = None) -> dict:
    """Results of every instance plus the NoC summary, as a JSON-ready dict.

    `done` holds results of an earlier, interrupted run (their instances are not evaluated again);
    `on_result` is called after each new instance, so a caller can save it before the next one starts.
    """
    finished = {r.id: r for r in done}
    todo = [inst for inst in instances if inst.id not in finished]
    loaded = iter_loaded(todo)
    if progress is not None:
        loaded = progress(loaded)
    for inst, image, gt in loaded:
        result = evaluate_instance(session, image, gt, inst.id, max_clicks, target_iou)
        finished[inst.id] = result
        if on_result is not None:
            on_result(result)
    return summarize_results([finished[inst.id] for inst in instances if inst.id in finished], max_clicks,
                             target_iou)


def summarize_results(results: Sequence[InstanceResult], max_clicks: int, target_iou: float) -> dict:
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
