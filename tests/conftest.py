from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, reference_dir) -> Path:
    """The official tiny_d8_s1 checkpoint exported with default options (flip, 448, 24 points)."""
    from export.onnx_export import export_onnx

    path, _, _ = export_onnx(reference_dir / "tiny_d8_s1" / "model.pth", tmp_path_factory.mktemp("onnx"))
    return path


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
