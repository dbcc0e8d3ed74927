from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CFR_SHARED", ROOT.parent / "shared"))
REFERENCE = SHARED / "reference" / "official"
DATA = SHARED / "data"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not present (the shared data/reference folder is missing)")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return need(REFERENCE)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return need(DATA)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A freshly initialised checkpoint of ours (the 'tiny' arch) with a centred output."""
    import torch

    from trainer.checkpoint import save_checkpoint
    from trainer.models import arch_config, build_model

    torch.manual_seed(0)
    params = arch_config("tiny")
    model = build_model(params)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    return save_checkpoint(path, model, params, meta={"arch": "tiny"})


# Exported test models by name. bench/mutation.py exports each once into $CFR_TEST_MODELS/<name>/ (with
# export_test_model) so that the tests run for every mutant reuse them instead of exporting again; without that
# variable every test session exports its own.
TEST_MODELS = ("tiny", "default224", "default224_full")


def export_test_model(name: str, out: Path) -> Path:
    """tiny: the official tiny_d8_s1 checkpoint (random weights) with default options (flip, 448, 24 points);
    default224 / default224_full: the bundled trained default checkpoint at its own size, square / full graph."""
    from export.onnx_export import export_onnx
    from trainer.default_model import default_checkpoint

    if name == "tiny":
        return export_onnx(need(REFERENCE) / "tiny_d8_s1" / "model.pth", out)[0]
    if name == "default224":
        return export_onnx(default_checkpoint(), out, size=224)[0]
    if name == "default224_full":
        return export_onnx(default_checkpoint(), out, size=224, graph="full", max_image=(1024, 1024))[0]
    raise KeyError(f"unknown test model {name!r}; one of {TEST_MODELS}")


def exported_model(name: str, tmp_path_factory) -> Path:
    cache = os.environ.get("CFR_TEST_MODELS")
    if cache:
        found = sorted(p for p in (Path(cache) / name).glob("*.onnx") if not p.name.startswith("."))
        if len(found) != 1:
            pytest.fail(f"CFR_TEST_MODELS={cache} has no exported {name!r} model; bench/mutation.py exports them")
        return found[0]
    return export_test_model(name, tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, reference_dir) -> Path:
    """The official tiny_d8_s1 checkpoint exported with default options (flip, 448, 24 points)."""
    return exported_model("tiny", tmp_path_factory)


@pytest.fixture(scope="session")
def default_onnx(tmp_path_factory) -> Path:
    """The bundled trained checkpoint exported at its own size (224), square contract: 4x cheaper forwards than
    tiny_onnx at 448, for tests that run many (cfr-eval end to end)."""
    return exported_model("default224", tmp_path_factory)


@pytest.fixture(scope="session")
def default_engines(default_onnx, tmp_path_factory) -> dict:
    """The bundled trained checkpoint at 224 on both contracts: {"square": Engine, "full": Engine}. Its masks
    follow objects (unlike the random-weight reference), so zoom-in boxes move between clicks on real images."""
    from cfr_runtime import Engine

    return {"square": Engine(default_onnx), "full": Engine(exported_model("default224_full", tmp_path_factory))}


@pytest.fixture(scope="module")
def engine():
    """An Engine on the bundled default model, one per test module (the serve, cluster and adapter tests); a
    module that needs another model defines its own `engine`, which takes precedence."""
    from cfr_runtime import Engine, default_model

    return Engine(default_model())


@pytest.fixture(scope="session")
def tiny_engine(tiny_onnx):
    from cfr_runtime import Engine

    return Engine(tiny_onnx)


