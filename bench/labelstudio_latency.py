"""Per-click time of cfr-serve through a real Label Studio vs direct, on the RITM clicker's clicks.

Starts Label Studio 1.23 (its own virtualenv, see tests/ls_util.py) and `cfr-serve` (a subprocess, with
LABEL_STUDIO_URL pointing at it) on 127.0.0.1, imports GrabCut images as tasks, connects cfr-serve as the
project's interactive ML backend, and then, click by click and interleaved so that all three see the same
machine:

  via_label_studio   POST /api/ml/<id>/interactive-annotating to Label Studio, as its labeling page does when a
                     keypoint is placed (Label Studio -> cfr-serve /labelstudio/predict -> back)
  direct_predict     the same /labelstudio/predict body straight to cfr-serve (the ML backend protocol without
                     Label Studio in between; its own task ids, so its own stored sessions)
  native_click       POST /sessions/<id>/clicks?format=rle, cfr-serve's own API

Every answer's mask is checked against a local Session fed the same clicks. The first click of an image
includes fetching and decoding the image (from Label Studio for the first two paths; the native session is
created beforehand, untimed), so it is reported apart from the later clicks.

    python bench/labelstudio_latency.py --dataset ../shared/data/GrabCut --limit 15 --clicks 10

Writes labelstudio_latency.json/.md under --out (default out/bench/; the committed results are in
bench/results/labelstudio/), never over existing files without --overwrite.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import command_line, write_results  # noqa: E402
from cfr_runtime import Engine, Session, default_model  # noqa: E402
from cfr_runtime.cli_options import (  # noqa: E402
    command,
    dataset_option,
    limit_option,
    merge_alias,
    model_argument,
    option,
    out_option,
    overwrite_option,
    refuse_existing,
)
from cfr_runtime.clicker import Clicker  # noqa: E402
from cfr_runtime.datasets import open_dataset  # noqa: E402
from cfr_runtime.serve.codec import UploadLimits, decode_upload, rle_to_mask  # noqa: E402
from cfr_runtime.serve.labelstudio import brush_rle_to_mask, mask_to_brush_rle  # noqa: E402
from tests import ls_util  # noqa: E402

CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="mask" toName="image"><Label value="Object" background="#ff0000"/></BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true">
    <Label value="Object" smart="true" background="#0000ff"/>
  </KeyPointLabels>
</View>"""
PATHS = ("via_label_studio", "direct_predict", "native_click")


