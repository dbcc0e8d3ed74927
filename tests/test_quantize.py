"""The CPU artifacts of export/quantize.py: int8 and offline-optimized graphs compute the fp32 function
(within the int8 tolerance), carry the contract, and load in the runtime."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cfr_runtime import Engine, Session
from export.cli import main as export_main
from export.graph_file import set_metadata
from export.onnx_export import ExportError, export_onnx
from export.quantize import optimize_offline, quantize_int8, read_contract
from export.verify import TOLERANCE, verify_onnx


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("q"), size=224)


def test_int8_is_quantized_and_verified(exported):
    path, contract, graph = exported
    q = quantize_int8(path)
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops, sorted(ops)
    c8 = read_contract(q)
    assert c8.precision == "int8" and c8.checkpoint_sha256 == contract.checkpoint_sha256
    report = verify_onnx(q, graph, c8, seed=int(np.random.default_rng().integers(1 << 30)))
    print(report)
    assert report.tolerance == TOLERANCE["int8"] and report.max_abs_diff <= report.tolerance
    assert report.max_abs_diff > 0  # it is really a different (quantized) graph


def test_offline_optimized_fp32_is_exact(exported, tmp_path):
    path, contract, graph = exported
    opt = optimize_offline(path, tmp_path / "opt.onnx")
    domains = {n.domain for n in onnx.load(str(opt)).graph.node}
    assert "com.microsoft" in domains  # fusions were applied and saved
    report = verify_onnx(opt, graph, read_contract(opt), seed=3)
    assert report.max_abs_diff < 1e-4 and report.tolerance == TOLERANCE["fp32"]


def test_int8_runs_in_a_session(exported):
    path, _, _ = exported
    engine = Engine(quantize_int8(path, path.with_name("session_int8.onnx")))
    assert engine.contract.precision == "int8" and "precision=int8" in repr(engine)
    s = Session(engine)
    s.set_image(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    assert s.add_click(60, 45).shape == (90, 120)


def test_int8_refuses_non_fp32_input(exported, tmp_path):
    path, contract, _ = exported
    model = onnx.load(str(path))
    set_metadata(model, replace(contract, precision="fp16"))
    onnx.save(model, str(tmp_path / "model_fp16.onnx"))
    with pytest.raises(ExportError, match="starts from the fp32 graph"):
        quantize_int8(tmp_path / "model_fp16.onnx")
    with pytest.raises(ExportError, match="not a cfr-export ONNX file"):
        del model.metadata_props[:]
        onnx.save(model, str(tmp_path / "foreign.onnx"))
        quantize_int8(tmp_path / "foreign.onnx")


def test_cli_int8(tiny_checkpoint, tmp_path):
    result = CliRunner().invoke(export_main, [str(tiny_checkpoint), "--size", "224", "--int8", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "int8: max |onnx - torch|" in result.output and "mask agreement" in result.output
    assert (tmp_path / "model_int8.onnx").is_file() and (tmp_path / "model.onnx").is_file()
