"""ONNX -> TensorRT plan (TensorRT 10 and 11) with a fixed-shape profile, a timing cache and a sidecar.

TensorRT 11 has no FP16 builder flag: networks are strongly typed and take their precision from the
graph, so the fp16 ONNX from `cfr-export --fp16` is what makes an fp16 plan. On TensorRT 10 an fp32
graph may still be built with the FP16 flag (`fp16_flag=True`); an fp16 graph is built strongly typed.
"""

from __future__ import annotations

from pathlib import Path

from cfr_runtime.contract import Contract
from cfr_runtime.errors import CfrError
from cfr_runtime.fileio import commit, file_sha256, staged_file
from cfr_runtime.plan import PlanInfo, sidecar_path

WORKSPACE_BYTES = 4 << 30


class TrtUnavailable(CfrError):
    """TensorRT (or a CUDA GPU) is not available in this process."""


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TrtUnavailable(f"TensorRT is not installed ({exc}); pip install 'cfr-icl[trt]' on a CUDA machine, "
                             "or use the ONNX graph with onnxruntime") from None
    return trt


def check_trt_available() -> None:
    """Fail before an export starts when no plan could be built at its end (no TensorRT or no GPU)."""
    _import_trt()
    gpu_identity()


def gpu_identity() -> tuple[str, str]:
    """(name, "major.minor") of CUDA device 0, from torch (export already depends on it)."""
    import torch

    if not torch.cuda.is_available():
        raise TrtUnavailable("no CUDA GPU is visible; a TensorRT plan must be built on the GPU that will run it")
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


def profile_shapes(contract: Contract) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) per input: one fixed shape for the square graph (a static engine); for the full graph
    the image sizes recorded in the contract (min_image, opt_image, max_image) on every H / W dim."""
    names = contract.input_names()
    if not contract.full:
        return {name: (shape, shape, shape) for name, shape in contract.shapes().items() if name in names}
    (h0, w0), (h1, w1), (h2, w2) = contract.min_image, contract.opt_image, contract.max_image
    lo, opt, hi = contract.io(h0, w0), contract.io(h1, w1), contract.io(h2, w2)
    return {name: (lo[name][0], opt[name][0], hi[name][0]) for name in names}


def build_plan(onnx_path: str | Path, out_dir: str | Path, fp16_flag: bool = False,
               timing_cache: str | Path | None = None) -> Path:
    """Build `<onnx stem>.plan` next to a JSON sidecar; reuse/update a timing cache file."""
    from cfr_runtime.backends.ort import read_contract_from_file

    trt = _import_trt()
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    contract: Contract = read_contract_from_file(onnx_path)
    gpu_name, cc = gpu_identity()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0
    strongly_typed = contract.precision == "fp16" or major >= 11
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # from the file, not from bytes: the parser then resolves a graph's external data (model.onnx.data, checked
    # against the graph's record by read_contract_from_file above) relative to the graph's own folder
    if not parser.parse_from_file(str(onnx_path.resolve())):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CfrError(f"{onnx_path}: TensorRT cannot parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16_flag and not strongly_typed:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise CfrError(f"TensorRT {trt.__version__} has no FP16 flag; export with --fp16 for an fp16 plan")
        config.set_flag(trt.BuilderFlag.FP16)
    cache_path = Path(timing_cache) if timing_cache else out_dir / "timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(contract).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CfrError(f"{onnx_path}: TensorRT failed to build a plan (see the log above)")
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = out_dir / f"{onnx_path.stem}.plan"
    info = PlanInfo(contract, trt.__version__, gpu_name, cc, file_sha256(onnx_path))
    # plan and sidecar staged together and moved into place together: an interrupted build never leaves half a
    # plan under the real name, nor a plan beside another plan's sidecar
    with staged_file(plan, ".partial", folder=True) as staged:
        staged.write_bytes(bytes(serialized))
        sidecar_path(staged).write_text(info.to_json())
        commit(staged, plan, [sidecar_path(staged).name])
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return plan
