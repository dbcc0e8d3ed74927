"""Adapter for CVAT's interactor protocol (the body CVAT's lambda manager posts to an "interactor" function).

Request:  {"image": <base64 JPEG/PNG of the frame>, "pos_points": [[x, y], ...], "neg_points": [[x, y], ...],
           "obj_bbox": ..., "threshold": ...}   (pixels; CVAT sends every point of the object each time)
Response: {"points": [[x, y], ...] (outline polygon), "mask": [[0 | 255, ...], ...] (H rows of W)}

Why CVAT rather than the Label Studio ML backend: CVAT's interactor request is self-contained (the frame's
bytes and the click coordinates in pixels), so a service can answer it without calling back into the tool's
storage with credentials, and its answer (a polygon plus a full mask) is exactly what a Session produces.
Label Studio sends an image URL to fetch from its own server and percent coordinates, and expects brush
masks in its own bit-packed RLE.

The protocol is stateless; this adapter is not: the image's digest keys a stored session, and each request's
points are reconciled with the session's clicks (undo back to the longest prefix that is still wanted, then
add the new points), so a click costs one click's forwards instead of re-decoding the image and replaying
every click. The order of a positive and a negative point added in the same request is not sent by CVAT;
positives go first. `obj_bbox` is accepted and ignored (click-only model).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections import Counter
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InputError
from ..session import Click, Session
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


def reconcile(session: Session, wanted: list[Click]) -> int:
    """Bring the session's clicks to the multiset `wanted` with the fewest forwards; returns forwards run."""
    have = session.clicks
    need = Counter(wanted)
    keep = 0
    for c in have:  # the longest prefix of the current clicks that is still wanted
        if need[c] <= 0:
            break
        need[c] -= 1
        keep += 1
    for _ in range(len(have) - keep):
        session.undo()
    forwards = 0
    for c in wanted:
        if need[c] > 0:
            need[c] -= 1
            session.add_click(c.x, c.y, c.positive)
            forwards += session.forwards[-1]
    return forwards


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
        wanted = [Click(float(x), float(y), True) for x, y in data.pos_points]
        wanted += [Click(float(x), float(y), False) for x, y in data.neg_points]
        key = hashlib.sha256(data.image.encode()).hexdigest() + "|" + mode
        entry = store.by_key(key)
        if entry is None:
            try:
                blob = base64.b64decode(data.image, validate=True)
            except (binascii.Error, ValueError):
                raise InputError("the CVAT request's 'image' is not valid base64") from None
            rgb = await run_in_threadpool(decode_upload, blob, config.upload)
            entry = await run_in_threadpool(store.create, rgb, mode, key)

        def run() -> dict:
            with entry.lock:
                with slots:
                    forwards = reconcile(entry.session, wanted)
                s = entry.session
                mask = s.mask if data.threshold is None else s.probs > data.threshold
            store.touched(entry)
            return {"points": mask_polygon(mask), "mask": (mask.astype("uint8") * 255).tolist(),
                    "forwards": forwards, "server_ms": round((time.perf_counter() - start) * 1000, 3)}

        return await run_in_threadpool(run)

    app.add_api_route("/cvat/interactor", interact, methods=["POST"], summary="CVAT interactor function body")
    app.add_api_route("/", interact, methods=["POST"], include_in_schema=False)  # nuclio invokes the root
