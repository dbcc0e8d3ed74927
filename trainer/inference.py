"""Torch inference behind the runtime's Engine interface (the reference backend and the validation path)."""

from __future__ import annotations

import numpy as np
import torch

import cfr_runtime
from cfr_runtime.contract import FULL_IMAGE, FULL_PREV, GRAPH_FULL, GRAPH_SQUARE, Contract
from cfr_runtime.engine import Engine, alloc_buffers
from cfr_runtime.full_runner import FullRunner

from .models.full_graph import FullGraph
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


class TorchFullRunner(FullRunner):
    """The full-resolution contract on torch tensors: `fn` is the eager `FullGraph` or a compiled program of
    it (AOTInductor), called with the contract's inputs in order. Image and both maps live on `device`; the
    small tables are copied there only when they change."""

    def __init__(self, fn, contract: Contract, device: torch.device):
        super().__init__(contract)
        self._fn, self._device = fn, device
        self._t: dict[str, torch.Tensor] = {}
        self._out: tuple = ()

    def _bind(self, image: np.ndarray) -> None:
        h, w = image.shape[1:3]
        self._t = {FULL_IMAGE: torch.from_numpy(image).to(self._device)}
        self._maps = [torch.zeros((h, w), dtype=torch.float32, device=self._device) for _ in range(2)]

    def _upload(self, names: list[str]) -> None:
        for name in names:
            self._t[name] = torch.from_numpy(self.small[name]).to(self._device)

    def _execute(self, cur: int) -> None:
        args = [self._maps[cur] if name == FULL_PREV else self._t[name] for name in self.contract.input_names()]
        with torch.inference_mode():
            out = self._fn(*args)
            self._maps[1 - cur].copy_(out[0])
        self._out = out

    def _fetch_small(self) -> tuple[np.ndarray, int]:
        return self._out[1].cpu().numpy(), int(self._out[2].reshape(-1)[0])

    def _read_map(self, k: int) -> np.ndarray:
        return self._maps[k].cpu().numpy()

    def _write_map(self, k: int, probs: np.ndarray | None) -> None:
        if probs is None:
            self._maps[k].zero_()
        else:
            self._maps[k].copy_(torch.from_numpy(np.ascontiguousarray(probs)))

    def _read_net(self) -> np.ndarray:
        return self._out[3].float().cpu().numpy()


def model_engine(model: PlainVitModel, size: int, max_points: int = 24, flip: bool = True,
                 arch: dict | None = None, sha256: str = "", graph: str = GRAPH_SQUARE) -> Engine:
    """An Engine over an in-memory model (fp32 eager); the model must already run at `size`."""
    device = next(model.parameters()).device
    square = ContractGraph(model, flip=flip).eval()
    contract = Contract(input_size=size, max_points=max_points, flip=flip, arch=arch or {},
                        checkpoint_sha256=sha256, package_version=cfr_runtime.__version__, graph=graph)
    if graph == GRAPH_FULL:
        full = FullGraph(square, size).eval().to(device)
        new_runner = lambda: TorchFullRunner(full, contract, device)  # noqa: E731
    else:
        new_runner = lambda: TorchRunner(square, contract, device)  # noqa: E731
    return Engine.from_runner_factory(contract, new_runner, "torch", f"torch {torch.__version__} eager on {device}")
