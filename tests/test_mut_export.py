"""export/verify.py and cfr-export's commit logic pinned where mutation testing found them loose (issue 21,
round 3), on small real exports (the tiny checkpoint at 224: a second or two each): the verification's figures
against an independent count, its tolerance edge, the cache key of the torch references, a rejected graph that
never replaces the old one, and what cfr-export says it wrote."""

from __future__ import annotations

import logging
import re
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from cfr_runtime.contract import INPUT_NAMES, OUTPUT_PROBS
from cfr_runtime.errors import CfrError
from export import graph_file
from export.cli import main as export_main
from export.graph_file import copy_graph
from export.onnx_export import ExportError, export_onnx, torch_reference, verification_cases
from export.verify import (
    TOLERANCE,
    TorchReferences,
    VerifyReport,
    _check_full_outputs,
    export_verified,
    verified_commit,
    verify_onnx,
)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("mx"), size=64, max_points=6)


def recount(path, graph, contract, seed: int) -> tuple[float, float, int]:
    """verify_onnx's figures, computed again here: worst |onnx - torch| and worst mask disagreement."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = disagree = 0.0
    cases = verification_cases(contract, seed)
    for inputs in cases:
        want = torch_reference(graph, inputs).astype(np.float64)
        got = sess.run([OUTPUT_PROBS], {k: inputs[k] for k in INPUT_NAMES})[0].astype(np.float64)
        worst = max(worst, float(np.abs(got - want).max()))
        disagree = max(disagree, float(((got > contract.threshold) != (want > contract.threshold)).mean()))
    return worst, disagree, len(cases)


def test_report_text():
    assert str(VerifyReport(0.000123456, 0.0025, 4, 1e-4)) == (
        "max |onnx - torch| = 0.000123 over 4 cases (tolerance 0.0001); mask agreement 99.7500% (worst case; "
        "disagreement 0.2500%)")
    assert str(VerifyReport(0.5, 0.0, 3, 0.02, batch_diff=0.0)).endswith(
        "mask agreement 100.0000% (worst case; disagreement 0.0000%); batched vs one by one: max diff 0")


def test_figures_match_an_independent_count_and_the_tolerance_edge(exported):
    path, contract, graph = exported
    report = verify_onnx(path, graph, contract, seed=11)
    worst, disagree, cases = recount(path, graph, contract, 11)
    assert report.max_abs_diff == pytest.approx(worst, abs=1e-12) and 0 < worst < TOLERANCE["fp32"]
    assert (report.mask_disagreement, report.cases, report.tolerance) == (disagree, cases, TOLERANCE["fp32"])
    assert report.batch_diff is None
    verify_onnx(path, graph, contract, seed=11, tolerance=report.max_abs_diff)  # the edge itself passes
    with pytest.raises(ExportError, match=r": exported graph does not match torch: max \|onnx - torch\|"):
        verify_onnx(path, graph, contract, seed=11, tolerance=report.max_abs_diff / 2)
    # against another function (the unflipped network), whose masks differ: the figures are still the real ones
    # and a mask threshold inside the range of its probabilities, so that some pixels cross it
    graph.flip = not graph.flip
    try:
        probs = torch_reference(graph, verification_cases(contract, 11)[2])
        split = replace(contract, threshold=float(np.median(probs)))
        wrong = verify_onnx(path, graph, split, seed=11, tolerance=1.0)
        worst, disagree, _ = recount(path, graph, split, 11)
        with pytest.raises(ExportError, match="does not match torch"):
            verify_onnx(path, graph, split, seed=11)
    finally:
        graph.flip = not graph.flip
    assert wrong.max_abs_diff == pytest.approx(worst, abs=1e-12) and worst > 1e-3
    assert wrong.mask_disagreement == disagree > 0


def test_torch_references_are_keyed_by_everything_that_changes_them(exported):
    path, contract, graph = exported
    refs = TorchReferences()
    inputs = verification_cases(contract, 3)[0]
    first = refs(graph, contract, 3, 0, inputs)
    assert np.array_equal(first, torch_reference(graph, inputs))
    assert refs(None, contract, 3, 0, inputs) is first  # cached: no torch model needed
    others = [(4, 0, contract), (3, 1, contract), (3, 0, replace(contract, flip=not contract.flip)),
              (3, 0, replace(contract, max_points=5)), (3, 0, replace(contract, input_size=448)),
              (3, 0, replace(contract, graph="full"))]
    for seed, case, other in others:
        key = (seed, case, other.graph, other.input_size, other.max_points, other.flip)
        with pytest.raises(ExportError) as info:
            refs(None, other, seed, case, inputs)
        assert str(info.value) == (f"no torch reference for verification case {key} (the torch model was released "
                                   "before every case was computed)")


def test_full_graph_outputs_are_checked_against_their_own_map():
    probs = np.zeros((5, 7), np.float32)
    probs[1:3, 2:6] = 0.6  # above 0.5 (the change threshold), below 0.7 (the box threshold)
    probs[2, 4] = 0.9
    probs[1, 2] = 0.7  # exactly at the box threshold: outside the box
    probs[4, 0] = 0.5  # exactly at the change threshold: not a change
    prev = np.zeros_like(probs)
    prev[0, 0] = 0.5  # the previous map exactly at the change threshold too: not a change
    inputs = {"thresholds": np.array([0.5, 0.7], np.float32), "prev_probs": prev}
    good = [probs, np.array([2, 2, 4, 4]), np.array([8])]
    _check_full_outputs("g", good, inputs, None)
    for box, changed in (([1, 2, 2, 5], 8), ([2, 2, 4, 4], 1), ([2, 2, 4, 5], 8)):
        with pytest.raises(ExportError, match=r"^g: full graph reports box"):
            _check_full_outputs("g", [probs, np.array(box), np.array([changed])], inputs, None)
    empty = [np.zeros_like(probs), np.array([1, 0, 1, 0]), np.array([0])]  # rmin > rmax: no box
    _check_full_outputs("g", empty, inputs, None)
    with pytest.raises(ExportError, match=r"reports box \(0, 0, 0, 0\) / changed 0, its own map gives None / 0"):
        _check_full_outputs("g", [empty[0], np.array([0, 0, 0, 0]), np.array([0])], inputs, None)


def test_verified_commit_moves_only_a_verified_graph(exported, tmp_path, monkeypatch, caplog):
    path, contract, graph = exported
    staged = copy_graph(path, (tmp_path / "stage").mkdir() or tmp_path / "stage")
    final = (tmp_path / "out").mkdir() or tmp_path / "out" / "model.onnx"
    final.write_bytes(b"the old model")
    monkeypatch.setitem(TOLERANCE, "fp32", -1.0)
    with pytest.raises(ExportError):
        verified_commit(staged, final, graph, contract, seed=2)
    assert final.read_bytes() == b"the old model" and staged.is_file()
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="export.verify"):  # the progress trail of a minutes-long export
        report = verified_commit(staged, final, graph, contract, seed=2)
    assert caplog.messages == ["model.onnx: verifying against torch", "model.onnx: ONNX Runtime session loaded",
                               "model.onnx: committed"]
    assert final.read_bytes() == path.read_bytes() and not staged.exists()
    assert report.cases == 4 and report.max_abs_diff < TOLERANCE["fp32"]


def test_export_verified_says_what_was_kept(tiny_checkpoint, tmp_path, monkeypatch):
    path, contract, graph, report = export_verified(tiny_checkpoint, tmp_path / "ok", 224, 6, True, seed=1)
    assert path == tmp_path / "ok" / "model.onnx" and path.is_file()
    assert (contract.input_size, contract.max_points) == (224, 6)
    assert report.cases == 4 and report.max_abs_diff < TOLERANCE["fp32"] and report.tolerance == TOLERANCE["fp32"]
    monkeypatch.setitem(TOLERANCE, "fp32", -1.0)
    with pytest.raises(ExportError) as info:
        export_verified(tiny_checkpoint, tmp_path / "new", 224, 6, True, seed=1)
    assert str(info.value).startswith("model.onnx not written: export: exported graph does not match torch: max |")
    old = path.read_bytes()
    with pytest.raises(ExportError) as info:
        export_verified(tiny_checkpoint, tmp_path / "ok", 224, 6, True, seed=1)
    assert str(info.value).startswith("model.onnx not written (the existing one was kept): export: exported graph "
                                      "does not match torch")
    assert ".partial" not in str(info.value) and path.read_bytes() == old


REPORT = r"max \|onnx - torch\| = \S+ over 4 cases \(tolerance {}\); mask agreement"


def test_cli_says_what_it_wrote(tiny_checkpoint, tmp_path, monkeypatch):
    """Each artifact's line names its file, its data file and size when it has one, and its own verification."""
    monkeypatch.setattr(graph_file, "EXTERNAL_DATA_THRESHOLD", 64 * 1024)
    out = tmp_path / "big"
    result = CliRunner().invoke(export_main, [str(tiny_checkpoint), "-o", str(out), "--size", "224",
                                              "--max-points", "6", "--verify-seed", "3", "--fp16", "--int8"])
    assert result.exit_code == 0, result.output
    note, *lines = result.output.splitlines()
    assert note == ("note: the checkpoint was trained at 448 px; exported at --size 224 (position embedding resized: "
                    "different results and 0.25x the work per forward)")
    assert len(lines) == 6, result.output
    for i, (name, precision, tol) in enumerate((("model.onnx", "fp32", "0.0001"), ("model_fp16.onnx", "fp16", "0.02"),
                                                ("model_int8.onnx", "int8", "0.05"))):
        size = (out / f"{name}.data").stat().st_size / 1e9
        assert lines[2 * i] == f"wrote {out / name} (+ {name}.data, {size:.2f} GB)"
        assert re.fullmatch(rf"  {precision}: {REPORT.format(tol)}.*", lines[2 * i + 1]), lines[2 * i + 1]
    monkeypatch.undo()
    single = CliRunner().invoke(export_main, [str(tiny_checkpoint), "-o", str(tmp_path / "s"), "--size", "224",
                                              "--max-points", "6", "--verify-seed", "3", "--int8"])
    assert single.exit_code == 0, single.output
    assert single.output.splitlines()[1::2] == [f"wrote {tmp_path / 's' / 'model.onnx'}",
                                               f"wrote {tmp_path / 's' / 'model_int8.onnx'}"]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["model.onnx", "model_int8.onnx"]


