"""What actually ran, for the GPU tests (issue 21).

ONNX Runtime falls back to the CPU silently when its CUDA provider cannot load (a missing cuDNN, a CPU-only
wheel beside the GPU one), and a torch engine built on the wrong device still runs; a GPU test that only
compares outputs would then compare CPU with CPU and pass. These helpers read the provider list of the
InferenceSession a runtime Session really uses, the providers ONNX Runtime's profiler saw execute each node,
and the device of a torch runner's tensors. Their CPU cases run everywhere (tests/test_gpu_paths.py), so the
GPU assertions are checked code even on machines without a GPU.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

HEAVY_OPS = ("MatMul", "FusedMatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "MultiHeadAttention")


def ort_session_of(session) -> object:
    """The onnxruntime.InferenceSession behind a runtime Session (square or full-resolution runner)."""
    inner = getattr(session._runner, "_session", None)
    if inner is None:
        raise AssertionError(f"{session.engine!r} is not an ONNX Runtime engine")
    return inner


def ort_providers(session) -> list[str]:
    """The providers the Session's InferenceSession was created with, first = preferred (what ORT kept)."""
    return list(ort_session_of(session).get_providers())


def profiled_providers(model: str | Path, providers: list, feeds: dict[str, np.ndarray], folder: Path
                       ) -> dict[str, dict[str, float]]:
    """Run `model` once with ONNX Runtime's profiler on and return {op type: {provider: microseconds}} for
    every node that executed: the provider that really ran each kernel, not the one that was asked for."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(folder / "ort_profile")
    sess = ort.InferenceSession(str(model), sess_options=opts, providers=providers)
    sess.run(None, feeds)
    trace = Path(sess.end_profiling())
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for event in json.loads(trace.read_text()):
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args and event.get("name", "").endswith("_kernel_time"):
            out[args["op_name"]][args["provider"]] += float(event.get("dur", 0))
    return {op: dict(v) for op, v in out.items()}


def heavy_op_providers(profile: dict[str, dict[str, float]]) -> set[str]:
    """Providers that executed the compute-heavy ops (matrix products, convolutions)."""
    found = {p for op, by in profile.items() if op in HEAVY_OPS for p in by}
    if not found:
        raise AssertionError(f"the profile has none of {HEAVY_OPS}: {sorted(profile)}")
    return found


def square_feeds(contract, seed: int = 0) -> dict[str, np.ndarray]:
    """One valid input of the square contract: an image, an empty previous mask, one positive click."""
    rng = np.random.default_rng(seed)
    from cfr_runtime.disks import fill_disk_rows

    s = contract.input_size
    disk_rows = np.empty(contract.disk_rows_shape, np.float32)
    fill_disk_rows(disk_rows, np.array([[s / 2, s / 3]]), [True], contract.disk_radius, s)
    return {"image": rng.random((1, 3, s, s), dtype=np.float32), "prev_mask": np.zeros((1, 1, s, s), np.float32),
            "disk_rows": disk_rows}


def torch_devices(session) -> set[str]:
    """Device types of a torch runner's bound tensors and of its network's parameters."""
    runner = session._runner
    tensors = list(getattr(runner, "_dev", {}).values()) + list(getattr(runner, "_t", {}).values())
    tensors += list(getattr(runner, "_maps", []))
    fn = getattr(runner, "_fn", None)
    if hasattr(fn, "parameters"):
        tensors += list(fn.parameters())
    if not tensors:
        raise AssertionError(f"{session.engine!r} has no torch tensors to inspect")
    return {t.device.type for t in tensors}
