"""The Label Studio ML backend adapter at protocol level, against a fake Label Studio on 127.0.0.1 (fast).

Request shapes as Label Studio 1.23 sends them (label_studio/ml/api_connector.py: `_prep_prediction_req`,
`setup`; the labeling page's `regionFinishedDrawing` handler builds `context.result` from the serialized
smart keypoints of one label, each with `is_positive`). The real server is exercised by
tests/test_labelstudio_e2e.py.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from tests.conftest import blob_scene

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[serve]')")
pytest.importorskip("httpx", reason="httpx is not installed (pip install -e '.[dev]')")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from cfr_runtime import Session  # noqa: E402
from cfr_runtime.errors import CfrError  # noqa: E402
from cfr_runtime.serve import ServeConfig, SessionStore, UploadLimits, create_app  # noqa: E402
from cfr_runtime.serve.codec import decode_upload  # noqa: E402
from cfr_runtime.serve.labelstudio import (  # noqa: E402
    brush_module,
    brush_rle_to_mask,
    mask_to_brush_rle,
    model_version,
    parse_schema,
    to_pixel,
)

try:
    brush = brush_module()  # Label Studio's own codec (label-studio-sdk or label-studio-converter)
except CfrError as exc:
    pytest.skip(str(exc), allow_module_level=True)

TOKEN = "0123456789abcdef0123456789abcdef01234567"
CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="mask" toName="image"><Label value="Object" background="red"/></BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true">
    <Label value="Object" smart="true" background="blue" showInline="true"/>
  </KeyPointLabels>
</View>"""