def test_cli_notes_nothing_at_the_trained_size(tiny_checkpoint, tmp_path):
    result = CliRunner().invoke(export_main, [str(tiny_checkpoint), "-o", str(tmp_path), "--max-points", "6"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == f"wrote {tmp_path / 'model.onnx'}"


@pytest.mark.parametrize("arch", [{"backbone_params": {"depth": 2}}, {}])
def test_cli_notes_nothing_for_a_checkpoint_that_does_not_record_its_size(tmp_path, monkeypatch, capsys, arch):
    """An architecture without backbone_params.img_size (older checkpoints): the size note is left out, the
    export goes on (export_verified replaced by its answer for such a checkpoint: the note is the unit here)."""
    import export.cli as cli
    import export.verify as verify
    from cfr_runtime.contract import Contract

    contract = Contract(input_size=224, max_points=6, arch=arch)
    report = verify.VerifyReport(0.0, 0.0, 4, 1e-4)
    monkeypatch.setattr(verify, "export_verified", lambda *a, **k: (tmp_path / "model.onnx", contract, None, report))
    cli._export(tmp_path / "ck.pth", "onnx", "cpu", tmp_path, None, 6, True, False, False, 1, {}, 1)
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / 'model.onnx'}", f"  fp32: {report}"]


def test_int8_is_staged_in_a_hidden_partial_folder_beside_its_target(tmp_path, monkeypatch, capsys):
    """docs/large-models.md: a killed export leaves its staging folder, hidden and named `.partial`, which may be
    deleted; the int8 graph is quantized there under its final name (the quantizer replaced by a recorder that
    stops the run; the export before it by its answer)."""
    import export.cli as cli
    import export.quantize as quantize
    import export.verify as verify
    from cfr_runtime.contract import Contract

    contract = Contract(input_size=224, max_points=6)
    report = verify.VerifyReport(0.0, 0.0, 4, 1e-4)
    monkeypatch.setattr(verify, "export_verified", lambda *a, **k: (tmp_path / "model.onnx", contract, None, report))
    seen = []

    def quantize_int8(src, staged):
        seen.append((src, staged))
        raise CfrError("stop here")

    monkeypatch.setattr(quantize, "quantize_int8", quantize_int8)
    with pytest.raises(CfrError, match="stop here"):
        cli._export(tmp_path / "ck.pth", "onnx", "cpu", tmp_path, None, 6, True, False, True, 1, {}, 1)
    ((src, staged),) = seen
    assert src == tmp_path / "model.onnx" and staged.name == "model_int8.onnx" and staged.parent.parent == tmp_path
    assert re.fullmatch(r"\.model_int8\.onnx\..+\.partial", staged.parent.name), staged.parent.name
    assert not staged.parent.exists()  # removed on the error


@pytest.mark.parametrize("size, shown", [(5_000_000, "0.01"), (4_999_999, "0.00"), (2_604_000_000, "2.60")])
def test_cli_gives_a_data_file_size_in_gigabytes_of_a_billion_bytes(tmp_path, monkeypatch, size, shown):
    import cfr_runtime.onnx_file as onnx_file
    import export.cli as cli

    record = onnx_file.DataFile(name="model.onnx.data", size=size, sha256="0" * 64)
    monkeypatch.setattr(onnx_file, "data_file", lambda path: record)
    assert cli._with_data(tmp_path / "model.onnx") == f"{tmp_path / 'model.onnx'} (+ model.onnx.data, {shown} GB)"


def test_int8_rejected_keeps_the_old_file_and_no_staging(exported, tiny_checkpoint, tmp_path, monkeypatch):
    args = [str(tiny_checkpoint), "-o", str(tmp_path), "--size", "224", "--max-points", "6", "--verify-seed", "3",
            "--int8"]
    assert CliRunner().invoke(export_main, args).exit_code == 0
    old = (tmp_path / "model_int8.onnx").read_bytes()
    monkeypatch.setitem(TOLERANCE, "int8", -1.0)
    result = CliRunner().invoke(export_main, [*args, "--overwrite", "--no-flip"])
    assert result.exit_code == 2 and "does not match torch" in result.output, result.output
    assert (tmp_path / "model_int8.onnx").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model_int8.onnx"]


def test_fp16_export_reuses_the_fp32_model(tiny_checkpoint, tmp_path, monkeypatch):
    """cfr-export --fp16 halves a copy of the fp32 export's model instead of loading the checkpoint again
    (ViT-H: 2.6 GB per copy): the checkpoint is read once."""
    import export.onnx_export as onnx_export

    loads, load = [], onnx_export._load
    monkeypatch.setattr(onnx_export, "_load", lambda *a, **k: loads.append(a[0]) or load(*a, **k))
    result = CliRunner().invoke(export_main, [str(tiny_checkpoint), "-o", str(tmp_path), "--size", "224",
                                              "--max-points", "6", "--verify-seed", "3", "--fp16"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model_fp16.onnx").is_file() and len(loads) == 1, loads


# ---- round 4: the engines' wiring and the files --overwrite protects -------------------------------------------

@pytest.mark.parametrize("graph", ["square", "full"])
def test_targets_name_every_file_the_export_writes(graph, tmp_path):
    """`_targets` (what an export without --overwrite refuses to replace) against the names the writers use:
    model_file_name for the graphs, `<stem>_int8.onnx`, build_plan's `<onnx stem>.plan` (of the fp16 graph when
    there is one) and aoti.package_name."""
    from types import SimpleNamespace

    from export.aoti import package_name
    from export.cli import _targets
    from export.onnx_export import model_file_name

    full = graph == "full"

    def name(precision):
        return model_file_name(SimpleNamespace(full=full, precision=precision))

    for fp16 in (False, True):
        for int8 in (False, True):
            for engine in ("onnx", "trt", "aoti"):
                want = [name("fp32")] + ([name("fp16")] if fp16 else [])
                want += [name("fp32").replace(".onnx", "_int8.onnx")] if int8 else []
                want += [name("fp16" if fp16 else "fp32").replace(".onnx", ".plan")] if engine == "trt" else []
                want += [package_name(full, "fp16" if fp16 else "fp32")] if engine == "aoti" else []
                assert _targets(tmp_path, graph, fp16, int8, engine) == [tmp_path / n for n in want], \
                    (fp16, int8, engine)
    stem = "model_full" if full else "model"
    assert _targets(tmp_path, graph, True, True, "trt") == [
        tmp_path / n for n in (f"{stem}.onnx", f"{stem}_fp16.onnx", f"{stem}_int8.onnx", f"{stem}_fp16.plan")]
    assert _targets(tmp_path, graph, False, False, "aoti") == [tmp_path / f"{stem}.onnx", tmp_path / f"{stem}_fp32.pt2"]


@pytest.mark.parametrize("fp16", [False, True])
def test_trt_plan_is_built_from_the_last_onnx_graph(fp16, tiny_checkpoint, tmp_path, monkeypatch):
    """--engine trt builds the plan from the fp16 graph when there is one, else the fp32 graph, into -o (TensorRT
    replaced by a recorder: no GPU here; export/trt.py's own tests need one)."""
    import export.trt as trt

    built, checked = [], []
    monkeypatch.setattr(trt, "check_trt_available", lambda: checked.append(True))
    monkeypatch.setattr(trt, "build_plan", lambda onnx_path, out_dir: built.append((onnx_path, out_dir))
                        or out_dir / "made.plan")
    args = [str(tiny_checkpoint), "-o", str(tmp_path), "--size", "224", "--max-points", "6", "--verify-seed", "3",
            "--engine", "trt", *(["--fp16"] if fp16 else [])]
    result = CliRunner().invoke(export_main, args)
    assert result.exit_code == 0, result.output
    assert checked == [True]  # TensorRT and the GPU checked before the export (export/trt.py's preflight)
    assert built == [(tmp_path / ("model_fp16.onnx" if fp16 else "model.onnx"), tmp_path)]
    assert result.output.splitlines()[-1] == f"wrote {tmp_path / 'made.plan'}"


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_aoti_gets_the_fp32_model_and_the_run_options(device, tiny_checkpoint, tmp_path, monkeypatch):
    """--engine aoti compiles after the ONNX graphs from the fp32 torch graph (kept, even with --int8, which
    frees it for the other engines), with the run's precision, device, verification seed and graph options
    (the compiler replaced by a recorder: minutes on the CPU; test_export.py's AOTInductor test runs it)."""
    import export.cli as cli

    calls = []
    monkeypatch.setattr(cli, "_export_aoti", lambda *args: calls.append(args))
    args = [str(tiny_checkpoint), "-o", str(tmp_path), "--size", "224", "--max-points", "6", "--verify-seed", "5",
            "--engine", "aoti", "--device", device, "--fp16", "--int8"]
    result = CliRunner().invoke(export_main, args)
    assert result.exit_code == 0, result.output
    assert len(calls) == 1, calls
    checkpoint, out_dir, contract, graph, fp16, got_device, seed, limits = calls[0]
    import torch

    resolved = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    assert (checkpoint, out_dir, fp16, got_device, seed) == (tiny_checkpoint, tmp_path, True, resolved, 5)
    assert (contract.precision, contract.input_size, contract.max_points, contract.full) == ("fp32", 224, 6, False)
    assert graph is not None and next(graph.parameters()).dtype.is_floating_point
    assert str(next(graph.parameters()).dtype) == "torch.float32"
    assert limits == {"graph": "square", "max_image": None, "opt_image": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model_fp16.onnx", "model_int8.onnx"]


def small_graph(folder, name: str, value: float, data: bool):
    """A one-initializer ONNX graph saved by save_graph into `folder`: with `<name>.data` beside it when `data`."""
    import onnx
    from onnx import TensorProto, helper

    from cfr_runtime.contract import Contract
    from export.graph_file import save_graph

    weights = helper.make_tensor("w", TensorProto.FLOAT, [256], np.full(256, value, np.float32).tobytes(), raw=True)
    node = helper.make_node("Add", ["x", "w"], ["y"])
    model = helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256])], [weights]))
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    record = save_graph(model, folder / name, Contract(), threshold=0 if data else 1 << 20)
    assert (record is not None) == data
    return folder / name


