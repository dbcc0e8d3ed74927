"""Torch inference behind the runtime's Engine interface (the reference backend and the validation path)."""

from __future__ import annotations

import numpy as np
import torch

import cfr_runtime
from cfr_runtime.contract import Contract
from cfr_runtime.engine import Engine, alloc_buffers

from .models.graph import ContractGraph
from .models.plainvit import PlainVitModel


class TorchRunner:
    def __init__(self, graph: ContractGraph, contract: Contract, device: torch.device):
        bufs = alloc_buffers(contract)
        self.image, self.prev_mask, self.points, self._probs = (
            bufs["image"], bufs["prev_mask"], bufs["points"], bufs["probs"])
        self._graph, self._device = graph, device
        self.image_dirty = True  # host buffers are read every run: nothing to upload lazily

    def run(self) -> np.ndarray:
        with torch.inference_mode():
            args = (torch.from_numpy(a).to(self._device) for a in (self.image, self.prev_mask, self.points))
            self._probs[...] = self._graph(*args).float().cpu().numpy()
        return self._probs


def model_engine(model: PlainVitModel, size: int, max_points: int = 24, flip: bool = True,
                 arch: dict | None = None, sha256: str = "") -> Engine:
    """An Engine over an in-memory model (fp32 eager); the model must already run at `size`."""
    device = next(model.parameters()).device
    graph = ContractGraph(model, flip=flip).eval()
    contract = Contract(input_size=size, max_points=max_points, flip=flip, arch=arch or {},
                        checkpoint_sha256=sha256, package_version=cfr_runtime.__version__)
    return Engine.from_runner_factory(contract, lambda: TorchRunner(graph, contract, device), "torch",
                                      f"torch {torch.__version__} eager on {device}")
