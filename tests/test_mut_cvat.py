"""cfr_runtime/serve/cvat.py pinned where mutation testing found it loose (issue 21, round 2): the request's
validation and messages, the answer's bytes (JSON rows, bounds, the empty mask) and `interact` on a real frame
(GrabCut) with repeated and mixed clicks, compared with a fresh Session fed the documented order."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pydantic", reason="pydantic is not installed (pip install -e '.[serve]')")

from cfr_runtime import Engine, Session, default_model  # noqa: E402
from cfr_runtime.errors import InputError  # noqa: E402
from cfr_runtime.serve import cvat  # noqa: E402
from cfr_runtime.serve.codec import UploadLimits, status_of  # noqa: E402
from cfr_runtime.serve.store import SessionStore  # noqa: E402
from cfr_runtime.session import Click  # noqa: E402
from tests.conftest import DATA, need  # noqa: E402


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(default_model())


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    """A GrabCut photograph, cropped to 160 x 120 around its object (quick forwards, a real scene)."""
    images = need(DATA / "GrabCut" / "images")
    rgb = np.asarray(Image.open(sorted(images.iterdir())[0]).convert("RGB"))
    h, w = rgb.shape[:2]
    return np.ascontiguousarray(rgb[h // 2 - 60:h // 2 + 60, w // 2 - 80:w // 2 + 80])


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def body(rgb: np.ndarray, pos, neg=(), **extra) -> dict:
    return {"image": base64.b64encode(png(rgb)).decode(), "pos_points": [list(p) for p in pos],
            "neg_points": [list(p) for p in neg], **extra}


def refused(fn, *args) -> tuple[int, str]:
    with pytest.raises(InputError) as info:
        fn(*args)
    return status_of(info.value), str(info.value)


# ---- the request --------------------------------------------------------------------------------------------
def test_click_order_is_positives_then_negatives():
    assert cvat.click_order([[1, 2], [3.5, 4]], [[5, 6]]) == [Click(1.0, 2.0, True), Click(3.5, 4.0, True),
                                                              Click(5.0, 6.0, False)]
    assert cvat.click_order([], [[5, 6], [1, 1]]) == [Click(5.0, 6.0, False), Click(1.0, 1.0, False)]
    assert all(isinstance(c.x, float) and isinstance(c.y, float) for c in cvat.click_order([[1, 2]], [[3, 4]]))


def test_parse_request_accepts_what_cvat_sends():
    raw = json.dumps({"image": "AAAA", "pos_points": [[1, 2]], "task": 3, "frame": 0}).encode()
    for given in (raw, raw.decode(), json.loads(raw)):
        req = cvat.parse_request(given)
        assert req.pos_points == [[1.0, 2.0]] and req.neg_points == [] and req.threshold is None
        assert req.obj_bbox is None
    req = cvat.parse_request({"image": "AAAA", "pos_points": [[1, 2]] * cvat.MAX_POINTS,
                              "neg_points": [[0, 0]] * cvat.MAX_POINTS, "threshold": 0.25, "obj_bbox": [1, 2]})
    assert len(req.pos_points) == len(req.neg_points) == 1000 and req.threshold == 0.25


def test_parse_request_errors_name_the_problem():
    assert refused(cvat.parse_request, b"[1, 2]") == (
        422, "not a CVAT interactor request: the body must be a JSON object")
    assert refused(cvat.parse_request, {"image": "AAAA", "pos_points": []}) == (
        400, "CVAT interactor request without positive points (the function needs at least 1)")
    status, msg = refused(cvat.parse_request, {"pos_points": [[1, 1]]})
    assert status == 422 and msg == "not a CVAT interactor request: image: Field required"
    status, msg = refused(cvat.parse_request, {"image": "A", "pos_points": [[1, 2, 3]], "neg_points": [[1]]})
    assert status == 422 and msg.startswith("not a CVAT interactor request: pos_points.0: ")
    assert "; neg_points.0: " in msg
    status, msg = refused(cvat.parse_request, {"image": "", "pos_points": [[1, 1]]})
    assert status == 422 and msg.startswith("not a CVAT interactor request: image: ")
    status, msg = refused(cvat.parse_request, {"image": "A", "pos_points": [[1, 1]] * 1001})
    assert status == 422 and msg.startswith("not a CVAT interactor request: pos_points: ")
    status, msg = refused(cvat.parse_request, {"image": "A", "pos_points": [[1, 1]], "neg_points": [[1, 1]] * 1001})
    assert status == 422 and msg.startswith("not a CVAT interactor request: neg_points: ")
    status, msg = refused(cvat.parse_request, {"image": "A", "pos_points": [[float("inf"), 1]]})
    assert status == 422 and "pos_points.0.0" in msg


@pytest.mark.parametrize("t", [0, 1, 1.5, -0.1, float("nan"), float("inf")])
def test_threshold_must_be_a_probability(t):
    status, msg = refused(cvat.parse_request, {"image": "A", "pos_points": [[1, 1]], "threshold": t})
    assert status == 422 and msg == (f"not a CVAT interactor request: threshold: Value error, threshold must be a "
                                     f"probability strictly between 0 and 1, got {float(t)}")


def test_threshold_inside_the_open_interval():
    for t in (1e-9, 0.5, 1 - 1e-9):
        assert cvat.parse_request({"image": "A", "pos_points": [[1, 1]], "threshold": t}).threshold == t


# ---- the answer ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 1), (5, 9)])
def test_mask_rows_json_is_the_json_of_the_rows(shape):
    rng = np.random.default_rng(shape[0] * 10 + shape[1])
    mask = rng.random(shape) < 0.5
    out = cvat.mask_rows_json(mask, b'{"a":', b',"b":2}')
    assert out == b'{"a":' + json.dumps(mask.astype(int).tolist(), separators=(",", ":")).encode() + b',"b":2}'
    assert cvat.mask_rows_json(mask) == json.dumps(mask.astype(int).tolist(), separators=(",", ":")).encode()


def test_answer_is_the_mask_cropped_to_its_box():
    mask = np.zeros((30, 40), bool)
    mask[5:9, 12:20] = True
    mask[11, 25] = True
    ans = json.loads(cvat.answer_bytes(mask, forwards=2, server_ms=1.5))
    assert ans["bounds"] == [12, 5, 25, 11] and ans["forwards"] == 2 and ans["server_ms"] == 1.5
    assert "points" not in ans
    assert np.array_equal(np.asarray(ans["mask"], bool), mask[5:12, 12:26])
    assert list(json.loads(cvat.answer_bytes(mask, x=1))) == ["mask", "x", "bounds"]
    whole = json.loads(cvat.answer_bytes(mask, crop=False))
    assert whole["bounds"] == [0, 0, 39, 29] and np.array_equal(np.asarray(whole["mask"], bool), mask)
    empty = json.loads(cvat.answer_bytes(np.zeros((30, 40), bool), crop=False, forwards=1))
    assert empty == {"mask": [[0]], "forwards": 1, "points": [], "bounds": [0, 0, 0, 0]}
    corner = np.zeros((3, 4), bool)
    corner[2, 3] = True
    assert json.loads(cvat.answer_bytes(corner)) == {"mask": [[1]], "bounds": [3, 2, 3, 2]}


# ---- interact on a real frame --------------------------------------------------------------------------------
def fresh(engine, rgb, clicks, threshold=None):
    s = Session(engine)
    s.set_image(rgb)
    for x, y, p in clicks:
        s.add_click(x, y, p)
    return s.mask if threshold is None else s.probs > threshold


def full_mask(answer: dict, shape) -> np.ndarray:
    left, top, right, bottom = answer["bounds"]
    out = np.zeros(shape, bool)
    out[top:bottom + 1, left:right + 1] = np.asarray(answer["mask"], bool)
    return out if answer.get("points") != [] else np.zeros(shape, bool)


def test_interact_answers_a_fresh_session_in_the_documented_order(engine, frame):
    store = SessionStore(engine)
    p1, p2, n1 = (80, 60), (100, 70), (20, 15)
    # repeated and mixed: p1 twice, a negative between positives as the person clicked them
    steps = [([p1], []), ([p1, p1], []), ([p1, p1], [n1]), ([p1, p1, p2], [n1])]
    for pos, neg in steps:
        ans = json.loads(cvat.interact(store, body(frame, pos, neg), limits=UploadLimits()))
        ref = fresh(engine, frame, [(*p, True) for p in pos] + [(*n, False) for n in neg])
        assert np.array_equal(full_mask(ans, frame.shape[:2]), ref), (pos, neg)
        assert ans["server_ms"] >= 0
    assert len(store) == 1
    key = "cvat:" + hashlib.sha256(body(frame, [p1])["image"].encode()).hexdigest() + "|StdInfer"
    assert len(store.by_key(key)) == 1 and store.by_key(key)[0].session.clicks == [
        Click(80.0, 60.0, True), Click(80.0, 60.0, True), Click(100.0, 70.0, True), Click(20.0, 15.0, False)]


def test_interact_threshold_mode_and_crop(engine, frame):
    store = SessionStore(engine)
    b = body(frame, [(80, 60)], threshold=0.8)
    ans = json.loads(cvat.interact(store, b, limits=UploadLimits(), crop=False))
    assert ans["bounds"] == [0, 0, 159, 119] or ans.get("points") == []
    assert np.array_equal(full_mask(ans, frame.shape[:2]), fresh(engine, frame, [(80, 60, True)], 0.8))
    cfr = json.loads(cvat.interact(store, body(frame, [(80, 60)]), limits=UploadLimits(), mode="CFR-2", start=0.0))
    assert cfr["forwards"] == 3 and cfr["server_ms"] > 1000  # measured from the given start
    s = Session(engine, cfr=2)
    s.set_image(frame)
    assert np.array_equal(full_mask(cfr, frame.shape[:2]), s.add_click(80, 60))
    assert {e.client for e in store._entries.values()} == {"-"}
    # the cache is shared between clients; a new session is accounted to the client that opened it
    cvat.interact(store, body(frame[::-1].copy(), [(10, 10)]), limits=UploadLimits(), client="10.0.0.9")
    assert sorted(e.client for e in store._entries.values()) == ["-", "-", "10.0.0.9"]


def test_interact_composites_transparency_over_white(engine, frame):
    rgba = np.dstack([frame, np.full(frame.shape[:2], 255, np.uint8)])
    rgba[:, :40, 3] = 0
    store = SessionStore(engine)
    ans = json.loads(cvat.interact(store, body(rgba, [(100, 60)]), limits=UploadLimits()))
    white = frame.copy()
    white[:, :40] = 255
    assert np.array_equal(full_mask(ans, frame.shape[:2]), fresh(engine, white, [(100, 60, True)]))
    entry = next(iter(store._entries.values()))
    assert entry.session._image[:, :40].min() == 1.0  # what the model saw: white, not the hidden colour


def test_interact_refuses_an_image_over_the_limits(engine, frame):
    store = SessionStore(engine)
    b = body(frame, [(10, 10)])
    status, msg = refused(lambda: cvat.interact(store, b, limits=UploadLimits(max_bytes=100)))
    assert status == 413 and msg.startswith("the CVAT request's 'image' is ")
    b["image"] = "@@@@"
    assert refused(lambda: cvat.interact(store, b, limits=UploadLimits())) == (
        400, "the CVAT request's 'image' is not valid base64")


def test_answer_bytes_are_compact_json():
    corner = np.zeros((3, 4), bool)
    corner[2, 3] = True
    assert cvat.answer_bytes(corner, forwards=1) == b'{"mask":[[1]],"forwards":1,"bounds":[3,2,3,2]}'
    assert cvat.answer_bytes(np.zeros((3, 4), bool)) == b'{"mask":[[0]],"points":[],"bounds":[0,0,0,0]}'


def test_interact_crops_by_default(engine):
    from tests.conftest import blob_scene

    rgb = blob_scene(3, 120, 160)[0]  # one small object: its box is well inside the frame
    store = SessionStore(engine)
    ans = json.loads(cvat.interact(store, body(rgb, [(80, 60)]), limits=UploadLimits()))
    left, top, right, bottom = ans["bounds"]
    mask = fresh(engine, rgb, [(80, 60, True)])
    ys, xs = np.nonzero(mask)
    assert [left, top, right, bottom] == [xs.min(), ys.min(), xs.max(), ys.max()] != [0, 0, 159, 119]


def test_body_that_is_not_json_is_named():
    status, msg = refused(cvat.parse_request, b"{nope")
    assert status == 400 and msg.startswith("the CVAT request body is not JSON (")


def test_threshold_is_strict(engine, frame):
    """A CVAT threshold keeps the pixels strictly above it, as the Session's own threshold does."""
    s = Session(engine)
    s.set_image(frame)
    s.add_click(80, 60)
    probs = s.probs
    inside = probs[(probs > 0.05) & (probs < 0.95)]
    t = float(inside[len(inside) // 2])  # a probability some pixel has exactly
    ans = json.loads(cvat.interact(SessionStore(engine), body(frame, [(80, 60)], threshold=t),
                                   limits=UploadLimits(), crop=False))
    got = np.asarray(ans["mask"], bool)
    assert np.array_equal(got, probs > t) and not np.array_equal(got, probs >= t)


def test_server_ms_is_the_time_since_start_in_ms(engine, frame, monkeypatch):
    monkeypatch.setattr(cvat, "time", SimpleNamespace(perf_counter=lambda: 3.23456789))
    ans = json.loads(cvat.interact(SessionStore(engine), body(frame, [(80, 60)]), limits=UploadLimits(), start=2.0))
    assert ans["server_ms"] == 1234.568
