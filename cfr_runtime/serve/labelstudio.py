"""cfr-serve as a Label Studio ML backend: the HTTP protocol of Label Studio 1.23's ML client, in our app.

Read from Label Studio's source (label_studio/ml/api_connector.py, models.py, and the labeling page's
`regionFinishedDrawing` handler) and from its ML backend package (label_studio_ml/api.py):

- The backend URL that a Label Studio user enters is a base; Label Studio calls `<base>/health` (GET, any
  JSON with a 2xx), `<base>/setup` (POST {project, schema, hostname, access_token, extra_params} -> {model_version}),
  `<base>/predict` (POST {tasks, project, label_config, params: {context, login, password}} -> {results: [...]}),
  `<base>/versions` (GET) and `<base>/webhook` (POST, every project event once the backend is connected).
  Our base is `/labelstudio` (StdInfer) or `/labelstudio/<mode>` (e.g. `/labelstudio/A-CFR-4`), so the
  app's own `/health` and `/` stay as they are.
- When a person places a smart keypoint, the labeling page posts `/api/ml/<id>/interactive-annotating`
  {task, context: {result: [...]}} to Label Studio, which forwards one `/predict` with that context: the
  serialized results of every smart keypoint of that label on the image, in the annotation's order, each
  with `value.x`/`value.y` in percent of `original_width`/`original_height` and `is_positive` (false for a
  keypoint placed with Alt). Label Studio hands `results[0]` back to the page, which shows its `result` as
  a suggestion: here one `brushlabels` region in Label Studio's brush RLE, with a score and model version.

State: the click list in the request is the truth. A task's image is fetched once (labelstudio_fetch: from
LABEL_STUDIO_URL only) and kept as a stored session keyed by task, image URL and mode; `replay` brings that
session to the request's clicks, so the answer is the one a fresh Session fed those clicks in Label
Studio's order gives, and a new click costs one click's forwards. Evicting a session (idle timeout, LRU, a
webhook saying the task was annotated or deleted) therefore only costs time, never correctness.

Why the brush encoder comes from Label Studio's package (label_studio_sdk.converter.brush, or the same code
as label_studio_converter.brush): the page decodes what that encoder writes, so our masks are in exactly
Label Studio's format. It is an optional extra (`cfr-icl[labelstudio]`), loaded on first use (`brush_module`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import secrets
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ..errors import InputError, SessionNotFoundError
from ..session import Click, Session
from .codec import http_error, read_body
from .labelstudio_fetch import ImageFetcher, LabelStudioConfig
from .store import Entry, SessionStore, format_mode, parse_mode

PREFIX = "/labelstudio"
MODEL_CLASS = "cfr-icl"
# webhook actions after which a task's interactive session is not needed any more (LS may send many more)
DROP_ACTIONS = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "TASKS_DELETED"}
PIXEL_EPS = 1e-6  # px: a percent that round-trips to 79.9999999 px still names pixel 80


# ---- the labeling config ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schema:
    """What the adapter needs from a project's labeling config."""

    image: str  # <Image name=...>: the results' to_name
    data_key: str  # the task data field that holds the image URL (<Image value="$image">)
    brush: str  # <BrushLabels name=...>: from_name of the masks we answer with
    brush_labels: tuple[str, ...]
    keypoints: frozenset[str]  # names of the <KeyPointLabels> on that image (the clicks)

    def brush_label(self, keypoint_label: str | None) -> str:
        """The BrushLabels label a mask gets: the keypoint's label when BrushLabels has it, else its only one."""
        if keypoint_label in self.brush_labels:
            return keypoint_label
        if len(self.brush_labels) == 1:
            return self.brush_labels[0]
        raise http_error(InputError, 400, f"the keypoint label {keypoint_label!r} has no BrushLabels label of the "
                                          f"same value in <BrushLabels name={self.brush!r}> "
                                          f"(labels {list(self.brush_labels)}); give both tags the same labels")