def test_commit_graph_moves_the_data_file_and_removes_only_the_replaced_ones(tmp_path):
    from cfr_runtime.onnx_file import check_data_file, data_file
    from export.graph_file import commit_graph

    out = tmp_path / "out"
    final = out / "model.onnx"
    # a first graph with a data file, into an empty folder: both move, nothing is left in the staging folder
    staged = small_graph(tmp_path / "s1", "model.onnx", 1.0, data=True)
    assert commit_graph(staged, (out.mkdir() or final)) == final
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert list((tmp_path / "s1").iterdir()) == [] and check_data_file(final).name == "model.onnx.data"
    # another graph with a data file of the same name: the new data file replaces the old one (never deleted)
    staged = small_graph(tmp_path / "s2", "model.onnx", 2.0, data=True)
    new_data = (tmp_path / "s2" / "model.onnx.data").read_bytes()
    commit_graph(staged, final)
    assert (out / "model.onnx.data").read_bytes() == new_data and check_data_file(final) == data_file(final)
    # a single-file graph over it: the data file the replaced graph used is removed
    staged = small_graph(tmp_path / "s3", "model.onnx", 3.0, data=False)
    commit_graph(staged, final)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"] and data_file(final) is None
    # a single-file graph over a single-file graph: nothing else is touched
    (out / "notes.txt").write_text("ours")
    commit_graph(small_graph(tmp_path / "s4", "model.onnx", 4.0, data=False), final)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "notes.txt"]


