"""The benchmark scripts run end to end (their numbers are measured, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_latency_bench_runs(reference_dir, tmp_path):
    cmd = [sys.executable, "bench/latency.py", "--checkpoint", str(reference_dir / "tiny_d8_s1" / "model.pth"),
           "--size", "224", "--images", "1", "--clicks", "3", "--modes", "StdInfer,A-CFR-4", "--out", str(tmp_path),
           "--graph", "square,full"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| ort | A-CFR-4 |" in out.stdout and "torch-loop-cpu" in out.stdout
    data = json.loads((tmp_path / "latency_cpu_custom_224.json").read_text())
    rows = {(r["backend"], r["mode"]) for r in data["rows"]}
    assert rows == {("ort", "StdInfer"), ("ort", "A-CFR-4"), ("ort-full", "StdInfer"), ("ort-full", "A-CFR-4"),
                    ("torch-loop-cpu", "StdInfer"), ("torch-loop-cpu", "A-CFR-4")}
    for r in data["rows"]:  # the host's share is measured for runtime sessions only
        assert ("host_share" in r) == r["backend"].startswith("ort")
        if "host_share" in r:
            assert 0 <= r["host_share"] < 1 and r["host_ms"]["n"] == 3
    ort_row = next(r for r in data["rows"] if r["backend"] == "ort" and r["mode"] == "StdInfer")
    assert ort_row["first_click_ms"]["n"] == 1 and ort_row["later_click_ms"]["n"] == 2
    assert ort_row["speedup_vs_torch_loop"]["first_click_ms"] > 0


def test_gpu_full_graph_check_runs_on_cpu(reference_dir, tmp_path):
    """Without a CUDA provider the GPU check runs its CPU part and says CUDA is absent."""
    cmd = [sys.executable, "bench/gpu_full_graph_check.py", "--out", str(tmp_path), "--images", "1", "--clicks", "2",
           "--cfr", "1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_full_graph_check.json").read_text())
    (entry,) = report["images"].values()
    assert len(entry["clicks"]) == 2 and len(entry["forwards"]) == 2
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert entry["ort-cuda"]["same_forwards"]
    else:
        assert "absent" in report["cuda"] and "CUDA: absent" in out.stdout
