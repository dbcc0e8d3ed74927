"""The HTTP API of `cfr-serve` (FastAPI on uvicorn): stateful click sessions around one shared Engine.

Every answer to a click, undo or reset carries the mask (PNG or COCO RLE, `?format=`), the zoom-in box,
the forwards the click ran and the server-side milliseconds. Errors are JSON
`{"error": <project error type>, "message": ...}` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from ..engine import Engine
from ..errors import CfrError, InputError, SessionNotFoundError, StateError
from .codec import FORMATS, UploadLimits, decode_upload, http_error, mask_png, mask_rle, read_body
from .store import Entry, SessionStore, StoreLimits, parse_mode

STATIC = Path(__file__).with_name("static")
UPLOAD_TYPES = ("image/jpeg", "image/png", "application/octet-stream")


@dataclass(frozen=True)
class ServeConfig:
    """Everything configurable about the service (the CLI maps its options onto this)."""

    store: StoreLimits = field(default_factory=StoreLimits)
    upload: UploadLimits = field(default_factory=UploadLimits)
    sweep_interval_s: float = 5.0
    # forwards run at once (other clicks queue): more than the cores only oversubscribes the CPU, and ONNX
    # Runtime's arena grows to the peak number of concurrent runs and never shrinks
    max_concurrent: int = 2


class ClickIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: Annotated[float, Field(strict=True)]
    y: Annotated[float, Field(strict=True)]
    positive: StrictBool = True


class ModeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: str


def status_of(exc: CfrError) -> int:
    explicit = getattr(exc, "http_status", None)
    if explicit:
        return explicit
    if isinstance(exc, SessionNotFoundError):
        return 404
    if isinstance(exc, StateError):
        return 409
    return 400


def error_response(exc: CfrError) -> JSONResponse:
    return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=status_of(exc))


def encode_mask(mask, fmt: str) -> dict:
    if fmt == "rle":
        return {"format": "rle", **mask_rle(mask)}
    return {"format": "png", "data": base64.b64encode(mask_png(mask)).decode("ascii")}


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InputError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    return fmt


def describe(entry: Entry) -> dict:
    w, h = entry.size
    s = entry.session
    return {"session_id": entry.id, "width": w, "height": h, "mode": entry.mode,
            "clicks": [{"x": c.x, "y": c.y, "positive": c.positive} for c in s.clicks],
            "forwards": list(s.forwards), "zoom_box": zoom_box(entry)}


def zoom_box(entry: Entry) -> dict | None:
    roi = entry.session.roi
    if roi is None:
        return None
    r0, r1, c0, c1 = roi
    return {"x0": c0, "y0": r0, "x1": c1, "y1": r1}  # inclusive image pixels


def answer(entry: Entry, fmt: str, start: float, forwards: int) -> dict:
    out = describe(entry)
    mask = entry.session.mask
    out.update(mask=encode_mask(mask, fmt), area=int(mask.sum()), last_forwards=forwards)
    out["server_ms"] = round((time.perf_counter() - start) * 1000, 3)
    return out


def create_app(engine: Engine | str, config: ServeConfig | None = None, store: SessionStore | None = None) -> FastAPI:
    """The ASGI app. `engine` is an Engine or a model path; `store` may be injected (tests use a fake clock)."""
    config = config or ServeConfig()
    if not isinstance(engine, Engine):
        engine = Engine(engine)
    if store is None:
        store = SessionStore(engine, config.store)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def sweeper():
            while True:
                await asyncio.sleep(config.sweep_interval_s)
                store.sweep()

        task = asyncio.create_task(sweeper())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="cfr-serve", version="0.1.0", lifespan=lifespan,
                  description="CFR-ICL click-based interactive segmentation sessions")
    app.state.store = store
    app.state.engine = engine
    app.state.config = config
    slots = threading.BoundedSemaphore(config.max_concurrent)

    @app.exception_handler(CfrError)
    async def on_cfr_error(request: Request, exc: CfrError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where or 'body'}: {err.get('msg')}")
        return error_response(http_error(InputError, 422, "invalid request: " + "; ".join(parts)))

    @app.exception_handler(404)
    async def on_not_found(request: Request, exc):
        return error_response(http_error(InputError, 404, f"no endpoint {request.method} {request.url.path}"))

    @app.exception_handler(405)
    async def on_bad_method(request: Request, exc):
        return error_response(http_error(InputError, 405, f"{request.method} is not allowed on {request.url.path}"))

    # ---- page and health -------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    def health():
        store.sweep()
        c = engine.contract
        return {"status": "ok", "engine": repr(engine), "input_size": c.input_size, "max_points": c.max_points,
                **store.stats()}

    # ---- sessions --------------------------------------------------------------------------------------
    @app.post("/sessions", status_code=201)
    async def create_session(request: Request, mode: str = "StdInfer"):
        """Body: the JPEG or PNG file itself (curl --data-binary @img.jpg)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and ctype not in UPLOAD_TYPES:
            raise http_error(InputError, 415, f"Content-Type {ctype} is not accepted; send the image file as the "
                                              "body with image/jpeg or image/png (curl --data-binary @img.jpg)")
        parse_mode(mode)
        body = await read_body(request, config.upload.max_bytes)
        rgb = await run_in_threadpool(decode_upload, body, config.upload)
        entry = await run_in_threadpool(store.create, rgb, mode)
        store.sweep()
        return {**describe(entry), "idle_timeout_s": store.limits.idle_timeout_s}

    @app.get("/sessions/{sid}")
    def get_session(sid: str):
        entry = store.get(sid)
        with entry.lock:
            return describe(entry)

    @app.delete("/sessions/{sid}", status_code=204)
    def delete_session(sid: str):
        store.delete(sid)
        return Response(status_code=204)

    @app.post("/sessions/{sid}/clicks")
    def click(sid: str, body: ClickIn, format: str = "png"):
        start = time.perf_counter()
        check_format(format)
        entry = store.get(sid)
        with entry.lock:
            with slots:
                entry.session.add_click(body.x, body.y, body.positive)
            out = answer(entry, format, start, entry.session.forwards[-1])
        store.touched(entry)
        return JSONResponse(out)

    @app.post("/sessions/{sid}/undo")
    def undo(sid: str, format: str = "png"):
        start = time.perf_counter()
        check_format(format)
        entry = store.get(sid)
        with entry.lock:
            with slots:
                entry.session.undo()
            out = answer(entry, format, start, 0)
        store.touched(entry)
        return JSONResponse(out)

    @app.post("/sessions/{sid}/reset")
    def reset(sid: str, format: str = "png"):
        start = time.perf_counter()
        check_format(format)
        entry = store.get(sid)
        with entry.lock:
            with slots:
                entry.session.reset()
            out = answer(entry, format, start, 0)
        store.touched(entry)
        return JSONResponse(out)

    @app.put("/sessions/{sid}/mode")
    def set_mode(sid: str, body: ModeIn):
        cfr, adaptive = parse_mode(body.mode)
        entry = store.get(sid)
        with entry.lock:
            entry.session.cfr, entry.session.adaptive = cfr, adaptive
            return describe(entry)

    @app.get("/sessions/{sid}/mask.png")
    def mask_file(sid: str):
        entry = store.get(sid)
        with entry.lock:
            data = mask_png(entry.session.mask)
        return Response(data, media_type="image/png",
                        headers={"Content-Disposition": 'attachment; filename="mask.png"'})

    from .cvat import add_cvat_routes

    add_cvat_routes(app, store, config, slots)
    # -- Label Studio ML backend (issue 17): routes under /labelstudio, see labelstudio.py --
    from .labelstudio import add_labelstudio_routes

    add_labelstudio_routes(app, store, config, slots)
    return app