def test_commit_graph_leaves_data_files_it_does_not_own(tmp_path):
    from export.graph_file import commit_graph

    out = tmp_path / "out"
    # the replaced graph records a data file under another name (a graph copied under a new name): not ours
    small_graph(out, "other.onnx", 1.0, data=True).rename(out / "model.onnx")
    commit_graph(small_graph(tmp_path / "s", "model.onnx", 2.0, data=False), out / "model.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "other.onnx.data"]
    # the replaced graph's data-file record is malformed (data_file refuses it): whatever is beside it stays
    import onnx

    from cfr_runtime.contract import DATA_META_KEY
    from cfr_runtime.errors import CfrError
    from cfr_runtime.onnx_file import data_file

    model = onnx.load(str(out / "model.onnx"))
    entry = model.metadata_props.add()
    entry.key, entry.value = DATA_META_KEY, "{not json"
    onnx.save(model, str(out / "model.onnx"))
    with pytest.raises(CfrError):
        data_file(out / "model.onnx")
    (out / "model.onnx.data").write_bytes(b"someone's data")
    commit_graph(small_graph(tmp_path / "t", "model.onnx", 3.0, data=False), out / "model.onnx")
    assert (out / "model.onnx.data").read_bytes() == b"someone's data"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data", "other.onnx.data"]


def test_commit_graph_over_a_graph_whose_data_file_is_already_gone(tmp_path):
    """The replaced graph's data file was deleted by hand: the commit does not fail on removing it."""
    from export.graph_file import commit_graph

    out = tmp_path / "out"
    small_graph(out, "model.onnx", 1.0, data=True)
    (out / "model.onnx.data").unlink()
    commit_graph(small_graph(tmp_path / "s", "model.onnx", 2.0, data=False), out / "model.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]


# ---- round 4: the full-resolution graph's verification, figures recomputed ------------------------------------

@pytest.fixture(scope="module")
def exported_full(tiny_checkpoint, tmp_path_factory):
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("mf"), size=64, max_points=6, graph="full")


def recount_full(path, graph, contract, seed: int) -> tuple[float, float, int]:
    """verify_onnx's figures for a full graph, computed again here on the probability map (output 0)."""
    import onnxruntime as ort

    from export.onnx_export import full_verification_cases

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = disagree = 0.0
    cases = full_verification_cases(contract, seed)
    for inputs in cases:
        want = torch_reference(graph, inputs)[0].astype(np.float64)
        got = sess.run(list(contract.output_names()), {k: inputs[k] for k in contract.input_names()})[0]
        got = got.astype(np.float64)
        worst = max(worst, float(np.abs(got - want).max()))
        disagree = max(disagree, float(((got > contract.threshold) != (want > contract.threshold)).mean()))
    return worst, disagree, len(cases)


@pytest.mark.parametrize("want_at, got_at, share", [(0.0, -0.25, 0.0), (-0.25, 0.0, 0.0), (0.25, -0.25, 1.0)])
def test_full_graph_mask_disagreement_counts_strictly_above_the_threshold(exported_full, monkeypatch, want_at, got_at,
                                                                          share):
    """As on the square graph: a pixel exactly at the threshold is out of the mask, for the graph and for torch
    (crafted maps of each case's size in place of torch's and ONNX Runtime's; the box and change-count check,
    pinned by its own tests, is left out)."""
    import onnxruntime as ort

    import export.verify as verify

    path, contract, graph = exported_full
    t = contract.threshold

    def full(feeds, at):
        return np.full(feeds["prev_probs"].shape, t + at, np.float32)

    monkeypatch.setattr(verify, "torch_reference", lambda graph, inputs: (full(inputs, want_at),))
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, names, feeds, *rest: [full(feeds, got_at)])
    monkeypatch.setattr(verify, "_check_full_outputs", lambda *args: None)
    report = verify_onnx(path, graph, contract, seed=1, tolerance=1.0)
    assert report.mask_disagreement == share and report.max_abs_diff == pytest.approx(abs(want_at - got_at))


