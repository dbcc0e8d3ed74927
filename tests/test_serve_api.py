"""cfr-serve's HTTP API: every endpoint and error, expiry/LRU, isolation, concurrency, the CVAT adapter."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib

import numpy as np
import pytest

from tests.conftest import blob_scene

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[serve]')")
pytest.importorskip("httpx", reason="httpx is not installed (pip install -e '.[dev]')")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from cfr_runtime import Session  # noqa: E402
from cfr_runtime.serve import ServeConfig, SessionStore, StoreLimits, UploadLimits, create_app  # noqa: E402
from cfr_runtime.serve.codec import decode_upload, mask_rle, rle_to_mask  # noqa: E402
from cfr_runtime.serve.memory import creation_bytes, resident_bytes  # noqa: E402
from tests.serve_fixtures import FakeClock, encode  # noqa: E402


@pytest.fixture(scope="module")
def scene():
    rgb, gt = blob_scene(3, 120, 160)
    return rgb, gt


def make(engine, store_limits=StoreLimits(), upload=UploadLimits()):
    clock = FakeClock()
    config = ServeConfig(store=store_limits, upload=upload, sweep_interval_s=3600)
    store = SessionStore(engine, config.store, clock=clock)
    return TestClient(create_app(engine, config, store), base_url="http://localhost"), store, clock


@pytest.fixture()
def api(engine):
    client, store, clock = make(engine)
    with client:
        yield client, store, clock


def upload(client, data: bytes, ctype="image/png", mode="StdInfer"):
    return client.post(f"/sessions?mode={mode}", content=data, headers={"Content-Type": ctype})


def reference(engine, data: bytes, clicks, mode=(0, False)) -> Session:
    s = Session(engine, cfr=mode[0], adaptive=mode[1])
    s.set_image(decode_upload(data, UploadLimits()))
    for x, y, p in clicks:
        s.add_click(x, y, p)
    return s


def png_mask(answer: dict) -> np.ndarray:
    assert answer["mask"]["format"] == "png"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask"]["data"]))).convert("L")) > 127


def assert_error(resp, status: int, error: str, match: str = ""):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == error, body
    assert match.lower() in body["message"].lower(), body


# ---- the happy path: every endpoint -------------------------------------------------------------------
def test_health_and_page(api):
    client, _, _ = api
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["input_size"] == 224 and h["sessions"] == 0
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "/static/app.js" in page.text
    assert "drawMask" in client.get("/static/app.js").text


@pytest.mark.parametrize("fmt,ctype", [("PNG", "image/png"), ("JPEG", "image/jpeg")])
def test_clicks_undo_reset_match_session(api, engine, scene, fmt, ctype):
    client, _, _ = api
    data = encode(scene[0], fmt)
    created = upload(client, data, ctype)
    assert created.status_code == 201
    c = created.json()
    sid = c["session_id"]
    assert (c["width"], c["height"], c["clicks"], c["mode"]) == (160, 120, [], "StdInfer")
    clicks = [(80, 60, True), (10, 10, False), (100, 70, True)]
    for i, (x, y, p) in enumerate(clicks):
        fmt_q = "rle" if i % 2 else "png"
        r = client.post(f"/sessions/{sid}/clicks?format={fmt_q}", json={"x": x, "y": y, "positive": p})
        assert r.status_code == 200, r.text
        a = r.json()
        ref = reference(engine, data, clicks[:i + 1])
        got = rle_to_mask(a["mask"]) if fmt_q == "rle" else png_mask(a)
        assert np.array_equal(got, ref.mask), f"click {i}: {np.count_nonzero(got != ref.mask)} px differ"
        assert a["area"] == int(ref.mask.sum()) and a["last_forwards"] == 1 and a["server_ms"] > 0
        r0, r1, c0, c1 = ref.roi
        assert a["zoom_box"] == {"x0": c0, "y0": r0, "x1": c1, "y1": r1}
        assert len(a["clicks"]) == i + 1 and a["forwards"] == [1] * (i + 1)
    u = client.post(f"/sessions/{sid}/undo?format=rle").json()
    assert np.array_equal(rle_to_mask(u["mask"]), reference(engine, data, clicks[:2]).mask)
    assert len(u["clicks"]) == 2
    state = client.get(f"/sessions/{sid}").json()
    assert state["clicks"] == [{"x": 80.0, "y": 60.0, "positive": True}, {"x": 10.0, "y": 10.0, "positive": False}]
    png = client.get(f"/sessions/{sid}/mask.png")
    assert png.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.content)).convert("L")) > 127,
                          reference(engine, data, clicks[:2]).mask)
    z = client.post(f"/sessions/{sid}/reset").json()
    assert z["clicks"] == [] and z["area"] == 0 and z["zoom_box"] is None and not png_mask(z).any()
    assert client.delete(f"/sessions/{sid}").status_code == 204
    assert_error(client.get(f"/sessions/{sid}"), 404, "SessionNotFoundError", "expired")


def test_mode_change(api, engine, scene):
    client, _, _ = api
    data = encode(scene[0])
    sid = upload(client, data, mode="CFR-2").json()["session_id"]
    a = client.post(f"/sessions/{sid}/clicks", json={"x": 80, "y": 60}).json()
    assert a["mode"] == "CFR-2" and a["last_forwards"] == 3  # CFR-n: 1 + n forwards on the first click
    m = client.put(f"/sessions/{sid}/mode", json={"mode": "A-CFR-4"})
    assert m.status_code == 200 and m.json()["mode"] == "A-CFR-4"
    client.post(f"/sessions/{sid}/reset")
    a = client.post(f"/sessions/{sid}/clicks?format=rle", json={"x": 80, "y": 60}).json()
    ref = reference(engine, data, [(80, 60, True)], mode=(4, True))
    assert a["last_forwards"] == ref.forwards[-1] and 2 <= a["last_forwards"] <= 5
    assert np.array_equal(rle_to_mask(a["mask"]), ref.mask)
    assert client.put(f"/sessions/{sid}/mode", json={"mode": "StdInfer"}).json()["mode"] == "StdInfer"


# ---- errors --------------------------------------------------------------------------------------------
def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header (with a valid CRC) claims width x height, followed by almost no pixel data."""
    raw = encode(np.zeros((4, 4, 3), np.uint8))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def test_upload_errors(engine, scene):
    client, store, _ = make(engine, upload=UploadLimits(max_bytes=200_000, max_pixels=1_000_000, max_side=4000))
    with client:
        assert_error(upload(client, b"\0" * 200_001), 413, "InputError", "limit")
        bomb = png_claiming(50_000, 50_000)  # would need 7.5 GB decoded: refused on the header
        assert len(bomb) < 200
        assert_error(upload(client, bomb), 413, "InputError", "too large")
        assert_error(upload(client, png_claiming(2000, 2000)), 413, "InputError", "2000x2000")
        assert_error(upload(client, png_claiming(5000, 10)), 413, "InputError", "px per side")
        jpeg = encode(scene[0], "JPEG")
        assert_error(upload(client, jpeg[: len(jpeg) // 2], "image/jpeg"), 400, "InputError", "corrupt")
        assert_error(upload(client, b"hello, not an image"), 415, "InputError", "not an image")
        assert_error(upload(client, encode(scene[0], "GIF")), 415, "InputError", "GIF")
        assert_error(upload(client, encode(scene[0]), "multipart/form-data"), 415, "InputError", "--data-binary")
        assert_error(upload(client, b""), 400, "InputError", "empty")
        assert_error(upload(client, encode(scene[0]), mode="CFR-99"), 400, "InputError", "unknown mode")
        assert len(store) == 0
        # grayscale and RGBA PNGs are converted, not refused
        gray = upload(client, encode(scene[0][..., 0]))
        rgba = upload(client, encode(np.dstack([scene[0], np.full(scene[0].shape[:2], 255, np.uint8)])))
        assert gray.status_code == rgba.status_code == 201


# ---- formats: the model sees what the person sees (issue 16, case 6) ---------------------------------------
def mpo(rgb: np.ndarray) -> bytes:
    """A two-frame MPO (what stereo cameras and many phones write): the first frame is the primary image."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="MPO", save_all=True, append_images=[Image.fromarray(rgb[::-1].copy())])
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    return data


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "WEBP", "MPO"])
def test_bmp_tiff_webp_mpo_frames_are_accepted(api, engine, scene, fmt):
    client, _, _ = api
    rgb = scene[0]
    data = mpo(rgb) if fmt == "MPO" else encode(rgb, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    created = upload(client, data, {"BMP": "image/bmp", "TIFF": "image/tiff", "WEBP": "image/webp"}.get(
        fmt, "application/octet-stream"))
    assert created.status_code == 201, created.text
    sid = created.json()["session_id"]
    a = client.post(f"/sessions/{sid}/clicks?format=rle", json={"x": 80, "y": 60}).json()
    decoded = decode_upload(data, UploadLimits())
    if fmt != "MPO":  # lossless: the decoded frame is the image itself
        assert np.array_equal(decoded, rgb)
    else:  # the primary (first) frame, not the second
        assert np.abs(decoded.astype(int) - rgb).mean() < np.abs(decoded.astype(int) - rgb[::-1]).mean()
    s = Session(engine)
    s.set_image(decoded)
    assert np.array_equal(rle_to_mask(a["mask"]), s.add_click(80, 60))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grayscale_is_scaled_not_clipped(fmt):
    ramp = (np.arange(256 * 64, dtype=np.uint32).reshape(64, 256) * 4).astype(np.uint16)  # 0 .. 65532
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format=fmt)
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I;16")
    rgb = decode_upload(buf.getvalue(), UploadLimits())
    expect = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert rgb.shape == (64, 256, 3) and np.array_equal(rgb[..., 0], expect) and np.array_equal(rgb[..., 2], expect)
    assert (rgb == 255).mean() < 0.01  # clipping made 99.6 % of such an image white


def test_transparency_is_composited_as_the_page_shows_it():
    """Transparent pixels become the page's background (#1e1f22), half-transparent ones a blend, as the
    browser draws the image over the page; the colour under alpha 0 must not reach the model."""
    from cfr_runtime.serve.codec import PAGE_BACKGROUND

    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = (255, 0, 0)  # red everywhere, hidden by alpha
    rgba[:, :2, 3] = 0
    rgba[:, 2:4, 3] = 128
    rgba[:, 4:, 3] = 255
    bg = np.array(PAGE_BACKGROUND)
    for data in (encode(rgba), encode(rgba, "WEBP", lossless=True), encode(rgba, "TIFF")):
        rgb = decode_upload(data, UploadLimits()).astype(int)
        assert (rgb[:, :2] == bg).all() and (rgb[:, 4:] == (255, 0, 0)).all()
        assert (np.abs(rgb[:, 2:4] - (bg + (np.array((255, 0, 0)) - bg) * 128 / 255)) <= 1).all()
    gray_alpha = np.zeros((2, 2, 2), np.uint8)  # LA: white, fully transparent
    gray_alpha[..., 0] = 255
    assert (decode_upload(encode(gray_alpha), UploadLimits()) == bg).all()
    pal = Image.fromarray(np.zeros((2, 2), np.uint8), "P")
    pal.putpalette([255, 255, 255] * 256)
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)  # palette index 0 transparent
    assert (decode_upload(buf.getvalue(), UploadLimits()) == bg).all()


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_exif_orientation_is_applied_as_browsers_do(fmt):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:5] = 255  # a white band on top
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format=fmt, exif=exif.tobytes())
    shown = decode_upload(buf.getvalue(), UploadLimits())
    assert shown.shape == (30, 20, 3) and (shown[:, -5:] > 200).all() and (shown[:, :10] < 50).all()
    assert decode_upload(encode(rgb, fmt), UploadLimits()).shape == (20, 30, 3)  # no tag: as stored


def test_float_images_are_refused_clearly():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.float32)).save(buf, format="TIFF")
    with pytest.raises(Exception, match="floating-point"):
        decode_upload(buf.getvalue(), UploadLimits())


def test_request_errors(api, scene):
    client, _, _ = api
    sid = upload(client, encode(scene[0])).json()["session_id"]
    assert_error(client.post("/sessions/nope/clicks", json={"x": 1, "y": 1}), 404, "SessionNotFoundError")
    assert_error(client.post(f"/sessions/{sid}/undo"), 409, "StateError", "no clicks")
    assert_error(client.post(f"/sessions/{sid}/clicks", json={"x": 500, "y": 1}), 400, "InputError", "outside")
    assert_error(client.post(f"/sessions/{sid}/clicks", json={"x": "3", "y": 1}), 422, "InputError", "x")
    assert_error(client.post(f"/sessions/{sid}/clicks", json={"x": 3}), 422, "InputError", "y: field required")
    assert_error(client.post(f"/sessions/{sid}/clicks", json={"x": 3, "y": 1, "positive": "yes"}), 422,
                 "InputError", "positive")
    assert_error(client.post(f"/sessions/{sid}/clicks", content=b"{not json",
                             headers={"Content-Type": "application/json"}), 400, "InputError", "not json")
    assert_error(client.post(f"/sessions/{sid}/clicks?format=bmp", json={"x": 3, "y": 1}), 400, "InputError",
                 "format")
    assert_error(client.put(f"/sessions/{sid}/mode", json={"mode": "fast"}), 400, "InputError", "unknown mode")
    assert_error(client.put(f"/sessions/{sid}/mode", json={}), 422, "InputError", "mode")
    assert_error(client.get(f"/sessions/{sid}/clicks"), 405, "InputError", "not allowed")
    assert_error(client.get("/no/such/thing"), 404, "InputError", "no endpoint")
    assert_error(client.delete("/sessions/nope"), 404, "SessionNotFoundError")
    for _ in range(24):
        assert client.post(f"/sessions/{sid}/clicks", json={"x": 5, "y": 5}).status_code == 200
    assert_error(client.post(f"/sessions/{sid}/clicks", json={"x": 5, "y": 5}), 400, "InputError", "at most 24")


# ---- expiry, LRU caps, isolation -----------------------------------------------------------------------
def test_idle_timeout(engine, scene):
    client, store, clock = make(engine, StoreLimits(idle_timeout_s=60))
    with client:
        a = upload(client, encode(scene[0])).json()["session_id"]
        b = upload(client, encode(scene[0])).json()["session_id"]
        clock.now += 50
        assert client.post(f"/sessions/{b}/clicks", json={"x": 3, "y": 3}).status_code == 200
        clock.now += 20  # a idle 70 s, b idle 20 s
        assert client.get("/health").json()["sessions"] == 1
        assert_error(client.get(f"/sessions/{a}"), 404, "SessionNotFoundError")
        assert client.get(f"/sessions/{b}").status_code == 200
        assert store.evicted["idle"] == 1
        entry = store.get(b)
        clock.now += 1000
        with entry.lock:  # a session in the middle of a click is never expired under it
            assert store.sweep() == 0
        assert store.sweep() == 1


def test_lru_caps(engine, scene):
    data = encode(scene[0])
    client, store, clock = make(engine, StoreLimits(max_sessions=2))
    with client:
        a, b = (upload(client, data).json()["session_id"] for _ in range(2))
        clock.now += 1
        client.get(f"/sessions/{a}")  # a is now the most recently used
        c = upload(client, data).json()["session_id"]
        assert_error(client.get(f"/sessions/{b}"), 404, "SessionNotFoundError")
        assert client.get(f"/sessions/{a}").status_code == client.get(f"/sessions/{c}").status_code == 200
        assert store.evicted["count"] == 1
    one = Session(engine)
    one.set_image(scene[0])
    held = resident_bytes(one)  # what a session is accounted at
    one.add_click(80, 60)
    delta = resident_bytes(one) - held
    assert delta >= 224 * 224 * 4  # the undo history counts
    h, w = scene[0].shape[:2]
    # room for one session, and for the upload body and the reservation of another
    cap = held + len(data) + creation_bytes(h, w, engine.contract)
    assert 2 * held + delta <= cap < 2 * held + 2 * delta  # a's second click, not its first, pushes b out
    client, store, clock = make(engine, StoreLimits(max_memory_mb=cap / 2**20))
    with client:
        a, b = (upload(client, data).json()["session_id"] for _ in range(2))
        assert store.evicted["memory"] == 0
        clock.now += 1
        client.post(f"/sessions/{a}/clicks", json={"x": 80, "y": 60})
        assert client.get(f"/sessions/{b}").status_code == 200 and store.evicted["memory"] == 0
        client.post(f"/sessions/{a}/clicks", json={"x": 70, "y": 60})  # a grows past the cap: LRU b goes
        assert_error(client.get(f"/sessions/{b}"), 404, "SessionNotFoundError")
        assert client.get(f"/sessions/{a}").status_code == 200 and store.evicted["memory"] == 1
        assert client.get("/health").json()["memory_mb"] <= cap / 2**20


def test_sessions_are_isolated(api, engine, scene):
    client, _, _ = api
    data = encode(scene[0])
    ids = [upload(client, data).json()["session_id"] for _ in range(8)]
    assert len(set(ids)) == 8 and all(len(i) >= 32 for i in ids)  # 24 random bytes from `secrets`
    client.post(f"/sessions/{ids[0]}/clicks", json={"x": 80, "y": 60})
    assert client.get(f"/sessions/{ids[1]}").json()["clicks"] == []
    assert_error(client.get(f"/sessions/{ids[0][:-1]}"), 404, "SessionNotFoundError")


def test_clicks_of_one_session_are_serialised(api, scene):
    client, _, _ = api
    sid = upload(client, encode(scene[0])).json()["session_id"]
    errors: list[str] = []

    def worker(k):
        for i in range(5):
            r = client.post(f"/sessions/{sid}/clicks?format=rle", json={"x": 20 + 10 * k, "y": 10 + 15 * i})
            if r.status_code != 200:
                errors.append(r.text)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = client.get(f"/sessions/{sid}").json()
    assert errors == [] and len(state["clicks"]) == 20 and len(state["forwards"]) == 20


# ---- the CVAT interactor adapter -----------------------------------------------------------------------
# Shapes as documented by CVAT's serverless interactor functions (e.g. serverless/pytorch/saic-vul/hrnet/
# nuclio/main.py): the body holds "image" (base64 of the frame), "pos_points" and "neg_points" ([[x, y], ...]
# in pixels), optionally "obj_bbox" and "threshold"; the answer is {"points": polygon [[x, y], ...],
# "mask": H x W list of 0/255}.
def cvat_body(data: bytes, pos, neg=(), **extra) -> dict:
    return {"image": base64.b64encode(data).decode(), "pos_points": [list(p) for p in pos],
            "neg_points": [list(p) for p in neg], "obj_bbox": None, **extra}


def cvat_mask(answer: dict, shape: tuple[int, int]) -> np.ndarray:
    """The full-frame mask from an interactor answer, read as cvat-ui reads it: `mask` rows, placed at
    `bounds` [left, top, right, bottom] (inclusive) when present, else at the origin."""
    rows = np.asarray(answer["mask"], np.uint8)
    left, top, right, bottom = answer.get("bounds", (0, 0, rows.shape[1] - 1, rows.shape[0] - 1))
    assert rows.shape == (bottom - top + 1, right - left + 1)
    full = np.zeros(shape, bool)
    full[top:bottom + 1, left:right + 1] = rows > 0
    return full


def test_cvat_interactor(api, engine, scene):
    client, store, _ = api
    data = encode(scene[0], "JPEG")
    a, b, c = (80, 60, True), (10, 10, False), (100, 70, True)
    # the clicks in the order made; the last request drops one (undo). The answer is a fresh Session's on
    # the documented order, positives then negatives: [a, c, b] for step 2, whatever the person did.
    steps = [([a], 1), ([a, b], 1), ([a, c, b], 2), ([a, b], 1)]
    for i, (clicks, forwards) in enumerate(steps):
        pos = [(x, y) for x, y, p in clicks if p]
        neg = [(x, y) for x, y, p in clicks if not p]
        path = "/" if i == 1 else "/cvat/interactor"  # nuclio invokes the function's root
        r = client.post(path, json=cvat_body(data, pos, neg))
        assert r.status_code == 200, r.text
        ans = r.json()
        ref = reference(engine, data, clicks)
        mask = cvat_mask(ans, (120, 160))
        assert np.array_equal(mask, ref.mask), f"step {i}"
        assert ans["forwards"] == forwards  # reuse of the cached session where it is exact
    assert len(store) == 1  # one stored session for the image, reused across requests
    r = client.post("/cvat/interactor", json=cvat_body(data, [(80, 60)], threshold=0.9, task=3, frame=0))
    assert r.status_code == 200
    assert cvat_mask(r.json(), (120, 160)).sum() <= mask.sum()


def test_cvat_answer_does_not_depend_on_other_requests(api, engine, scene):
    """Issue 16, case 5: [P1, P2] after another request's [P2] on the same frame is still fresh [P1, P2]."""
    client, _, _ = api
    data = encode(scene[0])
    p1, p2 = (80, 60), (100, 70)
    ref = reference(engine, data, [(*p1, True), (*p2, True)]).mask
    assert not np.array_equal(ref, reference(engine, data, [(*p2, True), (*p1, True)]).mask)
    assert client.post("/cvat/interactor", json=cvat_body(data, [p2])).status_code == 200
    r = client.post("/cvat/interactor", json=cvat_body(data, [p1, p2]))
    assert r.status_code == 200, r.text
    got = cvat_mask(r.json(), (120, 160))
    assert np.array_equal(got, ref), f"{np.count_nonzero(got != ref)} px differ from a fresh Session"


def test_cvat_order_is_positives_then_negatives(api, engine, scene):
    """The documented order, pinned: CVAT sends no order between its two lists."""
    client, _, _ = api
    data = encode(scene[0])
    p1, p2, n1 = (80, 60, True), (100, 70, True), (10, 10, False)
    orders = {name: reference(engine, data, clicks).mask for name, clicks in
              (("positives first", [p1, p2, n1]), ("negatives first", [n1, p1, p2]), ("as clicked", [p1, n1, p2]))}
    assert not np.array_equal(orders["positives first"], orders["negatives first"])
    assert not np.array_equal(orders["positives first"], orders["as clicked"])
    client.post("/cvat/interactor", json=cvat_body(data, [p1[:2]], [n1[:2]]))  # cache [p1, n1]
    r = client.post("/cvat/interactor", json=cvat_body(data, [p1[:2], p2[:2]], [n1[:2]]))
    assert np.array_equal(cvat_mask(r.json(), (120, 160)), orders["positives first"])


def test_cvat_errors(api, scene):
    client, _, _ = api
    data = encode(scene[0])
    assert_error(client.post("/cvat/interactor", json=cvat_body(data, [])), 400, "InputError", "positive")
    bad = cvat_body(data, [(1, 1)])
    bad["image"] = "%%%not base64"
    assert_error(client.post("/cvat/interactor", json=bad), 400, "InputError", "base64")
    assert_error(client.post("/cvat/interactor", json={"pos_points": [[1, 1]]}), 422, "InputError", "image")
    assert_error(client.post("/cvat/interactor", json=cvat_body(data, [(1, 2, 3)])), 422, "InputError",
                 "pos_points")
    assert_error(client.post("/cvat/interactor", content=b"[", headers={"Content-Type": "application/json"}),
                 400, "InputError", "not JSON")
    assert_error(client.post("/cvat/interactor", json=cvat_body(data, [(1000, 1)])), 400, "InputError", "outside")


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (3, 5), (37, 23)]:
        for m in (rng.random(shape) > 0.5, np.ones(shape, bool), np.zeros(shape, bool)):
            rle = mask_rle(m)
            assert sum(rle["counts"]) == m.size and np.array_equal(rle_to_mask(rle), m)
    assert mask_rle(np.array([[1, 0], [1, 1]], bool))["counts"] == [0, 2, 1, 1]  # column-major, zeros first


def test_cli_errors(tmp_path):
    from click.testing import CliRunner

    from cfr_runtime.serve.cli import main

    r = CliRunner().invoke(main, [str(tmp_path / "missing.onnx")])
    assert r.exit_code == 2 and "no such model file" in r.output
    r = CliRunner().invoke(main, ["--max-sessions", "0"])
    assert r.exit_code == 2 and "positive" in r.output
    assert "--idle-timeout" in CliRunner().invoke(main, ["--help"]).output
