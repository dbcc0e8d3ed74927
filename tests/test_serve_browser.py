"""The cfr-serve page driven in headless Chromium as a person would: open a GrabCut image, left/right
clicks, the undo/reset keys, a mode switch and the mask download; after each step the mask drawn on the
page's canvas must equal the mask of a Python `Session` given the same clicks. Clicks are aimed where the image
was shown before the first click, so a page whose layout moves after an answer sends them to other pixels;
the latency is cleared on reset, undo with nothing to undo is a friendly line, the zoom-in box has a legend."""

from __future__ import annotations

import base64
import io
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DATA, need
from tests.serve_util import ServerThread

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)"),
    pytest.mark.skipif(CHROMEDRIVER is None,
                       reason="chromedriver is not installed (Debian: apt-get install chromium-driver)"),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[serve]')")

from PIL import Image  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

from cfr_runtime import Engine, Session, default_model  # noqa: E402
from cfr_runtime.clicker import Clicker  # noqa: E402
from cfr_runtime.datasets import open_dataset  # noqa: E402
from cfr_runtime.serve import create_app  # noqa: E402
from cfr_runtime.serve.codec import UploadLimits, decode_upload  # noqa: E402


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,800", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    downloads = tmp_path_factory.mktemp("downloads")
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.downloads = downloads
    yield drv
    drv.quit()


def canvas_mask(driver) -> np.ndarray:
    url = driver.execute_script("return document.getElementById('mask').toDataURL('image/png')")
    rgba = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))
    return rgba[..., 3] > 0


def wait_idle(driver, n_clicks: int):
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return window.cfr.sid !== null && window.cfr.pending === 0 && window.cfr.clicks.length === arguments[0]",
        n_clicks))
    status = driver.find_element(By.ID, "status")
    assert "error" not in (status.get_attribute("class") or ""), status.text


def canvas_rect(driver) -> list[float]:
    """Where the page shows the image: [left, top, screen px per image px]."""
    return driver.execute_script("const r = document.getElementById('clicks').getBoundingClientRect();"
                                 "return [r.left, r.top, r.width / window.cfr.width];")


def click_pixel(driver, x: int, y: int, positive: bool, rect: list[float] | None = None):
    """Press the mouse over image pixel (x, y) of the canvas, where the page shows it now, or where it showed it
    when `rect` was measured (as a person aims at what they saw before the previous answer came back)."""
    left, top, scale = rect or canvas_rect(driver)
    # the whole screen pixel inside image pixel x (the pointer moves in whole pixels; the page may not sit on one)
    sx, sy = math.ceil(left + x * scale - 1e-6), math.ceil(top + y * scale - 1e-6)
    assert sx < left + (x + 1) * scale and sy < top + (y + 1) * scale, "an image pixel smaller than a screen pixel"
    actions = ActionChains(driver)
    actions.w3c_actions.pointer_action.move_to_location(sx, sy)
    actions.w3c_actions.pointer_action.click() if positive else actions.w3c_actions.pointer_action.context_click()
    actions.perform()


