"""CPU artifacts of an exported contract graph: int8 weights (ONNX Runtime dynamic quantization) and ORT graph
optimizations applied offline and saved into the file.

Why dynamic and not static QDQ: dynamic quantization stores the MatMul weights as int8 (per output channel)
and quantizes each activation at run time with the scale of that very tensor. ViT activations (LayerNorm
outputs, GELU outputs feeding fc2) have rare large outliers whose range changes from image to image and click
to click; static per-tensor activation scales calibrated once clip them or waste most of the 8 bits, and
their accuracy then depends on how well a calibration set (training images with simulated clicks and
previous masks) matches the evaluation protocol. Dynamic quantization needs no calibration data at all, so
no evaluation image can leak into it. Only MatMuls with constant weights are quantized (qkv, proj, fc1,
fc2: ~85% of a ViT-B forward's multiply-adds); attention's activation-by-activation MatMuls, the convolutions
of the neck and head (ConvInteger measured slower than fp32 Conv here) and all normalizations stay fp32.
On CPUs with AVX512-VNNI / AVX-VNNI the u8 x s8 products run on the VNNI dot-product instructions.

The offline optimization runs ONNX Runtime's graph transformers once at export (constant folding, MatMul +
Add / GELU / LayerNorm fusions, DynamicQuantizeMatMul fusion) at the EXTENDED level and saves the result, so
a Session starts without redoing them. EXTENDED, not ALL: ALL adds layout transforms (NCHWc) tied to the
exporting machine's vector width; those are cheap and ORT redoes them at load on the target CPU.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import onnx

from cfr_runtime.contract import META_KEY, Contract
from cfr_runtime.onnx_file import check_data_file

from .graph_file import copy_graph, restamp
from .onnx_export import ExportError

log = logging.getLogger(__name__)


def read_contract(path: str | Path) -> Contract:
    """The contract stored in an ONNX file's metadata (ExportError when it has none)."""
    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in meta:
        raise ExportError(f"{path}: not a cfr-export ONNX file (no '{META_KEY}' metadata)")
    return Contract.from_json(meta[META_KEY], str(path))


def _optimize(src: Path, dst: Path, contract: Contract) -> Path:
    """ONNX Runtime's EXTENDED optimizations of `src` saved as `dst` with `contract` (see optimize_offline)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".cfr-opt-") as tmp:
        optimized = Path(tmp) / "opt.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(optimized)
        # weights into a data file beside it, whatever the size: restamp() then streams them into the artifact
        # (one file, or external data past the protobuf limit) without ever holding the whole graph
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        log.info("%s: ONNX Runtime graph optimizations", dst.name)
        try:
            ort.InferenceSession(str(src), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises untyped errors
            raise ExportError(f"{src}: ONNX Runtime could not optimize this graph: {exc}") from None
        restamp(optimized, dst, contract)  # optimization does not keep the metadata reliably
    return dst


def optimize_offline(src: str | Path, dst: str | Path) -> Path:
    """Save `src` with ONNX Runtime's EXTENDED graph optimizations for the CPU provider applied, as `dst` (with
    its data file beside it when the weights pass the protobuf limit).

    The result uses com.microsoft contrib ops (FusedMatMul, DynamicQuantizeMatMul, ...) and is meant for
    ONNX Runtime's CPU provider; export the plain graph (model.onnx) for TensorRT or other runtimes.
    """
    src = Path(src)
    check_data_file(src)
    return _optimize(src, Path(dst), read_contract(src))


def quantize_int8(fp32_path: str | Path, out_path: str | Path | None = None, optimize: bool = True) -> Path:
    """Dynamic int8 quantization of an fp32 contract graph (weights int8 per channel, activations uint8 at
    run time), offline-optimized for ORT's CPU provider unless optimize=False. Returns the written path
    (default: model_int8.onnx beside the input). Verify it with `export.verify.verify_onnx`.

    The quantizer reads a copy of the graph in a scratch folder beside the output (it writes
    `<input>-inferred.onnx` beside its input: into that folder then, never into the model folder)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_path = Path(fp32_path)
    contract = read_contract(fp32_path)
    if contract.precision != "fp32":
        raise ExportError(f"{fp32_path}: int8 quantization starts from the fp32 graph, this one is "
                          f"{contract.precision}")
    big = check_data_file(fp32_path) is not None
    out = Path(out_path) if out_path is not None else fp32_path.with_name("model_int8.onnx")
    int8 = replace(contract, precision="int8")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".cfr-int8-") as tmp:
        work = Path(tmp)
        (work / "src").mkdir()
        source = copy_graph(fp32_path, work / "src")
        quantized = work / "q.onnx"
        root = logging.getLogger()
        level = root.level
        log.info("%s: quantizing %s", out.name, fp32_path.name)
        root.setLevel(logging.ERROR)  # its "run pre-processing" advice is for models with dynamic shapes
        try:
            quantize_dynamic(source, quantized, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True},
                             use_external_data_format=big)
        except Exception as exc:  # the quantizer raises RuntimeError/ValueError from deep inside
            raise ExportError(f"{fp32_path}: ONNX Runtime quantization failed: {exc}") from None
        finally:
            root.setLevel(level)
        if optimize:
            _optimize(quantized, out, int8)
        else:
            restamp(quantized, out, int8)
    return out
