"""Forwards of several sessions in one engine call: the Session side of cross-session batching.

A replica's sessions run their forwards in worker threads. With batching on, each session's Runner is wrapped
in a `BatchingRunner` whose `run()` hands the real runner to `submit` and blocks until its batch has run. On
Ray, `submit` feeds a `@serve.batch` method of the replica (`deploy.SessionReplica`), so Ray Serve's own
batcher collects up to `max_batch_size` forwards, waiting at most `batch_wait_timeout_s` for the batch to fill,
and `run_batch` executes them as one engine call.

`run_batch` is the one place that knows how a batch runs. Today's exported contract has no batch axis (every
graph takes (1, 3, S, S)), so it runs the batch's forwards back to back in one worker: each result is
exactly the unbatched one, the batching costs at most the wait, and the gain is nil. An engine whose graph has
a batch axis provides `run_batch(runners)` (stack the runners' buffers, one call, scatter the probabilities);
nothing above this function changes. Only the square contract is wrapped: a full-resolution engine keeps its
images and maps in the backend's own buffers per runner and is passed through unbatched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Submit = Callable[[object], np.ndarray]


def run_batch(engine, runners: Sequence) -> list[np.ndarray]:
    """The forwards of `runners` (each bound to one session's buffers) as one engine call; returns each
    runner's probabilities, in order."""
    batched = getattr(engine, "run_batch", None)
    if batched is not None:
        return list(batched(list(runners)))
    return [runner.run() for runner in runners]


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
    def points(self) -> np.ndarray:
        return self.inner.points

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
