"""`cfr-export --engine aoti`: the contract graph compiled ahead of time with AOTInductor (torch.export),
in fp32, fp16 or bf16, and an Engine that runs the package with device-resident buffers and a CUDA graph
(the runner template of every torch-executed engine, `trainer.inference.TorchRunner`).

It needs torch at run time, so it lives in `export`, not in the torch-free `cfr_runtime`. On an H100
(torch 2.11, CUDA 13) loading the fp16 ViT-B package crashed; the in-process compiled engine is
`export.compiled` (see its docstring), and `bench/gpu/h100_check.py` re-tests the package load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import cfr_runtime
from cfr_runtime.contract import INPUT_NAMES, Contract
from cfr_runtime.engine import Engine
from trainer.checkpoint import load_model
from trainer.inference import graph_engine
from trainer.models.graph import ContractGraph

from .compiled import DTYPES
from .onnx_export import example_inputs


def export_aoti(checkpoint: str | Path, out_dir: str | Path, size: int = 448, max_points: int = 24,
                flip: bool = True, precision: str = "fp16", device: str = "cuda") -> Path:
    model, info = load_model(checkpoint, input_size=size)
    if precision != "fp32":
        model.half_precision(DTYPES[precision])
    graph = ContractGraph(model, flip=flip).eval().to(device)
    contract = Contract(input_size=size, max_points=max_points, flip=flip, precision=precision,
                        arch=dict(name=info["arch"], **info["params"]), checkpoint_sha256=info["sha256"],
                        package_version=cfr_runtime.__version__)
    ex = example_inputs(contract)
    args = tuple(torch.from_numpy(ex[k]).to(device) for k in INPUT_NAMES)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.export.export(graph, args)
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(out_dir / f"model_{precision}.pt2"))
    Path(path + ".json").write_text(json.dumps({"contract": json.loads(contract.to_json()), "device": device,
                                                "torch": torch.__version__}, indent=1))
    return Path(path)


def aoti_engine(package: str | Path, cuda_graph: bool = True) -> Engine:
    package = Path(package)
    meta = json.loads(Path(str(package) + ".json").read_text())
    contract = Contract.from_json(json.dumps(meta["contract"]), str(package))
    device = torch.device(meta["device"])
    fn = torch._inductor.aoti_load_package(str(package))
    return graph_engine(fn, contract, device, "aoti", f"AOTInductor {contract.precision} on {device}", cuda_graph)
