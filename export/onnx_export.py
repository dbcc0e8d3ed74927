"""Checkpoint -> ONNX of the contract, with metadata, optional fp16, and a verification against torch."""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch

import cfr_runtime
from cfr_runtime.contract import (
    DIM_BATCH,
    DIM_H,
    DIM_W,
    FULL_DISK_ROWS,
    GRAPH_FULL,
    GRAPH_SQUARE,
    INPUT_DISK_ROWS,
    INPUT_NAMES,
    Contract,
)
from cfr_runtime.disks import fill_disk_rows, write_disk_rows
from cfr_runtime.errors import CfrError, CheckpointError
from cfr_runtime.fileio import remove_new_dirs_on_error, staged_file
from cfr_runtime.resample import crop_tables, paste_axis
from trainer.checkpoint import load_model
from trainer.models.full_graph import FullGraph
from trainer.models.graph import ContractGraph

from .graph_file import commit_graph, save_graph

OPSET = 17
log = logging.getLogger(__name__)  # stage by stage, for long exports (bench/vith_smoke.py shows it)


class ExportError(CfrError):
    """The exported graph does not compute what torch computes, or cannot be written."""


def _random_clicks(rng: np.random.Generator, n_pos: int, n_neg: int, high_y: float, high_x: float,
                   integer: bool) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2) (y, x) clicks in random order and their positive flags (n_pos True, n_neg False)."""
    n = n_pos + n_neg
    if integer:  # the clicker's clicks: pixel indices
        yx = np.stack([rng.integers(0, int(high_y) + 1, n), rng.integers(0, int(high_x) + 1, n)], 1).astype(np.float64)
    else:
        yx = np.stack([rng.uniform(0, high_y, n), rng.uniform(0, high_x, n)], 1)
    positive = np.zeros(n, bool)
    positive[rng.permutation(n)[:n_pos]] = True
    return yx, positive


def example_inputs(contract: Contract, seed: int = 0, n_pos: int = 2, n_neg: int = 1,
                   soft_prev: bool = True) -> dict[str, np.ndarray]:
    """Fresh random contract inputs: an image, a soft (or empty) prev mask, and the disk rows of random
    sub-pixel clicks in network pixels (plain and flipped), decided as the runtime decides them."""
    rng = np.random.default_rng(seed)
    s = contract.input_size
    image = rng.random((1, 3, s, s), dtype=np.float32)
    if soft_prev:
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        cy, cx, r = rng.uniform(0.3 * s, 0.7 * s, 2).tolist() + [rng.uniform(0.1 * s, 0.3 * s)]
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        prev = (1 / (1 + np.exp((d - r) / (0.05 * s)))).astype(np.float32)[None, None]
    else:
        prev = np.zeros((1, 1, s, s), np.float32)
    disk_rows = np.empty(contract.disk_rows_shape, np.float32)
    yx, positive = _random_clicks(rng, n_pos, n_neg, s - 1, s - 1, integer=False)
    fill_disk_rows(disk_rows, yx, positive, contract.disk_radius, s)
    return {"image": image, "prev_mask": prev, INPUT_DISK_ROWS: disk_rows}


def verification_cases(contract: Contract, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Several click patterns: one click, mixed clicks with a soft mask, many clicks, border clicks."""
    cases = [
        example_inputs(contract, seed, 1, 0, soft_prev=False),
        example_inputs(contract, seed + 1, 2, 1),
        example_inputs(contract, seed + 2, min(contract.max_points, 7), min(contract.max_points, 5)),
    ]
    border = example_inputs(contract, seed + 3, 1, 1)
    s = contract.input_size
    fill_disk_rows(border[INPUT_DISK_ROWS], np.array([[0.0, s - 1.0], [s - 1.0, 0.0]]), [True, False],
                   contract.disk_radius, s)
    cases.append(border)
    return cases


