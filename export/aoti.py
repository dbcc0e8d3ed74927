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

import numpy as np
import torch

import cfr_runtime
from cfr_runtime.contract import Contract
from cfr_runtime.engine import Engine
from trainer.checkpoint import load_model
from trainer.inference import graph_engine

from .compiled import DTYPES
from .onnx_export import build_graph, example_inputs, full_example_inputs


def export_aoti(checkpoint: str | Path, out_dir: str | Path, size: int = 448, max_points: int = 24,
                flip: bool = True, precision: str = "fp16", device: str = "cuda", graph: str = "square",
                max_image: tuple[int, int] | None = None, opt_image: tuple[int, int] | None = None) -> Path:
    """Compile the contract's graph module (square or full, as `export.onnx_export.build_graph` makes it); the
    full graph is exported with H and W dynamic within the contract's image limits."""
    model, info = load_model(checkpoint, input_size=size)
    if precision != "fp32":
        model.half_precision(DTYPES[precision])
    limits = {k: v for k, v in (("max_image", max_image), ("opt_image", opt_image)) if v is not None}
    if graph == "full":
        limits["min_image"] = (2, 2)  # torch.export specialises sizes 0 and 1, so a compiled H or W starts at 2
    contract = Contract(input_size=size, max_points=max_points, flip=flip, precision=precision,
                        arch=dict(name=info["arch"], **info["params"]), checkpoint_sha256=info["sha256"],
                        package_version=cfr_runtime.__version__, graph=graph, **limits)
    module = build_graph(model, contract).to(device)
    ex = full_example_inputs(contract, size + 13, size + 29) if contract.full else example_inputs(contract)
    args = tuple(torch.from_numpy(ex[k]).to(device) for k in contract.input_names())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.export.export(module, args, dynamic_shapes=_dynamic_shapes(contract))
        # past 2 GB of weights (ViT-H fp32) Inductor appends them to the library and maps them at load
        # (torch._inductor.utils.determine_aoti_mmap_flags); nothing to choose here
        path = Path(torch._inductor.aoti_compile_and_package(
            program, package_path=str(out_dir / package_name(contract.full, precision))))
    path.with_name(sidecar_name(path)).write_text(json.dumps({"contract": json.loads(contract.to_json()),
                                                              "device": device, "torch": torch.__version__}, indent=1))
    return path


def package_name(full: bool, precision: str) -> str:
    """model_fp16.pt2, model_full_fp32.pt2, ..."""
    return f"model_full_{precision}.pt2" if full else f"model_{precision}.pt2"


def sidecar_name(package: str | Path) -> str:
    """The JSON beside a package (its contract, device and torch version): `<package name>.json`."""
    return f"{Path(package).name}.json"


def _dynamic_shapes(contract: Contract):
    """torch.export dynamic dims of the full graph (H, W within the contract's limits); None when static."""
    if not contract.full:
        return None
    (h0, w0), (h1, w1) = contract.min_image, contract.max_image
    dims = {"H": torch.export.Dim("H", min=h0, max=h1), "W": torch.export.Dim("W", min=w0, max=w1)}
    return tuple({i: dims[d] for i, d in enumerate(shape) if d in dims} or None
                 for name, (shape, _) in contract.io().items() if name in contract.input_names())


def full_program_outputs(package: str | Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """probs_full of a compiled full-graph package on numpy inputs (the cfr-export check)."""
    package = Path(package)
    meta = json.loads(package.with_name(sidecar_name(package)).read_text())
    contract = Contract.from_json(json.dumps(meta["contract"]), str(package))
    fn = torch._inductor.aoti_load_package(str(package))
    with torch.inference_mode():
        out = fn(*(torch.from_numpy(inputs[k]).to(meta["device"]) for k in contract.input_names()))
    return out[0].float().cpu().numpy()


def aoti_engine(package: str | Path, cuda_graph: bool = True) -> Engine:
    package = Path(package)
    meta = json.loads(package.with_name(sidecar_name(package)).read_text())
    contract = Contract.from_json(json.dumps(meta["contract"]), str(package))
    contract.check_runnable(str(package))
    device = torch.device(meta["device"])
    fn = torch._inductor.aoti_load_package(str(package))
    what = "full graph " if contract.full else ""
    return graph_engine(fn, contract, device, "aoti", f"AOTInductor {what}{contract.precision} on {device}",
                        cuda_graph)
