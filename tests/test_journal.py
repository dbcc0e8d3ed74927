"""cfr-eval's journal and --resume (issue 21): finished instances are never evaluated again, a resume never
continues another model's run, and a torn last line (a kill mid-write) never swallows the next instance.

The end-to-end tests interrupt real runs (Ctrl-C at a chosen instance) and count which instances each run
evaluates; the `_Journal` tests pin the file format itself without a model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

import cfr_runtime.evaluate as ev
from cfr_runtime.cli_eval import _Journal
from cfr_runtime.cli_eval import main as eval_main
from cfr_runtime.errors import CfrError
from cfr_runtime.evaluate import InstanceResult
from tests.conftest import blob_dataset, blob_scene

N = 4
TORN = '{"id": "2", "ious": [0.1'
EVALUATE_INSTANCE = ev.evaluate_instance


class _Spy:
    """Replaces evaluate_instance: records the ids it is asked for and raises Ctrl-C at one of them."""

    def __init__(self, monkeypatch, interrupt_at: str | None = None):
        self.ids: list[str] = []
        self.interrupt_at = interrupt_at
        real = EVALUATE_INSTANCE

        def spy(session, image, gt, instance_id="", *a, **kw):
            self.ids.append(instance_id)
            if instance_id == self.interrupt_at:
                raise KeyboardInterrupt
            return real(session, image, gt, instance_id, *a, **kw)

        monkeypatch.setattr(ev, "evaluate_instance", spy)


@pytest.fixture
def run(default_onnx, tmp_path):
    data = blob_dataset(tmp_path / "ds", N)
    out = tmp_path / "runs" / "r" / "r.json"  # two folders that do not exist yet

    def invoke(*extra, model=default_onnx):
        return CliRunner().invoke(eval_main, [str(model), "--dataset", str(data), "--max-clicks", "2",
                                              "--json", str(out), *extra])

    invoke.out = out
    invoke.journal = out.with_suffix(".jsonl")
    return invoke


def _journal_ids(path: Path) -> list[str]:
    """Ids of the complete instance lines; every line but a torn one must parse."""
    ids = []
    for line in path.read_text().split("\n")[1:]:
        if line and line != TORN:
            ids.append(json.loads(line)["id"])
    return ids


def test_resume_evaluates_only_the_unfinished_instances(run, monkeypatch):
    spy = _Spy(monkeypatch, interrupt_at="2")
    first = run()
    assert first.exit_code == 130, first.output
    assert (f"cfr-eval: 2 finished instances are saved in {run.journal}; rerun the same command with --resume to "
            "continue") in first.stderr and "finished" not in first.stdout  # on stderr, where errors go
    assert spy.ids == ["0", "1", "2"] and _journal_ids(run.journal) == ["0", "1"]
    assert json.loads(run.journal.read_text().split("\n")[0])["mode"] == "StdInfer"
    spy = _Spy(monkeypatch)
    resumed = run("--resume")
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming: 2 instances already done in {run.journal}" in resumed.stderr  # a note, not a result
    assert "resuming" not in resumed.stdout
    assert spy.ids == ["2", "3"], f"the resumed run evaluated {spy.ids}"
    assert "ds:   0%|" in resumed.output and "| 0/2 [" in resumed.output  # the bar counts what is left
    assert _journal_ids(run.journal) == ["0", "1", "2", "3"]
    assert [i["id"] for i in json.loads(run.out.read_text())["instances"]] == ["0", "1", "2", "3"]
    spy = _Spy(monkeypatch)
    again = run("--resume")  # a finished run resumed: nothing left to do, the same summary
    assert again.exit_code == 0 and "resuming: 4 instances already done" in again.output, again.output
    assert spy.ids == [] and _journal_ids(run.journal) == ["0", "1", "2", "3"]


def test_resume_refuses_another_model(run, default_onnx, tmp_path, monkeypatch):
    """The same function in another file (a changed doc string) is another model: its journal is refused."""
    import onnx

    other = onnx.load(str(default_onnx))
    other.doc_string = "re-exported"
    onnx.save(other, str(tmp_path / "other.onnx"))
    _Spy(monkeypatch, interrupt_at="2")
    assert run().exit_code == 130
    before = run.journal.read_bytes()
    spy = _Spy(monkeypatch)
    resumed = run("--resume", model=tmp_path / "other.onnx")
    assert resumed.exit_code == 2 and "model_sha256" in resumed.output, resumed.output
    assert "other settings than the interrupted run" in resumed.output
    assert spy.ids == [] and run.journal.read_bytes() == before and not run.out.exists()


def test_torn_last_line_does_not_swallow_the_next_instance(run, monkeypatch):
    """Killed mid-write: the journal ends in half a line. The resumed run must start its first record on a new
    line, or that record joins the torn one and is lost to the next resume."""
    _Spy(monkeypatch, interrupt_at="2")
    assert run().exit_code == 130
    with run.journal.open("a") as f:
        f.write(TORN)
    spy = _Spy(monkeypatch, interrupt_at="3")
    second = run("--resume")
    assert second.exit_code == 130 and "3 finished instances are saved" in second.output, second.output
    assert spy.ids == ["2", "3"]
    lines = run.journal.read_text().split("\n")
    assert TORN in lines and _journal_ids(run.journal) == ["0", "1", "2"], lines
    spy = _Spy(monkeypatch)
    third = run("--resume")
    assert third.exit_code == 0 and "resuming: 3 instances already done" in third.output, third.output
    assert spy.ids == ["3"], f"the third run evaluated {spy.ids}: instance 2 was lost with the torn line"
    assert [i["id"] for i in json.loads(run.out.read_text())["instances"]] == ["0", "1", "2", "3"]


def test_nothing_finished_nothing_announced(run, monkeypatch):
    _Spy(monkeypatch, interrupt_at="0")
    result = run()
    assert result.exit_code == 130 and "cfr-eval: interrupted" in result.output, result.output
    assert "finished instances are saved" not in result.output and _journal_ids(run.journal) == []


def test_journal_that_cannot_be_written_is_a_clean_error(default_onnx, tmp_path):
    data = blob_dataset(tmp_path / "ds", 1)
    (tmp_path / "file").write_text("x")
    args = [str(default_onnx), "--dataset", str(data), "--max-clicks", "1", "--json"]
    under_file = CliRunner().invoke(eval_main, [*args, str(tmp_path / "file" / "r.json")])
    assert under_file.exit_code == 2 and "cannot create its folder (File exists)" in under_file.output, \
        under_file.output
    (tmp_path / "out" / "r.jsonl").mkdir(parents=True)  # the journal's name is taken by a folder
    taken = CliRunner().invoke(eval_main, [*args, str(tmp_path / "out" / "r.json"), "--overwrite"])
    assert taken.exit_code == 2 and "cannot write next to it (Is a directory)" in taken.output, taken.output


def test_max_clicks_up_to_the_models_capacity(run, monkeypatch):
    """24 clicks per sign is the tiny export's capacity: --max-clicks 24 runs, 25 is refused up front."""
    spy = _Spy(monkeypatch, interrupt_at="0")  # stop at the first instance: only the check matters here
    accepted = run("--max-clicks", "24")
    assert accepted.exit_code == 130 and spy.ids == ["0"], accepted.output
    refused = run("--max-clicks", "25", "--overwrite")  # the first run's journal is there
    assert refused.exit_code == 2 and "exceeds the model's click capacity (24 per sign)" in refused.output
    assert spy.ids == ["0"]


