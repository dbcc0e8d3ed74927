"""The torch-executed engines share one runner template (`trainer.inference.TorchRunner`): the compiled
engine computes the eager function, runners are reused per Engine, and two Sessions on one Engine give
the masks of two separate Engines. CUDA-only parts (CUDA graphs, ORT's per-runner `gpu_graph_id`) skip
with the reason where no GPU is present."""

from __future__ import annotations

import numpy as np
import pytest

from cfr_runtime import Session

SIZE = 224


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _model(seed: int = 0):
    import torch

    from trainer.models import arch_config, build_model

    torch.manual_seed(seed)
    return build_model(arch_config("tiny", SIZE)).eval()


def _trace(engine, img: np.ndarray, clicks) -> list[np.ndarray]:
    s = Session(engine, cfr=1)
    s.set_image(img)
    out = []
    for x, y, p in clicks:
        s.add_click(x, y, p)
        out.append(s.probs.copy())
    return out


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(11)
    img = rng.integers(0, 255, (180, 260, 3), dtype=np.uint8)
    clicks = [(int(rng.integers(0, 260)), int(rng.integers(0, 180)), bool(i != 2)) for i in range(4)]
    return img, clicks


def test_compiled_engine_matches_eager(scene):
    """torch.compile (Inductor, CPU here) computes the eager fp32 function over a CFR-1 click trace."""
    pytest.importorskip("torch._inductor")
    from export.compiled import compiled_model_engine
    from trainer.inference import model_engine

    img, clicks = scene
    eager = _trace(model_engine(_model(), SIZE), img, clicks)
    compiled = _trace(compiled_model_engine(_model(), SIZE, precision="fp32"), img, clicks)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(eager, compiled))
    print(f"max |compiled - eager| over {len(clicks)} clicks: {diff:.3g}")
    assert diff < 1e-4


def test_runners_are_reused_and_sessions_stay_apart(scene):
    """A collected Session gives its runner back; two live Sessions on one Engine never share buffers and
    match two Sessions on separate Engines click for click."""
    import gc

    from trainer.inference import model_engine

    img, clicks = scene
    engine = model_engine(_model(), SIZE)
    s = Session(engine)
    runner = s._runner
    del s
    gc.collect()
    assert Session(engine)._runner is runner

    flipped = np.ascontiguousarray(img[:, ::-1])
    a, b = Session(engine), Session(engine)
    assert a._runner is not b._runner
    ref = [Session(model_engine(_model(), SIZE)), Session(model_engine(_model(), SIZE))]
    for s, im in zip((a, b, *ref), (img, flipped, img, flipped)):
        s.set_image(im)
    for x, y, p in clicks:
        for s, r, xx in ((a, ref[0], x), (b, ref[1], img.shape[1] - 1 - x)):
            s.add_click(xx, y, p)
            r.add_click(xx, y, p)
            assert np.array_equal(s.probs, r.probs)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_cuda_graph_engines_match_eager_and_keep_sessions_apart(scene):
    """On CUDA: eager fp32 with a CUDA graph equals eager without one; fp16 compiled agrees on >= 99.9 %
    of mask pixels; two Sessions on one graph engine equal two separate engines."""
    from export.compiled import compiled_model_engine
    from trainer.inference import model_engine

    img, clicks = scene
    plain = _trace(model_engine(_model().cuda(), SIZE), img, clicks)
    graph = _trace(model_engine(_model().cuda(), SIZE, cuda_graph=True), img, clicks)
    assert max(float(np.abs(a - b).max()) for a, b in zip(plain, graph)) < 1e-5
    half = _trace(compiled_model_engine(_model().cuda(), SIZE, precision="fp16"), img, clicks)
    agree = np.mean([((a > 0.49) == (b > 0.49)).mean() for a, b in zip(plain, half)])
    assert agree >= 0.999
    engine = model_engine(_model().cuda(), SIZE, cuda_graph=True)
    a, b = Session(engine), Session(engine)
    ref = Session(model_engine(_model().cuda(), SIZE, cuda_graph=True))
    from tests.gpu_checks import torch_devices

    for s in (a, b, ref):  # what ran: CUDA tensors, and a captured graph that run() replays
        assert torch_devices(s) == {"cuda"} and s._runner._graph is not None
    for s in (a, b, ref):
        s.set_image(img)
    b.add_click(*clicks[0])  # b's clicks must not leak into a's buffers
    for x, y, p in clicks:
        a.add_click(x, y, p)
        ref.add_click(x, y, p)
        assert np.array_equal(a.probs, ref.probs)


@pytest.mark.gpu
def test_ort_cuda_graph_per_runner(tiny_onnx, scene):
    """ONNX Runtime CUDA graphs: each runner replays its own graph (gpu_graph_id); two Sessions on one
    Engine equal two Engines."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is not installed")
    from cfr_runtime import Engine
    from cfr_runtime.backends.ort import provider_with_options

    def engine():
        return Engine(tiny_onnx, providers=[provider_with_options("CUDAExecutionProvider", tiny_onnx, True)])

    img, clicks = scene
    shared = engine()
    a, b = Session(shared), Session(shared)
    ref_a, ref_b = Session(engine()), Session(engine())
    from tests.gpu_checks import ort_providers

    for s in (a, b, ref_a, ref_b):  # what ran: the CUDA provider (ORT falls back to the CPU silently), graphs on
        assert ort_providers(s)[0] == "CUDAExecutionProvider" and s._runner._device == "cuda"
        assert s._runner._run_options is not None, f"no CUDA graph: {s.engine!r}"
    assert a._runner._run_options is not b._runner._run_options
    flipped = np.ascontiguousarray(img[:, ::-1])
    for s, im in ((a, img), (ref_a, img), (b, flipped), (ref_b, flipped)):
        s.set_image(im)
    for x, y, p in clicks:
        for s, r in ((a, ref_a), (b, ref_b)):
            s.add_click(x, y, p)
            r.add_click(x, y, p)
            assert np.abs(s.probs - r.probs).max() < 1e-6