@functools.lru_cache(maxsize=32)
def parse_schema(label_config: str) -> Schema:
    """Find an Image with a BrushLabels (the answer) and a KeyPointLabels (the clicks) on it, or say what is missing."""
    if not isinstance(label_config, str) or not label_config.strip():
        raise http_error(InputError, 400, "the request has no label_config (Label Studio sends the project's "
                                          "labeling config with every call)")
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError as exc:
        raise http_error(InputError, 400, f"the labeling config is not valid XML ({exc})") from None
    images = {el.get("name"): el for el in root.iter("Image") if el.get("name")}
    problems = []
    for brush in root.iter("BrushLabels"):
        target = brush.get("toName", "")
        keypoints = frozenset(el.get("name") for el in root.iter("KeyPointLabels")
                              if el.get("toName") == target and el.get("name"))
        image = images.get(target)
        labels = tuple(lab.get("value") for lab in brush.iter("Label") if lab.get("value"))
        if image is None or not keypoints or not labels:
            problems.append(f"<BrushLabels name={brush.get('name')!r}> on {target!r}")
            continue
        value = image.get("value", "")
        if not value.startswith("$") or len(value) < 2:
            raise http_error(InputError, 400, f"<Image name={target!r}> takes its URL from {value!r}; expected a "
                                              "task field such as value=\"$image\"")
        return Schema(target, value[1:], brush.get("name", ""), labels, keypoints)
    where = f" (checked {', '.join(problems)})" if problems else ""
    raise http_error(InputError, 400, "the labeling config needs an <Image>, a <BrushLabels> with at least one "
                                      "<Label> for the masks, and a smart <KeyPointLabels> for the clicks, both with "
                                      f"toName set to the Image's name{where}")


# ---- clicks from Label Studio's context ------------------------------------------------------------------
def to_pixel(percent: float, n: int) -> int:
    """The pixel (column or row) a coordinate in percent of an n-pixel side lies in."""
    return min(n - 1, max(0, math.floor(percent * n / 100 + PIXEL_EPS)))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def clicks_from_context(results: Any, schema: Schema, size: tuple[int, int]) -> tuple[list[Click], str | None]:
    """The clicks (image pixels, in Label Studio's order) and the keypoints' label, from `context.result`."""
    w, h = size
    if not isinstance(results, list):
        raise http_error(InputError, 400, f"context.result must be a list of regions, got {type(results).__name__}")
    clicks: list[Click] = []
    label = None
    for i, r in enumerate(results):
        where = f"context.result[{i}]"
        if not isinstance(r, dict) or not isinstance(r.get("value"), dict):
            raise http_error(InputError, 400, f"{where} is not a Label Studio region with a 'value'")
        kind = str(r.get("type", "")).lower()
        if kind == "rectanglelabels":
            raise http_error(InputError, 400, f"{where} is a box: CFR-ICL is a click model; use a smart "
                                              "KeyPointLabels (click for the object, Alt+click for background)")
        if kind != "keypointlabels" or r.get("from_name") not in schema.keypoints:
            raise http_error(InputError, 400, f"{where} is {kind or 'untyped'} from {r.get('from_name')!r}; "
                                              f"expected keypointlabels from one of {sorted(schema.keypoints)}")
        if r.get("to_name", schema.image) != schema.image:
            raise http_error(InputError, 400, f"{where} is on {r.get('to_name')!r}, not on the image {schema.image!r}")
        if r.get("image_rotation", 0) not in (0, None):
            raise http_error(InputError, 400, f"{where} was placed on an image rotated by {r['image_rotation']} "
                                              "degrees in Label Studio; reset the rotation and click again")
        declared = (r.get("original_width", w), r.get("original_height", h))
        if declared != (w, h):
            raise http_error(InputError, 400, f"{where} was placed on a {declared[0]}x{declared[1]} image, but "
                                              f"the task's image is {w}x{h}")
        v = r["value"]
        x, y = v.get("x"), v.get("y")
        if not (_number(x) and _number(y) and 0 <= x <= 100 and 0 <= y <= 100):
            raise http_error(InputError, 400, f"{where}: value.x and value.y must be percentages in [0, 100], "
                                              f"got x={x!r}, y={y!r}")
        positive = r.get("is_positive", True)  # Label Studio sets it on every smart keypoint
        if not isinstance(positive, bool):
            raise http_error(InputError, 400, f"{where}: is_positive must be true or false, got {positive!r}")
        names = v.get("keypointlabels")
        if isinstance(names, list) and names and label is None:
            label = str(names[0])
        clicks.append(Click(float(to_pixel(x, w)), float(to_pixel(y, h)), positive))
    return clicks, label


# ---- the state rule -------------------------------------------------------------------------------------
def replay(session: Session, clicks: list[Click]) -> int:
    """Bring `session` to exactly `clicks`, in order: undo back to the longest common prefix, then add the rest.

    Undo restores a Session bit for bit, so the result equals a fresh Session fed `clicks`; the common case
    (one keypoint more than last time) costs one click's forwards. Returns the forwards run. This is the
    one place where a stateless request's click list meets a cached session.
    """
    have = session.clicks
    keep = 0
    while keep < min(len(have), len(clicks)) and have[keep] == clicks[keep]:
        keep += 1
    for _ in range(len(have) - keep):
        session.undo()
    forwards = 0
    for c in clicks[keep:]:
        session.add_click(c.x, c.y, c.positive)
        forwards += session.forwards[-1]
    return forwards


