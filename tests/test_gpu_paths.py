"""GPU paths: what can be checked without a GPU runs everywhere; the rest skips with the reason.

Every GPU test asserts what actually ran (tests/gpu_checks.py): the providers of the InferenceSession a
Session uses and, from ONNX Runtime's profiler, the provider that executed the heavy kernels; the device of a
torch runner's tensors; the native TensorRT backend. ONNX Runtime falls back to the CPU silently, so without
that a GPU-vs-CPU comparison could be CPU vs CPU. The CPU cases of the same checks run on every machine.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from cfr_runtime import CfrError, ContractError, Engine, EngineMismatchError
from cfr_runtime.backends.ort import provider_with_options
from cfr_runtime.contract import Contract
from cfr_runtime.plan import PlanInfo, check_plan, read_sidecar, sidecar_path
from tests.gpu_checks import heavy_op_providers, ort_providers, profiled_providers, square_feeds, torch_devices

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _info(**kw) -> PlanInfo:
    base = dict(contract=Contract(input_size=448), tensorrt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3",
                compute_capability="9.0", onnx_sha256="ab" * 32)
    base.update(kw)
    return PlanInfo(**base)


def test_plan_check_accepts_the_same_gpu_and_version():
    check_plan(_info(), "10.3.0", "NVIDIA H100 80GB HBM3", "9.0", "m.plan")


def test_plan_check_refuses_other_tensorrt():
    with pytest.raises(EngineMismatchError, match=r"TensorRT 10.3.0 built it, this process has TensorRT 11.0.0"):
        check_plan(_info(), "11.0.0", "NVIDIA H100 80GB HBM3", "9.0", "m.plan")


def test_plan_check_refuses_other_gpu():
    with pytest.raises(EngineMismatchError, match=r"built for NVIDIA H100.*sm_90.*this GPU is NVIDIA A10G \(sm_86\)"):
        check_plan(_info(), "10.3.0", "NVIDIA A10G", "8.6", "m.plan")


def test_sidecar_roundtrip_and_missing(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\0")
    with pytest.raises(ContractError, match="no sidecar"):
        read_sidecar(plan)
    sidecar_path(plan).write_text(_info().to_json())
    info = read_sidecar(plan)
    assert info == _info()
    sidecar_path(plan).write_text("{}")
    with pytest.raises(ContractError, match="malformed"):
        read_sidecar(plan)


def test_trt_backend_without_tensorrt_says_so(tmp_path):
    if HAS_TRT:
        pytest.skip("TensorRT is installed on this machine, so the message for its absence cannot be shown")
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\0")
    with pytest.raises(CfrError, match="TensorRT is not installed"):
        Engine(plan)  # .plan -> backend 'auto' picks trt


def test_build_plan_without_tensorrt_says_so(tiny_onnx, tmp_path):
    if HAS_TRT:
        pytest.skip("TensorRT is installed on this machine, so the refusal without it cannot be shown")
    from export.trt import TrtUnavailable, build_plan

    with pytest.raises(TrtUnavailable, match="TensorRT is not installed"):
        build_plan(tiny_onnx, tmp_path)


def test_gpu_provider_options(tmp_path):
    """Options follow the arguments: CUDA graphs on/off with cuda_graph, the TensorRT engine cache beside each
    model (two models never share one), and the CPU provider gets none (ONNX Runtime rejects unknown keys)."""
    assert provider_with_options("CPUExecutionProvider", tmp_path / "m.onnx", True) == "CPUExecutionProvider"
    for graph in (True, False):
        _, cuda = provider_with_options("CUDAExecutionProvider", tmp_path / "m.onnx", graph)
        _, trt = provider_with_options("TensorrtExecutionProvider", tmp_path / "m.onnx", graph)
        assert cuda["enable_cuda_graph"] == trt["trt_cuda_graph_enable"] == str(int(graph))
    _, a = provider_with_options("TensorrtExecutionProvider", tmp_path / "a" / "m.onnx", True)
    _, b = provider_with_options("TensorrtExecutionProvider", tmp_path / "b" / "m.onnx", True)
    assert Path(a["trt_engine_cache_path"]).parent == tmp_path / "a" and a["trt_engine_cache_path"] != \
        b["trt_engine_cache_path"]
    assert all(isinstance(v, str) for v in a.values())  # ORT provider options are strings


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT or not _cuda(), reason="needs TensorRT and a CUDA GPU; missing on this machine: "
                    + ", ".join(n for n, ok in (("TensorRT (pip install 'cfr-icl[trt]')", HAS_TRT),
                                                ("a CUDA GPU visible to torch", _cuda())) if not ok))
def test_trt_plan_matches_onnxruntime(tiny_onnx, tmp_path):
    from cfr_runtime import Session
    from export.trt import build_plan

    plan = build_plan(tiny_onnx, tmp_path)
    trt_s, ort_s = Session(Engine(plan)), Session(Engine(tiny_onnx, providers=["CPUExecutionProvider"]))
    assert trt_s.engine.backend == "trt" and type(trt_s._runner).__module__ == "cfr_runtime.backends.trt"
    assert ort_providers(ort_s) == ["CPUExecutionProvider"]  # the reference really is the CPU
    img = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    for s in (trt_s, ort_s):
        s.set_image(img)
        s.add_click(150, 100)
    assert np.abs(trt_s.probs - ort_s.probs).max() < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU visible to torch; this machine has none")
def test_torch_cuda_engine_matches_cpu(reference_dir):
    from cfr_runtime import Session
    from export.torch_backend import torch_engine

    img = np.random.default_rng(1).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    probs = []
    for device in ("cpu", "cuda"):
        s = Session(torch_engine(reference_dir / "tiny_d8_s1" / "model.pth", device=device))
        s.set_image(img)
        s.add_click(150, 100)
        assert torch_devices(s) == {device}, f"the {device} engine ran on {torch_devices(s)}"
        probs.append(s.probs.copy())
    assert np.abs(probs[0] - probs[1]).max() < 1e-3


@pytest.mark.gpu
def test_ort_cuda_provider(tiny_onnx, tmp_path):
    """The CUDA Session runs on CUDA (its InferenceSession kept the CUDA provider, device buffers are bound, the
    profiler saw the matrix products on CUDA), the reference on the CPU, and they agree."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (CUDAExecutionProvider), not installed on this machine")
    from cfr_runtime import Session

    gpu = Session(Engine(tiny_onnx, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]))
    cpu = Session(Engine(tiny_onnx, providers=["CPUExecutionProvider"]))
    assert ort_providers(gpu)[0] == "CUDAExecutionProvider", f"CUDA did not load: {ort_providers(gpu)}"
    assert gpu._runner._device == "cuda" and ort_providers(cpu) == ["CPUExecutionProvider"]
    img = np.random.default_rng(2).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    for s in (gpu, cpu):
        s.set_image(img)
        s.add_click(80, 60)
        s.add_click(10, 10, False)
    assert np.abs(gpu.probs - cpu.probs).max() < 1e-3
    profile = profiled_providers(tiny_onnx, ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                 square_feeds(gpu.engine.contract), tmp_path)
    assert heavy_op_providers(profile) == {"CUDAExecutionProvider"}, profile


def test_what_ran_checks_on_the_cpu(tiny_onnx, tmp_path, reference_dir):
    """The checks the GPU tests rely on, on this machine's CPU: an ORT Session reports the CPU provider and the
    profiler attributes the heavy kernels to it; a torch engine's tensors are on the CPU."""
    from cfr_runtime import Session
    from export.torch_backend import torch_engine

    s = Session(Engine(tiny_onnx, providers=["CPUExecutionProvider"]))
    assert ort_providers(s) == ["CPUExecutionProvider"] and s._runner._device == "cpu"
    profile = profiled_providers(tiny_onnx, ["CPUExecutionProvider"], square_feeds(s.engine.contract), tmp_path)
    assert heavy_op_providers(profile) == {"CPUExecutionProvider"}
    assert {"MatMul", "Conv"} <= set(profile) and all(t > 0 for by in profile.values() for t in by.values())
    t = Session(torch_engine(reference_dir / "tiny_d8_s1" / "model.pth", size=224))
    assert torch_devices(t) == {"cpu"}
    with pytest.raises(AssertionError, match="not an ONNX Runtime engine"):
        ort_providers(t)
