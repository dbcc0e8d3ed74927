"""cfr_runtime/serve/labelstudio.py pinned where mutation testing found it loose (issue 21, round 2): the
clicks read from Label Studio's context (every refusal compared whole: a person reads it in Label Studio), the
pieces of the answer (model version, brush label, task key) and the routes' answers, against the fake Label
Studio of tests/test_labelstudio.py and a real GrabCut object mask for the brush codec."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[serve]')")

from cfr_runtime.errors import CfrError, InputError  # noqa: E402
from cfr_runtime.serve import labelstudio as ls  # noqa: E402
from cfr_runtime.serve.codec import status_of  # noqa: E402
from cfr_runtime.session import Click  # noqa: E402
from tests.conftest import DATA, need  # noqa: E402

try:
    ls.brush_module()
except CfrError as exc:
    pytest.skip(str(exc), allow_module_level=True)

SCHEMA = ls.Schema("image", "image", "mask", ("Object",), frozenset({"click", "click2"}))


def kp(x=50.0, y=25.0, positive=True, size=(200, 100), **over) -> dict:
    r = {"from_name": "click", "to_name": "image", "type": "keypointlabels", "original_width": size[0],
         "original_height": size[1], "image_rotation": 0, "is_positive": positive,
         "value": {"x": x, "y": y, "keypointlabels": ["Object"]}}
    r.update(over)
    return r


def refused(fn, *args) -> tuple[int, str]:
    with pytest.raises(InputError) as info:
        fn(*args)
    return status_of(info.value), str(info.value)


# ---- pixels and numbers --------------------------------------------------------------------------------------
def test_to_pixel_edges():
    assert ls.to_pixel(0, 10) == 0 and ls.to_pixel(100, 10) == 9 and ls.to_pixel(99.99, 10) == 9
    assert ls.to_pixel(-5, 10) == 0 and ls.to_pixel(150, 10) == 9
    assert ls.to_pixel(50, 131) == 65  # 65.5: the pixel it lies in
    assert ls.to_pixel(100 * 80 / 131, 131) == 80  # 79.99999999 px from round-off: still pixel 80
    assert ls.to_pixel(100 * 79.9999 / 131, 131) == 79  # a real 79.9999 px is pixel 79 (the tolerance is 1e-6)
    assert ls.to_pixel(10, 1) == 0


def test_number_and_side():
    assert ls._number(0) and ls._number(2.5) and ls._number(-1)
    for bad in (True, False, float("nan"), float("inf"), "1", None, [1]):
        assert not ls._number(bad)
    assert ls._side(1) and ls._side(4000)
    for bad in (0, -1, True, 1.0, "5", None):
        assert not ls._side(bad)


# ---- clicks from the context -----------------------------------------------------------------------------------
def test_clicks_in_label_studio_order():
    results = [kp(50, 25), kp(10.25, 99.9, False, from_name="click2"), kp(100, 0)]
    del results[2]["is_positive"]  # not sent: a positive keypoint
    del results[2]["to_name"]  # not sent: on the schema's image
    del results[2]["image_rotation"]  # not sent: an image that was never rotated
    clicks, label, size = ls.clicks_from_context(results, SCHEMA)
    assert clicks == [Click(100.0, 25.0, True), Click(20.0, 99.0, False), Click(199.0, 0.0, True)]
    assert all(isinstance(c.x, float) for c in clicks)
    assert label == "Object" and size == (200, 100)
    assert ls.clicks_from_context([], SCHEMA) == ([], None, None)
    first = kp()
    first["value"]["keypointlabels"] = []
    second = kp()
    second["value"]["keypointlabels"] = ["Cat", "Dog"]
    assert ls.clicks_from_context([first, second], SCHEMA)[1] == "Cat"  # the first keypoint that has a label
    none = kp(image_rotation=None)
    none["value"]["keypointlabels"] = "Cat"  # not a list: no label
    assert ls.clicks_from_context([none], SCHEMA)[1] is None


@pytest.mark.parametrize("region,message", [
    ("x", "context.result[0] is not a Label Studio region with a 'value'"),
    ({"type": "keypointlabels"}, "context.result[0] is not a Label Studio region with a 'value'"),
    ({"value": []}, "context.result[0] is not a Label Studio region with a 'value'"),
    (kp(type="RectangleLabels"), "context.result[0] is a box: CFR-ICL is a click model; use a smart KeyPointLabels "
                                 "(click for the object, Alt+click for background)"),
    (kp(type="brushlabels"), "context.result[0] is brushlabels from 'click'; expected keypointlabels from one of "
                             "['click', 'click2']"),
    (kp(type=None, from_name="x"), "context.result[0] is none from 'x'; expected keypointlabels from one of "
                                   "['click', 'click2']"),
    ({**kp(), "type": ""}, "context.result[0] is untyped from 'click'; expected keypointlabels from one of "
                           "['click', 'click2']"),
    ({k: v for k, v in kp().items() if k != "type"}, "context.result[0] is untyped from 'click'; expected "
                                                      "keypointlabels from one of ['click', 'click2']"),
    (kp(from_name="other"), "context.result[0] is keypointlabels from 'other'; expected keypointlabels from one of "
                            "['click', 'click2']"),
    (kp(to_name="other"), "context.result[0] is on 'other', not on the image 'image'"),
    (kp(image_rotation=90), "context.result[0] was placed on an image rotated by 90 degrees in Label Studio; reset "
                            "the rotation and click again"),
    (kp(original_width=0), "context.result[0]: original_width and original_height must be the pixel size of the "
                           "image the keypoint was placed on (Label Studio sends them with every keypoint), got 0 x "
                           "100"),
    (kp(original_height=None), "context.result[0]: original_width and original_height must be the pixel size of "
                               "the image the keypoint was placed on (Label Studio sends them with every keypoint), "
                               "got 200 x None"),
    (kp(x=100.5), "context.result[0]: value.x and value.y must be percentages in [0, 100], got x=100.5, y=25.0"),
    (kp(y=-0.1), "context.result[0]: value.x and value.y must be percentages in [0, 100], got x=50.0, y=-0.1"),
    (kp(y=100.5), "context.result[0]: value.x and value.y must be percentages in [0, 100], got x=50.0, y=100.5"),
    (kp(x=True), "context.result[0]: value.x and value.y must be percentages in [0, 100], got x=True, y=25.0"),
    (kp(positive=1), "context.result[0]: is_positive must be true or false, got 1"),
])
def test_context_refusals(region, message):
    assert refused(ls.clicks_from_context, [region], SCHEMA) == (400, message)


def test_context_refusals_name_the_region_and_sizes():
    assert refused(ls.clicks_from_context, {"result": []}, SCHEMA) == (
        400, "context.result must be a list of regions, got dict")
    assert refused(ls.clicks_from_context, [kp(), kp(size=(200, 101))], SCHEMA) == (
        400, "context.result[1] was placed on a 200x101 image, but context.result[0] on a 200x100 image")
    assert refused(ls.clicks_from_context, [kp(), kp(), kp(x=-1)], SCHEMA)[1].startswith("context.result[2]: ")
    # the edges of the percent range are accepted
    clicks, _, _ = ls.clicks_from_context([kp(0, 0), kp(100, 100)], SCHEMA)
    assert clicks == [Click(0.0, 0.0, True), Click(199.0, 99.0, True)]


# ---- pieces of the answer --------------------------------------------------------------------------------------
def test_brush_label():
    assert SCHEMA.brush_label("Object") == "Object" and SCHEMA.brush_label("Other") == "Object"
    two = ls.Schema("image", "image", "mask", ("Cat", "Dog"), frozenset({"click"}))
    assert two.brush_label("Dog") == "Dog"
    assert refused(two.brush_label, "Bird") == (
        400, "the keypoint label 'Bird' has no BrushLabels label of the same value in <BrushLabels name='mask'> "
             "(labels ['Cat', 'Dog']); give both tags the same labels")
    assert refused(two.brush_label, None)[1].startswith("the keypoint label None has no BrushLabels label")


def test_model_version_mode_and_keys():
    engine = SimpleNamespace(contract=SimpleNamespace(input_size=224, precision="fp32",
                                                      checkpoint_sha256="0123456789abcdef0123"))
    assert ls.model_version(engine, "CFR-2") == "cfr-icl-224-fp32-0123456789ab-CFR-2"
    engine.contract.checkpoint_sha256 = None
    assert ls.model_version(engine, "StdInfer") == "cfr-icl-224-fp32-unknown-StdInfer"
    assert ls.canonical_mode(" A-CFR-4") == "A-CFR-4" and ls.canonical_mode("StdInfer") == "StdInfer"
    with pytest.raises(InputError, match="^unknown mode 'fast'"):
        ls.canonical_mode("fast")
    assert ls.task_key(17) == "labelstudio|17|"
    assert ls.json_object(b'{"a": 1}', "body") == {"a": 1}
    assert refused(ls.json_object, b"", "Label Studio webhook body") == (
        400, "the Label Studio webhook body must be a JSON object")
    assert refused(ls.json_object, b"[1]", "X")[1] == "the X must be a JSON object"
    assert refused(ls.json_object, b"{", "X")[1].startswith("the X is not JSON (")


def test_task_image():
    seen = []
    fetcher = SimpleNamespace(resolve=lambda value, task_id: seen.append((value, task_id)) or "http://ls/x.png")
    assert ls.task_image({"id": 4, "data": {"image": "/data/x.png"}}, SCHEMA, fetcher) == (4, "http://ls/x.png")
    assert seen == [("/data/x.png", 4)]
    for task in ({"data": {"image": "x"}}, {"id": "4", "data": {}}, {"id": True, "data": {}}):
        assert refused(ls.task_image, task, SCHEMA, fetcher) == (400, "the task has no integer 'id'")
    for data in (None, {"picture": "x"}, "x"):
        assert refused(ls.task_image, {"id": 4, "data": data}, SCHEMA, fetcher) == (
            400, "task 4 has no data field 'image' (the <Image name='image'> reads $image)")
    assert seen == [("/data/x.png", 4)]


def test_brush_codec_on_a_real_object_mask():
    path = sorted(need(DATA / "GrabCut" / "masks").iterdir())[0]
    gt = np.asarray(Image.open(path))
    gt = (gt if gt.ndim == 2 else gt[..., 0]) > 127
    h, w = gt.shape
    rle = ls.mask_to_brush_rle(gt)
    assert rle == ls.brush_module().mask2rle(gt.astype(np.uint8) * 255)
    back = ls.brush_rle_to_mask(rle, w, h)
    assert back.dtype == bool and np.array_equal(back, gt)
    assert refused(ls.brush_rle_to_mask, rle, w + 1, h) == (400, f"brush RLE holds {w * h * 4} values, expected "
                                                                 f"{w + 1}x{h}x4")


def test_brush_codec_thresholds_alpha_and_takes_any_truthy_mask():
    """Label Studio's brush RLE holds RGBA; a pixel is in the mask when its alpha is past half (128 and up), and
    mask_to_brush_rle paints every truthy pixel at full alpha whatever the mask's dtype (0/255 bytes, 0/1 floats:
    255 * 255 wraps to 1 in uint8, which would decode as background)."""
    alpha = np.array([[0, 126, 127], [128, 129, 255]], np.uint8)
    rle = ls.brush_module().mask2rle(alpha)  # each value in all four channels
    assert ls.brush_rle_to_mask(rle, 3, 2).tolist() == [[False, False, False], [True, True, True]]
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:4] = True
    want = ls.mask_to_brush_rle(mask)
    for other in (mask.astype(np.uint8) * 255, mask.astype(np.float32), mask.astype(np.int64) * 7):
        assert ls.mask_to_brush_rle(other) == want
    assert np.array_equal(ls.brush_rle_to_mask(want, 5, 4), mask)


# ---- the routes' answers (round 4: the survivors of add_labelstudio_routes) ------------------------------------
# Against the fake Label Studio of tests/test_labelstudio.py (imported in a fixture: that module skips itself when
# httpx is missing, which must not skip the unit tests above).
@pytest.fixture(scope="module")
def tl():
    from tests import test_labelstudio

    return test_labelstudio


@pytest.fixture(scope="module")
def engine():
    from cfr_runtime import Engine, default_model

    return Engine(default_model())


@pytest.fixture()
def fake(tl):
    with tl.FakeLS({"/data/upload/1/a.png": tl.png(tl.blob_scene(3, 121, 163)[0])}) as server:
        yield server


@pytest.fixture()
def api(tl, engine, fake, monkeypatch):
    client, store = tl.make_client(engine, monkeypatch, fake.url)
    with client:
        yield client, store


ROUTES = {"/health": "get", "/setup": "post", "/predict": "post", "/versions": "get", "/webhook": "post"}
TAG = "Label Studio ML backend"


def test_health_answers_in_full(api, engine, fake):
    """Label Studio's 'Validate and save' shows the health answer; the mode's own model version is in it."""
    client, _ = api
    for url, mode in (("/labelstudio/health", "StdInfer"), ("/labelstudio/CFR-2/health", "CFR-2"),
                      ("/labelstudio/", "StdInfer")):
        r = client.get(url)
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "UP", "model_class": "cfr-icl", "model_version": ls.model_version(engine, mode),
                            "label_studio_url": fake.url}, url
    assert ls.model_version(engine, "CFR-2").endswith("-CFR-2")


def test_prediction_reports_clicks_forwards_area_and_server_time(api, tl, monkeypatch):
    """The answer's `cfr` block (what a client logs per click): the clicks read, the forwards they cost, the mask's
    area and the server's time in ms to the microsecond, from the clock read at the request's start and end."""
    client, _ = api
    ticks = [100.0, 100.0123456]  # 12.3456 ms between the request's arrival and its rendered answer
    monkeypatch.setattr(ls, "time", SimpleNamespace(perf_counter=lambda: ticks.pop(0)))
    size = (163, 121)
    results = [tl.pixel_keypoint(80, 60, True, size), tl.pixel_keypoint(10, 10, False, size, 1)]
    mask, pred = tl.answer_mask(client.post("/labelstudio/predict", json=tl.predict_body(1, "/data/upload/1/a.png",
                                                                                         results)))
    assert ticks == []  # read twice: at the start and at the end
    assert mask.any()
    assert pred["cfr"] == {"clicks": 2, "forwards": 2, "area": int(mask.sum()), "server_ms": 12.346}
    assert isinstance(pred["cfr"]["server_ms"], float)


def test_webhook_answers_in_full_and_forgets_only_integer_task_ids(api, tl):
    """Label Studio logs the webhook's answer; an event is acknowledged whatever it is, and forgets a task's
    sessions only by its integer id (a string "7", a bool, a missing id name no task)."""
    client, store = api
    body = tl.predict_body(7, "/data/upload/1/a.png", [tl.pixel_keypoint(80, 60, True, (163, 121))])
    assert client.post("/labelstudio/predict", json=body).status_code == 200
    r = client.post("/labelstudio/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}})
    assert r.status_code == 200 and r.json() == {"status": "ok", "action": "PROJECT_UPDATED", "dropped": 0}
    for task in ({"id": "7"}, {"id": True}, {"id": None}, {}):
        r = client.post("/labelstudio/webhook", json={"action": "ANNOTATION_CREATED", "task": task})
        assert r.status_code == 200 and r.json() == {"status": "ok", "action": "ANNOTATION_CREATED", "dropped": 0}
        assert len(store) == 1, task
    r = client.post("/labelstudio/webhook", json={"action": "ANNOTATION_CREATED", "task": {"id": 7}})
    assert r.json() == {"status": "ok", "action": "ANNOTATION_CREATED", "dropped": 1} and len(store) == 0


@pytest.mark.parametrize("route", ["setup", "webhook"])
def test_setup_and_webhook_count_against_the_clients_in_flight_limit(tl, engine, fake, monkeypatch, route):
    """/setup and /webhook are counted against the client that sent them, as /predict is: 429 at its limit."""
    client, _ = tl.make_client(engine, monkeypatch, fake.url, client_max_inflight=1)
    body = {"schema": tl.CONFIG} if route == "setup" else {"action": "PROJECT_UPDATED"}
    with client:
        with client.app.state.work.admitted("testclient"):  # TestClient's peer: one request of its own in flight
            r = client.post(f"/labelstudio/{route}", json=body)
            assert r.status_code == 429, r.text
            assert "this client already has 1 requests in progress" in r.json()["message"]
        assert client.post(f"/labelstudio/{route}", json=body).status_code == 200


def test_routes_are_listed_together_in_the_api_docs(api):
    """/docs (the OpenAPI schema) groups the ML backend's routes under one tag, each with its one method, both
    under /labelstudio and /labelstudio/{mode}; the bare /labelstudio/ alias of health is not listed."""
    client, _ = api
    paths = client.get("/openapi.json").json()["paths"]
    for base in ("/labelstudio", "/labelstudio/{mode}"):
        for route, method in ROUTES.items():
            ops = paths[base + route]
            assert list(ops) == [method], (base, route)
            assert ops[method]["tags"] == [TAG], (base, route)
    assert "/labelstudio/" not in paths
    assert sorted(p for p in paths if p.startswith("/labelstudio")) == sorted(
        base + route for base in ("/labelstudio", "/labelstudio/{mode}") for route in ROUTES)
