"""The GPU engines of `bench/latency.py --device cuda`, the FLOP count of one forward, and the card's
measured matrix rate (the ceiling that achieved TFLOP/s is compared with)."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from pathlib import Path

# every engine the benchmark knows, in table order; `--engines` picks a subset
CUDA_ENGINES = ("torch-cuda-fp32", "torch-cuda-fp16", "compiled-fp16", "compiled-bf16", "ort-cuda-fp32",
                "ort-cuda-fp16", "trt")


def available(kind: str) -> str | None:
    """None when the engine kind can run in this process, else why not."""
    if kind.startswith("ort-cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime-gpu (CUDAExecutionProvider) is not installed"
    if kind == "trt" and importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    return None


def cuda_engine(kind: str, fresh_model: Callable, size: int, onnx_for: Callable[[bool], Path]):
    """One engine: `fresh_model()` gives an fp32 CPU copy of the model; `onnx_for(fp16)` an exported file."""
    from cfr_runtime import Engine
    from cfr_runtime.backends.ort import provider_with_options
    from export.compiled import compiled_model_engine
    from trainer.inference import model_engine

    if kind == "torch-cuda-fp32":
        return model_engine(fresh_model().to("cuda"), size, cuda_graph=True)
    if kind == "torch-cuda-fp16":
        return model_engine(fresh_model().half_precision().to("cuda"), size, cuda_graph=True)
    if kind.startswith("compiled-"):
        return compiled_model_engine(fresh_model().to("cuda"), size, precision=kind.split("-")[1])
    if kind.startswith("ort-cuda-"):
        path = onnx_for(kind.endswith("fp16"))
        return Engine(path, providers=[provider_with_options("CUDAExecutionProvider", path, cuda_graph=True)])
    if kind == "trt":
        from export.trt import build_plan

        path = onnx_for(True)
        return Engine(build_plan(path, path.parent / "trt"), backend="trt")
    raise ValueError(f"unknown engine {kind!r}; choose from {', '.join(CUDA_ENGINES)}")


def forward_flops(model, size: int, flip: bool = True) -> int:
    """Floating-point operations of one contract forward (matmuls, convolutions, attention), counted by
    torch's FlopCounterMode on a copy of the model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cfr_runtime.contract import Contract
    from trainer.models.graph import ContractGraph

    graph = ContractGraph(copy.deepcopy(model).float().to("meta"), flip=flip).eval()  # shapes only
    args = (torch.rand(1, 3, size, size, device="meta"), torch.rand(1, 1, size, size, device="meta"),
            torch.full(Contract(input_size=size, flip=flip).disk_rows_shape, -1.0, device="meta"))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        graph(*args)
    return int(counter.get_total_flops())


def matrix_rate_tflops(dtype_name: str = "bf16", n: int = 8192, repeats: int = 20) -> float:
    """Measured dense matrix-product rate of this GPU (random data, CUDA events, median of repeats)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12
