"""The trace cache of the export modules' mutation runs (tests/conftest.py, $CFR_TRACE_CACHE): a trace is reused
only for the same module weights and contract, never for anything a mutant could change."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cfr_runtime.contract import Contract
from tests.conftest import cached_trace, trace_key

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
