"""Checkpoint -> ONNX of the contract, with metadata, optional fp16, and a verification against torch."""

from __future__ import annotations

import os
import tempfile
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
from cfr_runtime.errors import CfrError, CheckpointError
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


def check_finite_weights(model: torch.nn.Module, source: str | Path) -> None:
    """Refuse a model with NaN/inf parameters: its graph would export and 'verify' (NaN vs NaN), then return
    NaN probabilities, i.e. empty masks, at run time."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} tensors contain NaN or inf (e.g. {bad[:3]}); the training "
                              "run that wrote this checkpoint diverged: use an earlier checkpoint")


def _writable_dir(out_dir: Path) -> Path:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".cfr-write-test", delete=True)
        probe.close()
    except OSError as exc:
        raise ExportError(f"{out_dir}: cannot write the export there ({exc.strerror or exc}); choose another "
                          "-o directory") from None
    return out_dir


def export_onnx(checkpoint: str | Path, out_dir: str | Path, size: int | None = None, max_points: int = 24,
                flip: bool = True, fp16: bool = False, final_name: str | None = None,
                ) -> tuple[Path, Contract, ContractGraph]:
    """Write `model.onnx` (or `model_fp16.onnx`) into out_dir; return its path, contract and torch graph.

    size None keeps the checkpoint's own input size. The file is written under a temporary name and renamed,
    so a crash never leaves half a model; `final_name=""` leaves it under the temporary name for the caller
    to verify and rename (what cfr-export does, so that a rejected graph never replaces a good one).
    """
    out_dir = _writable_dir(Path(out_dir))
    model, info = load_model(checkpoint, input_size=size)
    check_finite_weights(model, checkpoint)
    size = model.backbone.patch_embed.img_size[0]
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
    dummy = example_inputs(contract)
    fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=".model.", suffix=".trace.onnx")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(export_graph, tuple(torch.from_numpy(dummy[k]) for k in INPUT_NAMES), str(tmp),
                              input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
        proto = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    if fp16:
        contract = replace(contract, precision="fp16")
    _set_metadata(proto, contract)
    name = ("model_fp16.onnx" if fp16 else "model.onnx") if final_name is None else final_name
    fd, staged = tempfile.mkstemp(dir=out_dir, prefix=f".{name or 'model'}.", suffix=".partial.onnx")
    os.close(fd)
    try:
        onnx.save(proto, staged)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staged, 0o666 & ~umask)  # mkstemp creates 0600; a model is an ordinary file
        if name:
            os.replace(staged, out_dir / name)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
    return (out_dir / name if name else Path(staged)), contract, graph
