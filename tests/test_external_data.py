"""Graphs past the protobuf limit (ViT-H: 2.6 GB of fp32 weights) keep their weights in one data file beside
them. Here a tiny model is sent down that same path by lowering the size threshold (seconds instead of the
minutes and gigabytes of a real ViT-H; bench/vith_smoke.py is that run): the files written, the metadata
record, every consumer, the refusals of a missing or altered data file, and what a failed export leaves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import export.graph_file as graph_file
import export.verify
from cfr_runtime import ContractError, Engine, Session
from cfr_runtime.contract import DATA_META_KEY, META_KEY, DataFile
from cfr_runtime.fileio import file_sha256
from cfr_runtime.onnx_file import check_data_file, data_file, read_metadata
from export.cli import main as export_main
from tests.conftest import blob_scene

THRESHOLD = 64 * 1024  # the tiny model's ~1.5 MB of weights are far past it
ARGS = ["--size", "224", "--max-points", "6", "--verify-seed", "3"]


def listing(folder: Path) -> list[str]:
    """Every entry under `folder`, hidden ones included (staging folders, loose tensors)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run_export(ckpt, out, *extra):
    return CliRunner().invoke(export_main, [str(ckpt), "-o", str(out), *ARGS, *extra])


@pytest.fixture()
def lowered(monkeypatch):
    monkeypatch.setattr(graph_file, "EXTERNAL_DATA_THRESHOLD", THRESHOLD)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """cfr-export --fp16 --int8 past the lowered threshold, and the same export as single files."""
    root = tmp_path_factory.mktemp("ext")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(graph_file, "EXTERNAL_DATA_THRESHOLD", THRESHOLD)
        result = run_export(tiny_checkpoint, root / "big", "--fp16", "--int8")
    assert result.exit_code == 0, result.output
    single = run_export(tiny_checkpoint, root / "single", "--int8")
    assert single.exit_code == 0, single.output
    return root / "big", root / "single", result.output


def test_every_artifact_gets_one_data_file(exported):
    big, single, output = exported
    names = ["model.onnx", "model_fp16.onnx", "model_int8.onnx"]
    assert listing(big) == sorted(names + [n + ".data" for n in names])  # no loose tensors, no staging folders
    assert listing(single) == ["model.onnx", "model_int8.onnx"]
    assert "(+ model.onnx.data," in output and "int8: max |onnx - torch|" in output
    for name in names:
        graph = big / name
        record = data_file(graph)
        assert record == DataFile(name + ".data", (big / record.name).stat().st_size, file_sha256(big / record.name))
        assert THRESHOLD < record.size and graph.stat().st_size < record.size / 4  # the weights left the graph
        model = onnx.load(str(graph), load_external_data=False)
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {record.name}
        offsets = [int(e.value) for t in model.graph.initializer for e in t.external_data if e.key == "offset"]
        assert offsets and all(o % graph_file.ALIGN == 0 for o in offsets)
        meta = {p.key: p.value for p in model.metadata_props}
        assert read_metadata(graph) == meta and json.loads(meta[META_KEY])["precision"] in name + "fp32"


@pytest.mark.parametrize("name", ["model.onnx", "model_int8.onnx"])
def test_same_function_as_the_single_file_graph(exported, name):
    """Engine and Session run the data-file graph and give exactly the single-file graph's probabilities."""
    big, single, _ = exported
    rgb, _ = blob_scene(1)
    probs = []
    for folder in (big, single):
        s = Session(Engine(folder / name), cfr=1)
        s.set_image(rgb)
        s.add_click(80, 60)
        s.add_click(20, 20, positive=False)
        probs.append(s.probs.copy())
    assert np.array_equal(probs[0], probs[1])


