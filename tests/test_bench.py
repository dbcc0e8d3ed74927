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


def test_pareto_bench_runs_and_keeps_results(data_dir, tiny_checkpoint, tmp_path, capsys):
    """One instance, two clicks: every row gets NoC, mIoU, timings and its ratios; a second run into the same
    folder refuses to replace the files unless --overwrite is given."""
    import pytest

    from bench.pareto import main as pareto_main

    argv = ["--checkpoint", str(tiny_checkpoint), "--size", "224", "--dataset",
            str(data_dir / "GrabCut"), "--limit", "1", "--max-clicks", "2", "--precisions", "fp32,int8",
            "--modes", "StdInfer,A-CFR-4-all", "--reference-modes", "StdInfer", "--out", str(tmp_path)]
    res = pareto_main(argv)
    rows = {(r["engine"], r["precision"], r["mode"]): r for r in res["rows"]}
    assert set(rows) == {("ort", "fp32", "StdInfer"), ("ort", "int8", "StdInfer"), ("torch-loop", "fp32", "StdInfer"),
                         ("ort", "fp32", "A-CFR-4-all"), ("ort", "int8", "A-CFR-4-all")}
    for r in rows.values():
        assert r["clicks"] == r["first_click_ms"]["n"] + r["later_click_ms"]["n"] and r["first_click_ms"]["n"] == 1
        assert r["ms_per_click"] > 0
        # NoC restated from the row's own IoUs (issue 21: "between 1 and 2" held for any NoC capped at 2 clicks)
        (ious,) = r["raw"]["ious"]
        assert 1 <= len(ious) <= 2 and len(ious) == r["clicks"] and all(0 <= v <= 1 for v in ious)
        for t in ("0.85", "0.9", "0.95"):
            assert r["noc"][t] == next((i + 1 for i, v in enumerate(ious) if v >= float(t)), 2), (t, ious, r["noc"])
        assert len(ious) == 2 or ious[0] >= 0.95  # a run stops early only at the target IoU
    assert "noc90_vs_fp32" in rows[("ort", "int8", "StdInfer")] and "speedup_vs_torch_loop" in rows[
        ("ort", "fp32", "StdInfer")]
    assert "speedup_vs_torch_loop" not in rows[("ort", "fp32", "A-CFR-4-all")]  # no torch row for that mode
    assert rows[("ort", "fp32", "A-CFR-4-all")]["fwd_per_click"] > 1
    # same function: the torch loop and ORT fp32 see the same clicks and reach the same IoUs
    assert rows[("ort", "fp32", "StdInfer")]["miou"] == pytest.approx(rows[("torch-loop", "fp32", "StdInfer")]["miou"],
                                                                        abs=1e-3)
    flat = {k: [v for ious in rows[k]["raw"]["ious"] for v in ious] for k in rows}
    assert flat[("ort", "fp32", "StdInfer")] == pytest.approx(flat[("torch-loop", "fp32", "StdInfer")], abs=1e-3)
    stem = tmp_path / "pareto_GrabCut_tiny_224"
    assert res["meta"]["verification"]["int8"]["max_abs_diff"] <= res["meta"]["verification"]["int8"]["tolerance"]
    for ext in ("json", "md", "png"):
        assert stem.with_suffix(f".{ext}").stat().st_size > 0
    assert "| ort | int8 | StdInfer |" in stem.with_suffix(".md").read_text()
    merged = pareto_main(["--merge", str(stem.with_suffix(".json")), "--out", str(tmp_path / "merged")])
    key = lambda rows: [(r["noc"], r["ms_per_click"]) for r in rows]  # noqa: E731
    assert key(merged["rows"]) == key(res["rows"])
    before = stem.with_suffix(".json").read_text()
    with pytest.raises(SystemExit):
        pareto_main(argv)
    assert "--overwrite" in capsys.readouterr().err and stem.with_suffix(".json").read_text() == before
