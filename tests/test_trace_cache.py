"""The trace and torch-reference caches of the export modules' mutation runs (tests/conftest.py, $CFR_TRACE_CACHE):
a trace is reused only for the same module weights and contract, a reference only for the same graph (weights and
settings) and the same input bytes: never for anything a mutant could change."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cfr_runtime.contract import Contract
from tests.conftest import cached_reference, cached_trace, reference_key, trace_key

torch = pytest.importorskip("torch")


def module(seed: int = 0, dtype=None):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    return m.to(dtype) if dtype is not None else m


def test_key_is_the_weights_and_the_contract():
    c = Contract(input_size=224, max_points=6, checkpoint_sha256="a" * 64, package_version="1")
    key = trace_key(module(), c)
    assert key == trace_key(module(), c)
    # what the trace does not depend on: the checkpoint file's hash and the package version (metadata only)
    assert key == trace_key(module(), replace(c, checkpoint_sha256="b" * 64, package_version="2"))
    others = [trace_key(module(1), c), trace_key(module(dtype=torch.float16), c),
              trace_key(module(), replace(c, max_points=5)), trace_key(module(), replace(c, flip=not c.flip)),
              trace_key(module(), replace(c, input_size=448)), trace_key(module(), replace(c, precision="fp16")),
              trace_key(module(), replace(c, graph="full")), trace_key(module(), replace(c, max_batch=4))]
    changed = module()
    changed[1].running_mean += 1  # a buffer, not a parameter
    others.append(trace_key(changed, c))
    assert len({key, *others}) == len(others) + 1


def test_a_trace_is_made_once_per_key_and_copied(tmp_path):
    calls = []

    def real(mod, contract, path):
        calls.append(contract.max_points)
        path.write_bytes(f"trace {len(calls)}".encode())

    trace = cached_trace(real, tmp_path / "cache")
    c = Contract(input_size=224, max_points=6)
    for i in range(2):
        (tmp_path / f"t{i}").mkdir()
        trace(module(), c, tmp_path / f"t{i}" / "trace.onnx")
        assert (tmp_path / f"t{i}" / "trace.onnx").read_bytes() == b"trace 1"
    assert calls == [6]
    (tmp_path / "t2").mkdir()
    trace(module(), replace(c, max_points=5), tmp_path / "t2" / "trace.onnx")
    assert calls == [6, 5] and (tmp_path / "t2" / "trace.onnx").read_bytes() == b"trace 2"
    assert len(list((tmp_path / "cache").iterdir())) == 2  # no temporary files left


def test_a_trace_with_loose_weight_files_is_not_cached(tmp_path):
    def real(mod, contract, path):
        path.write_bytes(b"graph")
        (path.parent / "onnx__MatMul_1").write_bytes(b"weights")  # torch's export past 2 GB

    trace = cached_trace(real, tmp_path / "cache")
    (tmp_path / "t").mkdir()
    trace(module(), Contract(), tmp_path / "t" / "trace.onnx")
    assert not (tmp_path / "cache").exists()


class Flipper(torch.nn.Module):
    """A graph with a plain setting (like ContractGraph.flip) that changes its output but not its weights."""

    def __init__(self, flip: bool, seed: int = 0):
        super().__init__()
        self.flip = flip
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x, y):
        out = self.lin(x) + y
        return (out.flip(0), out) if self.flip else out


def inputs(seed: int = 0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {"x": rng.random((4, 3)).astype(dtype), "y": rng.random((4, 2)).astype(dtype)}


def test_reference_key_is_the_graph_its_settings_and_the_input_bytes():
    key = reference_key(Flipper(False), inputs())
    assert key == reference_key(Flipper(False), inputs())
    changed = inputs()
    changed["y"][3, 1] += 1e-7
    others = [reference_key(Flipper(True), inputs()), reference_key(Flipper(False, seed=1), inputs()),
              reference_key(Flipper(False), inputs(1)), reference_key(Flipper(False), changed),
              reference_key(Flipper(False), inputs(dtype=np.float64)),
              reference_key(Flipper(False), {"x": inputs()["x"], "z": inputs()["y"]})]
    assert len({key, *others}) == len(others) + 1


def test_a_reference_is_computed_once_per_key_and_read_back_equal(tmp_path):
    calls = []

    def real(graph, feeds):
        calls.append(graph.flip)
        with torch.no_grad():
            out = graph(*(torch.from_numpy(feeds[k]) for k in ("x", "y")))
        return tuple(o.numpy() for o in out) if isinstance(out, tuple) else out.numpy()

    ref = cached_reference(real, tmp_path / "refs")
    for flip in (False, True):
        first = ref(Flipper(flip), inputs())
        again = ref(Flipper(flip), inputs())
        want = real(Flipper(flip), inputs())
        assert type(first) is type(again) is type(want)
        for a, b, c in zip(*(x if isinstance(x, tuple) else (x,) for x in (first, again, want))):
            assert a.dtype == b.dtype == c.dtype and np.array_equal(a, c) and np.array_equal(b, c)
    assert calls == [False, False, True, True]  # per setting: one miss (the hit calls nothing), one direct call
    assert len(list((tmp_path / "refs").iterdir())) == 2  # no temporary files left
