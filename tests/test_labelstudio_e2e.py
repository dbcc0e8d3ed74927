"""cfr-serve as the ML backend of a real Label Studio 1.23 (its own virtualenv; see tests/ls_util.py).

A user with a token, a project whose labeling config has an Image, a smart KeyPointLabels and a BrushLabels,
a GrabCut image imported as a task, cfr-serve connected as the project's interactive ML backend through
Label Studio's API; then, click by click (positive and negative, then a keypoint deleted), the request the
labeling page sends when a keypoint is placed (`POST /api/ml/<id>/interactive-annotating` with the
serialized smart keypoints as `context.result`). The brush mask that comes back *through Label Studio* must
decode to the mask of a local `Session` fed the same clicks, pixel for pixel. Finally an annotation is
submitted and Label Studio's webhook must free the task's session in cfr-serve.

Skips, with the reason, only when Label Studio cannot be installed; with CFR_REQUIRE_LABEL_STUDIO=1 (set by
.ci/run) it fails instead, so CI never skips it silently.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from tests.conftest import DATA, need

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[serve]')")
pytest.importorskip("httpx", reason="httpx is not installed (pip install -e '.[dev]')")

from cfr_runtime import Engine, Session, default_model  # noqa: E402
from cfr_runtime.clicker import Clicker  # noqa: E402
from cfr_runtime.datasets import open_dataset  # noqa: E402
from cfr_runtime.errors import CfrError  # noqa: E402
from cfr_runtime.serve.codec import UploadLimits, decode_upload  # noqa: E402
from cfr_runtime.serve.labelstudio import brush_module, brush_rle_to_mask  # noqa: E402
from tests import ls_util  # noqa: E402

try:
    brush_module()
except CfrError as exc:
    pytest.skip(str(exc), allow_module_level=True)

IMAGE = "124080"  # 481 x 321: percent coordinates never land on whole pixels
CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="mask" toName="image"><Label value="Object" background="#ff0000"/></BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true">
    <Label value="Object" smart="true" background="#0000ff" showInline="true"/>
  </KeyPointLabels>
</View>"""


@pytest.fixture(scope="module")
def label_studio_exe():
    exe, why = ls_util.ensure()
    if exe is None:
        if os.environ.get("CFR_REQUIRE_LABEL_STUDIO") == "1":
            pytest.fail(f"Label Studio is required here (CFR_REQUIRE_LABEL_STUDIO=1) but {why}")
        pytest.skip(f"Label Studio cannot be installed: {why}")
    return exe


@pytest.fixture(scope="module")
def grabcut():
    inst = next(i for i in open_dataset(need(DATA / "GrabCut")) if i.id == IMAGE)
    data = inst.image_path.read_bytes()
    _, gt = inst.load()
    return inst.image_path, data, gt


def keypoint(i: int, x: int, y: int, positive: bool, size: tuple[int, int]) -> dict:
    """A smart keypoint as the labeling page serializes it (KeyPointRegion.serialize, `is_positive` added for a
    smart region; Alt+click makes it negative), placed in the middle of pixel (x, y)."""
    w, h = size
    return {"id": f"kp{i:03d}", "from_name": "click", "to_name": "image", "type": "keypointlabels",
            "origin": "manual", "original_width": w, "original_height": h, "image_rotation": 0,
            "is_positive": positive,
            "value": {"x": 100 * (x + 0.5) / w, "y": 100 * (y + 0.5) / h, "width": 0.5, "keypointlabels": ["Object"]}}


def fresh_mask(engine, rgb, clicks) -> np.ndarray:
    s = Session(engine)
    s.set_image(rgb)
    for x, y, p in clicks:
        s.add_click(x, y, p)
    return s.mask


def test_interactive_brush_through_label_studio(label_studio_exe, grabcut):
    path, data, gt = grabcut
    rgb = decode_upload(data, UploadLimits())  # how cfr-serve decodes what it fetches from Label Studio
    h, w = rgb.shape[:2]
    engine = Engine(default_model())
    # cfr-serve as a user runs it: its own process, told where Label Studio is by LABEL_STUDIO_URL/_API_KEY
    with ls_util.LabelStudio(label_studio_exe) as ls, ls_util.CfrServe(default_model(), ls.url) as cfr:
        project = ls.api("POST", "/api/projects/", {"title": "cfr-icl e2e", "label_config": CONFIG})
        imported = ls.api("POST", f"/api/projects/{project['id']}/import",
                          files={"file": (path.name, data, "image/jpeg")})
        assert imported["task_count"] == 1
        (task,) = ls.api("GET", f"/api/tasks/?project={project['id']}")["tasks"]
        assert task["data"]["image"].startswith("/data/upload/")
        backend = ls.api("POST", "/api/ml/", {"url": cfr.url + "/labelstudio", "project": project["id"],
                                              "is_interactive": True, "title": "cfr-icl"})
        assert backend["state"] == "CO", backend  # Label Studio called /health and /setup and is satisfied
        assert backend["model_version"].startswith("cfr-icl-")

        def ask(results: list) -> tuple[np.ndarray, dict]:
            """What the labeling page does on `regionFinishedDrawing` of a smart keypoint."""
            out = ls.api("POST", f"/api/ml/{backend['id']}/interactive-annotating",
                         {"task": task["id"], "context": {"result": results}})
            assert "errors" not in out, out
            pred = out["data"]
            (region,) = pred["result"]
            assert (region["type"], region["from_name"], region["to_name"]) == ("brushlabels", "mask", "image")
            assert region["value"]["brushlabels"] == ["Object"] and region["value"]["format"] == "rle"
            assert (region["original_width"], region["original_height"]) == (w, h)
            assert pred["model_version"] == backend["model_version"] and 0 <= pred["score"] <= 1
            return brush_rle_to_mask(region["value"]["rle"], w, h), pred

        # clicks as an annotator makes them: each at the centre of the largest error of the current mask
        clicker = Clicker(gt)
        local = Session(engine)
        local.set_image(rgb)
        clicks: list[tuple[int, int, bool]] = []
        for k in range(6):
            y, x, positive = clicker.next_click(local.mask)
            clicks.append((x, y, positive))
            local.add_click(x, y, positive)
            mask, pred = ask([keypoint(i, *c, (w, h)) for i, c in enumerate(clicks)])
            differ = np.count_nonzero(mask != local.mask)
            assert differ == 0, f"click {k + 1} {clicks[-1]}: {differ} px differ from the local Session"
            assert pred["cfr"]["forwards"] == 1  # the stored session reused: one click's work per click
        assert {p for _, _, p in clicks} == {True, False}, f"want positive and negative clicks, got {clicks}"
        assert local.mask.any()

        # the annotator deletes the second keypoint: the answer is that of a fresh Session without it
        kept = clicks[:1] + clicks[2:]
        mask, pred = ask([keypoint(i, *c, (w, h)) for i, c in enumerate(clicks) if i != 1])
        assert np.array_equal(mask, fresh_mask(engine, rgb, kept))
        assert cfr.health()["sessions"] == 1  # the image was fetched from Label Studio once for all of these

        # submitting the annotation fires Label Studio's webhook; cfr-serve frees the task's session
        final = ls.api("POST", f"/api/tasks/{task['id']}/annotations/", {"result": pred["result"]})
        assert final["id"]
        deadline = time.monotonic() + 20
        while cfr.health()["sessions"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cfr.health()["sessions"] == 0, "Label Studio's ANNOTATION_CREATED webhook did not reach cfr-serve"
