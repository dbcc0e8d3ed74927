"""A screenshot of Label Studio's labeling page with a CFR-ICL mask made through the ML backend (headless Chromium).

Starts Label Studio 1.23 and cfr-serve on 127.0.0.1 (as bench/labelstudio_latency.py does), imports one
GrabCut image, asks Label Studio for the interactive prediction of the RITM clicker's first clicks (the
request the labeling page sends per keypoint), saves the keypoints and the returned brush mask as the
task's annotation, logs in with Chromium and photographs the task's labeling page.

    python bench/labelstudio_screenshot.py --image 124080 --clicks 4

Needs Debian's chromium and chromium-driver and selenium (the dev extra). Writes labeling_page.png under
--out (default out/bench/; the committed one is in bench/results/labelstudio/), never over an existing file
without --overwrite.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfr_runtime import Engine, Session, default_model  # noqa: E402
from cfr_runtime.cli_options import (  # noqa: E402
    command,
    dataset_option,
    fail,
    option,
    out_option,
    overwrite_option,
    refuse_existing,
)
from cfr_runtime.clicker import Clicker  # noqa: E402
from cfr_runtime.datasets import open_dataset  # noqa: E402
from cfr_runtime.serve.codec import UploadLimits, decode_upload  # noqa: E402
from tests import ls_util  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from labelstudio_latency import CONFIG, keypoints  # noqa: E402

PROG = "labelstudio_screenshot.py"


@command(PROG)
@dataset_option(default=ROOT.parent / "shared" / "data" / "GrabCut",
                help="GrabCut-style dataset the image is taken from [default: ../shared/data/GrabCut].")
@option("--image", default="124080", show_default=True, help="The dataset image (its id) to annotate.")
@option("--clicks", type=click.IntRange(1, 24), default=4, show_default=True, help="RITM clicker clicks to place.")
@out_option(default=ROOT / "out" / "bench", shown="out/bench",
            help="Folder for labeling_page.png (pass bench/results/labelstudio to update the committed one).")
@overwrite_option("labeling_page.png in --out")
def main(dataset, image, clicks, out, overwrite) -> None:
    """A screenshot of Label Studio's labeling page with a CFR-ICL mask made through the ML backend."""
    args = SimpleNamespace(dataset=dataset, image=image, clicks=clicks, out=out)
    if not overwrite:
        refuse_existing([args.out / "labeling_page.png"], "pass --overwrite to replace it, or choose another --out")
    chromium, driver_path = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        fail(PROG, "needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)", 1)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    exe, why = ls_util.ensure()
    if exe is None:
        fail(PROG, f"Label Studio is not available: {why}", 1)
    inst = next((i for i in open_dataset(args.dataset) if i.id == args.image), None)
    if inst is None:
        fail(PROG, f"--image {args.image}: no such image in {args.dataset}")
    data = inst.image_path.read_bytes()
    engine = Engine(default_model())
    local = Session(engine)
    local.set_image(decode_upload(data, UploadLimits()))
    clicker, clicks = Clicker(inst.load()[1]), []
    for _ in range(args.clicks):
        y, x, positive = clicker.next_click(local.mask)
        local.add_click(int(x), int(y), positive)
        clicks.append((int(x), int(y), bool(positive)))
    size = local.mask.shape[::-1]

    with ls_util.LabelStudio(exe) as ls, ls_util.CfrServe(default_model(), ls.url) as cfr:
        project = ls.api("POST", "/api/projects/", {"title": "CFR-ICL in Label Studio", "label_config": CONFIG})
        ls.api("POST", f"/api/projects/{project['id']}/import",
               files={"file": (inst.image_path.name, data, "image/jpeg")})
        (task,) = ls.api("GET", f"/api/tasks/?project={project['id']}")["tasks"]
        backend = ls.api("POST", "/api/ml/", {"url": cfr.url + "/labelstudio", "project": project["id"],
                                              "is_interactive": True, "title": "cfr-icl"})
        points = keypoints(clicks, size)
        out = ls.api("POST", f"/api/ml/{backend['id']}/interactive-annotating",
                     {"task": task["id"], "context": {"result": points}})
        ls.api("POST", f"/api/tasks/{task['id']}/annotations/", {"result": points + out["data"]["result"]})

        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1400,900", "--force-device-scale-factor=1"):
            opts.add_argument(arg)
        drv = webdriver.Chrome(service=Service(driver_path), options=opts)
        try:
            drv.get(ls.url + "/user/login/")
            drv.find_element(By.NAME, "email").send_keys(ls_util.USER)
            drv.find_element(By.NAME, "password").send_keys(ls_util.PASSWORD)
            drv.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
            time.sleep(3)
            drv.get(f"{ls.url}/projects/{project['id']}/data?task={task['id']}")
            deadline = time.monotonic() + 90
            while not drv.find_elements(By.CSS_SELECTOR, "canvas") and time.monotonic() < deadline:
                time.sleep(1)
            time.sleep(8)  # the image, the regions and the brush layer draw after the canvas appears
            args.out.mkdir(parents=True, exist_ok=True)
            target = args.out / "labeling_page.png"
            drv.save_screenshot(str(target))
            print(f"wrote {target} ({len(clicks)} clicks: {clicks})")
        finally:
            drv.quit()


if __name__ == "__main__":
    main()
