"""Engine: one loaded network on one backend, shared by many sessions; each session gets its own Runner.

A Runner owns the contract's input/output buffers, bound once to the backend, so a click writes its disk rows
(a few kilobytes) in place and runs: no per-forward allocation and no feed dictionaries. Engines of the
full-resolution contract (`contract.full`) hand out `cfr_runtime.full_runner.FullRunner`s instead, which
keep the image and the probability maps in the backend's memory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from .buffers import alloc_buffers  # noqa: F401  (re-exported: callers and tests import it from here)
from .contract import Contract
from .errors import ContractError

BACKENDS = ("ort", "torch", "trt")


class Runner(Protocol):
    """Per-session buffers of one engine; `run()` reads them and returns the probs buffer (1, 1, S, S)."""

    image: np.ndarray  # (1, 3, S, S) float32
    prev_mask: np.ndarray  # (1, 1, S, S) float32
    disk_rows: np.ndarray  # (1, F, 2P, K, 3) float32, written by `cfr_runtime.disks`
    image_dirty: bool  # set by the Session after writing `image`; device backends upload it then

    def run(self) -> np.ndarray: ...


class Engine:
    """A network behind the contract. `Engine("model.onnx")` picks the ONNX Runtime backend.

    backend: "auto" (the fastest available for the file: a TensorRT plan -> "trt", else "ort"),
    "ort" (ONNX Runtime; providers default to CUDA/TensorRT when installed, else CPU) or "trt".
    The torch reference backend is built by `export.torch_backend.torch_engine` (it needs torch).
    """

    def __init__(self, model: str | Path, backend: str = "auto", providers: list | None = None,
                 threads: int | None = None):
        path = Path(model)
        if not path.is_file():
            raise ContractError(f"{path}: no such model file")
        if backend == "auto":
            backend = "trt" if path.suffix in (".plan", ".engine", ".trt") else "ort"
        if backend == "ort":
            from .backends.ort import OrtModel

            impl = OrtModel(path, providers=providers, threads=threads)
        elif backend == "trt":
            from .backends.trt import TrtModel

            impl = TrtModel(path)
        else:
            raise ContractError(f"unknown backend {backend!r}; choose one of 'auto', 'ort', 'trt'")
        self._init(impl.contract, impl.new_runner, backend, impl.describe())
        if impl.contract.batched:
            self._run_batch = getattr(impl, "run_batch", None)  # backends without it run one call per runner

    @classmethod
    def from_runner_factory(cls, contract: Contract, new_runner: Callable[[], Runner], name: str,
                            description: str) -> Engine:
        """An engine over any backend that provides Runners (used by the torch reference backend)."""
        engine = cls.__new__(cls)
        engine._init(contract, new_runner, name, description)
        return engine

    def _init(self, contract: Contract, new_runner: Callable[[], Runner], name: str, description: str) -> None:
        self.contract = contract
        self.backend = name
        self.description = description
        self._new_runner = new_runner
        self._run_batch: Callable[[Sequence[Runner]], list[np.ndarray]] | None = None
        self._lock = threading.Lock()
        self._free: list[Runner] = []

    def new_runner(self) -> Runner:
        """A runner for one Session: a released one when there is one, else a new one.

        Reuse matters on GPUs: a runner holds device buffers and its own captured CUDA graph, which ONNX
        Runtime never frees, so creating one per Session would grow memory with every image opened.
        """
        with self._lock:  # runner creation touches the backend's allocators; running does not need the lock
            if self._free:
                runner = self._free.pop()
                runner.image_dirty = True
                return runner
            return self._new_runner()

    def release_runner(self, runner: Runner) -> None:
        """Give a runner back (Sessions do this when they are garbage-collected)."""
        with self._lock:
            self._free.append(runner)

    @property
    def max_batch(self) -> int:
        """Forwards one engine call runs (`run_batch`): the graph's batch axis where this backend runs it, else 1."""
        return self.contract.max_batch if self._run_batch is not None else 1

    def run_batch(self, runners: Sequence[Runner]) -> list[np.ndarray]:
        """The forwards of several runners (each bound to one Session's buffers, filled as for `run()`), in as
        few engine calls as the graph allows: `max_batch` runners per call on a graph with a batch axis, else
        one call per runner. Returns what each runner's `run()` returns (its probs buffer, now holding this
        forward's probabilities), in order.

        Item i's probabilities are the ones `runners[i].run()` gives on the same engine: every operator of the
        graph works per item (flip averaging included), and ONNX Runtime's CPU kernels give them bit for bit
        (tests/test_batch_axis.py). Callers serialise calls on one engine (a replica's batcher runs one batch
        at a time); the runners must not be running on their own meanwhile.
        """
        runners = list(runners)
        if self._run_batch is None:
            return [runner.run() for runner in runners]
        n = self.contract.max_batch
        return [probs for k in range(0, len(runners), n) for probs in self._run_batch(runners[k:k + n])]

    def __repr__(self) -> str:
        c = self.contract
        return (f"Engine(backend={self.backend!r}, {self.description}, size={c.input_size}, "
                f"max_points={c.max_points}, flip={c.flip}, precision={c.precision}"
                f"{f', max_batch={self.max_batch}' if self.max_batch > 1 else ''})")
