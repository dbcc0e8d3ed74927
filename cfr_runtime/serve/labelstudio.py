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

State: the click list in the request is the truth. Each `/predict` is one call of `SessionStore.replay`
(the stateless primitive the CVAT adapter and the cluster use too) keyed by task and image URL, with the
keypoints in Label Studio's order and the requesting client's identity: the answer is the one a fresh
Session fed those clicks in that order gives, and when the previous call's clicks are a prefix (a keypoint
added) the cached session is reused and the call costs one click's forwards. The task's image is fetched
(labelstudio_fetch: from LABEL_STUDIO_URL only) only when no cached session can be used, and decoded under
the store's memory reservation and the upload limits. Evicting a session (idle timeout, LRU, a webhook
saying the task was annotated or deleted) therefore only costs time, never correctness.

Limits: the routes go through the app's `Gate` (app.state.gate) like the page's and CVAT's: bodies are JSON
only (`require_json`), read while held against the memory cap (`read_held`), counted against the client's
in-flight limit, and a prediction (parse, fetch, decode, forwards, RLE) runs in the fair queue's worker
slots. `/setup` and `/webhook` only parse JSON and run in a worker thread outside the queue, so Label
Studio's 3 s timeout on `/setup` is not spent waiting behind clicks.

Why the brush encoder comes from Label Studio's package (label_studio_sdk.converter.brush, or the same code
as label_studio_converter.brush): the page decodes what that encoder writes, so our masks are in exactly
Label Studio's format. It is an optional extra (`cfr-icl[labelstudio]`), loaded on first use (`brush_module`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import secrets
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

from ..errors import InputError
from ..session import Click
from .codec import http_error, parse_json
from .gate import Gate
from .labelstudio_fetch import ImageFetcher, LabelStudioConfig
from .security import require_json
from .store import SessionStore, format_mode, parse_mode

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


