"""Adapter for CVAT's interactor protocol: the body CVAT's lambda manager posts to an "interactor" function.

Request (built by cvat/apps/lambda_manager/views.py, LambdaFunction.invoke):
    {"image": <base64 of the frame's file, as stored: JPEG, PNG, BMP, TIFF, WebP, MPO...>,
     "pos_points": [[x, y], ...], "neg_points": [[x, y], ...], "obj_bbox": null, "threshold": t (only if set)}
  in frame pixels; cvat-ui sends every point of the object each time (convertShapesForInteractor: each list in
  the order the points were placed, nothing about the order between the lists).
Answer, as cvat-ui's tools-control.tsx reads it: `mask` (rows of numbers; any non-zero value is the object)
and optionally `bounds` [left, top, right, bottom] (inclusive) telling where those rows sit in the frame;
without `points` the page traces the outline itself (OpenCV findContours on the mask). So the answer is the
mask cropped to the object's bounding box, as 0/1: {"mask": [[0, 1, ...], ...], "bounds": [l, t, r, b]}
plus two small fields of ours (forwards, server_ms). That is 2 bytes per pixel of the box, against the full
frame's H x W list of 0/255 (93 MB for a 36 MP frame) before. An empty mask is answered as one 0 pixel with
`"points": []` (cvat-ui's contour tracing fails on a mask with no contour). It is built in a worker thread as
bytes (numpy writes the digits), never as a Python list on the event loop.

The protocol is stateless, and so is the answer: it is the mask of a fresh Session fed the request's points
in one fixed order, every positive point in the order sent, then every negative point (CVAT sends the two
lists, not the order between them). `SessionStore.replay` gives that answer while reusing a cached session
of the same frame where that is exact, so a new click usually costs one click's forwards instead of
re-decoding the frame and replaying every click. `obj_bbox` is accepted and ignored (click-only model).

Why CVAT rather than the Label Studio ML backend: CVAT's interactor request is self-contained (the frame's
bytes and the click coordinates in pixels), so a service can answer it without calling back into the tool's
storage with credentials.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import InputError
from ..session import Click
from .codec import EncodedImage, UploadLimits, http_error, parse_json
from .store import ANONYMOUS, SessionStore

Coordinate = Annotated[float, Field(allow_inf_nan=False)]
Point = Annotated[list[Coordinate], Field(min_length=2, max_length=2)]
MAX_POINTS = 1000  # per list: far beyond any engine's max_points, small enough to validate quickly
CVAT_BACKGROUND = (255, 255, 255)  # transparent pixels of a frame: composited over white


class CvatInteraction(BaseModel):
    model_config = ConfigDict(extra="allow")  # CVAT may add keys (task, frame, mapping); they are not needed
    image: str = Field(min_length=1)
    pos_points: Annotated[list[Point], Field(max_length=MAX_POINTS)]
    neg_points: Annotated[list[Point], Field(max_length=MAX_POINTS)] = []
    obj_bbox: Any = None
    threshold: float | None = None

    @field_validator("threshold")
    @classmethod
    def _probability(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and 0 < v < 1):
            raise ValueError(f"threshold must be a probability strictly between 0 and 1, got {v}")
        return v


def click_order(pos_points: list, neg_points: list) -> list[Click]:
    """The documented order of a CVAT request's points: positives in the order sent, then negatives."""
    return ([Click(float(x), float(y), True) for x, y in pos_points]
            + [Click(float(x), float(y), False) for x, y in neg_points])


def parse_request(body: bytes | str | dict) -> CvatInteraction:
    """A validated interactor request from the raw body (or the dict nuclio already decoded)."""
    data = body if isinstance(body, dict) else parse_json(body, "CVAT request body")
    if not isinstance(data, dict):
        raise http_error(InputError, 422, "not a CVAT interactor request: the body must be a JSON object")
    try:
        req = CvatInteraction.model_validate(data)
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise http_error(InputError, 422, f"not a CVAT interactor request: {msgs}") from None
    if not req.pos_points:
        raise InputError("CVAT interactor request without positive points (the function needs at least 1)")
    return req


def mask_rows_json(mask: np.ndarray, head: bytes = b"", tail: bytes = b"") -> bytes:
    """`head` + a bool H x W mask as the JSON text of H rows of W 0/1 numbers + `tail`, written by numpy into
    one buffer and copied out once (2 bytes a pixel; every copy of a 26 MB answer holds the GIL)."""
    h, w = mask.shape
    row = 2 * w + 2  # "[d,d,...,d],"
    out = np.empty(len(head) + 1 + h * row - 1 + 1 + len(tail), np.uint8)
    out[:len(head)] = np.frombuffer(head, np.uint8)
    out[len(head)] = ord("[")
    body = out[len(head) + 1:len(head) + 1 + h * row].reshape(h, row)  # the last row's "," is overwritten
    body[:, 0] = ord("[")
    body[:, 1:2 * w:2] = mask
    body[:, 1:2 * w:2] += ord("0")
    body[:, 2:2 * w:2] = ord(",")
    body[:, 2 * w] = ord("]")
    body[:, 2 * w + 1] = ord(",")
    end = len(head) + h * row
    out[end] = ord("]")
    out[end + 1:] = np.frombuffer(tail, np.uint8)
    return out.tobytes()


def answer_bytes(mask: np.ndarray, crop: bool = True, **extra) -> bytes:
    """The interactor answer as JSON bytes: the mask cropped to its bounding box plus `bounds` (crop=False: the
    whole frame, for CVAT versions that ignore `bounds`)."""
    fields = dict(extra)
    if not mask.any():
        rows, bounds = np.zeros((1, 1), bool), [0, 0, 0, 0]
        fields["points"] = []
    elif crop:
        ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        top, bottom, left, right = int(ys[0]), int(ys[-1]), int(xs[0]), int(xs[-1])
        rows, bounds = mask[top:bottom + 1, left:right + 1], [left, top, right, bottom]
    else:
        rows, bounds = mask, [0, 0, mask.shape[1] - 1, mask.shape[0] - 1]
    fields["bounds"] = bounds
    tail = "," + json.dumps(fields, separators=(",", ":"))[1:]
    return mask_rows_json(rows, b'{"mask":', tail.encode())


def interact(store: SessionStore, body: bytes | str | dict, *, limits: UploadLimits, mode: str = "StdInfer",
             client: str = ANONYMOUS, crop: bool = True, background: tuple[int, int, int] = CVAT_BACKGROUND,
             start: float | None = None) -> bytes:
    """Answer one interactor request (blocking: run it in a worker). Shared by `POST /cvat/interactor` and the
    nuclio function, so both answer the same bytes for the same body."""
    start = time.perf_counter() if start is None else start
    req = parse_request(body)
    wanted = click_order(req.pos_points, req.neg_points)
    key = "cvat:" + hashlib.sha256(req.image.encode()).hexdigest()
    image = EncodedImage(req.image, limits, background, what="CVAT request's 'image'")
    with store.replay(key, image, wanted, mode, client=client) as r:
        s = r.session
        mask = s.mask if req.threshold is None else s.probs > req.threshold
        forwards = r.forwards
    return answer_bytes(mask, crop, forwards=forwards, server_ms=round((time.perf_counter() - start) * 1000, 3))
