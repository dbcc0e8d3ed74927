"""The HTTP API of `cfr-serve` (FastAPI on uvicorn): stateful click sessions around one shared Engine.

Every answer to a click, undo or reset carries the mask (PNG or COCO RLE, `?format=`), the zoom-in box,
the forwards the click ran and the server-side milliseconds. Errors are always JSON
`{"error": <project error type>, "message": ...}` with a 4xx status (500 only for a bug, without a traceback).

Nothing heavy runs on the event loop: decodes, forwards and the encoding of masks and large JSON answers run
in worker threads, a few at a time, granted fairly between clients (`fairness.FairScheduler`); the loop only
reads bodies, checks headers and waits, so `/health` answers while any request runs. See
docs/serve-security.md for the limits and what each one stops.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..engine import Engine
from ..errors import CfrError, InputError
from . import cvat
from .codec import (
    FORMATS,
    UploadLimits,
    decode_upload,
    http_error,
    mask_png,
    mask_rle,
    parse_json,
    probe_upload,
    read_body,
    status_of,
)
from .fairness import IDENTITIES, FairScheduler
from .gate import Gate
from .memory import release_memory, rss_bytes
from .security import LOOPBACK_HOSTS, HostGuard, require_json, require_upload_type
from .store import Entry, SessionStore, StoreLimits, parse_mode

STATIC = Path(__file__).with_name("static")
log = logging.getLogger("cfr_runtime.serve")


@dataclass(frozen=True)
class ServeConfig:
    """Everything configurable about the service (the CLI maps its options onto this)."""

    store: StoreLimits = field(default_factory=StoreLimits)
    upload: UploadLimits = field(default_factory=UploadLimits)
    sweep_interval_s: float = 5.0
    # worker slots for heavy work (decodes, forwards, answers; other requests queue, fairly): more than the
    # cores only oversubscribes the CPU, and ONNX Runtime's arena grows to the peak number of concurrent runs
    max_concurrent: int = 2
    # Host (and Origin) names the server answers to; "*" allows any (then put a proxy in front that checks)
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    # who a request is accounted to: "address" (peer IP) or "header" (client_header, else the address)
    client_identity: str = "address"
    client_header: str = "x-client-id"
    # requests one client may have queued or running at once (more: 429), and the longest wait for a slot
    client_max_inflight: int = 32
    queue_timeout_s: float = 120.0
    # bodies of the small JSON endpoints (a click, a mode)
    max_json_bytes: int = 64 * 1024

    def __post_init__(self):
        if self.client_identity not in IDENTITIES:
            raise InputError(f"client_identity must be one of {IDENTITIES}, got {self.client_identity!r}")
        if min(self.max_concurrent, self.client_max_inflight, self.max_json_bytes) < 1 or self.queue_timeout_s <= 0:
            raise InputError("max_concurrent, client_max_inflight, max_json_bytes and queue_timeout_s must be > 0")


class ClickIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: Annotated[float, Field(strict=True)]
    y: Annotated[float, Field(strict=True)]
    positive: StrictBool = True


class ModeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: str


def error_response(exc: CfrError) -> JSONResponse:
    headers = {"Retry-After": "5"} if status_of(exc) in (429, 503) else None
    return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=status_of(exc),
                        headers=headers)


def validation_message(exc: ValidationError | RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


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


async def read_json(request: Request, limit: int, model: type[BaseModel], what: str) -> BaseModel:
    """A small JSON body: application/json only (415), at most `limit` bytes (413), JSON (400), valid (422)."""
    require_json(request, what)
    raw = await read_body(request, limit)
    data = parse_json(raw, what)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise http_error(InputError, 422, validation_message(exc)) from None


def create_app(engine: Engine | str, config: ServeConfig | None = None, store: SessionStore | None = None) -> FastAPI:
    """The ASGI app. `engine` is an Engine or a model path; `store` may be injected (tests use a fake clock)."""
    config = config or ServeConfig()
    if not isinstance(engine, Engine):
        engine = Engine(engine)
    if store is None:
        store = SessionStore(engine, config.store)
    work = FairScheduler(config.max_concurrent, config.client_max_inflight, config.queue_timeout_s)
    gate = Gate(store, work, config.client_identity, config.client_header)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def sweeper():
            while True:
                await asyncio.sleep(config.sweep_interval_s)
                await run_in_threadpool(store.sweep)

        task = asyncio.create_task(sweeper())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="cfr-serve", version="0.1.0", lifespan=lifespan,
                  description="CFR-ICL click-based interactive segmentation sessions")
    app.add_middleware(HostGuard, allowed=config.allowed_hosts)
    app.state.store = store
    app.state.engine = engine
    app.state.config = config
    app.state.work = work
    app.state.gate = gate  # what adapters registered on this app use to reach heavy work (gate.py)
    client, heavy, read_held = gate.client, gate.run, gate.read_held

    @app.exception_handler(CfrError)
    async def on_cfr_error(request: Request, exc: CfrError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        return error_response(http_error(InputError, 422, validation_message(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no endpoint {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(http_error(InputError, exc.status_code, message))

    @app.exception_handler(ClientDisconnect)
    async def on_gone(request: Request, exc: ClientDisconnect):  # nobody to answer; not a bug either
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):  # a bug: logged with its traceback, answered briefly
        log.exception("cfr-serve: %s %s failed", request.method, request.url.path)
        return JSONResponse({"error": "InternalError", "message": f"internal error ({type(exc).__name__}); "
                                                                   "see the server log"}, status_code=500)

    # ---- page and health -------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        """Runs on the event loop without a worker, so it answers while every worker is busy."""
        if store.sweep(release=False):
            asyncio.get_running_loop().run_in_executor(None, release_memory)
        c = engine.contract
        rss = rss_bytes()
        return {"status": "ok", "engine": repr(engine), "input_size": c.input_size, "max_points": c.max_points,
                **store.stats(), "rss_mb": None if rss is None else round(rss / 2**20, 1), "work": work.stats(),
                "upload": {"max_bytes": config.upload.max_bytes, "max_pixels": config.upload.max_pixels}}

    # ---- sessions --------------------------------------------------------------------------------------
    @app.post("/sessions", status_code=201)
    async def create_session(request: Request, mode: str = "StdInfer"):
        """Body: the image file itself (curl --data-binary @img.jpg -H 'Content-Type: image/jpeg')."""
        require_upload_type(request)
        parse_mode(mode)
        who = client(request)
        with gate.admitted(who):
            body, held = await read_held(request, config.upload.max_bytes, who)
            with held:
                header = await run_in_threadpool(probe_upload, body, config.upload)  # refusals before queueing

                def create() -> Entry:
                    with store.reserve(header.width, header.height, who) as reservation:
                        rgb = decode_upload(body, config.upload, header=header)
                        return store.create(rgb, mode, client=who, reservation=reservation)

                entry = await heavy(request, create, admitted=True)
        return {**describe(entry), "idle_timeout_s": store.limits.idle_timeout_s}

    @app.get("/sessions/{sid}")
    async def get_session(sid: str):
        entry = store.get(sid)
        async with entry.alock:
            return describe(entry)

    @app.delete("/sessions/{sid}", status_code=204)
    def delete_session(sid: str):
        store.delete(sid)
        return Response(status_code=204)

    def stepped(entry: Entry, fmt: str, step, start: float):
        def run() -> JSONResponse:
            with entry.lock:
                forwards = step(entry.session)
                out = answer(entry, fmt, start, forwards)
            store.account(entry)
            return JSONResponse(out)  # rendered here, in the worker
        return run

    @app.post("/sessions/{sid}/clicks")
    async def click(request: Request, sid: str, format: str = "png"):
        start = time.perf_counter()
        check_format(format)
        entry = store.get(sid)
        body = await read_json(request, config.max_json_bytes, ClickIn, "click")

        def add(session) -> int:
            session.add_click(body.x, body.y, body.positive)
            return session.forwards[-1]

        return await heavy(request, stepped(entry, format, add, start), entry.alock)

    @app.post("/sessions/{sid}/undo")
    async def undo(request: Request, sid: str, format: str = "png"):
        start = time.perf_counter()
        check_format(format)
        entry = store.get(sid)
        return await heavy(request, stepped(entry, format, lambda s: (s.undo(), 0)[1], start), entry.alock)

    @app.post("/sessions/{sid}/reset")
    async def reset(request: Request, sid: str, format: str = "png"):
        start = time.perf_counter()
        check_format(format)
        entry = store.get(sid)
        return await heavy(request, stepped(entry, format, lambda s: (s.reset(), 0)[1], start), entry.alock)

    @app.put("/sessions/{sid}/mode")
    async def set_mode(request: Request, sid: str):
        body = await read_json(request, config.max_json_bytes, ModeIn, "mode")
        cfr, adaptive = parse_mode(body.mode)
        entry = store.get(sid)
        async with entry.alock:
            with entry.lock:
                entry.session.cfr, entry.session.adaptive = cfr, adaptive
                return describe(entry)

    @app.get("/sessions/{sid}/mask.png")
    async def mask_file(request: Request, sid: str):
        entry = store.get(sid)

        def encode() -> bytes:
            with entry.lock:
                return mask_png(entry.session.mask)

        data = await heavy(request, encode, entry.alock)
        return Response(data, media_type="image/png",
                        headers={"Content-Disposition": 'attachment; filename="mask.png"'})

    # ---- the CVAT interactor adapter (cvat.py): nuclio invokes a function at its root ---------------------
    cvat_limit = config.upload.max_bytes * 4 // 3 + 65536  # base64 of the largest upload, plus the JSON around it

    async def interact(request: Request, mode: str = "StdInfer", crop: bool = True):
        start = time.perf_counter()
        require_json(request, "CVAT request body")
        parse_mode(mode)
        who = client(request)
        with gate.admitted(who):
            raw, held = await read_held(request, cvat_limit, who)
            with held:
                data = await heavy(request, lambda: cvat.interact(store, raw, limits=config.upload, mode=mode,
                                                                  client=who, crop=crop, start=start), admitted=True)
        return Response(data, media_type="application/json")

    app.add_api_route("/cvat/interactor", interact, methods=["POST"], summary="CVAT interactor function body")
    app.add_api_route("/", interact, methods=["POST"], include_in_schema=False)

    # ---- the Label Studio ML backend (labelstudio.py): routes under /labelstudio, through app.state.gate ----
    from .labelstudio import add_labelstudio_routes

    add_labelstudio_routes(app)
    return app