def test_page_matches_session(driver, tmp_path):
    instance = open_dataset(need(DATA / "GrabCut"))[0]
    _, gt = instance.load()
    image_path = instance.image_path
    rgb = decode_upload(image_path.read_bytes(), UploadLimits())  # the server's decoder
    engine = Engine(default_model())

    # three clicks of the official RITM clicker against the ground truth, as an annotator would make them
    ref = Session(engine)
    ref.set_image(rgb)
    clicker, pred, clicks = Clicker(gt), np.zeros(gt.shape, bool), []
    for _ in range(3):
        y, x, positive = clicker.next_click(pred)
        clicks.append((int(x), int(y), positive))
        pred = ref.add_click(x, y, positive)

    def expected(cl, mode=(0, False)) -> np.ndarray:
        s = Session(engine, cfr=mode[0], adaptive=mode[1])
        s.set_image(rgb)
        for x, y, p in cl:
            s.add_click(x, y, p)
        return s.mask

    def check(cl, mode=(0, False)):
        wait_idle(driver, len(cl))
        sent = driver.execute_script("return window.cfr.clicks")
        assert [(c["x"], c["y"], c["positive"]) for c in sent] == [(float(x), float(y), p) for x, y, p in cl]
        got, want = canvas_mask(driver), expected(cl, mode)
        assert got.shape == want.shape
        assert np.array_equal(got, want), f"{np.count_nonzero(got != want)} canvas pixels differ"
        return want

    app = create_app(engine)
    with ServerThread(app) as server:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "file").send_keys(str(image_path))
        wait_idle(driver, 0)
        assert driver.execute_script("return [window.cfr.width, window.cfr.height]") == [rgb.shape[1], rgb.shape[0]]
        # the legend explains the dashed zoom-in box
        legend = driver.find_element(By.ID, "zoom-legend")
        assert "zoom-in" in legend.text and "zoom-in" in (legend.get_attribute("title") or "")
        # undo with nothing to undo: a friendly line, not an error
        ActionChains(driver).send_keys("z").perform()
        wait_idle(driver, 0)
        assert "Nothing to undo" in driver.find_element(By.ID, "status").text
        # a negative (right) click first, then the clicker's clicks; every click aims where the image was shown
        # before the first click: an answer that moves the image (a status line cleared) would send it elsewhere
        before = canvas_rect(driver)
        background = np.argwhere(gt == 0)
        neg = [(int(x), int(y), False) for y, x in [background[len(background) // 3]]]
        click_pixel(driver, *neg[0][:2], positive=False, rect=before)
        check(neg)
        assert canvas_rect(driver) == before, "the image moved after the first click"
        ActionChains(driver).send_keys("z").perform()  # undo key
        check([])
        for i, c in enumerate(clicks):
            click_pixel(driver, c[0], c[1], c[2], rect=before)
            want = check(clicks[: i + 1])
        assert want.any()
        assert canvas_rect(driver) == before
        assert "last click" in driver.find_element(By.ID, "latency").text
        driver.save_screenshot(str(tmp_path / "serve_page.png"))
        if os.environ.get("CFR_SERVE_SCREENSHOT"):
            shutil.copy(tmp_path / "serve_page.png", os.environ["CFR_SERVE_SCREENSHOT"])

        # downloads: the mask PNG link and the clicks JSON button
        import httpx

        href = driver.find_element(By.ID, "download-mask").get_attribute("href")
        png = np.asarray(Image.open(io.BytesIO(httpx.get(href).content)).convert("L")) > 127
        assert np.array_equal(png, want)
        driver.find_element(By.ID, "download-clicks").click()
        saved = Path(driver.downloads) / "clicks.json"
        WebDriverWait(driver, 10).until(lambda d: saved.is_file() and saved.stat().st_size > 0)
        import json

        doc = json.loads(saved.read_text())
        assert [(c["x"], c["y"], c["positive"]) for c in doc["clicks"]] == [(float(x), float(y), p)
                                                                          for x, y, p in clicks]

        # mode switch, reset key, one click in A-CFR-4
        Select(driver.find_element(By.ID, "mode")).select_by_visible_text("A-CFR-4")
        WebDriverWait(driver, 10).until(lambda d: "A-CFR-4" in d.find_element(By.ID, "info").text)
        driver.execute_script("document.activeElement.blur()")  # keys go to the page, not the select
        ActionChains(driver).send_keys("r").perform()
        check([])
        assert "last click" not in driver.find_element(By.ID, "latency").text  # cleared with the clicks
        assert driver.execute_script("return window.cfr.lastMs") is None
        click_pixel(driver, *clicks[0])
        check(clicks[:1], mode=(4, True))
        assert "last click" in driver.find_element(By.ID, "latency").text