# ---- a fake Label Studio: serves uploads to a valid token, counts requests --------------------------------
class FakeLS:
    def __init__(self, files: dict[str, bytes], token: str = TOKEN, access: str | None = None):
        self.files, self.token, self.access = files, token, access
        self.hits: list[tuple[str, str | None]] = []  # (path, Authorization header)
        self.redirects: dict[str, str] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                owner.hits.append((self.path, self.headers.get("Authorization")))
                if self.path in owner.redirects:
                    self.send_response(302)
                    self.send_header("Location", owner.redirects[self.path])
                    self.end_headers()
                    return
                if self.headers.get("Accept", "*/*") not in ("*/*", "application/json"):
                    self.send_response(406)  # Label Studio's file views (DRF content negotiation) refuse image/*
                    self.end_headers()
                    return
                wanted = {f"Token {owner.token}"} | ({f"Bearer {owner.access}"} if owner.access else set())
                if self.headers.get("Authorization") not in wanted:
                    self.send_response(401)
                    self.end_headers()
                    return
                body = owner.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def do_POST(self):  # the personal access token exchange
                n = int(self.headers.get("Content-Length", 0))
                sent = json.loads(self.rfile.read(n))
                owner.hits.append((self.path, json.dumps(sent)))
                ok = self.path == "/api/token/refresh/" and sent.get("refresh") == owner.token and owner.access
                out = json.dumps({"access": owner.access}).encode() if ok else b"{}"
                self.send_response(200 if ok else 401)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeLS:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def fetches(self, path: str) -> int:
        return sum(p == path for p, _ in self.hits)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb, issue 16 case 2)."""
    import struct
    import zlib

    raw = png(np.zeros((4, 4, 3), np.uint8))
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def scenes():
    """Two images of odd sizes (percent coordinates do not land on whole pixels)."""
    return {"/data/upload/1/a.png": png(blob_scene(3, 121, 163)[0]),
            "/data/upload/1/b.png": png(blob_scene(5, 97, 131)[0])}


@pytest.fixture()
def fake(scenes):
    with FakeLS(dict(scenes)) as ls:
        yield ls


def make_client(engine, monkeypatch, url: str | None, key: str | None = TOKEN, upload=UploadLimits(), **config):
    """A TestClient on an app told where the (fake) Label Studio is; requests carry Host: localhost, which the
    Host allowlist accepts (TestClient's default, testserver, is refused like any foreign name)."""
    for name, value in (("LABEL_STUDIO_URL", url), ("LABEL_STUDIO_API_KEY", key)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    config = ServeConfig(upload=upload, sweep_interval_s=3600, **config)
    store = SessionStore(engine, config.store)
    return TestClient(create_app(engine, config, store), base_url="http://localhost"), store


@pytest.fixture()
def api(engine, fake, monkeypatch):
    client, store = make_client(engine, monkeypatch, fake.url)
    with client:
        yield client, store, fake


# ---- Label Studio's request shapes -------------------------------------------------------------------------
def keypoint(x_pct: float, y_pct: float, positive: bool, size: tuple[int, int], i: int = 0) -> dict:
    """One smart keypoint as the labeling page serializes it (KeyPointRegion.serialize + is_positive)."""
    w, h = size
    return {"id": f"kp{i}", "from_name": "click", "to_name": "image", "type": "keypointlabels", "origin": "manual",
            "original_width": w, "original_height": h, "image_rotation": 0, "is_positive": positive,
            "value": {"x": x_pct, "y": y_pct, "width": 0.6, "keypointlabels": ["Object"]}}


def pixel_keypoint(x: int, y: int, positive: bool, size: tuple[int, int], i: int = 0) -> dict:
    """A keypoint placed in the middle of pixel (x, y), as a mouse click there gives."""
    w, h = size
    return keypoint(100 * (x + 0.5) / w, 100 * (y + 0.5) / h, positive, size, i)


def predict_body(task_id: int, path: str, results: list | None, config: str = CONFIG) -> dict:
    """`MLApi._prep_prediction_req` for an interactive call (context is None for batch pre-annotation)."""
    context = None if results is None else {"result": results}
    return {"tasks": [{"id": task_id, "data": {"image": path}, "annotations": [], "predictions": [], "drafts": []}],
            "project": "1.1767139200", "label_config": config,
            "params": {"login": None, "password": None, "context": context}}


def reference(engine, data: bytes, clicks) -> Session:
    s = Session(engine)
    s.set_image(decode_upload(data, UploadLimits()))
    for x, y, p in clicks:
        s.add_click(x, y, p)
    return s


def answer_mask(resp) -> tuple[np.ndarray, dict]:
    assert resp.status_code == 200, resp.text
    pred = resp.json()["results"][0]
    (region,) = pred["result"]
    assert region["type"] == "brushlabels" and region["value"]["format"] == "rle"
    mask = brush_rle_to_mask(region["value"]["rle"], region["original_width"], region["original_height"])
    return mask, pred


def assert_error(resp, status: int, match: str):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == "InputError" and match.lower() in body["message"].lower(), body


# ---- the protocol ----------------------------------------------------------------------------------------
def test_health_setup_versions(api, engine):
    client, _, fake = api
    for base in ("/labelstudio", "/labelstudio/CFR-2"):
        h = client.get(f"{base}/health")
        assert h.status_code == 200 and h.json()["status"] == "UP" and h.json()["model_class"] == "cfr-icl"
    assert client.get("/labelstudio/").json()["status"] == "UP"
    assert client.get("/health").json()["status"] == "ok"  # the app's own health is untouched
    # LS's MLApi.setup body: hostname and access_token are ignored (images come from LABEL_STUDIO_URL only)
    s = client.post("/labelstudio/setup", json={"project": "1.1767139200", "schema": CONFIG,
                                                "hostname": "http://attacker.example", "access_token": "x",
                                                "extra_params": None})
    assert s.status_code == 200
    version = s.json()["model_version"]
    assert version.startswith("cfr-icl-224-") and version.endswith("StdInfer")
    assert client.post("/labelstudio/A-CFR-4/setup", json={"schema": CONFIG}).json()["model_version"].endswith(
        "A-CFR-4")
    assert client.get("/labelstudio/versions").json() == {"versions": [version]}
    assert_error(client.post("/labelstudio/setup", json={"schema": "<View><Image name='i' value='$i'/></View>"}),
                 400, "BrushLabels")
    assert_error(client.post("/labelstudio/CFR-99/setup", json={"schema": CONFIG}), 400, "unknown mode")
    assert fake.hits == []  # setup fetched nothing, certainly not from the "hostname" it was given


def test_clicks_match_fresh_session_in_label_studio_order(api, engine, scenes):
    """The state rule: every answer equals a fresh Session fed the request's clicks in order, whatever the
    requests before it were (appends, a deleted middle keypoint, a reordering, another task in between)."""
    client, store, fake = api
    path_a, path_b = "/data/upload/1/a.png", "/data/upload/1/b.png"
    size_a, size_b = (163, 121), (131, 97)
    a, b, c, d = (80, 60, True), (10, 10, False), (100, 70, True), (120, 30, False)
    steps = [  # (task, path, size, clicks, forwards expected)
        (1, path_a, size_a, [a], 1),
        (1, path_a, size_a, [a, b], 1),  # one keypoint more: one forward
        (2, path_b, size_b, [(60, 50, True)], 1),  # another task in between
        (1, path_a, size_a, [a, b, c], 1),
        (1, path_a, size_a, [a, c], 1),  # the middle keypoint deleted: undo to [a], add c
        (1, path_a, size_a, [c, a], 2),  # same clicks, another order: a fresh start
        (1, path_a, size_a, [c, a, d], 1),
        (2, path_b, size_b, [(60, 50, True), (5, 90, False)], 1),
        (1, path_a, size_a, [c, a, d], 0),  # the same request again: nothing to run
    ]
    for i, (task, path, size, clicks, forwards) in enumerate(steps):
        results = [pixel_keypoint(x, y, p, size, k) for k, (x, y, p) in enumerate(clicks)]
        mask, pred = answer_mask(client.post("/labelstudio/predict", json=predict_body(task, path, results)))
        ref = reference(engine, scenes[path], clicks)
        assert np.array_equal(mask, ref.mask), f"step {i}: {np.count_nonzero(mask != ref.mask)} px differ"
        assert pred["cfr"]["forwards"] == forwards, f"step {i}"
        region = pred["result"][0]
        assert (region["from_name"], region["to_name"], region["value"]["brushlabels"]) == ("mask", "image",
                                                                                          ["Object"])
        assert (region["original_width"], region["original_height"]) == size
        assert 0.5 <= pred["score"] <= 1 and pred["model_version"].endswith("StdInfer")
    assert fake.fetches(path_a) == 1 and fake.fetches(path_b) == 1  # each task's image fetched once
    assert len(store) == 2
    assert all(auth == f"Token {TOKEN}" for _, auth in fake.hits)


def test_mode_route_matches_session_with_that_mode(api, engine, scenes):
    client, _, _ = api
    path = "/data/upload/1/a.png"
    results = [pixel_keypoint(80, 60, True, (163, 121))]
    mask, pred = answer_mask(client.post("/labelstudio/CFR-2/predict", json=predict_body(1, path, results)))
    ref = Session(engine, cfr=2)
    ref.set_image(decode_upload(scenes[path], UploadLimits()))
    ref.add_click(80, 60, True)
    assert np.array_equal(mask, ref.mask) and pred["cfr"]["forwards"] == 3
    assert pred["model_version"].endswith("CFR-2")


def test_no_context_and_no_clicks(api):
    client, store, fake = api
    r = client.post("/labelstudio/predict", json=predict_body(1, "/data/upload/1/a.png", None))
    assert r.status_code == 200 and r.json()["results"] == []  # batch pre-annotation: nothing without clicks
    r = client.post("/labelstudio/predict", json=predict_body(1, "/data/upload/1/a.png", []))
    assert r.status_code == 200  # every keypoint deleted: one empty suggestion clears the page's mask
    (pred,) = r.json()["results"]
    assert pred["result"] == [] and pred["score"] == 0.0


def test_webhook_drops_finished_tasks(api):
    client, store, fake = api
    path = "/data/upload/1/a.png"
    body = predict_body(7, path, [pixel_keypoint(80, 60, True, (163, 121))])
    assert client.post("/labelstudio/predict", json=body).status_code == 200
    assert len(store) == 1
    r = client.post("/labelstudio/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}})
    assert r.status_code == 200 and r.json()["dropped"] == 0 and len(store) == 1
    r = client.post("/labelstudio/webhook", json={"action": "ANNOTATION_CREATED", "task": {"id": 7},
                                                  "annotation": {"id": 3}, "project": {"id": 1}})
    assert r.json()["dropped"] == 1 and len(store) == 0
    assert client.post("/labelstudio/predict", json=body).status_code == 200  # re-fetched, same answer rule
    assert fake.fetches(path) == 2
    r = client.post("/labelstudio/webhook", json={"action": "TASKS_DELETED", "tasks": [{"id": 7}]})
    assert r.json()["dropped"] == 1


# ---- the shared limits (issue 16's design, app.state.gate) -------------------------------------------------
def test_predict_runs_in_the_fair_queue_as_the_client(engine, fake, monkeypatch):
    """A prediction takes a worker slot of the app's fair scheduler and its session is accounted to the client
    that asked (here told apart by X-Client-Id), as the page's and CVAT's requests are."""
    client, store = make_client(engine, monkeypatch, fake.url, client_identity="header")
    with client:
        work = client.app.state.work
        body = predict_body(1, "/data/upload/1/a.png", [pixel_keypoint(80, 60, True, (163, 121))])
        r = client.post("/labelstudio/predict", json=body, headers={"X-Client-Id": "annotator-7"})
        assert r.status_code == 200, r.text
        assert work.granted["id:annotator-7"] == 1  # one slot for the whole prediction
        assert [e.client for e in store._entries.values()] == ["id:annotator-7"]
        assert client.post("/labelstudio/predict", json={"tasks": []}, headers={"X-Client-Id": "annotator-7"}
                           ).status_code == 200
        assert work.granted["id:annotator-7"] == 2


def test_predict_counts_against_the_in_flight_limit(engine, fake, monkeypatch):
    """A client at its in-flight limit gets 429 before its body is read or its image fetched."""
    client, store = make_client(engine, monkeypatch, fake.url, client_max_inflight=1)
    with client:
        body = predict_body(1, "/data/upload/1/a.png", [pixel_keypoint(80, 60, True, (163, 121))])
        with client.app.state.work.admitted("testclient"):  # TestClient's peer address: one request in flight
            r = client.post("/labelstudio/predict", json=body)
        assert r.status_code == 429, r.text
        assert fake.hits == [] and len(store) == 0
        assert client.post("/labelstudio/predict", json=body).status_code == 200


def test_task_image_memory_reserved_before_decoding(engine, fake, monkeypatch):
    """The task image's memory is reserved from its header, against the store's cap, before a pixel is decoded;
    a file that cannot hold the pixels it claims is refused from its header too."""
    import cfr_runtime.serve.codec as codec
    from cfr_runtime.serve import StoreLimits

    decoded = []
    real = codec.decode_upload
    monkeypatch.setattr(codec, "decode_upload", lambda *a, **k: decoded.append(1) or real(*a, **k))
    kp = [pixel_keypoint(80, 60, True, (163, 121))]
    client, store = make_client(engine, monkeypatch, fake.url, store=StoreLimits(max_memory_mb=1))
    with client:
        r = client.post("/labelstudio/predict", json=predict_body(1, "/data/upload/1/a.png", kp))
        assert_error(r, 413, "the server's limit is 1 MB")
    assert decoded == [] and fake.fetches("/data/upload/1/a.png") == 1 and len(store) == 0
    fake.files["/data/upload/1/bomb.png"] = png_claiming(6000, 6000)
    client, store = make_client(engine, monkeypatch, fake.url)
    with client:
        kp = [pixel_keypoint(80, 60, True, (6000, 6000))]
        r = client.post("/labelstudio/predict", json=predict_body(2, "/data/upload/1/bomb.png", kp))
        assert_error(r, 400, "decompression bomb")
    assert decoded == [] and len(store) == 0


def test_webhook_forgets_the_task_in_every_mode(api):
    """A finished task's sessions go in every mode route, and no other task's (task 7 is not task 70)."""
    client, store, _ = api
    kp = [pixel_keypoint(80, 60, True, (163, 121))]
    for route, task in (("/labelstudio", 7), ("/labelstudio/CFR-2", 7), ("/labelstudio", 70)):
        assert client.post(f"{route}/predict", json=predict_body(task, "/data/upload/1/a.png", kp)).status_code == 200
    assert len(store) == 3
    r = client.post("/labelstudio/A-CFR-4/webhook", json={"action": "ANNOTATION_UPDATED", "task": {"id": 7}})
    assert r.status_code == 200 and r.json()["dropped"] == 2 and len(store) == 1
    assert client.post("/labelstudio/webhook", json={"action": "ANNOTATIONS_CREATED", "tasks": [{"id": 70}]}
                       ).json()["dropped"] == 1
    assert_error(client.post("/labelstudio/webhook", content=b"action=TASKS_DELETED",
                             headers={"Content-Type": "application/x-www-form-urlencoded"}), 415, "application/json")


def test_foreign_host_is_refused(engine, fake, monkeypatch):
    """The Host allowlist guards the Label Studio routes like the others (a real Label Studio calls the URL it
    was given, 127.0.0.1 here: tests/test_labelstudio_e2e.py)."""
    client, _ = make_client(engine, monkeypatch, fake.url)
    client.base_url = "http://testserver"
    with client:
        r = client.post("/labelstudio/predict", json=predict_body(1, "/data/upload/1/a.png", []))
        assert r.status_code == 400 and "Host 'testserver' is not served here" in r.json()["message"]
    assert fake.hits == []


# ---- what is refused -------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_url", [
    "http://evil.example/x.png",  # another host
    "file:///etc/passwd",  # another scheme
    "//127.0.0.2/x.png",  # scheme-relative: keeps its own host
    "https://{host}/data/upload/1/a.png",  # same host and port, other scheme
    "http://{host}@evil.example/a.png",  # userinfo trick: the host is evil.example
    "data:image/png;base64,iVBORw0KGgo=",
])
def test_ssrf_refused(api, image_url):
    client, store, fake = api
    url = image_url.format(host=fake.url.split("//")[1])
    r = client.post("/labelstudio/predict", json=predict_body(1, url, [pixel_keypoint(5, 5, True, (163, 121))]))
    assert_error(r, 400, "fetches images only from LABEL_STUDIO_URL")
    assert fake.hits == [] and len(store) == 0


def test_redirects(engine, fake, monkeypatch):
    with FakeLS({}) as other:  # a second server on another port: a different origin
        fake.redirects["/data/upload/1/moved.png"] = "/data/upload/1/a.png"
        fake.redirects["/data/upload/1/away.png"] = other.url + "/steal"
        client, store = make_client(engine, monkeypatch, fake.url)
        with client:
            kp = [pixel_keypoint(80, 60, True, (163, 121))]
            assert client.post("/labelstudio/predict",
                               json=predict_body(1, "/data/upload/1/moved.png", kp)).status_code == 200
            r = client.post("/labelstudio/predict", json=predict_body(2, "/data/upload/1/away.png", kp))
            assert_error(r, 502, "pre-signed URLs")  # how cloud storage with pre-signed URLs answers
        assert other.hits == []  # the token never left for the other origin


def test_cloud_storage_uri_goes_through_label_studio(engine, fake, scenes, monkeypatch):
    """s3:// (gs://, azure-blob://) task data is fetched from Label Studio's proxy for the task, as the SDK does."""
    uri = "s3://bucket/images/a.png"
    proxied = f"/tasks/5/presign/?fileuri={base64.urlsafe_b64encode(uri.encode()).decode()}"
    fake.files[proxied] = scenes["/data/upload/1/a.png"]
    client, _ = make_client(engine, monkeypatch, fake.url)
    with client:
        kp = [pixel_keypoint(80, 60, True, (163, 121))]
        assert client.post("/labelstudio/predict", json=predict_body(5, uri, kp)).status_code == 200
    assert fake.fetches(proxied) == 1


def test_fetch_failures(engine, fake, monkeypatch):
    kp = [pixel_keypoint(5, 5, True, (163, 121))]
    body = predict_body(1, "/data/upload/1/a.png", kp)
    client, _ = make_client(engine, monkeypatch, None)
    with client:
        assert_error(client.post("/labelstudio/predict", json=body), 503, "LABEL_STUDIO_URL")
    client, _ = make_client(engine, monkeypatch, fake.url, key=None)
    with client:
        assert_error(client.post("/labelstudio/predict", json=body), 502, "set LABEL_STUDIO_API_KEY")
    client, _ = make_client(engine, monkeypatch, fake.url, key="wrong")
    with client:
        assert_error(client.post("/labelstudio/predict", json=body), 502, "was refused")
        assert_error(client.post("/labelstudio/predict", json=predict_body(1, "/data/upload/1/none.png", kp)),
                     502, "answered 401")
    client, _ = make_client(engine, monkeypatch, fake.url, upload=UploadLimits(max_bytes=1000))
    with client:
        assert_error(client.post("/labelstudio/predict", json=body), 413, "limit")
    client, _ = make_client(engine, monkeypatch, fake.url, upload=UploadLimits(max_pixels=100 * 100))
    with client:
        assert_error(client.post("/labelstudio/predict", json=body), 413, "163x121")
    client, _ = make_client(engine, monkeypatch, "http://127.0.0.1:9")  # nothing listens on the discard port
    with client:
        assert_error(client.post("/labelstudio/predict", json=body), 502, "could not fetch")


def test_personal_access_token(engine, scenes, monkeypatch):
    """A Label Studio personal access token (a JWT refresh token) is exchanged, then sent as Bearer."""
    def jwt(claims: dict) -> str:
        enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")
        return f"{enc({'alg': 'HS256'})}.{enc(claims)}.sig"

    refresh = jwt({"token_type": "refresh", "exp": time.time() + 3600})
    access = jwt({"token_type": "access", "exp": time.time() + 300})
    with FakeLS(dict(scenes), token=refresh, access=access) as ls:
        client, _ = make_client(engine, monkeypatch, ls.url, key=refresh)
        with client:
            kp = [pixel_keypoint(80, 60, True, (163, 121))]
            for t in (1, 2):
                assert client.post("/labelstudio/predict",
                                   json=predict_body(t, "/data/upload/1/a.png", kp)).status_code == 200
        assert [p for p, _ in ls.hits].count("/api/token/refresh/") == 1  # the access token is reused
        assert [a for p, a in ls.hits if p.startswith("/data")] == [f"Bearer {access}"] * 2


def test_request_errors(api):
    client, store, _ = api
    path, size = "/data/upload/1/a.png", (163, 121)

    def post(results, config=CONFIG, **task):
        body = predict_body(1, path, results, config)
        body["tasks"][0].update(task)
        return client.post("/labelstudio/predict", json=body)

    kp = pixel_keypoint(80, 60, True, size)
    box = {**kp, "type": "rectanglelabels", "from_name": "box",
           "value": {"x": 10, "y": 10, "width": 20, "height": 20, "rectanglelabels": ["Object"]}}
    assert_error(post([box]), 400, "click model")
    assert_error(post([{**kp, "original_width": 500}]), 400, "placed on a 500x121 image, but the image is 163x121")
    assert_error(post([kp, {**kp, "original_height": 120}]), 400, "context.result[1] was placed on a 163x120 image")
    assert_error(post([{k: v for k, v in kp.items() if k != "original_width"}]), 400, "original_width")
    assert_error(post([{**kp, "value": {**kp["value"], "x": 101}}]), 400, "percentages")
    assert_error(post([{**kp, "value": {**kp["value"], "x": "5"}}]), 400, "percentages")
    assert_error(post([{**kp, "is_positive": "yes"}]), 400, "is_positive")
    assert_error(post([{**kp, "image_rotation": 90}]), 400, "rotated")
    assert_error(post([{**kp, "from_name": "other"}]), 400, "expected keypointlabels")
    assert_error(post([kp], config="<View>"), 400, "not valid XML")
    assert_error(post([kp], data={"picture": path}), 400, "no data field 'image'")
    two = CONFIG.replace('<Label value="Object" background="red"/>',
                         '<Label value="Cat" background="red"/><Label value="Dog"/>')
    assert_error(post([kp], config=two), 400, "same labels")
    assert_error(client.post("/labelstudio/predict", content=b"{", headers={"Content-Type": "application/json"}),
                 400, "not JSON")
    assert_error(client.post("/labelstudio/predict", json=[1]), 400, "JSON object")
    assert_error(client.post("/labelstudio/predict", content=b"{}", headers={"Content-Type": "text/plain"}), 415,
                 "application/json")
    body = predict_body(1, path, [kp])
    body["tasks"].append(body["tasks"][0])
    assert_error(client.post("/labelstudio/predict", json=body), 400, "one task")
    # 25 positive keypoints on an engine that takes 24: the runtime's own error, as a 400
    many = [pixel_keypoint(5 + i, 5, True, size, i) for i in range(25)]
    assert_error(post(many), 400, "at most 24")
    assert len(store) == 1


def test_bodies_are_named_and_held_as_the_client(engine, fake, monkeypatch):
    """Every route's refusal names its body exactly (the page shows it), and a body is held against the memory
    cap as the client that sent it, as its session is."""
    client, store = make_client(engine, monkeypatch, fake.url, client_identity="header")
    held, hold = [], store.hold
    monkeypatch.setattr(store, "hold", lambda nbytes, who: held.append(who) or hold(nbytes, who))
    h = {"X-Client-Id": "annotator-7"}

    def message(resp, status: int) -> str:
        assert resp.status_code == status, resp.text
        return resp.json()["message"]

    with client:
        for route, what in (("setup", "setup body"), ("webhook", "webhook body"), ("predict", "request body")):
            url = f"/labelstudio/{route}"
            assert message(client.post(url, content=b"{}", headers={**h, "Content-Type": "text/plain"}), 415
                           ).startswith(f"the Label Studio {what} must be sent as Content-Type: application/json")
            assert message(client.post(url, json=[1], headers=h), 400) == (
                f"the Label Studio {what} must be a JSON object")
            assert message(client.post(url, content=b"{", headers={**h, "Content-Type": "application/json"}), 400
                           ).startswith(f"the Label Studio {what} is not JSON (")
    assert held and set(held) == {"id:annotator-7"}


def test_predict_body_shapes(api, engine):
    """The request's shapes, each answered exactly: 'tasks' a list of objects, the context an object (under
    params, or at the top level as older Label Studio versions send it), none at all a batch request."""
    client, store, _ = api
    path, size = "/data/upload/1/a.png", (163, 121)
    kp = pixel_keypoint(80, 60, True, size)

    def answer(body, status: int):
        resp = client.post("/labelstudio/predict", json=body)
        assert resp.status_code == status, resp.text
        return resp.json()

    for tasks in ({"id": 1}, None, [{"id": 1}, "x"]):
        assert answer({**predict_body(1, path, [kp]), "tasks": tasks}, 400)["message"] == (
            "'tasks' must be a list of Label Studio tasks")
    body = predict_body(1, path, [kp])
    body["params"]["context"] = [kp]
    assert answer(body, 400)["message"] == "params.context must be an object with a 'result' list"
    batch = {"results": [], "model_version": model_version(engine, "StdInfer")}
    assert answer(predict_body(1, path, None), 200) == batch
    top = predict_body(1, path, None)
    del top["params"]
    top["context"] = {"result": [kp]}
    assert len(answer(top, 200)["results"][0]["result"]) == 1  # the context at the top level is read
    cleared = {"results": [{"result": [], "score": 0.0, "model_version": batch["model_version"]}]}
    no_result = predict_body(1, path, None)
    no_result["params"]["context"] = {"selected": []}
    assert answer(no_result, 200) == cleared  # a context without 'result': no keypoints, the mask cleared
    assert answer(predict_body(1, path, []), 200) == cleared


def test_prediction_region_label_and_score(api):
    """The region's id (10 hex digits, Label Studio's own length), the brush label of the keypoint's own label
    among several, and the score of an empty mask: 0, not the mean of nothing."""
    client, _, _ = api
    path, size = "/data/upload/1/a.png", (163, 121)
    two = CONFIG.replace('<Label value="Object" background="red"/>', '<Label value="Cat"/><Label value="Dog"/>')
    two = two.replace('<Label value="Object" smart="true" background="blue" showInline="true"/>',
                      '<Label value="Cat" smart="true"/><Label value="Dog" smart="true"/>')
    kp = pixel_keypoint(80, 60, True, size)
    kp["value"]["keypointlabels"] = ["Dog"]
    mask, pred = answer_mask(client.post("/labelstudio/predict", json=predict_body(1, path, [kp], two)))
    region = pred["result"][0]
    assert region["value"]["brushlabels"] == ["Dog"] and re.fullmatch("[0-9a-f]{10}", region["id"]), region["id"]
    assert {k: region[k] for k in ("type", "from_name", "to_name", "original_width", "original_height",
                                   "image_rotation", "readonly")} == {
        "type": "brushlabels", "from_name": "mask", "to_name": "image", "original_width": 163, "original_height": 121,
        "image_rotation": 0, "readonly": False}
    assert mask.any() and 0.5 <= pred["score"] <= 1
    negative = pixel_keypoint(80, 60, False, size)
    mask, pred = answer_mask(client.post("/labelstudio/predict", json=predict_body(3, path, [negative])))
    assert not mask.any() and pred["score"] == 0.0 and pred["result"][0]["score"] == 0.0


# ---- small pieces --------------------------------------------------------------------------------------
@given(st.integers(1, 5000), st.data())
def test_percent_to_pixel(n, data):
    px = data.draw(st.integers(0, n - 1))
    assert to_pixel(100 * (px + 0.5) / n, n) == px  # the middle of a pixel
    assert to_pixel(100 * px / n, n) == px  # its top-left corner, despite float round-off
    assert to_pixel(100.0, n) == n - 1 and to_pixel(0.0, n) == 0


def test_brush_rle_round_trip():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (37, 23)]:
        for m in (rng.random(shape) > 0.5, np.ones(shape, bool), np.zeros(shape, bool)):
            rle = mask_to_brush_rle(m)
            assert rle == brush.mask2rle(m.astype(np.uint8) * 255)  # Label Studio's encoder, not ours
            assert np.array_equal(brush_rle_to_mask(rle, shape[1], shape[0]), m)


def test_schema_variants():
    s = parse_schema(CONFIG)
    assert (s.image, s.data_key, s.brush, s.brush_labels, s.keypoints) == ("image", "image", "mask", ("Object",),
                                                                          frozenset({"click"}))
    assert s.brush_label("Object") == "Object" and s.brush_label(None) == "Object"
    # the first BrushLabels with keypoints on its image wins; an unrelated one is skipped
    two = CONFIG.replace("<View>", '<View><Image name="other" value="$other"/>'
                                   '<BrushLabels name="m2" toName="other"><Label value="X"/></BrushLabels>')
    assert parse_schema(two).brush == "mask"


def test_brush_codec_loads_without_the_converter_package():
    """Label Studio gives /setup 3 s; importing label_studio_converter's package pulls in pandas and nltk
    (seconds on a cold, busy machine), so the codec must be loaded from brush.py alone."""
    import subprocess
    import sys

    code = ("import sys; from cfr_runtime.serve.labelstudio import brush_module; m = brush_module(); "
            "heavy = sorted({'pandas', 'nltk', 'lxml'} & set(sys.modules)); print(m.__file__, heavy); "
            "sys.exit(1 if heavy or not hasattr(m, 'mask2rle') else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
