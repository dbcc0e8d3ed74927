"""Checkpoint -> ONNX of the contract, with metadata, optional fp16, and a verification against torch."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch

import cfr_runtime
from cfr_runtime.contract import (
    INPUT_NAMES,
    META_KEY,
    OUTPUT_NAMES,
    Contract,
)
from cfr_runtime.errors import CfrError
from trainer.checkpoint import load_model
from trainer.models.graph import ContractGraph

OPSET = 17


class ExportError(CfrError):
    """The exported graph does not compute what torch computes, or cannot be written."""


def example_inputs(contract: Contract, seed: int = 0, n_pos: int = 2, n_neg: int = 1,
                   soft_prev: bool = True) -> dict[str, np.ndarray]:
    """Fresh random contract inputs: an image, a soft (or empty) prev mask, and clicks with padding."""
    rng = np.random.default_rng(seed)
    s, p = contract.input_size, contract.max_points
    image = rng.random((1, 3, s, s), dtype=np.float32)
    if soft_prev:
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        cy, cx, r = rng.uniform(0.3 * s, 0.7 * s, 2).tolist() + [rng.uniform(0.1 * s, 0.3 * s)]
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        prev = (1 / (1 + np.exp((d - r) / (0.05 * s)))).astype(np.float32)[None, None]
    else:
        prev = np.zeros((1, 1, s, s), np.float32)
    points = np.full((1, 2 * p, 3), -1, np.float32)
    order = rng.permutation(n_pos + n_neg)
    for i in range(n_pos):
        points[0, i] = [*rng.uniform(0, s - 1, 2), order[i]]
    for j in range(n_neg):
        points[0, p + j] = [*rng.uniform(0, s - 1, 2), order[n_pos + j]]
    return {"image": image, "prev_mask": prev, "points": points}


def verification_cases(contract: Contract, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Several click patterns: one click, mixed clicks with a soft mask, many clicks, border clicks."""
    cases = [
        example_inputs(contract, seed, 1, 0, soft_prev=False),
        example_inputs(contract, seed + 1, 2, 1),
        example_inputs(contract, seed + 2, min(contract.max_points, 7), min(contract.max_points, 5)),
    ]
    border = example_inputs(contract, seed + 3, 1, 1)
    s = contract.input_size
    border["points"][0, 0, :2] = [0, s - 1]
    border["points"][0, contract.max_points, :2] = [s - 1, 0]
    cases.append(border)
    return cases


def torch_reference(graph: ContractGraph, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return graph(*(torch.from_numpy(inputs[k]) for k in INPUT_NAMES)).numpy()


def _set_metadata(model: onnx.ModelProto, contract: Contract) -> None:
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, contract.to_json()
    model.producer_name = "cfr-icl"
    model.producer_version = cfr_runtime.__version__


def export_onnx(checkpoint: str | Path, out_dir: str | Path, size: int = 448, max_points: int = 24,
                flip: bool = True, fp16: bool = False) -> tuple[Path, Contract, ContractGraph]:
    """Write `model.onnx` (or `model_fp16.onnx`) into out_dir; return its path, contract and torch graph."""
    model, info = load_model(checkpoint, input_size=size)
    graph = ContractGraph(model, flip=flip).eval()
    export_graph = graph
    if fp16:
        # Built in torch rather than by an ONNX rewriting pass: the model itself keeps LayerNorm,
        # GroupNorm, softmax, the click disks and the final sigmoid in fp32 (see plainvit.py).
        half, _ = load_model(checkpoint, input_size=size)
        export_graph = ContractGraph(half.half_precision(), flip=flip).eval()
    contract = Contract(input_size=size, max_points=max_points, flip=flip, arch=dict(
        name=info["arch"], **info["params"]), checkpoint_sha256=info["sha256"],
        package_version=cfr_runtime.__version__)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dummy = example_inputs(contract)
    tmp = out_dir / f"model.{contract.precision}.tmp.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(export_graph, tuple(torch.from_numpy(dummy[k]) for k in INPUT_NAMES), str(tmp),
                          input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    proto = onnx.load(str(tmp))
    tmp.unlink()
    if fp16:
        contract = replace(contract, precision="fp16")
    _set_metadata(proto, contract)
    path = out_dir / ("model_fp16.onnx" if fp16 else "model.onnx")
    onnx.save(proto, str(path))
    return path, contract, graph