def _option_scene(tmp_path: Path) -> Path:
    """One instance where each result-changing option of cfr-eval changes the result (checked where used)."""
    data = tmp_path / "ds"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    img, gt = blob_scene(5, 300, 450)  # larger than the 200 px minimum crop: zoom-in changes the box
    mask = (gt * 255).astype(np.uint8)
    mask[:, :20] = 128  # 'anynonzero' reads it as object, the folder's guessed 'grabcut' as ignore
    assert cv2.imwrite(str(data / "images" / "0.png"), img[..., ::-1])
    assert cv2.imwrite(str(data / "masks" / "0.png"), mask)
    return data


def _restated(model: Path, data: Path, encoding: str = "anynonzero", **kw) -> InstanceResult:
    """The scene's instance evaluated through the API (A-CFR-2, threshold 1e6, 2 clicks, target 0.9 unless
    `kw` says otherwise): what cfr-eval with the same options must give."""
    from cfr_runtime import Engine, Session
    from cfr_runtime.datasets import open_dataset

    (inst,) = open_dataset(data, encoding)
    options = dict(cfr=2, adaptive=True, cfr_threshold=1000000, cfr_clicks=None, zoom_in=False)
    return EVALUATE_INSTANCE(Session(Engine(model), **{**options, **kw}), *inst.load(), inst.id, max_clicks=2,
                             target_iou=0.9)


