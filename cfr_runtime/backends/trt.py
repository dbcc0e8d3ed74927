"""Native TensorRT backend: one deserialized plan per Engine, one execution context per Session.

Buffers: pinned-free numpy host mirrors (the Runner protocol) and device buffers bound once with
`set_tensor_address`; a forward uploads the disk rows (kilobytes) and the prev mask, the image only when the
Session marks it changed (a new image or zoom-in ROI), runs `execute_async_v3` (replayed as a CUDA graph
after the first call) and reads back the probabilities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..buffers import alloc_buffers
from ..contract import (
    FULL_IMAGE,
    FULL_OUT_BOX,
    FULL_OUT_CHANGED,
    FULL_OUT_NET,
    FULL_OUT_PROBS,
    FULL_PREV,
    INPUT_DISK_ROWS,
    INPUT_NAMES,
    OUTPUT_PROBS,
)
from ..errors import CfrError
from ..full_runner import FullRunner
from ..plan import check_plan, read_sidecar
from . import cuda


class TrtRunner:
    def __init__(self, engine, contract, use_cuda_graph: bool = True):
        self.context = engine.create_execution_context()
        host = alloc_buffers(contract)
        self.image, self.prev_mask, self.disk_rows = (host[n] for n in INPUT_NAMES)
        self._probs = host[OUTPUT_PROBS]
        self._dev = {name: cuda.DeviceBuffer(arr.nbytes) for name, arr in host.items()}
        for name, buf in self._dev.items():
            if not self.context.set_tensor_address(name, buf.ptr):
                raise CfrError(f"TensorRT refused the address of tensor '{name}'")
        self._stream = cuda.Stream()
        self._graph = None
        self._use_graph = use_cuda_graph
        self.image_dirty = True  # set by the Session when it writes a new image crop

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self._stream.handle):
            raise CfrError("TensorRT execute_async_v3 failed")

    def run(self) -> np.ndarray:
        s = self._stream
        if self.image_dirty:
            s.h2d(self._dev["image"], self.image)
            self.image_dirty = False
        s.h2d(self._dev["prev_mask"], self.prev_mask)
        s.h2d(self._dev[INPUT_DISK_ROWS], self.disk_rows)
        if self._graph is not None:
            self._graph.launch()
        else:
            self._enqueue()  # the first call also lets TensorRT finish its lazy setup before capture
            if self._use_graph:
                s.sync()
                self._graph = cuda.Graph(s, self._enqueue)
        s.d2h(self._probs, self._dev[OUTPUT_PROBS])
        s.sync()
        return self._probs


class TrtFullRunner(FullRunner):
    """The full-resolution contract on a TensorRT plan built with an optimisation profile over image sizes.

    Per image: device buffers sized for it, `set_input_shape` for the dynamic inputs, the image uploaded once.
    The two maps ping-pong by swapping the addresses of `prev_probs` and `probs_full`; with CUDA graphs each
    direction is captured once per image (fixed addresses and shapes), the small tables are copied to their
    fixed buffers before the replay."""

    def __init__(self, engine, contract, use_cuda_graph: bool = True):
        super().__init__(contract)
        self.context = engine.create_execution_context()
        self._stream = cuda.Stream()
        self._use_graph = use_cuda_graph
        self._dev: dict[str, cuda.DeviceBuffer] = {}

    def _bind(self, image: np.ndarray) -> None:
        h, w = image.shape[1:3]
        io = self.contract.io(h, w)
        self._graphs: dict[int, cuda.Graph] = {}
        self._dev, self._host = {}, {}
        for name, (shape, dtype) in io.items():
            key = {FULL_PREV: "map0", FULL_OUT_PROBS: "map1"}.get(name, name)
            self._dev[key] = cuda.DeviceBuffer(max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize))
            if name in self.contract.input_names() and not self.context.set_input_shape(name, shape):
                raise CfrError(f"TensorRT refused shape {shape} for '{name}' (outside the plan's profile?)")
            if name in (FULL_OUT_BOX, FULL_OUT_CHANGED, FULL_OUT_NET):
                self._host[name] = np.zeros(shape, dtype)
        for name in self.contract.input_names() + self.contract.output_names():
            if name not in (FULL_PREV, FULL_OUT_PROBS) and not self.context.set_tensor_address(name,
                                                                                            self._dev[name].ptr):
                raise CfrError(f"TensorRT refused the address of tensor '{name}'")
        self._stream.h2d(self._dev[FULL_IMAGE], image)
        zeros = np.zeros((h, w), np.float32)
        for k in (0, 1):
            self._stream.h2d(self._dev[f"map{k}"], zeros)
        self._stream.sync()

    def _upload(self, names: list[str]) -> None:
        for name in names:
            self._stream.h2d(self._dev[name], self.small[name])

    def _enqueue(self, cur: int) -> None:
        self.context.set_tensor_address(FULL_PREV, self._dev[f"map{cur}"].ptr)
        self.context.set_tensor_address(FULL_OUT_PROBS, self._dev[f"map{1 - cur}"].ptr)
        if not self.context.execute_async_v3(self._stream.handle):
            raise CfrError("TensorRT execute_async_v3 failed")

    def _execute(self, cur: int) -> None:
        graph = self._graphs.get(cur)
        if graph is not None:
            graph.launch()
            return
        self._enqueue(cur)  # the first call per direction also lets TensorRT finish its lazy setup
        if self._use_graph:
            self._stream.sync()
            self._graphs[cur] = cuda.Graph(self._stream, lambda: self._enqueue(cur))

    def _fetch_small(self) -> tuple[np.ndarray, int]:
        for name in (FULL_OUT_BOX, FULL_OUT_CHANGED):
            self._stream.d2h(self._host[name], self._dev[name])
        self._stream.sync()
        return self._host[FULL_OUT_BOX], int(self._host[FULL_OUT_CHANGED][0])

    def _read_map(self, k: int) -> np.ndarray:
        out = np.empty(self.shape, np.float32)
        self._stream.d2h(out, self._dev[f"map{k}"])
        self._stream.sync()
        return out

    def _write_map(self, k: int, probs: np.ndarray | None) -> None:
        src = np.zeros(self.shape, np.float32) if probs is None else np.ascontiguousarray(probs, np.float32)
        self._stream.h2d(self._dev[f"map{k}"], src)
        self._stream.sync()

    def _read_net(self) -> np.ndarray:
        self._stream.d2h(self._host[FULL_OUT_NET], self._dev[FULL_OUT_NET])
        self._stream.sync()
        return self._host[FULL_OUT_NET]


class TrtModel:
    def __init__(self, path: Path):
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise CfrError(f"TensorRT is not installed ({exc}); pip install 'cfr-icl[trt]', or run the ONNX "
                           "graph with Engine('model.onnx')") from None
        info = read_sidecar(path)
        name, cc = cuda.device_identity()
        info.contract.check_runnable(str(path))
        check_plan(info, trt.__version__, name, cc, str(path))
        self.contract = info.contract
        self._trt = trt
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise CfrError(f"{path}: TensorRT could not deserialize the plan (corrupt file?)")
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        if names != set(self.contract.input_names()) | set(self.contract.output_names()):
            raise CfrError(f"{path}: plan tensors {sorted(names)} do not match the contract")
        self.gpu = name

    def describe(self) -> str:
        return f"TensorRT {self._trt.__version__} on {self.gpu}"

    def new_runner(self) -> TrtRunner | TrtFullRunner:
        if self.contract.full:
            return TrtFullRunner(self.engine, self.contract)
        return TrtRunner(self.engine, self.contract)