def _side(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def clicks_from_context(results: Any, schema: Schema) -> tuple[list[Click], str | None, tuple[int, int] | None]:
    """The clicks (image pixels, in Label Studio's order), the keypoints' label and the (width, height) of the
    image they were placed on, from `context.result`; size None when there are no keypoints.

    Label Studio gives each keypoint in percent of its `original_width` x `original_height`; the pixels are
    computed for that size, and `SessionStore.replay(size=...)` refuses a task image of another size."""
    if not isinstance(results, list):
        raise http_error(InputError, 400, f"context.result must be a list of regions, got {type(results).__name__}")
    clicks: list[Click] = []
    label = None
    size: tuple[int, int] | None = None
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
        w, h = r.get("original_width"), r.get("original_height")
        if not (_side(w) and _side(h)):
            raise http_error(InputError, 400, f"{where}: original_width and original_height must be the pixel size "
                                              "of the image the keypoint was placed on (Label Studio sends them "
                                              f"with every keypoint), got {w!r} x {h!r}")
        if size is None:
            size = (w, h)
        elif (w, h) != size:
            raise http_error(InputError, 400, f"{where} was placed on a {w}x{h} image, but context.result[0] on a "
                                              f"{size[0]}x{size[1]} image")
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
    return clicks, label, size


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


def canonical_mode(mode: str) -> str:
    """The mode of a route (`/labelstudio/<mode>/...`) in its one spelling; 400 for an unknown one."""
    return format_mode(*parse_mode(mode))


def task_key(task_id: int) -> str:
    """The start of every store key of a task's sessions (the webhook forgets them by it)."""
    return f"labelstudio|{task_id}|"


def json_object(raw: bytes, what: str) -> dict:
    data = parse_json(raw or b"null", what)
    if not isinstance(data, dict):
        raise http_error(InputError, 400, f"the {what} must be a JSON object")
    return data


def task_image(task: dict, schema: Schema, fetcher: ImageFetcher) -> tuple[int, str]:
    """(task id, the absolute URL of its image on LABEL_STUDIO_URL); the SSRF rule is applied here, before any
    network access."""
    task_id = task.get("id")
    if not isinstance(task_id, int) or isinstance(task_id, bool):
        raise http_error(InputError, 400, "the task has no integer 'id'")
    data = task.get("data")
    if not isinstance(data, dict) or schema.data_key not in data:
        raise http_error(InputError, 400, f"task {task_id} has no data field {schema.data_key!r} "
                                          f"(the <Image name={schema.image!r}> reads ${schema.data_key})")
    return task_id, fetcher.resolve(data[schema.data_key], task_id)


def add_labelstudio_routes(app: FastAPI, ls: LabelStudioConfig | None = None) -> None:
    """Register the ML backend routes under PREFIX (and PREFIX/<mode>) on an app made by `create_app`, served by
    its store, limits and `app.state.gate` as the page's routes are. `ls` defaults to the environment
    (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY)."""
    store: SessionStore = app.state.store
    gate: Gate = app.state.gate
    config = app.state.config
    fetcher = ImageFetcher(ls or LabelStudioConfig.from_env(), config.upload)
    engine = store.engine
    body_limit = config.upload.max_bytes  # a task's JSON (with its earlier predictions' RLE), an event

    async def read_object(request: Request, who: str, what: str) -> dict:
        """A JSON-object body, read held and parsed in a worker thread; the caller holds `gate.admitted(who)`."""
        require_json(request, what)
        raw, held = await gate.read_held(request, body_limit, who)
        with held:
            return await run_in_threadpool(json_object, raw, what)

    def predict_sync(raw: bytes, mode: str, who: str, start: float) -> JSONResponse:
        data = json_object(raw, "Label Studio request body")
        version = model_version(engine, mode)
        params = data.get("params") if isinstance(data.get("params"), dict) else {}
        context = params.get("context", data.get("context"))
        items = data.get("tasks")
        if not isinstance(items, list) or not all(isinstance(t, dict) for t in items):
            raise http_error(InputError, 400, "'tasks' must be a list of Label Studio tasks")
        if not context:  # batch pre-annotation: a click model has nothing to say without clicks
            return JSONResponse({"results": [], "model_version": version})
        if not isinstance(context, dict):
            raise http_error(InputError, 400, "params.context must be an object with a 'result' list")
        if len(items) != 1:
            raise http_error(InputError, 400, f"an interactive request carries one task, got {len(items)}")
        schema = parse_schema(data.get("label_config"))
        task_id, url = task_image(items[0], schema, fetcher)
        clicks, label, size = clicks_from_context(context.get("result", []), schema)
        if not clicks:  # the last keypoint was deleted: an empty suggestion clears the mask on the page
            return JSONResponse({"results": [{"result": [], "score": 0.0, "model_version": version}]})
        brush_label = schema.brush_label(label)
        brush_module()  # a missing codec is refused before any work, not after it
        with store.replay(task_key(task_id) + url, fetcher.image(url), clicks, mode, client=who, size=size) as r:
            mask = r.session.mask
            score = float(r.session.probs[mask].mean()) if mask.any() else 0.0
            forwards = r.forwards
        w, h = size
        region = {"id": secrets.token_hex(5), "from_name": schema.brush, "to_name": schema.image,
                  "type": "brushlabels", "original_width": w, "original_height": h, "image_rotation": 0,
                  "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [brush_label]},
                  "score": score, "readonly": False}
        prediction = {"result": [region], "score": score, "model_version": version,
                      "cfr": {"clicks": len(clicks), "forwards": forwards, "area": int(mask.sum()),
                              "server_ms": round((time.perf_counter() - start) * 1000, 3)}}
        return JSONResponse({"results": [prediction]})  # rendered here, in the worker

    # ---- handlers --------------------------------------------------------------------------------------
    def health(mode: str = "StdInfer"):
        return {"status": "UP", "model_class": MODEL_CLASS,
                "model_version": model_version(engine, canonical_mode(mode)), "label_studio_url": fetcher.config.url}

    async def setup(request: Request, mode: str = "StdInfer"):
        mode = canonical_mode(mode)
        who = gate.client(request)
        with gate.admitted(who):
            data = await read_object(request, who, "Label Studio setup body")
        # hostname/access_token in the body are ignored on purpose: images come from LABEL_STUDIO_URL only

        def check() -> None:  # an unusable labeling config or a missing codec fails here, where Label Studio
            if data.get("schema"):  # shows it when the model is connected, not on the first click
                parse_schema(data["schema"])
            brush_module()

        await run_in_threadpool(check)
        return {"model_version": model_version(engine, mode)}

    async def predict(request: Request, mode: str = "StdInfer"):
        start = time.perf_counter()
        mode = canonical_mode(mode)
        who = gate.client(request)
        with gate.admitted(who):
            require_json(request, "Label Studio request body")
            raw, held = await gate.read_held(request, body_limit, who)
            with held:  # the body stays held against the memory cap until its prediction is done
                return await gate.run(request, lambda: predict_sync(raw, mode, who, start), admitted=True)

    def versions(mode: str = "StdInfer"):
        return {"versions": [model_version(engine, canonical_mode(mode))]}

    async def webhook(request: Request, mode: str = "StdInfer"):
        canonical_mode(mode)
        who = gate.client(request)
        with gate.admitted(who):
            data = await read_object(request, who, "Label Studio webhook body")
        action = data.get("action")
        if action not in DROP_ACTIONS:
            return {"status": "ok", "action": action, "dropped": 0}
        # ANNOTATION_* events nest the task (a list for ANNOTATIONS_CREATED); TASKS_DELETED lists {id}s
        found = []
        for name in ("task", "tasks"):
            value = data.get(name)
            found += value if isinstance(value, list) else [value]
        ids = {t.get("id") for t in found if isinstance(t, dict)}
        prefixes = [task_key(i) for i in ids if isinstance(i, int) and not isinstance(i, bool)]
        dropped = await run_in_threadpool(lambda: sum(store.forget(p) for p in prefixes))
        return {"status": "ok", "action": action, "dropped": dropped}

    for base in (PREFIX, PREFIX + "/{mode}"):
        tag = ["Label Studio ML backend"]
        app.add_api_route(base + "/health", health, methods=["GET"], tags=tag)
        app.add_api_route(base + "/setup", setup, methods=["POST"], tags=tag)
        app.add_api_route(base + "/predict", predict, methods=["POST"], tags=tag)
        app.add_api_route(base + "/versions", versions, methods=["GET"], tags=tag)
        app.add_api_route(base + "/webhook", webhook, methods=["POST"], tags=tag)
    app.add_api_route(PREFIX + "/", health, methods=["GET"], include_in_schema=False)
