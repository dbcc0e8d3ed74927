"""The full-resolution contract: same function as the square Session, the host numbers it returns, undo memory."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import onnx
import pytest

from cfr_runtime import Contract, ContractError, Engine, InputError, Session
from cfr_runtime.clicker import Clicker
from cfr_runtime.contract import META_KEY
from cfr_runtime.metrics import iou
from cfr_runtime.zoom import mask_box
from tests.conftest import blob_scene, run_without_torch

SIZE = 224  # the official tiny_d8_s1 checkpoint at 224: the same code paths as 448, a quarter of the CPU


@pytest.fixture(scope="module")
def engines(reference_dir, tmp_path_factory):
    from export.onnx_export import export_onnx

    ckpt = reference_dir / "tiny_d8_s1" / "model.pth"
    d = tmp_path_factory.mktemp("full")
    square, _, _ = export_onnx(ckpt, d, size=SIZE)
    full, contract, graph = export_onnx(ckpt, d, size=SIZE, graph="full", max_image=(4000, 4000))
    return {"square": Engine(square), "full": Engine(full), "full_path": full, "contract": contract,
            "graph": graph}


def _trace(engine, image, gt, n, **kw):
    s = Session(engine, **kw)
    s.set_image(image)
    clicker, pred, out = Clicker(gt), np.zeros(gt.shape, bool), []
    for _ in range(n):
        y, x, p = clicker.next_click(pred)
        pred = s.add_click(x, y, p)
        out.append(((y, x, p), iou(gt, pred), s.forwards[-1], s.probs.copy(), s.roi))
    return out


@pytest.mark.parametrize("mode", [dict(), dict(cfr=4), dict(cfr=4, adaptive=True)], ids=["plain", "CFR-4", "A-CFR-4"])
def test_full_graph_reproduces_square_session(engines, data_dir, mode):
    """20 RITM clicks on real GrabCut images: same clicks, ROIs and forwards, IoUs within 1e-4."""
    from cfr_runtime.datasets import open_dataset

    ds = open_dataset(data_dir / "GrabCut")
    worst = 0.0
    for idx in (0, 7):
        image, gt = ds[idx].load()
        a = _trace(engines["square"], image, gt, 20, **mode)
        b = _trace(engines["full"], image, gt, 20, **mode)
        for k, (sa, sb) in enumerate(zip(a, b)):
            assert sa[0] == sb[0], f"image {idx}: click {k} differs"
            assert sa[4] == sb[4], f"image {idx}: ROI of click {k} differs"
            assert sa[2] == sb[2], f"image {idx}: forwards of click {k} differ"
            assert abs(sa[1] - sb[1]) <= 1e-4
            worst = max(worst, float(np.abs(sa[3] - sb[3]).max()))
    print(f"{mode}: max |full - square| probability over 2 images x 20 clicks: {worst:.3g}")
    assert worst < 1e-4


def test_full_graph_outputs_match_torch_and_host(engines):
    """ORT vs the torch FullGraph on fresh random inputs (sizes, ROIs, a one-row image), and the box / change
    count equal what the host computes from the map (zoom.py's mask_box, the square Session's A-CFR count)."""
    import onnxruntime as ort

    from export.onnx_export import full_verification_cases, torch_reference

    c = engines["contract"]
    sess = ort.InferenceSession(str(engines["full_path"]), providers=["CPUExecutionProvider"])
    seed = int(np.random.default_rng().integers(1 << 30))
    worst = 0.0
    for case in full_verification_cases(c, seed):
        want = torch_reference(engines["graph"], case)
        got = sess.run(list(c.output_names()), {k: case[k] for k in c.input_names()})
        worst = max(worst, float(np.abs(got[0] - want[0]).max()))
        probs = got[0]
        box = mask_box(probs > 0.5)
        r0, r1, c0, c1 = (int(v) for v in got[1])
        assert (box is None and r0 > r1) or box == (r0, r1, c0, c1)
        assert int(got[2][0]) == np.count_nonzero((probs > c.threshold) != (case["prev_probs"] > c.threshold))
        roi = case["roi"].astype(int)
        outside = np.ones(probs.shape, bool)
        outside[roi[0]:roi[1] + 1, roi[2]:roi[3] + 1] = False
        assert not probs[outside].any(), "paste-back must leave zeros outside the ROI"
    print(f"seed {seed}: max |onnx - torch| full-resolution probs {worst:.3g}")
    assert worst < 1e-4


def test_degenerate_one_row_image(engines):
    """A one-row image: the ROI is one row; crop and paste tables degenerate to weight 0 / index 0."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (1, 60, 3), dtype=np.uint8)
    out = []
    for name in ("square", "full"):
        s = Session(engines[name], cfr=2)
        s.set_image(image)
        s.add_click(10, 0, True)
        out.append((s.probs.copy(), s.roi))
        s.add_click(50, 0, False)
        out.append((s.probs.copy(), s.roi))
    assert out[0][1] == out[2][1] == (0, 0, 0, 59)
    assert np.abs(out[0][0] - out[2][0]).max() < 1e-4 and np.abs(out[1][0] - out[3][0]).max() < 1e-4


