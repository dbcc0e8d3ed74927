"""The GPU engines available in this process, for `bench/latency.py --device cuda`."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def cuda_engines(checkpoint: Path, onnx_path: Path, size: int) -> dict:
    import onnxruntime as ort

    from cfr_runtime import Engine
    from trainer.checkpoint import load_model
    from trainer.inference import model_engine

    engines = {}
    model, _ = load_model(checkpoint, input_size=size)
    engines["torch-cuda-fp32"] = model_engine(model.to("cuda"), size)
    half, _ = load_model(checkpoint, input_size=size)
    engines["torch-cuda-fp16"] = model_engine(half.half_precision().to("cuda"), size)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        engines["ort-cuda"] = Engine(onnx_path, providers=["CUDAExecutionProvider"])
    if importlib.util.find_spec("tensorrt") is not None:
        from export.trt import build_plan

        engines["trt"] = Engine(build_plan(onnx_path, onnx_path.parent / "trt"), backend="trt")
    return engines