# ---- masks in Label Studio's brush RLE ------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def brush_module() -> ModuleType:
    """Label Studio's own brush RLE codec: `brush.py` of label-studio-sdk (label_studio_sdk/converter/) or of
    label-studio-converter, loaded from its file.

    Loaded by itself rather than imported through its package because the packages' __init__ imports the
    whole converter (pandas, nltk, lxml: seconds and tens of MB), while brush.py needs only numpy and PIL; and
    Label Studio gives an ML backend's /setup 3 seconds. Falls back to the ordinary import should a later
    brush.py need its package.
    """
    for package, rel in (("label_studio_sdk", "converter/brush.py"), ("label_studio_converter", "brush.py")):
        try:
            spec = importlib.util.find_spec(package)  # finds the package without running its __init__
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / rel
        if not path.is_file():
            continue
        file_spec = importlib.util.spec_from_file_location("_cfr_labelstudio_brush", path)
        module = importlib.util.module_from_spec(file_spec)
        try:
            file_spec.loader.exec_module(module)
        except ImportError:
            module = importlib.import_module(package + "." + rel[:-3].replace("/", "."))
        return module
    raise http_error(InputError, 501, "answering Label Studio needs its brush RLE encoder: "
                                      "pip install 'cfr-icl[labelstudio]' (label-studio-converter) or label-studio-sdk")


def mask_to_brush_rle(mask: np.ndarray) -> list[int]:
    return brush_module().mask2rle(np.asarray(mask, bool).astype(np.uint8) * 255)


def brush_rle_to_mask(rle: list[int], width: int, height: int) -> np.ndarray:
    """Inverse (tests and clients): the alpha channel of the RGBA image Label Studio's RLE holds, as bool."""
    flat = brush_module().decode_rle(rle)
    if flat.size != width * height * 4:
        raise InputError(f"brush RLE holds {flat.size} values, expected {width}x{height}x4")
    return flat.reshape(height, width, 4)[:, :, 3] > 127


# ---- the routes -----------------------------------------------------------------------------------------
def model_version(engine, mode: str) -> str:
    c = engine.contract
    digest = (c.checkpoint_sha256 or "unknown")[:12]
    return f"cfr-icl-{c.input_size}-{c.precision}-{digest}-{mode}"


class _TaskIndex:
    """task id -> stored session keys, so a webhook can drop a finished task's sessions."""

    def __init__(self):
        self._keys: dict[int, set[str]] = {}
        self._lock = threading.Lock()

    def add(self, task: int, key: str) -> None:
        with self._lock:
            self._keys.setdefault(task, set()).add(key)

    def pop(self, task: int) -> set[str]:
        with self._lock:
            return self._keys.pop(task, set())