def test_fp16_and_full_graph_run(exported, tiny_checkpoint, tmp_path, lowered):
    big, _, _ = exported
    rgb, _ = blob_scene(2)
    s = Session(Engine(big / "model_fp16.onnx"))
    s.set_image(rgb)
    assert s.add_click(80, 60).shape == rgb.shape[:2]
    result = run_export(tiny_checkpoint, tmp_path, "--graph", "full", "--max-image", "600x600")
    assert result.exit_code == 0, result.output
    assert listing(tmp_path) == ["model_full.onnx", "model_full.onnx.data"]
    engine = Engine(tmp_path / "model_full.onnx")
    assert engine.contract.full
    s = Session(engine)
    s.set_image(rgb)
    assert s.add_click(80, 60).shape == rgb.shape[:2]


def _copy(src: Path, dst: Path, name: str = "model.onnx") -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for n in (name, name + ".data"):
        (dst / n).write_bytes((src / n).read_bytes())
    return dst / name


def test_missing_data_file_is_refused(exported, tmp_path):
    graph = _copy(exported[0], tmp_path)
    (tmp_path / "model.onnx.data").unlink()
    for load in (Engine, lambda p: check_data_file(p), lambda p: export.verify.verify_onnx(p, None, None)):
        with pytest.raises(ContractError, match=r"model.onnx.data beside it .* is missing"):
            load(graph)


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap"])
def test_altered_data_file_is_refused(exported, tmp_path, damage):
    graph = _copy(exported[0], tmp_path)
    data = tmp_path / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01  # one bit of one weight: ONNX Runtime would load it without a word
    elif damage == "truncate":
        raw = raw[:-4096]
    else:  # the data file of another export of the same architecture
        raw = bytearray((exported[0] / "model_fp16.onnx.data").read_bytes())
    data.write_bytes(bytes(raw))
    with pytest.raises(ContractError, match="does not match the graph|bytes, the graph was exported with"):
        Engine(graph)


def test_cli_eval_and_serve_take_a_data_file_graph(exported, tmp_path):
    """cfr-eval and cfr-serve open models through Engine: a data-file graph works, a broken one is refused."""
    import cv2

    from cfr_runtime.cli_eval import main as eval_main

    graph = exported[0] / "model.onnx"
    rgb, gt = blob_scene(4)
    ds = tmp_path / "GrabCut"
    for sub, arr in (("data_GT/a.jpg", rgb[..., ::-1]), ("boundary_GT/a.bmp", (gt * 255).astype(np.uint8))):
        (ds / sub).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(ds / sub), arr)
    result = CliRunner().invoke(eval_main, [str(graph), "--dataset", str(ds), "--max-clicks", "2"])
    assert result.exit_code == 0 and "NoC@85" in result.output, result.output
    broken = _copy(exported[0], tmp_path / "broken")
    (tmp_path / "broken" / "model.onnx.data").unlink()
    result = CliRunner().invoke(eval_main, [str(broken), "--dataset", str(ds), "--max-clicks", "2"])
    assert result.exit_code != 0 and "is missing" in result.output, result.output

    pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[serve]')")
    pytest.importorskip("httpx", reason="httpx is not installed (pip install -e '.[dev]')")
    from fastapi.testclient import TestClient
    from PIL import Image

    from cfr_runtime.serve import create_app

    with TestClient(create_app(str(graph)), base_url="http://localhost") as client:  # the Host guard's name
        png = tmp_path / "a.png"
        Image.fromarray(rgb).save(png)
        created = client.post("/sessions", content=png.read_bytes(), headers={"Content-Type": "image/png"})
        assert created.status_code == 201, created.text
        answer = client.post(f"/sessions/{created.json()['session_id']}/clicks", json={"x": 80, "y": 60})
        direct = Session(Engine(graph))
        direct.set_image(rgb)
        assert answer.status_code == 200, answer.text
        assert answer.json()["area"] == int(direct.add_click(80, 60).sum())
    with pytest.raises(ContractError, match="is missing"):
        create_app(str(broken))


# ---- what a failed export leaves ----------------------------------------------------------------------------

