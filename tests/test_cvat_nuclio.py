"""The nuclio function CVAT registers (cfr_runtime/serve/nuclio): its function.yaml read the way CVAT's lambda
manager reads it, and its handler fed the exact body the lambda manager builds (a BMP frame among others),
its answer read the way cvat-ui's tools-control.tsx reads it. nuclio's context and event are small fakes."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.conftest import blob_scene

pytest.importorskip("pydantic", reason="pydantic is not installed (pip install -e '.[serve]')")

from cfr_runtime import Session  # noqa: E402
from cfr_runtime.serve.codec import UploadLimits, decode_upload  # noqa: E402
from cfr_runtime.serve.cvat import CVAT_BACKGROUND  # noqa: E402
from cfr_runtime.serve.nuclio import main as function  # noqa: E402

FUNCTION_DIR = Path(function.__file__).parent


# ---- nuclio, faked ---------------------------------------------------------------------------------------
class Logger:
    def __init__(self):
        self.lines: list[str] = []

    def __getattr__(self, level):  # info, warn, error, debug, info_with, ...
        return lambda message, *a, **k: self.lines.append(f"{level}: {message}")


class Response:
    """nuclio_sdk.Response's constructor."""

    def __init__(self, headers=None, body=None, content_type=None, status_code=200):
        self.headers, self.body, self.content_type, self.status_code = headers, body, content_type, status_code


def fake_context():
    return SimpleNamespace(logger=Logger(), user_data=SimpleNamespace(), Response=Response)


def nuclio_event(payload: dict | bytes, content_type: str = "application/json"):
    """What nuclio's Python wrapper hands the handler for CVAT's POST: the body decoded from JSON when the
    content type says so (nuclio_sdk.Event.decode_body), else the raw bytes."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    body = raw
    if content_type == "application/json":
        try:
            body = json.loads(raw.decode("utf-8"))
        except Exception:  # nuclio keeps the bytes when they do not decode
            body = raw
    return SimpleNamespace(body=body, content_type=content_type, headers={"Content-Type": content_type},
                           method="POST", path="/")


def lambda_manager_payload(frame: bytes, pos_points, neg_points, threshold=None) -> dict:
    """LambdaFunction.invoke (cvat/apps/lambda_manager/views.py) for an interactor: threshold only if set and
    truthy, then the frame's file base64-encoded, the two point lists as cvat-ui sent them, obj_bbox None."""
    payload: dict = {}
    if threshold:
        payload["threshold"] = threshold
    payload.update({"image": base64.b64encode(frame).decode("utf-8"), "pos_points": pos_points,
                    "neg_points": neg_points, "obj_bbox": None})
    return payload


# ---- cvat-ui, re-read in Python ----------------------------------------------------------------------------
def mask2rle(flat: list[int]) -> list[int]:
    """cvat-core's mask2Rle: run lengths starting with a (possibly empty) run of zeros."""
    acc: list[int] = []
    for idx, val in enumerate(flat):
        if idx == 0:
            acc.extend([0, 1] if val > 0 else [1])
        elif flat[idx - 1] == val:
            acc[-1] += 1
        else:
            acc.append(1)
    return acc


