"""The square graph's batch axis (`cfr-export --max-batch N`): one engine call runs the forwards of several
sessions, and each click's result is the one it gets alone (bit for bit on ONNX Runtime's CPU provider), on
fresh random inputs and on a real image through Sessions; batch-1 graphs keep loading and running as before."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from cfr_runtime import Engine, Session
from cfr_runtime.contract import INPUT_NAMES, META_KEY, Contract
from cfr_runtime.errors import ContractError

pytest.importorskip("torch", reason="the batch-axis export needs torch (pip install -e '.[export]')")
pytest.importorskip("onnx", reason="the batch-axis export needs onnx (pip install -e '.[export]')")

MAX_BATCH = 4


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    """The bundled trained checkpoint at its own size (224), exported with a batch axis and verified."""
    from export.verify import export_verified
    from trainer.default_model import default_checkpoint

    path, contract, _, report = export_verified(default_checkpoint(), tmp_path_factory.mktemp("b4"), None, 24, True,
                                                seed=7, max_batch=MAX_BATCH)
    return path, contract, report


@pytest.fixture(scope="module")
def engine(batched) -> Engine:
    return Engine(batched[0], threads=1)


def fill(runner, case: dict) -> None:
    for name in INPUT_NAMES:
        getattr(runner, name)[...] = case[name]
    runner.image_dirty = True


def test_export_records_the_axis_and_verifies_batched_calls(batched):
    import onnx

    path, contract, report = batched
    assert contract.max_batch == MAX_BATCH and contract.batched
    graph = onnx.load(str(path), load_external_data=False).graph
    for value in (*graph.input, *graph.output):  # only the leading dim is free
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "B" and all(d.dim_value > 0 for d in list(dims)[1:]), value
    assert report.batch_diff == 0.0, report  # the verification ran the cases as one call too: bit for bit
    assert "batched vs one by one" in str(report)
    pytest.importorskip("fastapi", reason="cfr-serve's options need fastapi")
    from cfr_runtime.serve.cluster.options import model_max_batch

    assert model_max_batch(path) == MAX_BATCH and model_max_batch(None) == 1  # what cfr-serve --batch-size checks


def test_run_batch_equals_one_call_per_runner_on_fresh_inputs(engine):
    """Random images, soft previous masks and click sets, different per item; 6 runners on max_batch 4 are two
    calls (4 + 2). Each item's probabilities equal its own run() exactly."""
    from export.onnx_export import example_inputs

    seed = int(np.random.default_rng().integers(1 << 30))
    cases = [example_inputs(engine.contract, seed + i, n_pos=1 + i % 3, n_neg=i % 2, soft_prev=i % 2 == 0)
             for i in range(6)]
    singles = []
    for case in cases:
        runner = engine.new_runner()
        fill(runner, case)
        singles.append(runner.run().copy())
    runners = [engine.new_runner() for _ in cases]
    for runner, case in zip(runners, cases):
        fill(runner, case)
    out = engine.run_batch(runners)
    assert [o is r._probs for o, r in zip(out, runners)] == [True] * 6  # each runner's own buffer, as run()
    for i, (got, want) in enumerate(zip(out, singles)):
        assert np.array_equal(got, want), f"seed {seed} item {i}: max diff {np.abs(got - want).max():.3g}"
    assert len({float(o.sum()) for o in out}) == 6, "items must differ, or the test proves nothing"


def test_sessions_batched_through_one_engine_match_sessions_alone(engine, data_dir):
    """Three Sessions on a real GrabCut image (CFR-2: the first click runs three forwards), their forwards
    grouped three at a time into one engine call; every click's probabilities equal an unbatched Session's."""
    from cfr_runtime.clicker import Clicker
    from cfr_runtime.datasets import open_dataset
    from cfr_runtime.serve.cluster.batching import batching
    from tests.ray_util import GroupBatcher

    items = [open_dataset(data_dir / "GrabCut")[i].load() for i in (3, 7, 12)]
    scripts, wanted = [], []
    for image, gt in items:  # the clicks the RITM clicker makes for an unbatched session, and its masks
        plain, clicker = Session(engine, cfr=2), Clicker(gt)
        plain.set_image(image)
        script, probs = [], []
        pred = np.zeros(gt.shape, bool)
        for _ in range(3):
            y, x, positive = clicker.next_click(pred)
            pred = plain.add_click(x, y, positive)
            script.append((x, y, positive))
            probs.append(plain.probs.copy())
        scripts.append(script)
        wanted.append(probs)
    batcher = GroupBatcher(engine, size=3)
    batched_engine = batching(engine, batcher.submit)
    got: dict[int, list] = {}

    def annotate(i: int) -> None:
        s = Session(batched_engine, cfr=2)
        s.set_image(items[i][0])
        got[i] = []
        for x, y, positive in scripts[i]:
            s.add_click(x, y, positive)
            got[i].append(s.probs.copy())

    threads = [threading.Thread(target=annotate, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert max(batcher.batch_sizes) == 3, batcher.batch_sizes  # forwards of three sessions in one call
    for i in range(3):
        for k in range(3):
            assert np.array_equal(got[i][k], wanted[i][k]), f"image {i} click {k}"


def test_batch_one_graphs_load_and_run_one_call_per_runner(tiny_engine):
    """Every graph exported before the axis (and the shipped default) is batch 1: run_batch runs them one by one."""
    from cfr_runtime import default_model

    for engine in (tiny_engine, Engine(default_model())):
        assert engine.contract.max_batch == 1 and engine.max_batch == 1 and not engine.contract.batched
        runners = [engine.new_runner() for _ in range(2)]
        out = engine.run_batch(runners)
        assert [o is r._probs for o, r in zip(out, runners)] == [True, True]


def test_contract_field_is_checked(tmp_path):
    base = json.loads(Contract().to_json())
    assert Contract.from_json(json.dumps({k: v for k, v in base.items() if k != "max_batch"})).max_batch == 1
    for bad in (0, -1, "4", 1.5, True, 10**6):
        with pytest.raises(ContractError, match="max_batch"):
            Contract.from_json(json.dumps({**base, "max_batch": bad}))
    with pytest.raises(ContractError, match="no batch axis"):
        Contract.from_json(json.dumps({**base, "graph": "full", "max_batch": 4}))


def test_a_file_that_claims_an_axis_it_lacks_is_refused(tmp_path):
    """Metadata saying max_batch 4 on a graph whose leading dims are fixed at 1 (e.g. edited by hand)."""
    import onnx

    from cfr_runtime import default_model

    proto = onnx.load(str(default_model()))
    meta = next(p for p in proto.metadata_props if p.key == META_KEY)
    meta.value = json.dumps({**json.loads(meta.value), "max_batch": 4})
    path = tmp_path / "lying.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ContractError, match="fixed leading dim 1"):
        Engine(path)


@pytest.mark.parametrize("args, message", [
    (["--graph", "full"], "square graph"),
    (["--engine", "trt"], "TensorRT plans are built for batch 1"),
    (["--int8"], "depend on the other sessions"),
])
def test_export_refuses_what_a_batch_axis_does_not_fit(tmp_path, args, message):
    from click.testing import CliRunner

    from export.cli import main
    from trainer.default_model import default_checkpoint

    result = CliRunner().invoke(main, [str(default_checkpoint()), "-o", str(tmp_path / "out"), "--max-batch", "4",
                                       *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()  # refused before anything was written