def full_example_inputs(contract: Contract, h: int, w: int, seed: int = 0, n_pos: int = 2, n_neg: int = 1,
                        roi: tuple[int, int, int, int] | None = None, soft_prev: bool = True
                        ) -> dict[str, np.ndarray]:
    """Fresh random inputs of the full graph: an H x W uint8 image, a soft prev map that is zero outside a
    box, the disk rows of clicks in image pixels (integers, as the clicker makes) in a random zoom-in ROI, and
    its tables."""
    rng = np.random.default_rng(seed)
    s = contract.input_size
    io = contract.io(h, w)
    out = {name: np.zeros(shape, dtype) for name, (shape, dtype) in io.items() if name in contract.input_names()}
    out["image_u8"][...] = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
    if roi is None:
        r0, c0 = int(rng.integers(0, max(1, h // 3))), int(rng.integers(0, max(1, w // 3)))
        roi = (r0, int(rng.integers(r0, h)), c0, int(rng.integers(c0, w)))
    if soft_prev:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        d = np.sqrt((yy - rng.uniform(0, h)) ** 2 + (xx - rng.uniform(0, w)) ** 2)
        prev = 1 / (1 + np.exp((d - rng.uniform(0.1, 0.4) * max(h, w)) / (0.05 * max(h, w) + 1e-6)))
        box = rng.integers(0, h, 2), rng.integers(0, w, 2)
        keep = np.zeros((h, w), bool)
        keep[box[0].min():box[0].max() + 1, box[1].min():box[1].max() + 1] = True
        out["prev_probs"][...] = np.where(keep, prev, 0).astype(np.float32)
    yx, positive = _random_clicks(rng, n_pos, n_neg, h - 1, w - 1, integer=True)
    write_disk_rows(out[FULL_DISK_ROWS], yx, positive, roi, s, contract.disk_radius)
    out["thresholds"][...] = (contract.threshold, 0.5)
    crop_tables(roi, s, out["crop_index"], out["crop_weight"])
    paste_axis(roi[0], roi[1], s, out["paste_row_index"], out["paste_row_weight"])
    paste_axis(roi[2], roi[3], s, out["paste_col_index"], out["paste_col_weight"])
    out["roi"] = np.array(roi, np.int64)  # the box the tables and disk rows were made for (not a graph input)
    return out


def full_verification_cases(contract: Contract, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Full-graph cases at several image sizes: whole-image ROI, random ROIs, a one-row degenerate image."""
    s = contract.input_size
    return [
        full_example_inputs(contract, 97, 131, seed, 1, 0, soft_prev=False, roi=(0, 96, 0, 130)),
        full_example_inputs(contract, s + 37, s // 2 + 5, seed + 1, 2, 1),
        full_example_inputs(contract, 2 * s + 3, 3 * s - 1, seed + 2, min(contract.max_points, 7),
                            min(contract.max_points, 5)),
        full_example_inputs(contract, 1, 57, seed + 3, 1, 1, roi=(0, 0, 3, 40)),
    ]


def stack_batch(cases: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Square-graph inputs of several items as one batch (item i of each input is case i's)."""
    return {name: np.concatenate([case[name] for case in cases]) for name in INPUT_NAMES}


def torch_reference(graph: ContractGraph | FullGraph, inputs: dict[str, np.ndarray]):
    """The torch graph on numpy inputs: probs (square) or the tuple of full-graph outputs."""
    with torch.no_grad():
        if isinstance(graph, FullGraph):
            names = Contract(graph=GRAPH_FULL).input_names()
            return tuple(o.numpy() for o in graph(*(torch.from_numpy(inputs[k]) for k in names)))
        return graph(*(torch.from_numpy(inputs[k]) for k in INPUT_NAMES)).numpy()


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


def build_graph(model, contract: Contract) -> ContractGraph | FullGraph:
    """The torch module of a contract (square or full) around a loaded model."""
    square = ContractGraph(model, flip=contract.flip)
    return (FullGraph(square, contract.input_size) if contract.full else square).eval()


def dynamic_axes(contract: Contract) -> dict[str, dict[int, str]] | None:
    """ONNX dynamic axes of the full graph (every H / W dim); for the square graph the leading (batch) dim of
    every tensor when it has a batch axis (`max_batch` > 1), else None (static)."""
    if not contract.full:
        if not contract.batched:
            return None
        return {name: {0: DIM_BATCH} for name in (*contract.input_names(), *contract.output_names())}
    return {name: {i: d for i, d in enumerate(shape) if d in (DIM_H, DIM_W)}
            for name, (shape, _) in contract.io().items() if DIM_H in shape or DIM_W in shape}


def _load(checkpoint: str | Path, size: int | None, max_points: int, flip: bool, graph: str,
          max_image: tuple[int, int] | None, opt_image: tuple[int, int] | None, max_batch: int = 1):
    """The fp32 model of a checkpoint and the contract of its export (square or full graph; a batch axis when
    max_batch > 1)."""
    if graph not in (GRAPH_SQUARE, GRAPH_FULL):
        raise ExportError(f"unknown graph {graph!r}; choose 'square' or 'full'")
    if max_batch != 1 and graph != GRAPH_SQUARE:
        raise ExportError("a batch axis (--max-batch) is for the square graph; the full graph runs one image "
                          "at its own size per call")
    model, info = load_model(checkpoint, input_size=size)
    check_finite_weights(model, checkpoint)
    size = model.backbone.patch_embed.img_size[0]
    limits = {}
    if graph == GRAPH_FULL:
        limits = {k: tuple(int(v) for v in val) for k, val in (("max_image", max_image), ("opt_image", opt_image))
                  if val is not None}
    contract = Contract(input_size=size, max_points=max_points, flip=flip, arch=dict(
        name=info["arch"], **info["params"]), checkpoint_sha256=info["sha256"],
        package_version=cfr_runtime.__version__, graph=graph, max_batch=max_batch, **limits)
    return model, contract


def _model_of(graph: ContractGraph | FullGraph):
    return (graph.square if isinstance(graph, FullGraph) else graph).model


def trace_graph(module: torch.nn.Module, contract: Contract, path: Path) -> None:
    """torch's ONNX exporter on the contract's inputs, writing `path`. Past 2 GB it writes each weight as its own
    file beside `path`, so `path` gets a folder of its own (the caller's scratch space)."""
    names_in, names_out = contract.input_names(), contract.output_names()
    s = contract.input_size
    dummy = full_example_inputs(contract, s + 13, s + 29) if contract.full else example_inputs(contract)
    if contract.batched:  # traced on two items, so no size-1 leading dim can be folded into a constant
        dummy = stack_batch([dummy, example_inputs(contract, seed=1)])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(torch.from_numpy(dummy[k]) for k in names_in), str(path),
                          input_names=list(names_in), output_names=list(names_out),
                          dynamic_axes=dynamic_axes(contract), opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)


def export_onnx(checkpoint: str | Path, out_dir: str | Path, size: int | None = None, max_points: int = 24,
                flip: bool = True, fp16: bool = False, graph: str = GRAPH_SQUARE,
                max_image: tuple[int, int] | None = None, opt_image: tuple[int, int] | None = None,
                check: Callable[[Path, Contract, ContractGraph | FullGraph], object] | None = None,
                base: tuple[Contract, ContractGraph | FullGraph] | None = None, max_batch: int = 1,
                ) -> tuple[Path, Contract, ContractGraph | FullGraph]:
    """Write `model.onnx` (`model_fp16.onnx`; `model_full*.onnx` for graph="full") into out_dir, with its data
    file `<name>.data` beside it when the weights pass the protobuf limit (export/graph_file.py); return its
    path, contract and the fp32 torch graph (the verification reference).

    size None keeps the checkpoint's own input size. Everything is written in a private staging folder beside
    the target (torch's trace, the graph, its data file); `check(staged_graph, contract, fp32_graph)` runs there
    (cfr-export verifies against torch), and only when it returns are the files moved into place. If anything
    raises, the staging folder is removed, an existing model is left untouched, and an output folder that this
    call created is removed again.

    base: the (contract, fp32 torch graph) of the same checkpoint's fp32 export; the fp16 export then halves a
    copy of that model instead of loading the checkpoint twice more (ViT-H: 2.6 GB per copy).

    max_batch > 1 (square graph only) gives the graph a batch axis (cfr_runtime.contract): an option, not the
    default, because a batch-1 graph is what one annotator needs, keeps every consumer static (TensorRT plans
    are built for batch 1), and only a server batching the forwards of many sessions gains from it.
    """
    out_dir = Path(out_dir)
    with remove_new_dirs_on_error(out_dir):
        out_dir = _writable_dir(out_dir)
        if base is not None and fp16:
            contract, torch_graph = base
            export_graph = build_graph(copy.deepcopy(_model_of(torch_graph)).half_precision(), contract)
        else:
            model, contract = _load(checkpoint, size, max_points, flip, graph, max_image, opt_image, max_batch)
            torch_graph = export_graph = build_graph(model, contract)
            if fp16:
                # Built in torch rather than by an ONNX rewriting pass: the model itself keeps LayerNorm,
                # GroupNorm, softmax, the click disks and the final sigmoid in fp32 (see plainvit.py).
                export_graph = build_graph(copy.deepcopy(model).half_precision(), contract)
        if fp16:
            contract = replace(contract, precision="fp16")
        final = out_dir / model_file_name(contract)
        with staged_file(final, ".partial", folder=True) as staged:
            trace_dir = staged.parent / "trace"
            trace_dir.mkdir()
            log.info("%s: tracing with torch", final.name)
            trace_graph(export_graph, contract, trace_dir / "trace.onnx")
            del export_graph  # the fp16 copy is not needed past the trace
            log.info("%s: writing", final.name)
            proto = onnx.load(str(trace_dir / "trace.onnx"), load_external_data=False)
            if contract.batched:
                _static_item_dims(proto, contract)
            record = save_graph(proto, staged, contract, trace_dir)
            del proto
            shutil.rmtree(trace_dir)  # torch's loose weight files: 2.6 GB of disk for ViT-H
            log.info("%s: written%s", final.name, f" with {record.name} ({record.size} bytes)" if record else "")
            if check is not None:
                check(staged, contract, torch_graph)
            commit_graph(staged, final)
            log.info("%s: committed", final.name)
    return final, contract, torch_graph


def _static_item_dims(proto: onnx.ModelProto, contract: Contract) -> None:
    """With a batch axis the tracer leaves the output's other dims symbolic too; write them as the contract says,
    so every tensor reads (B, ...) with only B free."""
    shapes = contract.shapes()
    for value in (*proto.graph.input, *proto.graph.output):
        if value.name in shapes:
            for dim, size in zip(list(value.type.tensor_type.shape.dim)[1:], shapes[value.name][1:]):
                dim.dim_value = size


def model_file_name(contract: Contract) -> str:
    """model.onnx, model_fp16.onnx, model_full.onnx, model_full_fp16.onnx."""
    stem = "model_full" if contract.full else "model"
    return f"{stem}_{contract.precision}.onnx" if contract.precision != "fp32" else f"{stem}.onnx"