def test_full_graph_figures_match_an_independent_count_and_the_tolerance_edge(exported_full):
    from export.onnx_export import full_verification_cases

    path, contract, graph = exported_full
    assert contract.full
    report = verify_onnx(path, graph, contract, seed=5)
    worst, disagree, cases = recount_full(path, graph, contract, 5)
    assert report.max_abs_diff == pytest.approx(worst, abs=1e-12) and 0 < worst < TOLERANCE["fp32"]
    assert (report.mask_disagreement, report.cases, report.tolerance, report.batch_diff) == (
        disagree, cases, TOLERANCE["fp32"], None)
    verify_onnx(path, graph, contract, seed=5, tolerance=report.max_abs_diff)  # the edge itself passes
    with pytest.raises(ExportError, match=r": exported full graph does not match torch: max \|onnx - torch\| = "):
        verify_onnx(path, graph, contract, seed=5, tolerance=report.max_abs_diff / 2)
    # against the unflipped network, with a mask threshold inside its probabilities: real figures, refused
    graph.square.flip = not graph.square.flip
    try:
        import onnxruntime as ort

        case = full_verification_cases(contract, 5)[1]
        want = torch_reference(graph, case)[0]
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            list(contract.output_names()), {k: case[k] for k in contract.input_names()})[0]
        at = np.unravel_index(np.argmax(np.abs(got - want)), got.shape)  # a threshold between the two there
        split = replace(contract, threshold=float(got[at] + want[at]) / 2)
        wrong = verify_onnx(path, graph, split, seed=5, tolerance=1.0)
        worst, disagree, _ = recount_full(path, graph, split, 5)
        with pytest.raises(ExportError, match="exported full graph does not match torch"):
            verify_onnx(path, graph, split, seed=5)
    finally:
        graph.square.flip = not graph.square.flip
    assert wrong.max_abs_diff == pytest.approx(worst, abs=1e-12) and worst > 1e-3
    assert wrong.mask_disagreement == disagree > 0