def ui_reads(answer: dict, frame_shape: tuple[int, int]) -> tuple[np.ndarray, list]:
    """What tools-control.tsx makes of an interactor answer: the mask shape's RLE (mask2Rle of the mask rows,
    then `bounds`, or [0, 0, w - 1, h - 1] without them), decoded onto the frame; and the polygon (`points`,
    or the first contour OpenCV finds in the mask, shifted by bounds' left and top)."""
    rows = answer["mask"]
    assert isinstance(rows, list) and rows and all(len(r) == len(rows[0]) for r in rows)
    left, top, right, bottom = answer.get("bounds") or (0, 0, len(rows[0]) - 1, len(rows) - 1)
    rle = mask2rle([v for row in rows for v in row])
    w, h = right - left + 1, bottom - top + 1
    assert sum(rle) == w * h and (len(rows), len(rows[0])) == (h, w)
    flat, value, pos = np.zeros(w * h, bool), False, 0
    for count in rle:
        flat[pos:pos + count] = value
        pos, value = pos + count, not value
    full = np.zeros(frame_shape, bool)
    full[top:bottom + 1, left:right + 1] = flat.reshape(h, w)
    points = answer.get("points")
    if points is None:
        mat = np.asarray(rows, np.uint8)
        contours, _ = cv2.findContours(mat, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        points = [[int(x) + left, int(y) + top] for x, y in contours[0].reshape(-1, 2)]
    return full, points


@pytest.fixture()
def context(engine, monkeypatch):
    monkeypatch.setenv("CFR_MODE", "StdInfer")
    ctx = fake_context()
    function.init_context(ctx)
    return ctx


def fresh(engine, rgb, pos, neg) -> np.ndarray:
    s = Session(engine)
    s.set_image(rgb)
    for x, y in pos:
        s.add_click(x, y, True)
    for x, y in neg:
        s.add_click(x, y, False)
    return s.mask


def bmp(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="BMP")
    return buf.getvalue()


# ---- function.yaml -----------------------------------------------------------------------------------------
def test_function_yaml_is_what_cvat_registers_as_an_interactor():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    conf = yaml.safe_load((FUNCTION_DIR / "function.yaml").read_text())
    meta = conf["metadata"]
    anno = {k: "" if v is None else str(v) for k, v in meta["annotations"].items()}  # nuclio: strings
    # as LambdaFunction.__init__ reads them
    assert anno["type"] == "interactor" and int(anno.get("version", "1")) >= 2
    assert json.loads(anno.get("spec") or "[]") == []
    assert int(anno.get("min_pos_points", 1)) == 1 and int(anno.get("min_neg_points", -1)) == 0
    assert anno.get("startswith_box", "false").lower() == "false" and anno["name"] and anno["help_message"]
    assert meta["name"] and meta["namespace"] == "cvat" and conf["spec"]["description"]
    module, entry = conf["spec"]["handler"].split(":")
    assert (FUNCTION_DIR / f"{module}.py").is_file() and callable(getattr(function, entry))
    http = conf["spec"]["triggers"]["myHttpTrigger"]
    assert http["kind"] == "http" and int(http["attributes"]["maxRequestBodySize"]) >= 4 * 20 * 2**20 // 3
    env = {e["name"]: e["value"] for e in conf["spec"]["env"]}
    assert env["CFR_MODE"] == "StdInfer"


# ---- the handler -------------------------------------------------------------------------------------------
def test_handler_answers_a_bmp_frame_as_cvat_ui_reads_it(engine, context):
    rgb = blob_scene(5, 120, 160)[0]
    frame = bmp(rgb)
    pos, neg = [[80.0, 60.0], [95.5, 66.25]], [[10.0, 12.0]]
    resp = function.handler(context, nuclio_event(lambda_manager_payload(frame, pos, neg)))
    assert resp.status_code == 200 and resp.content_type == "application/json"
    answer = json.loads(resp.body)
    mask, polygon = ui_reads(answer, rgb.shape[:2])
    ref = fresh(engine, decode_upload(frame, UploadLimits(), CVAT_BACKGROUND), pos, neg)
    assert np.array_equal(mask, ref), f"{np.count_nonzero(mask != ref)} px differ from a fresh Session"
    assert 0 < ref.sum() < ref.size and len(polygon) >= 3
    assert all(0 <= x < 160 and 0 <= y < 120 and ref[y, x] for x, y in polygon)  # the outline lies on the object
    # the next click (cvat-ui resends every point): one click's forwards, same answer as a fresh Session
    pos2 = [*pos, [60.0, 50.0]]
    answer = json.loads(function.handler(context, nuclio_event(lambda_manager_payload(frame, pos2, neg))).body)
    assert np.array_equal(ui_reads(answer, rgb.shape[:2])[0], fresh(engine, rgb, pos2, neg))
    assert answer["forwards"] == 2  # positives first: [P1, P2, P3, N1] from [P1, P2, N1] undoes N1


def test_handler_on_a_grabcut_bmp(engine, context, data_dir):
    """A real BMP frame of the GrabCut set (11 of its 50 images are BMPs), with a threshold set."""
    path = next(p for p in sorted((data_dir / "GrabCut" / "images").iterdir()) if p.suffix.lower() == ".bmp")
    frame = path.read_bytes()
    rgb = decode_upload(frame, UploadLimits(), CVAT_BACKGROUND)
    h, w = rgb.shape[:2]
    pos = [[w / 2, h / 2]]
    resp = function.handler(context, nuclio_event(lambda_manager_payload(frame, pos, [], threshold=0.6)))
    assert resp.status_code == 200, resp.body
    mask, _ = ui_reads(json.loads(resp.body), (h, w))
    s = Session(engine)
    s.set_image(rgb)
    s.add_click(w / 2, h / 2, True)
    assert np.array_equal(mask, s.probs > 0.6)


def test_handler_empty_mask_keeps_cvat_ui_working():
    """An empty mask has no contour for cvat-ui to trace: the answer carries `points: []` itself."""
    from cfr_runtime.serve import cvat

    answer = json.loads(cvat.answer_bytes(np.zeros((30, 40), bool)))
    assert answer["points"] == [] and answer["mask"] == [[0]]
    mask, points = ui_reads(answer, (30, 40))
    assert not mask.any() and points == []


@pytest.mark.parametrize("payload,ctype,status,match", [
    ({"pos_points": [[1, 1]], "neg_points": []}, "application/json", 422, "image"),
    ({"image": "AAAA", "pos_points": [], "neg_points": []}, "application/json", 400, "positive"),
    ({"image": "%%%", "pos_points": [[1, 1]], "neg_points": []}, "application/json", 400, "base64"),
    (b"[" * 50_000, "application/json", 400, "nests too deeply"),
    (b'{"image": "x", "pos_points": [[1, 1]]}', "text/plain", 415, "application/json"),
])
def test_handler_errors_are_json_with_a_4xx(context, payload, ctype, status, match):
    resp = function.handler(context, nuclio_event(payload, ctype))
    assert resp.status_code == status and resp.content_type == "application/json"
    body = json.loads(resp.body)
    assert set(body) == {"error", "message"} and match in body["message"], body
    assert context.logger.lines  # a warning in the function's log, not a traceback


def test_init_context_refuses_a_bad_mode(monkeypatch):
    from cfr_runtime.errors import InputError

    monkeypatch.setenv("CFR_MODE", "fast")
    with pytest.raises(InputError, match="unknown mode"):
        function.init_context(fake_context())