def test_journal_header_records_every_setting(default_onnx, tmp_path):
    """The header is what --resume compares: the model's hash, the dataset's absolute path and every option
    that changes results, with their values as this run used them; and the options reach the Session: the
    run equals the API restatement, on a scene where each option changes the result."""
    data = _option_scene(tmp_path)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(eval_main, [
        str(default_onnx), "--dataset", str(data), "--max-clicks", "2", "--json", str(out), "--cfr", "2", "--acfr",
        "--acfr-threshold", "1000000", "--cfr-clicks", "all", "--no-zoom", "--target-iou", "0.9",
        "--mask-encoding", "anynonzero"])
    assert result.exit_code == 0, result.output
    header = json.loads(out.with_suffix(".jsonl").read_text().split("\n")[0])
    assert header == {"cfr_eval_journal": 1, "model_sha256": hashlib.sha256(default_onnx.read_bytes()).hexdigest(),
                      "dataset": str(data.resolve()), "mask_encoding": "anynonzero", "mode": "A-CFR-2",
                      "acfr_threshold": 1000000, "cfr_clicks": None, "zoom_in": False, "max_clicks": 2,
                      "target_iou": 0.9}
    summary = json.loads(out.read_text())
    assert summary["mode"] == "A-CFR-2" and summary["cfr_clicks"] == "all" and summary["zoom_in"] is False

    def restated(encoding="anynonzero", **kw):
        return _restated(default_onnx, data, encoding, **kw)

    want, got = restated(), summary["instances"][0]
    assert got["clicks"] == want.clicks and got["forwards"] == want.forwards and got["ious"] == want.ious
    assert want.forwards == [2, 2]  # A-CFR stopped after the second forward of both clicks (--cfr-clicks all)
    # each option matters on this scene, so the comparison above checks that each one reached the Session
    for other in (restated(adaptive=False), restated(cfr_threshold=20), restated(zoom_in=True),
                  restated(cfr_clicks=1), restated("grabcut")):
        assert (other.forwards, other.ious) != (want.forwards, want.ious)


