"""The parity benchmarks: the click-by-click comparison and the disk-rounding script."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def _run(clicks, ious, noc):
    return {"instances": [{"id": k, "clicks": c, "ious": i} for k, (c, i) in enumerate(zip(clicks, ious))],
            "noc": noc}


def test_compare_finds_the_first_divergent_click():
    from parity_compare import compare

    official = _run([[[1, 2, 1], [3, 4, 0]], [[5, 6, 1]], [[7, 8, 1]]], [[0.5, 0.9], [0.96], [0.2]],
                    {"85": 3.0, "90": 3.0, "95": 7.0})
    ours = _run([[[1, 2, 1], [3, 4, 0]], [[5, 6, 1], [9, 9, 0]], [[7, 8, 0]]], [[0.5, 0.9001], [0.9, 0.95], [0.2]],
                {"0.85": 3.0, "0.9": 3.0, "0.95": 7.006})
    row = compare(official, ours)
    assert row["identical"] == 1 and row["instances"] == 3
    assert [(d["id"], d["at_click"]) for d in row["diverged"]] == [(1, 2), (2, 1)]
    assert abs(row["max_iou_diff_identical"] - 1e-4) < 1e-9
    assert row["noc_equal_2dp"] is False  # 7.01 vs 7.00
    ours["noc"]["0.95"] = 7.0
    assert compare(official, ours)["noc_equal_2dp"] is True


def test_disk_rounding_bench_runs(tmp_path):
    cmd = [sys.executable, "bench/disk_rounding.py", "--samples", "300", "--no-cost", "--out", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "disk_rounding.json").read_text())
    assert data["rounding"]["plain_host_differs"] == 0 and data["rounding"]["flip_host_differs"] == 0
    assert (tmp_path / "disk_rounding.md").read_text().startswith("# Click disks")
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr  # results are never replaced silently