def test_failed_export_leaves_nothing(tiny_checkpoint, tmp_path, lowered, monkeypatch):
    """Verification rejects the graph after its data file was written: no data file, no loose tensors, no
    staging folder, and no output folder (it did not exist before)."""
    monkeypatch.setitem(export.verify.TOLERANCE, "fp32", -1.0)
    out = tmp_path / "new" / "out"
    result = run_export(tiny_checkpoint, out)
    assert result.exit_code == 2 and "model.onnx not written" in result.output, result.output
    assert listing(tmp_path) == []


def test_failure_while_writing_leaves_nothing(tiny_checkpoint, tmp_path, lowered, monkeypatch):
    """torch's exporter wrote its trace and the data file is half written when the writer fails (as the old
    EncodeError did past 2 GB): everything of that export goes."""
    real = graph_file.save_graph

    def fail_midway(model, path, *args, **kw):
        real(model, path, *args, **kw)
        assert (Path(path).parent / "trace").is_dir() and Path(str(path) + ".data").is_file()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("export.onnx_export.save_graph", fail_midway)
    (tmp_path / "keep.txt").write_text("not ours")
    result = run_export(tiny_checkpoint, tmp_path)
    assert result.exit_code == 2 and "No space left" in result.output, result.output
    assert listing(tmp_path) == ["keep.txt"]


def test_previous_model_survives_a_failed_reexport(exported, tiny_checkpoint, tmp_path, lowered, monkeypatch):
    _copy(exported[0], tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in listing(tmp_path)}
    assert set(before) == {"model.onnx", "model.onnx.data"}
    monkeypatch.setitem(export.verify.TOLERANCE, "fp32", -1.0)
    result = run_export(tiny_checkpoint, tmp_path, "--no-flip", "--overwrite")  # another graph, rejected
    assert result.exit_code == 2 and "not written (the existing one was kept)" in result.output, result.output
    assert {n: (tmp_path / n).read_bytes() for n in listing(tmp_path)} == before
    Engine(tmp_path / "model.onnx")  # still loads: graph and data file belong together


def test_int8_replaced_only_after_verification(exported, tiny_checkpoint, tmp_path, lowered, monkeypatch):
    """The int8 graph is verified in its staging folder, then moved: a rejected one never replaces the old one,
    and its staged files are removed."""
    _copy(exported[0], tmp_path)
    _copy(exported[0], tmp_path, "model_int8.onnx")
    old = {n: (tmp_path / n).read_bytes() for n in ("model_int8.onnx", "model_int8.onnx.data")}
    monkeypatch.setitem(export.verify.TOLERANCE, "int8", -1.0)
    result = CliRunner().invoke(export_main, [str(tiny_checkpoint), "-o", str(tmp_path), "--size", "224",
                                              "--max-points", "9", "--int8", "--overwrite"])  # differs from the old
    assert result.exit_code == 2 and "does not match torch" in result.output, result.output
    assert {n: (tmp_path / n).read_bytes() for n in old} == old
    assert listing(tmp_path) == ["model.onnx", "model.onnx.data", "model_int8.onnx", "model_int8.onnx.data"]
    assert Engine(tmp_path / "model.onnx").contract.max_points == 9  # the fp32 graph passed and was replaced


def test_single_file_export_removes_the_old_data_file(exported, tiny_checkpoint, tmp_path):
    _copy(exported[0], tmp_path)
    assert listing(tmp_path) == ["model.onnx", "model.onnx.data"]
    assert run_export(tiny_checkpoint, tmp_path, "--overwrite").exit_code == 0
    assert listing(tmp_path) == ["model.onnx"] and data_file(tmp_path / "model.onnx") is None


# ---- the pieces ----------------------------------------------------------------------------------------------

