"""The compiled PyTorch engine: the contract graph through `torch.compile` (Inductor), with static device
buffers and the forward replayed as a CUDA graph.

Why `torch.compile` rather than the AOTInductor package as the default compiled path: the AOTInductor
package of the fp16 ViT-B contract compiled on an H100 (torch 2.11, CUDA 13) but crashed with a
segmentation fault inside `torch._inductor.aoti_load_package`, so it never ran (`cfr-export --engine aoti`
stays, and `bench/gpu/h100_check.py` re-tests its load in a child process). `torch.compile` produces the
same Inductor kernels in-process, needs no package on disk, and its compiled code is cached by Inductor
between processes. The function is unchanged: the engine is checked against the eager fp32 graph
(`tests/test_compiled.py` on CPU, the GPU script on CUDA).
"""

from __future__ import annotations

from pathlib import Path

import torch

import cfr_runtime
from cfr_runtime.contract import Contract
from cfr_runtime.engine import Engine
from trainer.checkpoint import load_model
from trainer.inference import graph_engine
from trainer.models.graph import ContractGraph
from trainer.models.plainvit import PlainVitModel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compile_graph(model: PlainVitModel, flip: bool = True, precision: str = "fp16", mode: str | None = None):
    """`torch.compile` of the contract graph at `precision` (the model is converted in place)."""
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    if precision != "fp32":
        model.half_precision(DTYPES[precision])
    graph = ContractGraph(model, flip=flip).eval()
    return torch.compile(graph, fullgraph=True, dynamic=False, mode=mode)


def compiled_model_engine(model: PlainVitModel, size: int, precision: str = "fp16", flip: bool = True,
                          max_points: int = 24, cuda_graph: bool = True, arch: dict | None = None,
                          sha256: str = "") -> Engine:
    """An Engine over an in-memory model compiled with Inductor; compilation happens on the first run."""
    device = next(model.parameters()).device
    fn = compile_graph(model, flip, precision)
    contract = Contract(input_size=size, max_points=max_points, flip=flip, precision=precision, arch=arch or {},
                        checkpoint_sha256=sha256, package_version=cfr_runtime.__version__)
    graph_note = " + CUDA graph" if cuda_graph and device.type == "cuda" else ""
    return graph_engine(fn, contract, device, "compiled",
                        f"torch.compile (Inductor) {precision}{graph_note} on {device}", cuda_graph)


def compiled_engine(checkpoint: str | Path, size: int | None = None, precision: str = "fp16", flip: bool = True,
                    max_points: int = 24, device: str = "cuda", cuda_graph: bool = True) -> Engine:
    """The compiled engine of a checkpoint (official or cfr-train); size defaults to the checkpoint's own."""
    model, info = load_model(checkpoint, input_size=size)
    size = model.backbone.patch_embed.img_size[0]
    return compiled_model_engine(model.to(torch.device(device)), size, precision, flip, max_points, cuda_graph,
                                 arch=dict(name=info["arch"], **info["params"]), sha256=info["sha256"])
