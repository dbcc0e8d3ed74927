"""Forwards of several sessions in one engine call: the Session side of cross-session batching.

A replica's sessions run their forwards in worker threads. With batching on, each session's Runner is wrapped
in a `BatchingRunner` whose `run()` hands the real runner to `submit` and blocks until its batch has run. On
Ray, `submit` feeds a `@serve.batch` method of the replica (`deploy.SessionReplica`), so Ray Serve's own
batcher collects up to `max_batch_size` forwards, waiting at most `batch_wait_timeout_s` for the batch to fill,
and `Engine.run_batch` executes them: one engine call per batch on a graph exported with a batch axis
(`cfr-export --max-batch N`), one call per forward on a batch-1 graph (then batching only adds the wait).
Either way each forward's probabilities are the ones the runner's own `run()` gives (bit for bit on ONNX
Runtime's CPU provider), so a session's masks do not depend on which other sessions shared its batch, and a
record replayed on another replica gives the same masks. Only the square contract is wrapped: a full-resolution
engine keeps its images and maps in the backend's own buffers per runner and is passed through unbatched.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Submit = Callable[[object], np.ndarray]


class BatchingRunner:
    """A session's runner whose forwards go through `submit` (the batcher); buffers are the real runner's."""

    def __init__(self, inner, submit: Submit):
        self.inner = inner
        self._submit = submit

    @property
    def image(self) -> np.ndarray:
        return self.inner.image

    @property
    def prev_mask(self) -> np.ndarray:
        return self.inner.prev_mask

    @property
    def disk_rows(self) -> np.ndarray:
        return self.inner.disk_rows

    @property
    def image_dirty(self) -> bool:
        return self.inner.image_dirty

    @image_dirty.setter
    def image_dirty(self, value: bool) -> None:
        self.inner.image_dirty = value

    def run(self) -> np.ndarray:
        return self._submit(self.inner)


class BatchingEngine:
    """What Sessions see of a replica's engine when batching is on: the same contract, batching runners."""

    def __init__(self, engine, submit: Submit):
        self.engine = engine
        self.contract = engine.contract
        self._submit = submit

    def new_runner(self) -> BatchingRunner:
        return BatchingRunner(self.engine.new_runner(), self._submit)

    def release_runner(self, runner: BatchingRunner) -> None:
        self.engine.release_runner(runner.inner)

    def __repr__(self) -> str:
        return f"{self.engine!r} (forwards batched across sessions)"


def batching(engine, submit: Submit | None):
    """`engine` with its forwards going through `submit`, where batching applies (square contract)."""
    if submit is None or engine.contract.full:
        return engine
    return BatchingEngine(engine, submit)