def test_writer_streams_tensors_from_one_file_each(exported, tmp_path):
    """The shape of torch's export past 2 GB (every weight in its own file beside the graph) becomes one data
    file with the same function."""
    from export.graph_file import save_graph
    from export.quantize import read_contract

    single = exported[1] / "model.onnx"
    model = onnx.load(str(single))
    src = tmp_path / "trace"
    src.mkdir()
    onnx.save(model, str(src / "trace.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
              size_threshold=1024)
    assert len(os.listdir(src)) > 20
    out = tmp_path / "model.onnx"
    record = save_graph(onnx.load(str(src / "trace.onnx"), load_external_data=False), out, read_contract(single),
                        src, threshold=THRESHOLD)
    assert record is not None and check_data_file(out) == record
    rgb, _ = blob_scene(5)
    masks = []
    for path in (single, out):
        s = Session(Engine(path))
        s.set_image(rgb)
        masks.append(s.add_click(70, 50).copy())
    assert np.array_equal(*masks)


@pytest.mark.parametrize("name", ["../model.onnx.data", "/etc/passwd", "a/b.data", "", ".."])
def test_data_record_names_a_file_beside_the_graph_only(name):
    text = json.dumps({"name": name, "size": 1, "sha256": "0" * 64})
    with pytest.raises(ContractError, match="not a plain file name"):
        DataFile.from_json(text, "model.onnx")
    with pytest.raises(ContractError, match="malformed"):
        DataFile.from_json(json.dumps({"name": "m.data", "size": -1, "sha256": "0" * 64}), "model.onnx")


def test_metadata_scan(exported, tmp_path):
    graph = exported[1] / "model_int8.onnx"
    assert read_metadata(graph) == {p.key: p.value for p in onnx.load(str(graph)).metadata_props}
    assert DATA_META_KEY not in read_metadata(graph)
    for junk in (b"", b"\x00junk" * 10, b"\xff" * 64):
        (tmp_path / "junk.onnx").write_bytes(junk)
        assert not read_metadata(tmp_path / "junk.onnx")
    assert read_metadata(tmp_path / "absent.onnx") is None


def test_trt_reads_the_contract_without_loading_the_weights(exported, tmp_path):
    """The TensorRT build reads the contract from the metadata (not a 2.6 GB ONNX Runtime session) and checks
    the data file first; the build itself needs a GPU."""
    from cfr_runtime.backends.ort import read_contract_from_file

    assert read_contract_from_file(exported[0] / "model_fp16.onnx").precision == "fp16"
    graph = _copy(exported[0], tmp_path)
    (tmp_path / "model.onnx.data").unlink()
    with pytest.raises(ContractError, match="is missing"):
        read_contract_from_file(graph)
    pytest.importorskip("tensorrt", reason="TensorRT is not installed: the plan build from a data-file graph "
                                           "runs on the GPU machine (bench/gpu/run_h100.sh vith_onnx)")
    from export.trt import build_plan

    plan = build_plan(exported[0] / "model_fp16.onnx", tmp_path / "plan")
    assert plan.is_file()


def test_torch_model_is_freed_before_quantizing(tiny_checkpoint, tmp_path, monkeypatch):
    """ONNX Runtime's quantizer holds the fp32 weights several times over (ViT-H: +5 GiB); the fp32 torch model
    (2.6 GB) is not needed by then (the int8 check reuses the cached torch outputs) and must be gone."""
    import gc
    import weakref

    import export.quantize

    graphs, checked = [], []
    real_export, real_quantize = export.verify.export_verified, export.quantize.quantize_int8

    def spy_export(*args, **kw):
        result = real_export(*args, **kw)
        graphs.append(weakref.ref(result[2]))
        return result

    def spy_quantize(*args, **kw):
        gc.collect()
        checked.append([ref() is None for ref in graphs])
        return real_quantize(*args, **kw)

    monkeypatch.setattr(export.verify, "export_verified", spy_export)
    monkeypatch.setattr(export.quantize, "quantize_int8", spy_quantize)
    result = run_export(tiny_checkpoint, tmp_path, "--fp16", "--int8")
    assert result.exit_code == 0, result.output
    assert checked == [[True, True]]
