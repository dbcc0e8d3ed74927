"""The torch reference backend: the same ContractGraph that is exported, run eagerly behind `Engine`."""

from __future__ import annotations

from pathlib import Path

import torch

from cfr_runtime.engine import Engine
from trainer.checkpoint import load_model
from trainer.inference import model_engine


def torch_engine(checkpoint: str | Path, size: int = 448, max_points: int = 24, flip: bool = True,
                 device: str = "cpu", graph: str = "square") -> Engine:
    """An Engine that runs the checkpoint in torch eager mode (fp32), for parity checks and benchmarks."""
    model, info = load_model(checkpoint, input_size=size)
    return model_engine(model.to(torch.device(device)), size, max_points, flip,
                        arch=dict(name=info["arch"], **info["params"]), sha256=info["sha256"], graph=graph)