def test_output_range_edges_and_message():
    from cfr_runtime.errors import ModelOutputError
    from export.verify import check_output_range, worst_diff

    check_output_range(np.array([0.0, 1.0], np.float32), "m")  # both ends are probabilities
    for bad, lo, hi in ((np.array([-0.5, 0.25]), -0.5, 0.25), (np.array([0.0, 2.0]), 0.0, 2.0)):
        with pytest.raises(ModelOutputError) as info:
            check_output_range(bad, "the graph")
        assert str(info.value) == (f"the graph returns values outside [0, 1] (min {lo}, max {hi}): NaN/inf weights or "
                                   "a precision overflow; nothing was kept")
    assert worst_diff(0.5, np.array([0.5]), np.array([0.25])) == 0.5  # the running max keeps the larger
    assert worst_diff(0.0, np.array([0.5, 0.1], np.float32), np.array([0.25, 0.1], np.float32)) == 0.25
    # NaN anywhere keeps NaN (max(0.0, nan) is 0.0, which once let NaN outputs verify)
    assert np.isnan(worst_diff(0.0, np.array([np.nan], np.float32), np.zeros(1, np.float32)))
    assert np.isnan(worst_diff(float("nan"), np.zeros(1, np.float32), np.zeros(1, np.float32)))


def test_one_seed_and_one_reference_cache_per_run(tiny_checkpoint, tmp_path, monkeypatch):
    """Every artifact of one cfr-export run is verified on the same inputs (--verify-seed, else one fresh seed for
    the run) against one shared cache of torch outputs."""
    import export.verify as verify

    calls, real = [], verify.verify_onnx

    def spy(path, graph, contract, seed=None, tolerance=None, references=None):
        calls.append((contract.precision, seed, references))
        return real(path, graph, contract, seed=seed, tolerance=tolerance, references=references)

    monkeypatch.setattr(verify, "verify_onnx", spy)
    base = [str(tiny_checkpoint), "--size", "224", "--max-points", "6", "--fp16", "--int8"]
    result = CliRunner().invoke(export_main, [*base, "-o", str(tmp_path / "a"), "--verify-seed", "7"])
    assert result.exit_code == 0, result.output
    assert [(p, s) for p, s, _ in calls] == [("fp32", 7), ("fp16", 7), ("int8", 7)]
    assert calls[0][2] is not None and all(r is calls[0][2] for _, _, r in calls)
    seeds = []
    for run in ("b", "c"):
        calls.clear()
        result = CliRunner().invoke(export_main, [*base, "-o", str(tmp_path / run)])
        assert result.exit_code == 0, result.output
        assert len({s for _, s, _ in calls}) == 1 and calls[0][1] is not None, calls
        seeds.append(calls[0][1])
    assert seeds[0] != seeds[1]  # fresh per run (two equal draws of 2**30: once in a billion)