def stats(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    if a.size == 0:
        return {"n": 0}
    out = {"n": int(a.size), "p50": round(float(np.percentile(a, 50)), 2),
           "p90": round(float(np.percentile(a, 90)), 2), "mean": round(float(a.mean()), 2),
           "max": round(float(a.max()), 2)}
    out["p99"] = round(float(np.percentile(a, 99)), 2) if a.size >= 100 else None  # never from < 100 samples
    return out


def keypoints(clicks: list, size: tuple[int, int]) -> list[dict]:
    w, h = size
    return [{"id": f"kp{i:03d}", "from_name": "click", "to_name": "image", "type": "keypointlabels",
             "origin": "manual", "original_width": w, "original_height": h, "image_rotation": 0, "is_positive": p,
             "value": {"x": 100 * (x + 0.5) / w, "y": 100 * (y + 0.5) / h, "width": 0.5,
                       "keypointlabels": ["Object"]}} for i, (x, y, p) in enumerate(clicks)]


def plan(engine: Engine, data: bytes, gt: np.ndarray, n: int) -> tuple[list, list]:
    """The clicker's first n clicks (x, y, positive) and the local Session's mask after each."""
    s = Session(engine)
    s.set_image(decode_upload(data, UploadLimits()))
    clicker, clicks, masks = Clicker(gt), [], []
    for _ in range(n):
        y, x, positive = clicker.next_click(s.mask)
        s.add_click(int(x), int(y), positive)
        clicks.append((int(x), int(y), bool(positive)))
        masks.append(s.mask.copy())
    return clicks, masks


def run(args) -> dict:
    import httpx

    exe, why = ls_util.ensure()
    if exe is None:
        sys.exit(f"Label Studio is not available: {why}")
    model = args.model or default_model()
    engine = Engine(model)
    instances = [i for i in open_dataset(args.dataset) if i.image_path.suffix.lower() in (".jpg", ".jpeg", ".png")]
    instances = instances[: args.images]
    load_before = os.getloadavg()
    samples = {p: {"first": [], "later": []} for p in PATHS}
    server_ms = {p: [] for p in PATHS[:2]}
    encode_ms: list[float] = []
    paired_overhead: list[float] = []  # via_label_studio - direct_predict, same click
    wrong = 0
    with ls_util.LabelStudio(exe) as ls:
        cfr = ls_util.CfrServe(str(model), ls.url)
        client = httpx.Client(timeout=120)
        try:
            project = ls.api("POST", "/api/projects/", {"title": "cfr-icl latency", "label_config": CONFIG})
            for inst in instances:
                ls.api("POST", f"/api/projects/{project['id']}/import",
                       files={"file": (inst.image_path.name, inst.image_path.read_bytes(), "image/jpeg")})
            tasks = ls.api("GET", f"/api/tasks/?project={project['id']}&page_size=1000")["tasks"]
            by_name = {t["data"]["image"].rsplit("-", 1)[-1]: t for t in tasks}
            backend = ls.api("POST", "/api/ml/", {"url": cfr.url + "/labelstudio", "project": project["id"],
                                                  "is_interactive": True, "title": "cfr-icl"})
            assert backend["state"] == "CO", backend
            for n_img, inst in enumerate(instances):
                data = inst.image_path.read_bytes()
                clicks, masks = plan(engine, data, inst.load()[1], args.clicks)
                size = masks[0].shape[::-1]
                task = by_name[inst.image_path.name]
                sid = client.post(cfr.url + "/sessions", content=data,
                                  headers={"Content-Type": "image/jpeg"}).json()["session_id"]
                for k in range(args.clicks):
                    which = "first" if k == 0 else "later"
                    context = {"result": keypoints(clicks[: k + 1], size)}
                    # through Label Studio, as the labeling page asks
                    t0 = time.perf_counter()
                    r = client.post(f"{ls.url}/api/ml/{backend['id']}/interactive-annotating",
                                    headers={"Authorization": f"Token {ls_util.TOKEN}"},
                                    json={"task": task["id"], "context": context})
                    via = (time.perf_counter() - t0) * 1000
                    pred = r.json()["data"]
                    rle = pred["result"][0]["value"]["rle"]
                    wrong += not np.array_equal(brush_rle_to_mask(rle, *size), masks[k])
                    samples["via_label_studio"][which].append(via)
                    server_ms["via_label_studio"].append(pred["cfr"]["server_ms"])
                    # the same protocol call straight to cfr-serve
                    body = {"tasks": [{"id": 10_000_000 + task["id"], "data": task["data"]}],
                            "project": f"{project['id']}.0", "label_config": CONFIG,
                            "params": {"login": None, "password": None, "context": context}}
                    t0 = time.perf_counter()
                    r = client.post(cfr.url + "/labelstudio/predict", json=body)
                    direct = (time.perf_counter() - t0) * 1000
                    pred = r.json()["results"][0]
                    wrong += not np.array_equal(brush_rle_to_mask(pred["result"][0]["value"]["rle"], *size), masks[k])
                    samples["direct_predict"][which].append(direct)
                    server_ms["direct_predict"].append(pred["cfr"]["server_ms"])
                    paired_overhead.append(via - direct)
                    # cfr-serve's own click API
                    x, y, p = clicks[k]
                    t0 = time.perf_counter()
                    r = client.post(f"{cfr.url}/sessions/{sid}/clicks?format=rle", json={"x": x, "y": y, "positive": p})
                    samples["native_click"][which].append((time.perf_counter() - t0) * 1000)
                    wrong += not np.array_equal(rle_to_mask(r.json()["mask"]), masks[k])
                    t0 = time.perf_counter()
                    mask_to_brush_rle(masks[k])
                    encode_ms.append((time.perf_counter() - t0) * 1000)
                recent = {p: np.median(samples[p]["later"][1 - args.clicks:]) for p in PATHS[:2]}
                print(f"image {n_img + 1}/{len(instances)} {inst.id}: via LS {recent[PATHS[0]]:.1f} ms, "
                      f"direct {recent[PATHS[1]]:.1f} ms", flush=True)
        finally:
            client.close()
            cfr.stop()
    return {
        "what": "ms per click (client wall time), GrabCut, RITM clicker clicks; masks checked pixel for pixel",
        "label_studio": ls_util.LS_VERSION, "engine": repr(engine), "model": str(model),
        "images": [i.id for i in instances], "clicks_per_image": args.clicks, "wrong_masks": wrong,
        "ms": {p: {k: stats(v) for k, v in samples[p].items()} for p in PATHS},
        "server_ms": {p: stats(v) for p, v in server_ms.items()},
        "label_studio_overhead_ms": stats(paired_overhead),
        "brush_rle_encode_ms": stats(encode_ms),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.platform()}",
        "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "niceness": os.nice(0),  # the bench and the servers it starts (they inherit it)
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
    }


