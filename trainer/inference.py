"""Torch inference behind the runtime's Engine interface: the reference backend, the validation path, and
the runner template shared by every torch-executed engine (eager, `torch.compile`, AOTInductor)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

import cfr_runtime
from cfr_runtime.contract import (
    FULL_IMAGE,
    FULL_PREV,
    GRAPH_FULL,
    GRAPH_SQUARE,
    INPUT_DISK_ROWS,
    INPUT_NAMES,
    OUTPUT_PROBS,
    Contract,
)
from cfr_runtime.engine import Engine
from cfr_runtime.full_runner import FullRunner

from .models.full_graph import FullGraph
from .models.graph import ContractGraph
from .models.plainvit import PlainVitModel


class TorchRunner:
    """Per-session buffers of a torch-executed contract function.

    Host buffers are numpy views of (pinned, on CUDA) torch tensors; device tensors are allocated once, so
    addresses never change and the forward can be captured as a CUDA graph and replayed. A run uploads
    disk rows and prev mask (kilobytes and one S x S map), the image only when the Session marks it changed,
    replays the graph (or calls `fn`), and downloads the probabilities with one copy.

    Each runner captures its own graph: a graph replays the buffers it was captured with, so two Sessions
    must never share one.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], contract: Contract, device: torch.device,
                 cuda_graph: bool = False):
        self._fn, self._device = fn, torch.device(device)
        cuda = self._device.type == "cuda"
        shapes = contract.shapes()
        host = {k: torch.zeros(shape, dtype=torch.float32, pin_memory=cuda) for k, shape in shapes.items()}
        host[INPUT_DISK_ROWS].fill_(-1.0)
        self._host = host
        self.image, self.prev_mask, self.disk_rows = (host[k].numpy() for k in INPUT_NAMES)
        self._probs = host[OUTPUT_PROBS].numpy()
        self._dev = {k: v.to(self._device) for k, v in host.items()} if cuda else host
        self.image_dirty = True
        self._want_graph = cuda_graph and cuda
        self._graph: torch.cuda.CUDAGraph | None = None
        self._stream = torch.cuda.Stream(self._device) if cuda else None
        if self._want_graph:  # capture now, so a Session's first click is already a replay
            with torch.inference_mode():
                for k in INPUT_NAMES:
                    self._dev[k].copy_(host[k])
                self._capture()

    def _forward(self) -> None:
        out = self._fn(*(self._dev[k] for k in INPUT_NAMES))
        self._dev[OUTPUT_PROBS].copy_(out[0] if isinstance(out, (list, tuple)) else out)

    def _capture(self) -> None:
        """Warm up on the runner's stream (lazy init, compilation, cuDNN plans), then capture."""
        with torch.cuda.stream(self._stream):
            for _ in range(2):
                self._forward()
        self._stream.synchronize()
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph, stream=self._stream, capture_error_mode="thread_local"):
            self._forward()

    def run(self) -> np.ndarray:
        with torch.inference_mode():
            if self._device.type != "cuda":
                self._forward()
                return self._probs
            with torch.cuda.stream(self._stream):
                dev, host = self._dev, self._host
                if self.image_dirty:
                    dev["image"].copy_(host["image"], non_blocking=True)
                    self.image_dirty = False
                dev["prev_mask"].copy_(host["prev_mask"], non_blocking=True)
                dev[INPUT_DISK_ROWS].copy_(host[INPUT_DISK_ROWS], non_blocking=True)
                if self._graph is not None:
                    self._graph.replay()
                else:
                    self._forward()
                host[OUTPUT_PROBS].copy_(dev[OUTPUT_PROBS], non_blocking=True)
            self._stream.synchronize()
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


def graph_engine(fn: Callable[..., torch.Tensor], contract: Contract, device: torch.device | str, name: str,
                 description: str, cuda_graph: bool = False) -> Engine:
    """An Engine whose runners call `fn(image, prev_mask, disk_rows) -> probs` on `device` (square contract) or
    the full graph's inputs in contract order (full contract)."""
    device = torch.device(device)
    if contract.full:
        return Engine.from_runner_factory(contract, lambda: TorchFullRunner(fn, contract, device), name, description)
    return Engine.from_runner_factory(contract, lambda: TorchRunner(fn, contract, device, cuda_graph), name,
                                      description)


def model_engine(model: PlainVitModel, size: int, max_points: int = 24, flip: bool = True,
                 arch: dict | None = None, sha256: str = "", cuda_graph: bool = False,
                 graph: str = GRAPH_SQUARE) -> Engine:
    """An Engine over an in-memory model run eagerly (fp32, or the model's half precision); the model must
    already run at `size`. `cuda_graph=True` replays the square forward as a CUDA graph on CUDA devices;
    `graph="full"` runs the full-resolution contract (`trainer.models.full_graph.FullGraph`)."""
    device = next(model.parameters()).device
    dtype = model.backbone.patch_embed.proj.weight.dtype
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    square = ContractGraph(model, flip=flip).eval()
    contract = Contract(input_size=size, max_points=max_points, flip=flip, precision=precision, arch=arch or {},
                        checkpoint_sha256=sha256, package_version=cfr_runtime.__version__, graph=graph)
    fn = FullGraph(square, size).eval().to(device) if graph == GRAPH_FULL else square
    how = "eager" + (" + CUDA graph" if cuda_graph and device.type == "cuda" and graph != GRAPH_FULL else "")
    return graph_engine(fn, contract, device, "torch", f"torch {torch.__version__} {how} {precision} {graph} on "
                        f"{device}", cuda_graph)