def test_fp16_full_graph_keeps_the_graph_options(tiny_checkpoint, tmp_path):
    """--graph full --fp16: both graphs are full-resolution graphs with the given --max-image."""
    from cfr_runtime.backends.ort import read_contract_from_file

    result = CliRunner().invoke(export_main, [str(tiny_checkpoint), "-o", str(tmp_path), "--size", "224",
                                              "--max-points", "6", "--verify-seed", "3", "--graph", "full",
                                              "--max-image", "600x700", "--fp16"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_full.onnx", "model_full_fp16.onnx"]
    for name, precision in (("model_full.onnx", "fp32"), ("model_full_fp16.onnx", "fp16")):
        contract = read_contract_from_file(tmp_path / name)
        assert (contract.full, contract.precision, tuple(contract.max_image)) == (True, precision, (600, 700))


def test_fp16_batch_axis_keeps_the_batch(tiny_checkpoint, tmp_path):
    from cfr_runtime.backends.ort import read_contract_from_file

    result = CliRunner().invoke(export_main, [str(tiny_checkpoint), "-o", str(tmp_path), "--size", "224",
                                              "--max-points", "6", "--verify-seed", "3", "--max-batch", "2",
                                              "--fp16"])
    assert result.exit_code == 0, result.output
    for name in ("model.onnx", "model_fp16.onnx"):
        assert read_contract_from_file(tmp_path / name).max_batch == 2
    assert result.output.count("batched vs one by one: max diff 0") == 2, result.output


def test_export_verified_passes_every_option_on(tiny_checkpoint, tmp_path):
    """--no-flip, the size and the click rows reach the graph export_verified writes (and its verification)."""
    from cfr_runtime.backends.ort import read_contract_from_file

    path, contract, graph, report = export_verified(tiny_checkpoint, tmp_path, 224, 5, False, seed=2)
    written = read_contract_from_file(path)
    assert (contract.flip, contract.input_size, contract.max_points) == (False, 224, 5)
    assert (written.flip, written.input_size, written.max_points) == (False, 224, 5) and graph.flip is False


def test_verification_runs_on_the_cpu_provider(exported, monkeypatch):
    """The check compares with torch on the CPU: ONNX Runtime's default provider list would pick a GPU build's
    CUDA provider first, whose numerics the fp32 tolerance is not set for."""
    import onnxruntime as ort

    seen, real = [], ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: seen.append(k.get("providers")) or real(*a, **k))
    path, contract, graph = exported
    verify_onnx(path, graph, contract, seed=4)
    assert seen == [["CPUExecutionProvider"]]


@pytest.fixture(scope="module")
def exported_batched(tiny_checkpoint, tmp_path_factory):
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("mb"), size=64, max_points=6, max_batch=2)


def test_batched_verification_runs_the_cases_as_one_call(exported_batched, monkeypatch):
    """A batch-axis graph is checked one case at a time and then on its first max_batch cases as one call; the
    figures are the worst over both, and the batch against the single calls is reported (0: bit for bit)."""
    import onnxruntime as ort

    path, contract, graph = exported_batched
    calls, real_run = [], ort.InferenceSession.run

    def run(self, names, feeds, *rest):
        calls.append(int(feeds["image"].shape[0]))
        return real_run(self, names, feeds, *rest)

    monkeypatch.setattr(ort.InferenceSession, "run", run)
    report = verify_onnx(path, graph, contract, seed=6)
    monkeypatch.undo()
    assert calls == [1, 1, 1, 1, contract.max_batch] and contract.max_batch == 2
    assert report.batch_diff == 0.0 and report.cases == 4
    worst, disagree, _ = recount(path, graph, contract, 6)
    assert report.max_abs_diff == pytest.approx(worst, abs=1e-12) and report.mask_disagreement == disagree
    assert str(report).endswith("; batched vs one by one: max diff 0")