def test_default_cfr_clicks_zoom_and_threads_reach_the_run(default_onnx, tmp_path, monkeypatch):
    """The other side of the header test: the defaults it overrides (CFR on the first click only, zoom-in on)
    reach the Session too, each changing the result on this scene, and --threads reaches ONNX Runtime as the
    session's intra-op thread count (read back from the InferenceSession cfr-eval created)."""
    import onnxruntime as ort

    sessions = []

    class Recorded(ort.InferenceSession):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            sessions.append(self)

    monkeypatch.setattr(ort, "InferenceSession", Recorded)
    data = _option_scene(tmp_path)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(eval_main, [
        str(default_onnx), "--dataset", str(data), "--max-clicks", "2", "--json", str(out), "--cfr", "2", "--acfr",
        "--acfr-threshold", "1000000", "--target-iou", "0.9", "--mask-encoding", "anynonzero", "--threads", "3"])
    assert result.exit_code == 0, result.output
    assert [s.get_session_options().intra_op_num_threads for s in sessions] == [3]
    header = json.loads(out.with_suffix(".jsonl").read_text().split("\n")[0])
    assert header["cfr_clicks"] == 1 and header["zoom_in"] is True
    got = json.loads(out.read_text())["instances"][0]
    want = _restated(default_onnx, data, cfr_clicks=1, zoom_in=True)
    assert (got["clicks"], got["forwards"], got["ious"]) == (want.clicks, want.forwards, want.ious)
    assert want.forwards == [2, 1]  # CFR on the first click only
    for other in (_restated(default_onnx, data, cfr_clicks=None, zoom_in=True),
                  _restated(default_onnx, data, cfr_clicks=1, zoom_in=False)):
        assert (other.forwards, other.ious) != (want.forwards, want.ious)


@pytest.mark.parametrize("args,mode", [([], "StdInfer"), (["--cfr", "1"], "CFR-1"), (["--cfr", "1", "--acfr"],
                                                                                      "A-CFR-1")])
def test_mode_name_without_a_journal(default_onnx, tmp_path, args, mode):
    data = blob_dataset(tmp_path / "ds", 1)
    result = CliRunner().invoke(eval_main, [str(default_onnx), "--dataset", str(data), "--max-clicks", "1", *args])
    assert result.exit_code == 0 and f"mode={mode}  instances=1" in result.output, result.output
    assert not list(tmp_path.rglob("*.jsonl"))