@pytest.mark.parametrize("kind", ["square", "full"])
def test_undo_history_is_small_and_exact(engines, kind):
    """Undo keeps S x S floats per click, not a full-resolution map: on a 2000 x 3000 image (a 24 MB map)
    eight clicks retain far less than one map, and undo restores the probabilities bit for bit."""
    image, _ = blob_scene(8, 2000, 3000)
    clicks = [(1500, 1000, True), (300, 200, False), (1600, 1100, True), (2900, 1900, False),
              (1400, 900, True), (100, 1800, False), (1550, 1050, True), (2000, 500, False)]
    tracemalloc.start()  # from before set_image, so buffers freed later are subtracted too
    s = Session(engines[kind])
    s.set_image(image)
    states = []
    for x, y, p in clicks[:2]:
        states.append((s.probs.copy(), s.roi))
        s.add_click(x, y, p)
    roi, base = s.roi, tracemalloc.get_traced_memory()[0]
    for x, y, p in clicks[2:]:
        states.append((s.probs.copy(), s.roi))
        s.add_click(x, y, p)
    kept = tracemalloc.get_traced_memory()[0] - base - sum(st[0].nbytes for st in states[2:])
    tracemalloc.stop()
    assert s.roi == roi  # the same zoom-in box throughout: no resampling scratch is reallocated
    map_bytes, per_click, n = 2000 * 3000 * 4, SIZE * SIZE * 4, len(clicks) - 2
    print(f"{kind}: memory kept by {n} clicks: {kept / 1e6:.2f} MB (one full-resolution map: {map_bytes / 1e6} MB)")
    assert kept < n * (per_click + 64 * 1024) + map_bytes // 8
    for probs, roi in reversed(states[1:]):
        s.undo()
        assert s.roi == roi and np.array_equal(s.probs, probs)
    s.undo()
    assert not s.mask.any() and s.roi is None


def test_undo_then_click_equals_fresh_session(engines):
    image, _ = blob_scene(4)
    s = Session(engines["full"], cfr=2, adaptive=True)
    s.set_image(image)
    s.add_click(70, 60, True)
    s.add_click(10, 10, False)
    s.undo()
    again = s.add_click(12, 100, False)
    fresh = Session(engines["full"], cfr=2, adaptive=True)
    fresh.set_image(image)
    fresh.add_click(70, 60, True)
    assert np.array_equal(again, fresh.add_click(12, 100, False))
    s.reset()
    assert s.clicks == [] and not s.mask.any() and s.roi is None


