"""The overwrite policy (issue 20): no command replaces an existing result without --overwrite (or continues it
with --resume where that applies); the refusal names the file and the flag and comes before the work, and the
earlier result is left byte for byte. One test per command that writes results."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from cfr_runtime.cli_eval import main as eval_main
from export.cli import main as export_main
from tests.conftest import DATA, blob_scene, need
from trainer.cli import main as train_main
from trainer.default_model import default_checkpoint

OLD = b"an earlier run's result"


def _dataset(root: Path, n: int = 2) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img, gt = blob_scene(i, 60, 80)
        assert cv2.imwrite(str(root / "images" / f"{i}.png"), img[..., ::-1])
        assert cv2.imwrite(str(root / "masks" / f"{i}.png"), (gt * 255).astype(np.uint8))
    return root


def _refused(result, path: Path, *flags: str) -> None:
    assert result.exit_code == 2, result.output
    assert f"{path} exists" in result.output, result.output
    for flag in flags:
        assert flag in result.output, result.output


def test_eval_never_replaces_results(tmp_path):
    data = _dataset(tmp_path / "ds", 2)
    out = tmp_path / "results" / "grabcut.json"
    base = ["cfr_runtime/assets/default.onnx", "--dataset", str(data), "--max-clicks", "2", "--json", str(out)]
    first = CliRunner().invoke(eval_main, base)
    assert first.exit_code == 0, first.output
    files = {p: p.read_bytes() for p in (out, *(out.with_suffix(x) for x in (".md", ".png", ".jsonl")))}
    again = CliRunner().invoke(eval_main, [*base, "--limit", "1"])  # the case: a 3-instance rerun
    _refused(again, out, "--overwrite", "--resume")
    assert {p: p.read_bytes() for p in files} == files
    replaced = CliRunner().invoke(eval_main, [*base, "--limit", "1", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert len(json.loads(out.read_text())["instances"]) == 1
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 2  # header + 1: a fresh journal


def test_eval_out_folder_and_plot_follow_the_policy(tmp_path):
    data = _dataset(tmp_path / "ds", 1)
    base = ["cfr_runtime/assets/default.onnx", "--dataset", str(data), "--max-clicks", "2"]
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "ds_A-CFR-4.png").write_bytes(OLD)
    _refused(CliRunner().invoke(eval_main, [*base, "--mode", "A-CFR-4", "-o", str(tmp_path / "o")]),
             tmp_path / "o" / "ds_A-CFR-4.png", "--overwrite")
    assert (tmp_path / "o" / "ds_A-CFR-4.png").read_bytes() == OLD
    (tmp_path / "p.png").write_bytes(OLD)
    _refused(CliRunner().invoke(eval_main, [*base, "--plot", str(tmp_path / "p.png")]), tmp_path / "p.png",
             "--overwrite")
    ok = CliRunner().invoke(eval_main, [*base, "-o", str(tmp_path / "o")])  # another mode: other files
    assert ok.exit_code == 0 and (tmp_path / "o" / "ds_StdInfer.json").is_file(), ok.output


def _train(run: Path, *extra: str):
    args = ["--data", "synthetic:2", "--size", "32", "--steps", "2", "--batch-size", "1", "--threads", "1",
            "--log-every", "1", "--no-progress", "-o", str(run), *extra]
    return CliRunner().invoke(train_main, args)


def test_train_never_replaces_a_run(tmp_path):
    run = tmp_path / "run"
    assert _train(run).exit_code == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    _refused(_train(run), run / "model.pth", "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert _train(run, "--steps", "3", "--resume").exit_code == 0  # continues the same run
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert _train(run, "--overwrite").exit_code == 0
    # a fresh run: its own metrics only, no checkpoint of the earlier run left to resume from
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_export_never_replaces_a_model(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_int8.onnx").write_bytes(OLD)
    result = CliRunner().invoke(export_main, [str(default_checkpoint()), "-o", str(out), "--int8"])
    _refused(result, out / "model_int8.onnx", "--overwrite")
    assert (out / "model_int8.onnx").read_bytes() == OLD and sorted(p.name for p in out.iterdir()) == [
        "model_int8.onnx"]  # refused before anything was exported
    (out / "model_full.onnx").write_bytes(OLD)
    _refused(CliRunner().invoke(export_main, [str(default_checkpoint()), "-o", str(out), "--graph", "full"]),
             out / "model_full.onnx", "--overwrite")


def _bench(name):
    import importlib

    return importlib.import_module(f"bench.{name}")


def test_latency_never_replaces_results(tmp_path, capsys):
    (tmp_path / "latency_cpu_tiny_224.md").write_bytes(OLD)
    with pytest.raises(SystemExit) as info:
        _bench("latency").main(["--dataset", "synthetic", "--limit", "1", "--clicks", "1", "--mode", "StdInfer",
                                "--no-reference", "-o", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'latency_cpu_tiny_224.json'} exists" not in err  # only the file that exists is named
    assert f"{tmp_path / 'latency_cpu_tiny_224.md'} exists" in err and "--overwrite" in err, err
    assert (tmp_path / "latency_cpu_tiny_224.md").read_bytes() == OLD


def test_pareto_never_replaces_results(tmp_path, capsys):
    (tmp_path / "pareto_GrabCut_default_224.png").write_bytes(OLD)
    with pytest.raises(SystemExit) as info:
        _bench("pareto").main(["--dataset", str(need(DATA / "GrabCut")), "--limit", "1", "--max-clicks", "1",
                               "--precisions", "fp32", "--mode", "StdInfer", "--reference-modes", "none",
                               "-o", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "pareto_GrabCut_default_224.png exists" in err and "--overwrite" in err, err
    assert (tmp_path / "pareto_GrabCut_default_224.png").read_bytes() == OLD


def test_serve_load_never_replaces_results(tmp_path):
    pytest.importorskip("httpx")
    (tmp_path / "serve_load_t.json").write_bytes(OLD)
    result = CliRunner().invoke(_bench("serve_load").main, [
        "--clients", "1", "--clicks", "1", "--overhead-images", "1", "--overhead-rounds", "2", "--idle-timeout", "1",
        "--tag", "t", "-o", str(tmp_path)])
    _refused(result, tmp_path / "serve_load_t.json", "--overwrite")
    assert (tmp_path / "serve_load_t.json").read_bytes() == OLD


def test_serve_load_default_is_not_the_committed_results():
    out = next(p for p in _bench("serve_load").main.params if p.name == "out").default
    assert (Path(__file__).parents[1] / "bench" / "results").resolve() not in (out.resolve(), *out.resolve().parents)


def test_main_job_never_replaces_a_run_and_pins_threads(tmp_path, monkeypatch):
    """The main job passes its thread count to every step and records the machine's load; a second run into the
    same folder is refused unless --overwrite, which it hands down to every step."""
    job = _bench("main_job")
    calls = []
    monkeypatch.setattr(job, "sh", lambda *cmd, threads: calls.append((cmd, threads)))
    data = need(DATA)
    result = CliRunner().invoke(job.main, ["-o", str(tmp_path), "--threads", "1", "--limit", "1",
                                           "--data-root", str(data)])
    assert result.exit_code == 0, result.output
    by_tool = {cmd[0]: cmd for cmd, _ in calls}
    for tool in ("cfr-train", "cfr-eval"):
        cmd = by_tool[tool]
        assert cmd[cmd.index("--threads") + 1] == "1", cmd
    assert all(threads == 1 for _, threads in calls)
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert timing["threads"] == 1 and "load_average" in timing["machine"]["start"]
    assert "load average" in result.output
    _refused(CliRunner().invoke(job.main, ["-o", str(tmp_path), "--data-root", str(data)]),
             tmp_path / "overlay.png", "--overwrite")
    calls.clear()
    again = CliRunner().invoke(job.main, ["-o", str(tmp_path), "--limit", "1", "--data-root", str(data),
                                          "--overwrite"])
    assert again.exit_code == 0, again.output
    assert all("--overwrite" in cmd for cmd, _ in calls), calls


def test_ablations_never_replace_rows(tmp_path):
    rows = [{"run": "icl", "mode": "StdInfer"}]
    (tmp_path / "ablations.json").write_text(json.dumps(rows))
    result = CliRunner().invoke(_bench("ablations").main, ["icl=runs/icl", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "already has rows for icl StdInfer" in result.output, result.output
    assert "--overwrite" in result.output and json.loads((tmp_path / "ablations.json").read_text()) == rows


def test_gpu_full_graph_check_never_replaces_its_report(tmp_path):
    (tmp_path / "gpu_full_graph_check.json").write_bytes(OLD)
    result = CliRunner().invoke(_bench("gpu_full_graph_check").cli, ["-o", str(tmp_path)])
    _refused(result, tmp_path / "gpu_full_graph_check.json", "--overwrite")
    assert (tmp_path / "gpu_full_graph_check.json").read_bytes() == OLD