def test_target_iou_stops_each_instance(default_onnx, tmp_path):
    data = blob_dataset(tmp_path / "ds", 2)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(eval_main, [str(default_onnx), "--dataset", str(data), "--max-clicks", "3",
                                            "--target-iou", "0.01", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert [len(i["ious"]) for i in json.loads(out.read_text())["instances"]] == [1, 1]  # 0.95 would click on


def test_backend_option_reaches_the_engine(default_onnx, tmp_path):
    """--backend trt on an ONNX file is refused (no TensorRT here, or not a plan), never run on ONNX Runtime."""
    data = blob_dataset(tmp_path / "ds", 1)
    result = CliRunner().invoke(eval_main, [str(default_onnx), "--dataset", str(data), "--max-clicks", "1",
                                            "--backend", "trt"])
    assert result.exit_code == 2 and "cfr-eval: error:" in result.output and "NoC@85" not in result.output


# ---- the file format, without a model -------------------------------------------------------------------

HEADER = {"cfr_eval_journal": 1, "model_sha256": "ab" * 32, "mode": "StdInfer", "max_clicks": 20}


def _result(i: int) -> InstanceResult:
    return InstanceResult(str(i), [0.5, 0.9], [[1, 2, 1], [3, 4, 0]], [1, 1], 0.25)


def test_new_journal_is_the_header_then_one_line_per_instance(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("stale content\n")
    j = _Journal(path, HEADER, resume=False)  # no --resume: a stale journal is replaced
    assert j.done == [] and j.count == 0
    j.add(_result(0))
    j.add(_result(1))
    assert j.count == 2 and j.added == 2
    j.close()
    lines = path.read_text().split("\n")
    assert lines[-1] == "" and json.loads(lines[0]) == HEADER
    assert [InstanceResult.from_json(json.loads(x)) for x in lines[1:-1]] == [_result(0), _result(1)]


def test_a_nan_never_reaches_the_journal(tmp_path):
    """The journal is strict JSON, like the summary: a NaN IoU is refused before anything is written."""
    path = tmp_path / "r.jsonl"
    j = _Journal(path, HEADER, resume=False)
    with pytest.raises(ValueError):
        j.add(InstanceResult("0", [float("nan")]))
    j.close()
    assert path.read_text() == json.dumps(HEADER) + "\n" and j.count == 0


def test_journal_is_readable_while_the_run_goes_on(tmp_path):
    """Each record reaches the file when it is added (flushed), not when the journal is closed."""
    path = tmp_path / "r.jsonl"
    j = _Journal(path, HEADER, resume=False)
    j.add(_result(0))
    assert path.read_text().count("\n") == 2
    j.close()


def test_resume_reads_finished_instances_and_appends(tmp_path):
    path = tmp_path / "r.jsonl"
    j = _Journal(path, HEADER, resume=False)
    j.add(_result(0))
    j.close()
    j = _Journal(path, dict(HEADER), resume=True)
    assert j.done == [_result(0)] and j.count == 1 and j.added == 0
    j.add(_result(1))
    j.close()
    assert path.read_text() == "\n".join(json.dumps(x) for x in (HEADER, _result(0).to_json(),
                                                                 _result(1).to_json())) + "\n"


def test_resume_without_a_journal_starts_one(tmp_path):
    path = tmp_path / "r.jsonl"
    j = _Journal(path, HEADER, resume=True)
    assert j.done == []
    j.close()
    assert json.loads(path.read_text()) == HEADER


def test_resume_after_a_torn_line_starts_a_new_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(HEADER) + "\n" + json.dumps(_result(0).to_json()) + "\n" + TORN)
    j = _Journal(path, HEADER, resume=True)
    assert j.done == [_result(0)]
    j.add(_result(1))
    j.close()
    lines = path.read_text().split("\n")
    assert lines[2] == TORN and InstanceResult.from_json(json.loads(lines[3])) == _result(1) and lines[4] == ""
    j = _Journal(path, HEADER, resume=True)  # the next resume sees both finished instances
    assert j.done == [_result(0), _result(1)]
    j.close()


@pytest.mark.parametrize("key,value", [("model_sha256", "cd" * 32), ("max_clicks", 5), ("mode", "CFR-2")])
def test_resume_refuses_other_settings_naming_them(tmp_path, key, value):
    path = tmp_path / "r.jsonl"
    _Journal(path, HEADER, resume=False).close()
    before = path.read_bytes()
    with pytest.raises(CfrError, match=rf"{key}: {HEADER[key]!r} then, {value!r} now") as info:
        _Journal(path, {**HEADER, key: value}, resume=True)
    assert str(info.value).endswith("now); use the same options, or run without --resume to start over")
    assert sum(f"{k}: " in str(info.value) for k in HEADER) == 1  # only the setting that differs is named
    assert path.read_bytes() == before


def test_resume_names_every_setting_that_differs(tmp_path):
    path = tmp_path / "r.jsonl"
    _Journal(path, HEADER, resume=False).close()
    with pytest.raises(CfrError) as info:
        _Journal(path, {**HEADER, "mode": "CFR-2", "max_clicks": 5}, resume=True)
    assert "(max_clicks: 20 then, 5 now, mode: 'StdInfer' then, 'CFR-2' now);" in str(info.value)


def test_resume_refuses_a_header_missing_a_setting(tmp_path):
    path = tmp_path / "r.jsonl"
    old = {k: v for k, v in HEADER.items() if k != "model_sha256"}
    path.write_text(json.dumps(old) + "\n")
    with pytest.raises(CfrError, match="model_sha256: None then"):
        _Journal(path, HEADER, resume=True)


@pytest.mark.parametrize("text", ["not json\n", "", "{\"id\": \"0\"\n", "42\n", "[1, 2]\n"])
def test_resume_refuses_a_file_that_is_not_a_journal(tmp_path, text):
    path = tmp_path / "r.jsonl"
    path.write_text(text)
    with pytest.raises(CfrError, match="not a cfr-eval journal"):
        _Journal(path, HEADER, resume=True)
    assert path.read_text() == text
