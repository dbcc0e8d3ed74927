"""Adapter for CVAT's interactor protocol (the body CVAT's lambda manager posts to an "interactor" function).

Request:  {"image": <base64 JPEG/PNG of the frame>, "pos_points": [[x, y], ...], "neg_points": [[x, y], ...],
           "obj_bbox": ..., "threshold": ...}   (pixels; CVAT sends every point of the object each time)
Response: {"points": [[x, y], ...] (outline polygon), "mask": [[0 | 255, ...], ...] (H rows of W)}

Why CVAT rather than the Label Studio ML backend: CVAT's interactor request is self-contained (the frame's
bytes and the click coordinates in pixels), so a service can answer it without calling back into the tool's
storage with credentials, and its answer (a polygon plus a full mask) is exactly what a Session produces.
Label Studio sends an image URL to fetch from its own server and percent coordinates, and expects brush
masks in its own bit-packed RLE.

The protocol is stateless, and so is the answer: it is the mask of a fresh Session fed the request's points
in one fixed order, every positive point in the order sent, then every negative point (CVAT sends the two
lists, not the order between them). `SessionStore.replay` gives that answer while reusing a cached session
of the same frame where that is exact, so a new click usually costs one click's forwards instead of
re-decoding the frame and replaying every click. `obj_bbox` is accepted and ignored (click-only model).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InputError
from ..session import Click
from .codec import decode_upload, http_error, mask_polygon, read_body
from .store import SessionStore

Point = Annotated[list[float], Field(min_length=2, max_length=2)]


class CvatInteraction(BaseModel):
    model_config = ConfigDict(extra="allow")  # CVAT may add keys (task, frame, mapping); they are not needed
    image: str
    pos_points: list[Point]
    neg_points: list[Point] = []
    obj_bbox: Any = None
    threshold: float | None = None


def click_order(pos_points: list, neg_points: list) -> list[Click]:
    """The documented order of a CVAT request's points: positives in the order sent, then negatives."""
    return ([Click(float(x), float(y), True) for x, y in pos_points]
            + [Click(float(x), float(y), False) for x, y in neg_points])


def add_cvat_routes(app: FastAPI, store: SessionStore, config, slots) -> None:
    limit = config.upload.max_bytes * 4 // 3 + 65536  # base64 of the largest upload, plus the JSON around it

    async def interact(request: Request, mode: str = "StdInfer"):
        start = time.perf_counter()
        raw = await read_body(request, limit)
        try:
            data = CvatInteraction.model_validate(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise InputError(f"the CVAT request body is not JSON ({exc})") from None
        except ValidationError as exc:
            msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise http_error(InputError, 422, f"not a CVAT interactor request: {msgs}") from None
        if not data.pos_points:
            raise InputError("CVAT interactor request without positive points (the function needs at least 1)")
        wanted = click_order(data.pos_points, data.neg_points)
        key = "cvat:" + hashlib.sha256(data.image.encode()).hexdigest()

        def image():
            try:
                blob = base64.b64decode(data.image, validate=True)
            except (binascii.Error, ValueError):
                raise InputError("the CVAT request's 'image' is not valid base64") from None
            return decode_upload(blob, config.upload)

        def run() -> dict:
            with slots, store.replay(key, image, wanted, mode) as r:
                s = r.session
                mask = s.mask if data.threshold is None else s.probs > data.threshold
                forwards = r.forwards
            return {"points": mask_polygon(mask), "mask": (mask.astype("uint8") * 255).tolist(),
                    "forwards": forwards, "server_ms": round((time.perf_counter() - start) * 1000, 3)}

        return await run_in_threadpool(run)

    app.add_api_route("/cvat/interactor", interact, methods=["POST"], summary="CVAT interactor function body")
    app.add_api_route("/", interact, methods=["POST"], include_in_schema=False)  # nuclio invokes the root
