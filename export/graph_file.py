"""Writing an exported ONNX graph: the one place that stamps the metadata, decides between one file and ONNX
external data, and commits a graph together with its data file.

A protobuf message cannot exceed 2 GB, and ViT-H's weights alone are 2.6 GB in fp32. A graph whose tensors
total more than EXTERNAL_DATA_THRESHOLD keeps them in ONE file beside it, named after it (`model.onnx.data`),
each tensor at a 4 KiB-aligned offset (page alignment, which a loader needs to map a tensor rather than copy it); the
graph's metadata records that file's name, size and sha256 (`cfr_runtime.contract.DataFile`), and the runtime
refuses the graph when the file is missing or differs (`cfr_runtime.onnx_file.check_data_file`).

Memory: the tensors are streamed, one at a time, from wherever the source graph keeps them (torch's exporter
writes one file per tensor beside a graph past 2 GB; ONNX Runtime's optimizer one data file) into the data
file, hashed on the way: a graph past the threshold is never held with all its weights in memory (one below it
is, at most 1.75 GiB).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import onnx

import cfr_runtime
from cfr_runtime.contract import DATA_META_KEY, META_KEY, Contract, DataFile
from cfr_runtime.errors import CfrError
from cfr_runtime.fileio import commit
from cfr_runtime.onnx_file import data_file

# Tensor bytes above which a graph is saved with external data: the 2 GiB protobuf limit less room for the
# graph's own structure (nodes, names, shapes: a few MB for ViT-H). Tests lower it to send a small model down
# the same path.
EXTERNAL_DATA_THRESHOLD = (1 << 31) - (1 << 28)
ALIGN = 4096  # offset alignment of each tensor in the data file (a page)
INLINE_MAX = 1024  # tensors smaller than this stay inside the graph (as ONNX's own converter does)
_CHUNK = 1 << 24


def data_file_name(graph: str | os.PathLike) -> str:
    """The data file of a graph saved with external data: its name plus `.data` (`model.onnx.data`)."""
    return f"{Path(graph).name}.data"


def set_metadata(model: onnx.ModelProto, contract: Contract, data: DataFile | None = None) -> None:
    """Replace the graph's metadata with the contract (and the data file record): nothing a source graph carried
    (another precision's contract, a stale data record) survives."""
    del model.metadata_props[:]
    entries = [(META_KEY, contract.to_json())] + ([(DATA_META_KEY, data.to_json())] if data else [])
    for key, value in entries:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "cfr-icl"
    model.producer_version = cfr_runtime.__version__


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a graph: initializers, then constants held in node attributes (subgraphs included)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def _external(tensor: onnx.TensorProto) -> dict[str, str] | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def _source_file(info: dict[str, str], source_dir: Path | None, name: str) -> Path:
    location = info.get("location", "")
    if source_dir is None or not location or Path(location).is_absolute() or ".." in Path(location).parts:
        raise CfrError(f"tensor {name!r} refers to external data {location!r} that cannot be resolved")
    return source_dir / location


def _nbytes(tensor: onnx.TensorProto, source_dir: Path | None) -> int:
    info = _external(tensor)
    if info is None:
        return len(tensor.raw_data) if tensor.HasField("raw_data") else tensor.ByteSize()
    if "length" in info:
        return int(info["length"])
    return _source_file(info, source_dir, tensor.name).stat().st_size - int(info.get("offset", 0))


def _chunks(tensor: onnx.TensorProto, source_dir: Path | None) -> Iterator[bytes | memoryview]:
    """The tensor's bytes in pieces of at most 16 MiB, read from its source file when it is external."""
    info = _external(tensor)
    if info is None:
        raw = memoryview(tensor.raw_data)
        for i in range(0, len(raw), _CHUNK):
            yield raw[i:i + _CHUNK]
        return
    left = _nbytes(tensor, source_dir)
    with open(_source_file(info, source_dir, tensor.name), "rb") as src:
        src.seek(int(info.get("offset", 0)))
        while left > 0:
            piece = src.read(min(left, _CHUNK))
            if not piece:
                raise CfrError(f"external data of tensor {tensor.name!r} ends early")
            left -= len(piece)
            yield piece


def save_graph(model: onnx.ModelProto, path: str | os.PathLike, contract: Contract, source_dir: str | os.PathLike |
               None = None, threshold: int | None = None) -> DataFile | None:
    """Write `model` with the contract's metadata to `path`: one file, or the graph plus `<path>.data` when its
    tensors total more than the threshold (default EXTERNAL_DATA_THRESHOLD). Tensors the source graph keeps as
    external data are read from `source_dir`. Returns the data file's record (None: one file).

    The model is modified (tensors moved out, metadata replaced); it is meant to be the caller's throwaway copy.
    """
    path = Path(path)
    src = Path(source_dir) if source_dir is not None else None
    tensors = list(_tensors(model.graph))
    limit = EXTERNAL_DATA_THRESHOLD if threshold is None else threshold
    if sum(_nbytes(t, src) for t in tensors) <= limit:
        for t in tensors:
            if _external(t) is not None:  # small enough for one file: bring them in
                t.raw_data = b"".join(bytes(c) for c in _chunks(t, src))
                t.data_location = onnx.TensorProto.DEFAULT
                del t.external_data[:]
        set_metadata(model, contract)
        path.write_bytes(model.SerializeToString())
        return None
    name = data_file_name(path)
    digest, offset = hashlib.sha256(), 0
    with open(path.parent / name, "wb") as out:
        for t in tensors:
            if _external(t) is None and not (t.HasField("raw_data") and len(t.raw_data) >= INLINE_MAX):
                continue
            pad = b"\0" * (-offset % ALIGN)
            out.write(pad)
            digest.update(pad)
            offset += len(pad)
            start = offset
            for piece in _chunks(t, src):
                out.write(piece)
                digest.update(piece)
                offset += len(piece)
            t.ClearField("raw_data")
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", name), ("offset", str(start)), ("length", str(offset - start))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
    record = DataFile(name=name, size=offset, sha256=digest.hexdigest())
    set_metadata(model, contract, record)
    path.write_bytes(model.SerializeToString())
    return record


def restamp(src: str | os.PathLike, dst: str | os.PathLike, contract: Contract,
            threshold: int | None = None) -> DataFile | None:
    """Re-save the graph at `src` (one file or with external data beside it) as `dst` with the contract's
    metadata, streaming its tensors: what quantization and ONNX Runtime's optimizer wrote becomes an artifact."""
    src = Path(src)
    model = onnx.load(str(src), load_external_data=False)
    return save_graph(model, dst, contract, src.parent, threshold)


def commit_graph(staged: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a verified graph into place with its data file: the data file first, the graph last (a reader that
    opens the old graph in between is refused by the checksum, never given other weights). A data file that the
    replaced graph used and the new one does not is removed afterwards."""
    staged, final = Path(staged), Path(final)
    new = data_file(staged)
    try:
        old = data_file(final) if final.is_file() else None
    except CfrError:  # the replaced graph's metadata is malformed: leave whatever is beside it
        old = None
    commit(staged, final, [new.name] if new else [])
    if old is not None and old.name == data_file_name(final) and (new is None or new.name != old.name):
        (final.parent / old.name).unlink(missing_ok=True)
    return final


def copy_graph(graph: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """A copy of the graph and its data file in `folder`, for tools that write scratch files beside their input
    (ONNX Runtime's quantizer writes `<input>-inferred.onnx`; pointed at the copy, it writes into `folder`, never
    into the model folder). A copy, not a hard link: ONNX refuses external data with several links (its guard
    against hard-link attacks). The copy is made by the kernel (`copy_file_range`/`sendfile`), not through memory.
    """
    graph, folder = Path(graph), Path(folder)
    record = data_file(graph)
    for name in [graph.name] + ([record.name] if record else []):
        shutil.copyfile(graph.parent / name, folder / name)
    return folder / graph.name