def add_labelstudio_routes(app: FastAPI, store: SessionStore, config, slots,
                           ls: LabelStudioConfig | None = None) -> None:
    """Register the ML backend routes under PREFIX (and PREFIX/<mode>). `ls` defaults to the environment."""
    fetcher = ImageFetcher(ls or LabelStudioConfig.from_env(), config.upload)
    engine = store.engine
    tasks = _TaskIndex()
    opening: dict[str, threading.Lock] = {}  # one fetch per task at a time
    opening_lock = threading.Lock()
    body_limit = config.upload.max_bytes  # JSON with the task (and its earlier predictions' RLE)

    async def read_json(request: Request) -> dict:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise http_error(InputError, 415, f"send JSON with Content-Type: application/json, not {ctype or 'none'}")
        raw = await read_body(request, body_limit)
        try:
            data = await run_in_threadpool(json.loads, raw or b"null")
        except json.JSONDecodeError as exc:
            raise http_error(InputError, 400, f"the request body is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise http_error(InputError, 400, "the request body must be a JSON object")
        return data

    def session_for(task: dict, schema: Schema, mode: str) -> Entry:
        task_id = task.get("id")
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            raise http_error(InputError, 400, "the task has no integer 'id'")
        data = task.get("data")
        if not isinstance(data, dict) or schema.data_key not in data:
            raise http_error(InputError, 400, f"task {task_id} has no data field {schema.data_key!r} "
                                              f"(the <Image name={schema.image!r}> reads ${schema.data_key})")
        url = fetcher.resolve(data[schema.data_key], task_id)
        key = f"labelstudio|{task_id}|{url}|{mode}"
        entry = store.by_key(key)
        if entry is not None:
            return entry
        with opening_lock:
            lock = opening.setdefault(key, threading.Lock())
        try:
            with lock:  # a second request for the same new task waits for the first fetch instead of repeating it
                entry = store.by_key(key)
                if entry is None:
                    rgb = fetcher.load(url)
                    entry = store.create(rgb, mode, key)
                    tasks.add(task_id, key)
        finally:
            with opening_lock:
                opening.pop(key, None)
        return entry

    def predict_sync(data: dict, mode: str, start: float) -> dict:
        version = model_version(engine, mode)
        params = data.get("params") if isinstance(data.get("params"), dict) else {}
        context = params.get("context", data.get("context"))
        items = data.get("tasks")
        if not isinstance(items, list) or not all(isinstance(t, dict) for t in items):
            raise http_error(InputError, 400, "'tasks' must be a list of Label Studio tasks")
        if not context:  # batch pre-annotation: a click model has nothing to say without clicks
            return {"results": [], "model_version": version}
        if not isinstance(context, dict):
            raise http_error(InputError, 400, "params.context must be an object with a 'result' list")
        if len(items) != 1:
            raise http_error(InputError, 400, f"an interactive request carries one task, got {len(items)}")
        schema = parse_schema(data.get("label_config"))
        entry = session_for(items[0], schema, mode)
        size = entry.size
        clicks, label = clicks_from_context(context.get("result", []), schema, size)
        if not clicks:  # the last keypoint was deleted: an empty suggestion clears the mask on the page
            return {"results": [{"result": [], "score": 0.0, "model_version": version}]}
        brush_label = schema.brush_label(label)
        with entry.lock:
            with slots:
                forwards = replay(entry.session, clicks)
            mask = entry.session.mask
            score = float(entry.session.probs[mask].mean()) if mask.any() else 0.0
        store.touched(entry)
        w, h = size
        region = {"id": secrets.token_hex(5), "from_name": schema.brush, "to_name": schema.image,
                  "type": "brushlabels", "original_width": w, "original_height": h, "image_rotation": 0,
                  "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [brush_label]},
                  "score": score, "readonly": False}
        prediction = {"result": [region], "score": score, "model_version": version,
                      "cfr": {"clicks": len(clicks), "forwards": forwards, "area": int(mask.sum()),
                              "server_ms": round((time.perf_counter() - start) * 1000, 3)}}
        return {"results": [prediction]}

    # ---- handlers --------------------------------------------------------------------------------------
    def health(mode: str = "StdInfer"):
        mode = format_mode(*parse_mode(mode))
        return {"status": "UP", "model_class": MODEL_CLASS, "model_version": model_version(engine, mode),
                "label_studio_url": fetcher.config.url}

    async def setup(request: Request, mode: str = "StdInfer"):
        mode = format_mode(*parse_mode(mode))
        data = await read_json(request)
        # hostname/access_token in the body are ignored on purpose: images come from LABEL_STUDIO_URL only
        if data.get("schema"):
            parse_schema(data["schema"])  # an unusable labeling config fails here, where Label Studio shows it
        brush_module()  # a missing codec fails here, where Label Studio shows it, not on the first click
        return {"model_version": model_version(engine, mode)}

    async def predict(request: Request, mode: str = "StdInfer"):
        start = time.perf_counter()
        mode = format_mode(*parse_mode(mode))
        data = await read_json(request)
        return JSONResponse(await run_in_threadpool(predict_sync, data, mode, start))

    def versions(mode: str = "StdInfer"):
        return {"versions": [model_version(engine, format_mode(*parse_mode(mode)))]}

    async def webhook(request: Request, mode: str = "StdInfer"):
        data = await read_json(request)
        action = data.get("action")
        # ANNOTATION_* events nest the task (a list for ANNOTATIONS_CREATED); TASKS_DELETED lists {id}s
        found = []
        for field in ("task", "tasks"):
            value = data.get(field)
            found += value if isinstance(value, list) else [value]
        ids = [t.get("id") for t in found if isinstance(t, dict)]
        if action not in DROP_ACTIONS:
            return {"status": "ok", "action": action, "dropped": 0}
        dropped = 0
        for task_id in ids:
            if not isinstance(task_id, int):
                continue
            for key in tasks.pop(task_id):
                entry = store.by_key(key)
                if entry is None:
                    continue
                try:
                    store.delete(entry.id)
                    dropped += 1
                except SessionNotFoundError:
                    pass
        return {"status": "ok", "action": action, "dropped": dropped}

    for base in (PREFIX, PREFIX + "/{mode}"):
        tag = ["Label Studio ML backend"]
        app.add_api_route(base + "/health", health, methods=["GET"], tags=tag)
        app.add_api_route(base + "/setup", setup, methods=["POST"], tags=tag)
        app.add_api_route(base + "/predict", predict, methods=["POST"], tags=tag)
        app.add_api_route(base + "/versions", versions, methods=["GET"], tags=tag)
        app.add_api_route(base + "/webhook", webhook, methods=["POST"], tags=tag)
    app.add_api_route(PREFIX + "/", health, methods=["GET"], include_in_schema=False)
