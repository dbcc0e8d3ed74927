"""Native TensorRT backend: one deserialized plan per Engine, one execution context per Session.

Buffers: pinned-free numpy host mirrors (the Runner protocol) and device buffers bound once with
`set_tensor_address`; a forward uploads the points (bytes) and the prev mask, the image only when the
Session marks it changed (a new image or zoom-in ROI), runs `execute_async_v3` (replayed as a CUDA graph
after the first call) and reads back the probabilities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..contract import INPUT_NAMES, OUTPUT_PROBS
from ..engine import alloc_buffers
from ..errors import CfrError
from ..plan import check_plan, read_sidecar
from . import cuda


class TrtRunner:
    def __init__(self, engine, contract, use_cuda_graph: bool = True):
        self.context = engine.create_execution_context()
        host = alloc_buffers(contract)
        self.image, self.prev_mask, self.points = (host[n] for n in INPUT_NAMES)
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
        s.h2d(self._dev["points"], self.points)
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


class TrtModel:
    def __init__(self, path: Path):
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise CfrError(f"TensorRT is not installed ({exc}); pip install 'cfr-icl[trt]', or run the ONNX "
                           "graph with Engine('model.onnx')") from None
        info = read_sidecar(path)
        name, cc = cuda.device_identity()
        check_plan(info, trt.__version__, name, cc, str(path))
        self.contract = info.contract
        self._trt = trt
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise CfrError(f"{path}: TensorRT could not deserialize the plan (corrupt file?)")
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        if names != set(INPUT_NAMES) | {OUTPUT_PROBS}:
            raise CfrError(f"{path}: plan tensors {sorted(names)} do not match the contract")
        self.gpu = name

    def describe(self) -> str:
        return f"TensorRT {self._trt.__version__} on {self.gpu}"

    def new_runner(self) -> TrtRunner:
        return TrtRunner(self.engine, self.contract)
