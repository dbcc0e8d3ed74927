"""cfr-export writes the contract graph, and it computes what torch computes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cfr_runtime.contract import INPUT_NAMES, META_KEY, OUTPUT_NAMES, Contract
from export.cli import main as export_main
from export.onnx_export import export_onnx, torch_reference, verification_cases
from export.verify import verify_onnx


def _io(path):
    model = onnx.load(str(path), load_external_data=False)
    dims = lambda vi: [d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    return ({i.name: (dims(i), i.type.tensor_type.elem_type) for i in model.graph.input},
            {o.name: (dims(o), o.type.tensor_type.elem_type) for o in model.graph.output},
            {p.key: p.value for p in model.metadata_props})


@pytest.mark.parametrize("source", ["official", "ours"])
def test_cli_export_matches_torch(source, reference_dir, tiny_checkpoint, tmp_path):
    ckpt = reference_dir / "tiny_d8_s1" / "model.pth" if source == "official" else tiny_checkpoint
    result = CliRunner().invoke(export_main, [str(ckpt), "--engine", "onnx", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "max |onnx - torch|" in result.output
    inputs, outputs, meta = _io(tmp_path / "model.onnx")
    assert list(inputs) == list(INPUT_NAMES) and list(outputs) == list(OUTPUT_NAMES)
    assert inputs["image"][0] == [1, 3, 448, 448] and inputs["disk_rows"][0] == [1, 2, 48, 12, 3]
    assert all(t == onnx.TensorProto.FLOAT for _, t in list(inputs.values()) + list(outputs.values()))
    contract = Contract.from_json(meta[META_KEY])
    assert contract.flip and contract.max_points == 24 and len(contract.checkpoint_sha256) == 64
    assert contract.arch["backbone_params"]["depth"] == 8


def test_options_and_fresh_inputs(reference_dir, tmp_path):
    """--size 224 --max-points 5 --no-flip, verified on several fresh random seeds."""
    path, contract, graph = export_onnx(reference_dir / "tiny_d8_s1" / "model.pth", tmp_path, size=224,
                                        max_points=5, flip=False)
    assert contract.input_size == 224 and not contract.flip
    for seed in np.random.default_rng(20251125).integers(0, 1 << 30, 3):  # seeded: a failure can be replayed
        report = verify_onnx(path, graph, contract, seed=int(seed))
        print(f"seed {seed}: {report}")
        assert report.max_abs_diff < 1e-4


def test_flip_is_in_the_graph(reference_dir, tmp_path):
    """The flipped graph differs from the unflipped one, and equals the mean of logits over both."""
    path, contract, graph = export_onnx(reference_dir / "tiny_d8_s1" / "model.pth", tmp_path)
    inputs = verification_cases(contract, seed=5)[1]
    graph.flip = False
    plain = torch_reference(graph, inputs)
    graph.flip = True
    flipped = torch_reference(graph, inputs)
    assert np.abs(plain - flipped).max() > 1e-3
    # restated independently: the unflipped network on mirrored inputs (image, prev mask, and the disks of the
    # flipped clicks x -> (S - x) - 1, the second block of disk_rows), logits un-mirrored and averaged with the
    # plain logits, then the sigmoid
    mirrored = {"image": inputs["image"][..., ::-1].copy(), "prev_mask": inputs["prev_mask"][..., ::-1].copy(),
                "disk_rows": inputs["disk_rows"][:, ::-1].copy()}
    graph.flip = False
    logit = lambda p: np.log(p.astype(np.float64)) - np.log1p(-p.astype(np.float64))  # noqa: E731
    mirror_probs = torch_reference(graph, mirrored)
    want = 1 / (1 + np.exp(-0.5 * (logit(plain) + logit(mirror_probs)[..., ::-1])))
    diff = np.abs(flipped - want).max()
    print(f"max |graph flip - restated flip| = {diff:.3g}")
    assert diff < 1e-4


def test_fp16_export(reference_dir, tmp_path):
    result = CliRunner().invoke(export_main, [str(reference_dir / "tiny_s0" / "model.pth"), "-o", str(tmp_path),
                                              "--fp16"])
    assert result.exit_code == 0, result.output
    assert "fp16: max |onnx - torch|" in result.output
    inputs, outputs, meta = _io(tmp_path / "model_fp16.onnx")
    assert inputs["image"][1] == onnx.TensorProto.FLOAT and outputs["probs"][1] == onnx.TensorProto.FLOAT
    assert json.loads(meta[META_KEY])["precision"] == "fp16"
    model = onnx.load(str(tmp_path / "model_fp16.onnx"))
    init_types = {t.data_type for t in model.graph.initializer if len(t.dims) >= 2}
    assert onnx.TensorProto.FLOAT16 in init_types  # matmul/conv weights are half
    ln = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert ln, "LayerNorm stays one fp32 op"


def test_export_refuses_bad_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(export_main, [str(bad), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not a readable torch checkpoint" in result.output


def test_torch_references_are_shared(tiny_checkpoint, tmp_path):
    """One run verifies fp32, fp16 and int8 on the same inputs: torch computes each reference once, and a check
    whose cases are all cached needs no torch model (cfr-export frees ViT-H's 2.6 GB before quantizing)."""
    from export.onnx_export import ExportError
    from export.verify import TorchReferences

    path, contract, graph = export_onnx(tiny_checkpoint, tmp_path, size=224)
    refs = TorchReferences()
    first = verify_onnx(path, graph, contract, seed=1, references=refs)
    again = verify_onnx(path, None, contract, seed=1, references=refs)
    assert first.max_abs_diff == again.max_abs_diff < 1e-4
    with pytest.raises(ExportError, match="no torch reference"):
        verify_onnx(path, None, contract, seed=2, references=refs)


def test_failed_export_leaves_no_empty_folder(tmp_path):
    """cfr-export creates its -o folder (and missing parents); when the export then fails they are removed again,
    while a folder that existed before stays."""
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(export_main, [str(bad), "-o", str(tmp_path / "new" / "out")])
    assert result.exit_code == 2, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]
    (tmp_path / "old").mkdir()
    result = CliRunner().invoke(export_main, [str(bad), "-o", str(tmp_path / "old")])
    assert result.exit_code == 2 and (tmp_path / "old").is_dir(), result.output


@pytest.mark.slow
def test_vit_base_export_and_verify(tmp_path):
    """A randomly initialised ViT-B in our format exports and matches torch (fp32 and fp16)."""
    import torch

    from trainer.checkpoint import save_checkpoint
    from trainer.models import arch_config, build_model

    torch.manual_seed(0)
    params = arch_config("vit_base")
    ckpt = save_checkpoint(tmp_path / "vitb.pth", build_model(params), params)
    result = CliRunner().invoke(export_main, [str(ckpt), "-o", str(tmp_path / "out"), "--fp16"])
    print(result.output)
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_aoti_package_on_cpu(reference_dir, tmp_path):
    """The compiled PyTorch path (AOTInductor) builds and matches torch; on a GPU the same code adds CUDA graphs."""
    pytest.importorskip("torch._inductor")
    result = CliRunner().invoke(export_main, [str(reference_dir / "tiny_d8_s1" / "model.pth"), "-o", str(tmp_path),
                                              "--engine", "aoti", "--device", "cpu", "--size", "224"])
    print(result.output)
    assert result.exit_code == 0, result.output
    assert "aoti: max |aoti - torch fp32|" in result.output
    assert (tmp_path / "model_fp32.pt2").exists()