def test_mask_disagreement_counts_strictly_above_the_threshold(exported, monkeypatch):
    """A pixel is in the mask when its probability is above the threshold, for the graph and for torch alike:
    one exactly at it is out (crafted outputs in place of torch's and ONNX Runtime's)."""
    import onnxruntime as ort

    import export.verify as verify

    path, contract, graph = exported
    t, s = contract.threshold, contract.input_size
    want = np.full((1, 1, s, s), t - 0.25, np.float32)
    got = want.copy()
    want[..., :10, :] = t  # torch exactly at the threshold, the graph below: both out, they agree
    got[..., 10:20, :] = t  # the other way round
    want[..., 20:30, :] = t + 0.25  # torch above, the graph below: these 10 rows disagree
    monkeypatch.setattr(verify, "torch_reference", lambda graph, inputs: want)
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, names, feeds, *rest: [got])
    report = verify_onnx(path, graph, contract, seed=1, tolerance=1.0)
    assert report.mask_disagreement == 10 / s and report.max_abs_diff == pytest.approx(0.5)


@pytest.mark.parametrize("bad", ["torch", "graph", "batched"])
def test_out_of_range_outputs_name_their_source(bad, exported, exported_batched, monkeypatch):
    import onnxruntime as ort

    import export.verify as verify
    from cfr_runtime.errors import ModelOutputError

    path, contract, graph = exported_batched if bad == "batched" else exported
    real_reference, real_run = verify.torch_reference, ort.InferenceSession.run
    if bad == "torch":
        monkeypatch.setattr(verify, "torch_reference", lambda g, inputs: real_reference(g, inputs) * np.nan)
    else:
        def run(self, names, feeds, *rest):
            out = real_run(self, names, feeds, *rest)
            return [out[0] * np.nan] if bad == "graph" or feeds["image"].shape[0] > 1 else out

        monkeypatch.setattr(ort.InferenceSession, "run", run)
    with pytest.raises(ModelOutputError) as info:
        verify_onnx(path, graph, contract, seed=1)
    what = {"torch": "the torch model", "graph": "the exported graph", "batched": "the exported graph (batched)"}[bad]
    assert str(info.value).startswith(f"{path}: {what} returns values outside [0, 1] (min nan, max nan)")


@pytest.mark.parametrize("bad", ["torch", "graph"])
def test_full_graph_out_of_range_outputs_name_their_source(bad, exported_full, monkeypatch):
    import onnxruntime as ort

    import export.verify as verify
    from cfr_runtime.errors import ModelOutputError

    path, contract, graph = exported_full
    real_reference, real_run = verify.torch_reference, ort.InferenceSession.run
    if bad == "torch":
        monkeypatch.setattr(verify, "torch_reference", lambda g, inputs: [r * np.nan if i == 0 else r for i, r in
                                                                          enumerate(real_reference(g, inputs))])
    else:
        monkeypatch.setattr(ort.InferenceSession, "run", lambda self, names, feeds, *rest: [
            o * np.nan if i == 0 else o for i, o in enumerate(real_run(self, names, feeds, *rest))])
    with pytest.raises(ModelOutputError) as info:
        verify_onnx(path, graph, contract, seed=1)
    what = {"torch": "the torch model", "graph": "the exported graph"}[bad]
    assert str(info.value).startswith(f"{path}: {what} returns values outside [0, 1] (min nan, max nan)")


def test_a_shared_reference_cache_never_serves_another_seeds_outputs(exported, exported_full):
    """Verifications sharing one TorchReferences with other seeds (or with none: a fresh one each) each compare
    against torch on their own inputs: a cache entry is never reused for other inputs."""
    for path, contract, graph in (exported, exported_full):
        refs = TorchReferences()
        for seed in (1, 2, None, None):
            assert verify_onnx(path, graph, contract, seed=seed, references=refs).max_abs_diff < TOLERANCE["fp32"]


def test_full_graph_inconsistent_outputs_are_refused_naming_the_file(exported_full, monkeypatch):
    import onnxruntime as ort

    path, contract, graph = exported_full
    real_run = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, names, feeds, *rest: [
        o + 1 if i == 2 else o for i, o in enumerate(real_run(self, names, feeds, *rest))])  # one change too many
    with pytest.raises(ExportError) as info:
        verify_onnx(path, graph, contract, seed=1)
    assert str(info.value).startswith(f"{path}: full graph reports box")
