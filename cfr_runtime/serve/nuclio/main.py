"""The nuclio handler of the CFR-ICL interactor for CVAT (deployed by `nuctl deploy`, see docs/cvat.md).

nuclio calls `init_context` once per worker process, then `handler(context, event)` per request, one request at
a time per worker. Each worker loads the model once and keeps a `SessionStore`, so a click on a frame already
seen costs one click's forwards (`SessionStore.replay`); the answer is still exactly a fresh Session's on the
request's points (cfr_runtime.serve.cvat). Environment (set in function.yaml):
  CFR_MODEL          ONNX model or TensorRT plan (default: the tiny model bundled with cfr_runtime)
  CFR_MODE           StdInfer (default), CFR-n or A-CFR-n
  CFR_THREADS        ONNX Runtime intra-op threads (default: its own)
  CFR_MAX_MEMORY_MB  cap on the memory of the cached sessions of one worker (default 2048)
  CFR_MAX_SESSIONS   cap on their number (default 16)
  CFR_IDLE_TIMEOUT   seconds before an idle cached session is dropped (default 900)
  CFR_CROP           1 (default): answer the mask cropped to its box plus `bounds`; 0: the whole frame
"""

from __future__ import annotations

import json
import os
import time

from cfr_runtime import Engine, default_model
from cfr_runtime.errors import CfrError, InputError
from cfr_runtime.serve import cvat
from cfr_runtime.serve.codec import UploadLimits, http_error, status_of
from cfr_runtime.serve.store import SessionStore, StoreLimits, parse_mode

BROWSER_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def init_context(context) -> None:
    """Load the engine and open the worker's session store (once per worker process)."""
    model = _env("CFR_MODEL", str(default_model()))
    threads = os.environ.get("CFR_THREADS")
    engine = Engine(model, threads=int(threads) if threads else None)
    mode = _env("CFR_MODE", "StdInfer")
    parse_mode(mode)  # a bad CFR_MODE fails the deployment, not every request
    limits = StoreLimits(max_memory_mb=float(_env("CFR_MAX_MEMORY_MB", "2048")),
                         max_sessions=int(_env("CFR_MAX_SESSIONS", "16")),
                         idle_timeout_s=float(_env("CFR_IDLE_TIMEOUT", "900")))
    context.user_data.store = SessionStore(engine, limits)
    context.user_data.mode = mode
    context.user_data.upload = UploadLimits()
    context.user_data.crop = _env("CFR_CROP", "1") != "0"
    context.logger.info(f"cfr-icl interactor ready: {engine!r}, mode {mode}")


def handler(context, event):
    """One CVAT interactor request -> the answer cvat-ui reads (mask, bounds), or {error, message} with a 4xx."""
    start = time.perf_counter()
    ud = context.user_data
    try:
        body = event.body  # a dict when nuclio decoded an application/json body, else bytes
        ctype = (event.content_type or "").split(";")[0].strip().lower()
        if not isinstance(body, dict) and ctype in BROWSER_TYPES:
            raise http_error(InputError, 415, f"the CVAT request must be application/json, not {ctype}")
        ud.store.sweep()
        data = cvat.interact(ud.store, body if isinstance(body, (dict, str)) else bytes(body or b""),
                             limits=ud.upload, mode=ud.mode, crop=ud.crop, start=start)
        return context.Response(body=data.decode("ascii"), headers={}, content_type="application/json",
                                status_code=200)
    except CfrError as exc:
        context.logger.warn(f"cfr-icl interactor: {type(exc).__name__}: {exc}")
        return context.Response(body=json.dumps({"error": type(exc).__name__, "message": str(exc)}), headers={},
                                content_type="application/json", status_code=status_of(exc))
