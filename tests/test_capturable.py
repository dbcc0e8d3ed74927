"""The forward must be capturable in a CUDA graph: no host tensors and no host syncs inside it.

Checked without a GPU: the contract graph runs on the `meta` device under two modes. A function mode
flags tensors built from host data inside the forward (`torch.tensor(1e6, device=x.device)` is a host
buffer copied to the device: "Cannot copy between CPU and CUDA tensors during CUDA graph capture"); a
dispatch mode flags ops whose arguments live on the CPU and host syncs (`.item()`, `bool(tensor)`,
data-dependent shapes show up as `_local_scalar_dense` or a nonzero-like op), which a graph cannot hold.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from trainer.models import arch_config, build_model
from trainer.models.graph import ContractGraph
from trainer.models.plainvit import click_disks, place_disks

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "item"}
HOST_DATA_FUNCS = {"tensor", "as_tensor", "from_numpy", "asarray", "item", "tolist", "numpy", "cpu", "__bool__"}


class _Ops(TorchDispatchMode):
    def __init__(self, offenders: list[str]):
        super().__init__()
        self.offenders = offenders

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat, _ = tree_flatten((args, kwargs or {}))
        name = func.overloadpacket.__name__
        if any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in flat) or name in SYNC_OPS:
            self.offenders.append(str(func))
        return func(*args, **(kwargs or {}))


class _Funcs(TorchFunctionMode):
    def __init__(self, offenders: list[str]):
        super().__init__()
        self.offenders = offenders

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_DATA_FUNCS:
            self.offenders.append(f"torch.{func.__name__}")
        return func(*args, **(kwargs or {}))


class HostTraffic:
    """Context manager: `offenders` lists host-data tensors, CPU operands and syncs seen inside it."""

    def __enter__(self):
        self.offenders: list[str] = []
        self._modes = (_Funcs(self.offenders), _Ops(self.offenders))
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)


def _meta_inputs(size: int, points: int = 4):
    image = torch.rand(1, 3, size, size, device="meta")
    prev = torch.rand(1, 1, size, size, device="meta")
    disk_rows = torch.full((1, 2, 2 * points, 12, 3), -1.0, device="meta")  # (1, F, 2P, K, 3), plain + flipped
    return image, prev, disk_rows


def test_guard_sees_host_tensors():
    """The guard itself: a host scalar tensor in a forward is caught (so the tests below can fail)."""
    x = torch.ones(3, device="meta")
    with HostTraffic() as mode:
        torch.where(x > 0, torch.tensor(1e6, device=x.device), x)
    assert mode.offenders, "a torch.tensor() built inside the forward must be reported"
    with HostTraffic() as mode:
        torch.where(x > 0, 1e6, x)
    assert mode.offenders == []


def test_click_disks_capturable():
    pts = torch.full((2, 8, 3), -1.0, device="meta")
    with HostTraffic() as mode:
        click_disks(pts, 64, 64, 5.0)
    assert mode.offenders == [], f"host traffic in click_disks: {mode.offenders}"


def test_place_disks_capturable():
    rows = torch.full((2, 8, 12, 3), -1.0, device="meta")
    with HostTraffic() as mode:
        place_disks(rows, 64, 64)
    assert mode.offenders == [], f"host traffic in place_disks: {mode.offenders}"


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_contract_graph_capturable(flip, dtype):
    params = arch_config("tiny")
    with torch.device("meta"):
        model = build_model(params)
    if dtype != torch.float32:
        model.half_precision(dtype)
    graph = ContractGraph(model, flip=flip).eval()
    size = params["backbone_params"]["img_size"][0]
    with torch.no_grad(), HostTraffic() as mode:
        out = graph(*_meta_inputs(size))
    assert out.shape == (1, 1, size, size)
    assert mode.offenders == [], f"host tensors or syncs in the forward: {sorted(set(mode.offenders))}"
