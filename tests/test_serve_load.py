"""A small run of the cfr-serve load benchmark: concurrent clients, every mask checked, zero errors expected."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[serve]')")
pytest.importorskip("httpx", reason="httpx is not installed (pip install -e '.[dev]')")


def test_serve_load_small(data_dir, tmp_path):
    cmd = [sys.executable, "bench/serve_load.py", "--dataset", str(data_dir / "GrabCut"), "--clients", "4",
           "--clicks", "5", "--overhead-images", "1", "--overhead-rounds", "2", "--idle-timeout", "1",
           "--out", str(tmp_path), "--tag", "small"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    r = json.loads((tmp_path / "serve_load_small.json").read_text())
    assert r["load"]["errors"] == 0, r["load"]["error_samples"]
    assert r["load"]["clicks_total"] == 20 and r["load"]["click_ms"]["p50"] > 0
    assert r["memory"]["sessions_after_expiry"] == 0 and r["memory"]["evicted"]["idle"] >= 4
    assert r["overhead"]["png"]["http_click_ms"]["n"] == r["overhead"]["rle"]["http_click_ms"]["n"] == 10
    assert "| 20 | 0 |" in (tmp_path / "serve_load_small.md").read_text()