def test_full_contract_metadata(engines, tmp_path):
    c = engines["contract"]
    assert c.full and c.max_image == (4000, 4000) and Contract.from_json(c.to_json()).to_json() == c.to_json()
    # a version-1 document (written before the full graph existed) still parses, as a square contract; like
    # version 2 (float32 disks drawn in the graph) it is refused at load time with the re-export command
    v1 = {k: v for k, v in json.loads(Contract().to_json()).items()
          if k not in ("graph", "min_image", "opt_image", "max_image")}
    v1["contract_version"] = 1
    old = Contract.from_json(json.dumps(v1))
    assert old.graph == "square" and not old.full
    v2 = Contract.from_json(json.dumps({**json.loads(c.to_json()), "contract_version": 2, "exact_flip": True}))
    for contract in (old, v2):
        with pytest.raises(ContractError, match="Re-export the checkpoint"):
            contract.check_runnable()
    proto = onnx.load(str(engines["full_path"]))
    meta = next(p for p in proto.metadata_props if p.key == META_KEY)
    meta.value = v2.to_json()
    onnx.save(proto, str(tmp_path / "v2.onnx"))
    with pytest.raises(ContractError, match="contract version 2"):
        Engine(tmp_path / "v2.onnx")
    with pytest.raises(ContractError, match="unknown graph"):
        Contract.from_json(json.dumps({**json.loads(c.to_json()), "graph": "cube"}))
    with pytest.raises(ContractError, match="version"):
        Contract.from_json(json.dumps({**json.loads(c.to_json()), "contract_version": 99}))
    s = Session(engines["full"])
    with pytest.raises(InputError, match="outside the sizes"):
        s.set_image(np.zeros((4001, 10, 3), np.uint8))
    # a full-graph file whose inputs were renamed is refused at load time
    proto = onnx.load(str(engines["full_path"]))
    assert any(p.key == META_KEY for p in proto.metadata_props)
    proto.graph.output[1].name = "bbox"
    for node in proto.graph.node:
        node.output[:] = ["bbox" if o == "mask_box" else o for o in node.output]
    onnx.save(proto, str(tmp_path / "renamed.onnx"))
    with pytest.raises(ContractError, match="expected outputs"):
        Engine(tmp_path / "renamed.onnx")


def test_full_graph_follows_official_loop(engines, reference_dir, data_dir):
    """The full graph against the official-style torch loop (float64 click mapping, flip and disks, as the
    official code): same clicks and probabilities within 1e-4 over 12 clicks with A-CFR (kept short: the torch
    loop is the slow side)."""
    from cfr_runtime.datasets import open_dataset
    from export.reference_loop import ReferencePredictor
    from trainer.checkpoint import load_model

    ckpt = reference_dir / "tiny_d8_s1" / "model.pth"
    model, _ = load_model(ckpt, input_size=SIZE)
    image, gt = open_dataset(data_dir / "GrabCut")[7].load()
    ref = ReferencePredictor(model, size=SIZE, cfr=2, adaptive=True)
    ref.set_image(image)
    clicker, pred, worst = Clicker(gt), np.zeros(gt.shape, bool), 0.0
    for click in _trace(engines["full"], image, gt, 12, cfr=2, adaptive=True):
        y, x, p = clicker.next_click(pred)
        assert (y, x, p) == click[0]
        pred = ref.add_click(x, y, p)
        worst = max(worst, float(np.abs(click[3] - ref.prev[0, 0].numpy()).max()))
    print(f"max |full graph - official-style loop| over 12 clicks: {worst:.3g}")
    assert worst < 1e-4


def test_full_graph_runtime_imports_no_torch(engines):
    """A Session on a full-graph engine runs in a process where importing torch (or trainer/export) fails."""
    out = run_without_torch(f"""
        import numpy as np
        from cfr_runtime import Engine, Session
        s = Session(Engine({str(engines["full_path"])!r}), cfr=2, adaptive=True)
        s.set_image(np.zeros((50, 70, 3), np.uint8))
        m = s.add_click(10, 20, True)
        s.undo()
        assert m.shape == (50, 70) and s.roi is None
        print('ok')
    """)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
