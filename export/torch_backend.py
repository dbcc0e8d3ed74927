"""The torch reference backend: the same ContractGraph that is exported, run eagerly behind `Engine`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import cfr_runtime
from cfr_runtime.contract import Contract
from cfr_runtime.engine import Engine, alloc_buffers
from trainer.checkpoint import load_model

from .graph import ContractGraph


class TorchRunner:
    def __init__(self, graph: ContractGraph, contract: Contract, device: torch.device):
        bufs = alloc_buffers(contract)
        self.image, self.prev_mask, self.points, self._probs = (
            bufs["image"], bufs["prev_mask"], bufs["points"], bufs["probs"])
        self._graph, self._device = graph, device

    def run(self) -> np.ndarray:
        with torch.inference_mode():
            args = (torch.from_numpy(a).to(self._device) for a in (self.image, self.prev_mask, self.points))
            self._probs[...] = self._graph(*args).cpu().numpy()
        return self._probs


def torch_engine(checkpoint: str | Path, size: int = 448, max_points: int = 24, flip: bool = True,
                 device: str = "cpu") -> Engine:
    """An Engine that runs the checkpoint in torch eager mode (fp32), for parity checks and benchmarks."""
    model, info = load_model(checkpoint, input_size=size)
    dev = torch.device(device)
    graph = ContractGraph(model, flip=flip).eval().to(dev)
    contract = Contract(input_size=size, max_points=max_points, flip=flip,
                        arch=dict(name=info["arch"], **info["params"]), checkpoint_sha256=info["sha256"],
                        package_version=cfr_runtime.__version__)
    return Engine.from_runner_factory(contract, lambda: TorchRunner(graph, contract, dev), "torch",
                                      f"torch {torch.__version__} eager on {dev}")