def fmt(s: dict, key: str) -> str:
    v = s.get(key)
    return "-" if v is None else f"{v:.1f} ms"


def markdown(r: dict) -> str:
    lines = [f"# Per-click time: through Label Studio {r['label_studio']} vs direct cfr-serve", "",
             f"{r['engine']}; {r['machine']}; load average {r['loadavg_before']} before, {r['loadavg_after']} after; "
             f"niceness {r.get('niceness', 0)}; {r['date']}", "", f"`{r['command']}`", "",
             f"{len(r['images'])} GrabCut images x {r['clicks_per_image']} clicks; wrong masks: {r['wrong_masks']}. "
             "p99 only from >= 100 samples ('-' otherwise).", "",
             "| path | clicks | p50 | p90 | p99 | mean | first click p50 (incl. image fetch) |",
             "|---|---|---|---|---|---|---|"]
    for p in PATHS:
        later, first = r["ms"][p]["later"], r["ms"][p]["first"]
        lines.append(f"| {p} | {later['n']} | {fmt(later, 'p50')} | {fmt(later, 'p90')} | "
                     f"{fmt(later, 'p99')} | {fmt(later, 'mean')} | {fmt(first, 'p50')} |")
    o, e = r["label_studio_overhead_ms"], r["brush_rle_encode_ms"]
    sv, sd = r["server_ms"]["via_label_studio"], r["server_ms"]["direct_predict"]
    lines += ["", f"- Label Studio's own share (via - direct, same click, all clicks): p50 {fmt(o, 'p50')}, "
                  f"p90 {fmt(o, 'p90')}, p99 {fmt(o, 'p99')}.",
              f"- cfr-serve's time inside /labelstudio/predict (server_ms): p50 {fmt(sv, 'p50')} when Label Studio "
              f"asks, {fmt(sd, 'p50')} when asked directly.",
              f"- Label Studio's brush RLE encoder (brush.mask2rle) alone: p50 {fmt(e, 'p50')}, "
              f"max {fmt(e, 'max')} per mask.", ""]
    return "\n".join(lines)


@command("labelstudio_latency.py")
@model_argument(required=False, old=["--model"])
@dataset_option(default=ROOT.parent / "shared" / "data" / "GrabCut",
                help="GrabCut-style dataset whose images become tasks [default: ../shared/data/GrabCut].")
@limit_option(old=["--images"], default=15, help="Only the first N images of the dataset (each a task).")
@option("--clicks", type=click.IntRange(2, 24), default=10, show_default=True,
        help="RITM clicker clicks per image (the tiny model takes at most 24).")
@out_option(default=ROOT / "out" / "bench", shown="out/bench",
            help="Folder for the results (pass bench/results/labelstudio to update the committed results on purpose).")
@overwrite_option("labelstudio_latency.json/.md in --out")
@option("--force", is_flag=True, hidden=True)  # the old spelling of --overwrite
def main(model, model_alias, dataset, limit, clicks, out, overwrite, force) -> None:
    """Per-click time of cfr-serve MODEL (default: the bundled tiny model) through a real Label Studio vs direct;
    see the module docstring of bench/labelstudio_latency.py."""
    args = SimpleNamespace(model=merge_alias(model, model_alias, "MODEL"), dataset=dataset, images=limit,
                           clicks=clicks, out=out)
    stem = args.out / "labelstudio_latency"
    if not (overwrite or force):  # refused before minutes of work, not after
        refuse_existing([stem.with_suffix(".json"), stem.with_suffix(".md")],
                        "pass --overwrite to replace it, or choose another --out")
    if args.model is not None:
        args.model = str(args.model)
    result = run(args)
    write_results(stem, result, markdown(result))
    if result["wrong_masks"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