def blob_scene(seed: int = 0, h: int = 120, w: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """A small RGB image with one elliptic object and its gt mask (with a 1 px ignore band)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.15, 0.3) * h, rng.uniform(0.15, 0.3) * w
    d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    gt = (d <= 1).astype(np.int32)
    img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
    img[gt == 1] = np.clip(img[gt == 1] + np.array([160, 90, 40]), 0, 255).astype(np.uint8)
    return img, gt


def blob_dataset(root: Path, n: int = 4, h: int = 90, w: int = 120) -> Path:
    """A GrabCut-layout dataset (images/*.png, masks/*.png) of `n` blob scenes (seeds 0..n-1) under `root`,
    which must not exist yet: for the cfr-eval tests that need files on disk."""
    import cv2

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img, gt = blob_scene(i, h, w)
        assert cv2.imwrite(str(root / "images" / f"{i}.png"), img[..., ::-1])
        assert cv2.imwrite(str(root / "masks" / f"{i}.png"), (gt * 255).astype(np.uint8))
    return root


# Prepended by run_without_torch: from then on an import of torch, trainer or export (or of anything under them)
# raises ImportError, as it would where they are not installed.
_BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'trainer', 'export'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def run_without_torch(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the Python source `code` (dedented here) in a fresh interpreter in the repository root in which torch,
    trainer and export cannot be imported: the runtime's promise that it needs none of them. `sys` is already
    imported there. Returns the finished process (text stdout/stderr) for the caller's asserts."""
    return subprocess.run([sys.executable, "-c", _BLOCK_TORCH + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


# ---- mutation testing of the export (bench/mutation.py sets CFR_TRACE_CACHE for those modules) -----------------

def trace_key(module, contract) -> str:
    """What torch's tracer output depends on: the traced module's class, parameters and buffers, and the
    contract (dummy inputs, names, dynamic axes). Not the checkpoint's file hash or the package version, which
    only the metadata written after the trace records."""
    import dataclasses
    import hashlib
    import json

    import torch

    skip = ("checkpoint_sha256", "package_version")
    fields = {k: v for k, v in dataclasses.asdict(contract).items() if k not in skip}
    h = hashlib.sha256(json.dumps([type(module).__qualname__, fields], sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(autouse=True)
def _trace_once_per_mutation_run(monkeypatch):
    """Under mutation testing of export/verify.py and cfr-export's commit logic only ($CFR_TRACE_CACHE): torch's
    ONNX trace of a given module and contract is made once per mutation run and copied afterwards. The mutants
    of those modules cannot change the trace (everything it depends on is in the key, so a mutant that passes
    other options or another model gets a real trace of its own), and tracing is most of a small export's time,
    paid again by every mutant's tests. Everything after the trace (writing, verification, the staged commit)
    runs for real. Without the variable (the suite, CI) nothing changes."""
    folder = os.environ.get("CFR_TRACE_CACHE")
    if not folder:
        return
    import export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "trace_graph", cached_trace(onnx_export.trace_graph, Path(folder)))
    # torch's forward on the verification cases, the other half of a small export's time: same argument (the
    # key holds the graph's weights, its settings and the input bytes, so a mutant that feeds other inputs or
    # builds another graph computes its own); export.verify imported the function by name, hence both patches
    import export.verify as verify

    cached = cached_reference(onnx_export.torch_reference, Path(folder) / "references")
    monkeypatch.setattr(onnx_export, "torch_reference", cached)
    monkeypatch.setattr(verify, "torch_reference", cached)


def cached_trace(real, folder: Path):
    """`real` (export.onnx_export.trace_graph) with its output kept in `folder` under trace_key and copied on the
    next call with the same key."""
    import shutil

    def trace_graph(module, contract, path) -> None:
        path = Path(path)
        cached = folder / f"{trace_key(module, contract)}.onnx"
        if cached.is_file():
            shutil.copyfile(cached, path)
            return
        real(module, contract, path)
        if [p.name for p in path.parent.iterdir()] == [path.name]:  # one file (no loose weights past 2 GB)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
            shutil.copyfile(path, tmp)
            os.replace(tmp, cached)  # whole or absent for a concurrent mutant

    return trace_graph


def reference_key(graph, inputs: dict) -> str:
    """What torch's output on `inputs` depends on: every submodule's class and plain settings (flip, sizes),
    the parameters and buffers, and the input arrays (names, dtypes, shapes, bytes)."""
    import hashlib
    import json

    import numpy as np
    import torch

    h = hashlib.sha256()
    for name, module in graph.named_modules():
        settings = {k: v for k, v in vars(module).items()
                    if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple, type(None)))}
        h.update(json.dumps([name, type(module).__qualname__, settings], sort_keys=True, default=str).encode())
    for name, tensor in graph.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for name in sorted(inputs):
        a = np.ascontiguousarray(inputs[name])
        h.update(f"{name}:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cached_reference(real, folder: Path):
    """`real` (export.onnx_export.torch_reference) with its outputs kept in `folder` under reference_key."""
    import numpy as np

    def torch_reference(graph, inputs):
        cached = folder / f"{reference_key(graph, inputs)}.npz"
        if cached.is_file():
            with np.load(cached) as f:
                outs = [f[f"o{i}"] for i in range(len(f.files) - 1)]
                return tuple(outs) if bool(f["is_tuple"]) else outs[0]
        out = real(graph, inputs)
        outs = list(out) if isinstance(out, tuple) else [out]
        folder.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.stem}.{os.getpid()}.npz")
        np.savez(tmp, is_tuple=isinstance(out, tuple), **{f"o{i}": o for i, o in enumerate(outs)})
        os.replace(tmp, cached)  # whole or absent for a concurrent mutant
        return out

    return torch_reference
