"""Minimal CUDA runtime calls through cuda-python (no torch): device buffers, copies, streams, graphs.

cuda-python is the light dependency of the `[trt]` extra; every call returns an error code first, which
`_ok` turns into an exception naming the call.
"""

from __future__ import annotations

import numpy as np

from ..errors import CfrError


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise CfrError(f"cuda-python is not installed ({exc}); pip install 'cfr-icl[trt]'") from None
    return cudart


def _ok(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    cudart = _cudart()
    if int(err) != int(cudart.cudaError_t.cudaSuccess):
        raise CfrError(f"CUDA call {what} failed: {err}")
    return rest[0] if len(rest) == 1 else (rest or None)


def device_identity(device: int = 0) -> tuple[str, str]:
    cudart = _cudart()
    props = _ok(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00"), f"{props.major}.{props.minor}"


class DeviceBuffer:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.ptr = int(_ok(_cudart().cudaMalloc(nbytes), "cudaMalloc"))

    def __del__(self):
        if getattr(self, "ptr", 0):
            try:
                _cudart().cudaFree(self.ptr)
            except Exception:  # interpreter shutdown
                pass
            self.ptr = 0


class Stream:
    def __init__(self):
        cudart = _cudart()
        self.handle = _ok(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate")

    def h2d(self, dst: DeviceBuffer, src: np.ndarray) -> None:
        cudart = _cudart()
        _ok(cudart.cudaMemcpyAsync(dst.ptr, src.ctypes.data, src.nbytes,
                                   cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.handle), "cudaMemcpyAsync H2D")

    def d2h(self, dst: np.ndarray, src: DeviceBuffer) -> None:
        cudart = _cudart()
        _ok(cudart.cudaMemcpyAsync(dst.ctypes.data, src.ptr, dst.nbytes,
                                   cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.handle), "cudaMemcpyAsync D2H")

    def sync(self) -> None:
        _ok(_cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")


class Graph:
    """A CUDA graph captured from whatever `enqueue()` launches on the stream."""

    def __init__(self, stream: Stream, enqueue):
        cudart = _cudart()
        _ok(cudart.cudaStreamBeginCapture(stream.handle, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal),
            "cudaStreamBeginCapture")
        enqueue()
        graph = _ok(cudart.cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")
        self.exec = _ok(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        self.stream = stream

    def launch(self) -> None:
        _ok(_cudart().cudaGraphLaunch(self.exec, self.stream.handle), "cudaGraphLaunch")
