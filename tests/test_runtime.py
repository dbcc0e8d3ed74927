"""Engine and Session: the official protocol, backend agreement, CFR, and no torch in the runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from cfr_runtime import ContractError, Engine, Session
from cfr_runtime.clicker import Clicker
from cfr_runtime.metrics import iou
from tests.conftest import blob_scene, run_without_torch


def _run_clicks(session, image, gt, n=20):
    session.set_image(image)
    clicker = Clicker(gt)
    pred = np.zeros(gt.shape, bool)
    trail = []
    for _ in range(n):
        y, x, p = clicker.next_click(pred)
        pred = session.add_click(x, y, p)
        trail.append(((y, x, p), pred.copy(), session.probs.copy()))
    return trail


def test_session_reproduces_official_loop(reference_dir, tiny_engine, data_dir):
    """Same clicks and probabilities as the official-style torch predictor, 20 clicks, with zoom-in."""
    from export.reference_loop import ReferencePredictor
    from trainer.checkpoint import load_model

    model, _ = load_model(reference_dir / "tiny_d8_s1" / "model.pth")
    from cfr_runtime.datasets import open_dataset

    inst = open_dataset(data_dir / "GrabCut")[7]
    image, gt = inst.load()
    for cfr, adaptive in [(0, False), (2, True)]:
        session = Session(tiny_engine, cfr=cfr, adaptive=adaptive)
        ref = ReferencePredictor(model, cfr=cfr, adaptive=adaptive)
        ref.set_image(image)
        ref_clicker = Clicker(gt)
        ref_pred = np.zeros(gt.shape, bool)
        for (click, _, probs) in _run_clicks(session, image, gt):
            y, x, p = ref_clicker.next_click(ref_pred)
            assert (y, x, p) == click
            ref_pred = ref.add_click(x, y, p)
            diff = np.abs(probs - ref.prev[0, 0].numpy()).max()
            assert diff < 1e-4, f"probs differ by {diff}"


def test_ort_and_torch_backends_agree(reference_dir):
    from export.onnx_export import export_onnx
    from export.torch_backend import torch_engine

    ckpt = reference_dir / "tiny_d8_s1" / "model.pth"
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path, _, _ = export_onnx(ckpt, d, size=224)
        ort_engine = Engine(path)
        ref_engine = torch_engine(ckpt, size=224)
        assert ref_engine.backend == "torch" and ort_engine.backend == "ort"
        image, gt = blob_scene(3, 150, 200)
        a = _run_clicks(Session(ort_engine, cfr=1), image, gt)
        b = _run_clicks(Session(ref_engine, cfr=1), image, gt)
    worst = 0.0
    for (ca, ma, pa), (cb, mb, pb) in zip(a, b):
        assert ca == cb
        worst = max(worst, float(np.abs(pa - pb).max()))
        assert np.count_nonzero(ma != mb) <= 2  # a pixel at exactly the threshold may flip
    print(f"max |ort - torch| over 20 clicks: {worst:.3g}")
    assert worst < 1e-4


def test_cfr_forward_counts(tiny_engine):
    image, gt = blob_scene(1)
    s = Session(tiny_engine, cfr=3)
    _run_clicks(s, image, gt, 3)
    assert s.forwards == [4, 1, 1]
    s = Session(tiny_engine, cfr=2, cfr_clicks=None)
    _run_clicks(s, image, gt, 3)
    assert s.forwards == [3, 3, 3]
    s = Session(tiny_engine, cfr=4, adaptive=True, cfr_threshold=10**9)
    _run_clicks(s, image, gt, 2)
    assert s.forwards == [2, 1]  # the first comparison is after the second forward


def test_acfr_stops_on_threshold(tiny_engine):
    """A-CFR-4 stops at the first forward that changes at most `cfr_threshold` pixels, else after 5 forwards;
    restated from fixed CFR-k runs (k = 0..4) of the same click, at thresholds that make it stop at each step."""
    image, gt = blob_scene(2)
    masks = []
    for k in range(5):
        fixed = Session(tiny_engine, cfr=k)
        fixed.set_image(image)
        masks.append(fixed.add_click(80, 60, True))
    changed = [int(np.count_nonzero(masks[i] != masks[i - 1])) for i in range(1, 5)]
    seen = set()
    for threshold in sorted({0, *changed}):
        want = next((i + 2 for i, c in enumerate(changed) if c <= threshold), 5)
        s = Session(tiny_engine, cfr=4, adaptive=True, cfr_threshold=threshold)
        s.set_image(image)
        s.add_click(80, 60, True)
        print(f"threshold {threshold}: {s.forwards[0]} forwards (restated {want}; pixels changed {changed})")
        assert s.forwards[0] == want and np.array_equal(s.mask, masks[want - 1])
        seen.add(want)
    assert len(seen) >= 2  # the thresholds exercised more than one stopping point


def test_undo_and_reset_restore_state(tiny_engine):
    image, gt = blob_scene(4)
    s = Session(tiny_engine)
    s.set_image(image)
    m1 = s.add_click(70, 60, True)
    p1 = s.probs.copy()
    roi1 = s.roi
    s.add_click(10, 10, False)
    assert len(s.clicks) == 2
    m = s.undo()
    assert np.array_equal(m, m1) and np.array_equal(s.probs, p1) and s.roi == roi1
    # the next click after undo equals a fresh session's second click
    again = s.add_click(10, 10, False)
    fresh = Session(tiny_engine)
    fresh.set_image(image)
    fresh.add_click(70, 60, True)
    assert np.array_equal(again, fresh.add_click(10, 10, False))
    s.reset()
    assert s.clicks == [] and not s.mask.any() and s.roi is None


def test_zoom_in_roi_follows_object(tiny_engine):
    image, gt = blob_scene(5, 400, 600)
    s = Session(tiny_engine)
    s.set_image(image)
    s.add_click(300, 200, True)
    assert s.roi == (0, 399, 0, 599)  # the first click sees the whole image
    first = s.probs > 0.5
    s.add_click(310, 210, True)
    # restated: box of the first mask and the positive clicks, x1.4 about its centre (>= 200 px), clamped
    rows, cols = np.flatnonzero(first.any(1)), np.flatnonzero(first.any(0))
    r0, r1 = min(rows[0], 200, 210), max(rows[-1], 200, 210)
    c0, c1 = min(cols[0], 300, 310), max(cols[-1], 300, 310)
    h, w = max(1.4 * (r1 - r0 + 1), 200), max(1.4 * (c1 - c0 + 1), 200)
    rc, cc = (r0 + r1) / 2, (c0 + c1) / 2
    want = (max(0, round(rc - h / 2)), min(399, round(rc + h / 2)),
            max(0, round(cc - w / 2)), min(599, round(cc + w / 2)))
    assert s.roi == want and s.roi != (0, 399, 0, 599), (s.roi, want)
    s2 = Session(tiny_engine, zoom_in=False)
    s2.set_image(image)
    s2.add_click(300, 200, True)
    s2.add_click(310, 210, True)
    assert s2.roi == (0, 399, 0, 599)


def test_engine_refuses_files_without_contract(tmp_path, tiny_onnx):
    plain = onnx.load(str(tiny_onnx))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(ContractError, match="not written by cfr-export"):
        Engine(tmp_path / "plain.onnx")
    renamed = onnx.load(str(tiny_onnx))
    renamed.graph.input[0].name = "input"
    for node in renamed.graph.node:
        node.input[:] = ["input" if i == "image" else i for i in node.input]
    onnx.save(renamed, str(tmp_path / "renamed.onnx"))
    with pytest.raises(ContractError, match="expected inputs"):
        Engine(tmp_path / "renamed.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ContractError, match="cannot load"):
        Engine(tmp_path / "junk.onnx")
    with pytest.raises(ContractError, match="no such model"):
        Engine(tmp_path / "missing.onnx")


def test_runtime_imports_no_torch(tiny_onnx):
    """A Session runs in a process where importing torch (or trainer/export) fails."""
    out = run_without_torch(f"""
        import numpy as np
        from cfr_runtime import Engine, Session
        s = Session(Engine({str(tiny_onnx)!r}), cfr=1)
        s.set_image(np.zeros((50, 70, 3), np.uint8))
        m = s.add_click(10, 20, True)
        assert m.shape == (50, 70)
        assert not any(k.split('.')[0] in ('torch', 'trainer', 'export') for k in sys.modules)
        print('ok')
    """)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_iou_progress_on_simple_object(tiny_engine):
    """Sanity: on a blob, 20 official clicks never produce NaN IoUs and masks are image-sized bools."""
    image, gt = blob_scene(6)
    trail = _run_clicks(Session(tiny_engine), image, gt, 5)
    for _, mask, probs in trail:
        assert mask.dtype == bool and mask.shape == gt.shape
        assert 0 <= iou(gt, mask) <= 1 and np.isfinite(probs).all()


def test_engine_shared_between_threads(tiny_engine):
    """Sessions on one Engine in parallel threads give the masks they give one after another."""
    from concurrent.futures import ThreadPoolExecutor

    scenes = [blob_scene(s, 90, 120) for s in range(4)]

    def work(i):
        image, gt = scenes[i]
        return [m for _, m, _ in _run_clicks(Session(tiny_engine, cfr=1), image, gt, 3)]

    sequential = [work(i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(work, range(4)))
    for a, b in zip(sequential, parallel):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_resampler_matches_torch_align_corners():
    import torch
    import torch.nn.functional as F

    from cfr_runtime.resample import Resampler

    rng = np.random.default_rng(0)
    src = rng.random((37, 53, 3), dtype=np.float32)
    for (r0, h, c0, w, oh, ow) in [(0, 37, 0, 53, 64, 64), (5, 20, 7, 30, 17, 90), (0, 1, 0, 53, 4, 9)]:
        rs = Resampler(r0, h, c0, w, oh, ow)
        want = F.interpolate(torch.from_numpy(src[r0:r0 + h, c0:c0 + w]).permute(2, 0, 1)[None], size=(oh, ow),
                             mode="bilinear", align_corners=True)[0].permute(1, 2, 0).numpy()
        for _ in range(2):  # the second call reuses the scratch buffers
            assert np.abs(rs(src) - want).max() < 1e-5
        assert np.abs(rs(src[..., 0]) - want[..., 0]).max() < 1e-5
