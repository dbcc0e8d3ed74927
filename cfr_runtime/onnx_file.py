"""An ONNX file as the runtime opens it: its metadata read without loading the graph or the weights, and the
check of the external data file that a graph past the 2 GB protobuf limit keeps its weights in.

Why a protobuf scan of our own: the runtime needs the metadata *before* ONNX Runtime loads the model (to refuse
a missing or altered data file with a clear message, instead of ONNX Runtime's own error or, worse, a model
that loads and computes with other weights), and it depends on onnxruntime only, not on the `onnx` package.
A ModelProto is a sequence of (field, value) records; metadata_props is field 14, each entry a (key, value)
pair of strings; the graph (field 7) is skipped by its length, so the scan reads a few hundred bytes.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

from .contract import DATA_META_KEY, DataFile
from .errors import ContractError
from .fileio import file_sha256

_METADATA_PROPS = 14  # onnx.proto: ModelProto.metadata_props
_MAX_ENTRY = 1 << 24  # one metadata entry; anything larger is not ours


class _Malformed(Exception):
    pass


def _varint(f: BinaryIO) -> int:
    result = 0
    for shift in range(0, 70, 7):
        b = f.read(1)
        if not b:
            raise _Malformed("truncated varint")
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
    raise _Malformed("varint longer than 10 bytes")


def _fields(f: BinaryIO, end: int, keep: tuple[int, ...]):
    """(field number, value) of each record up to `end`: the bytes of length-delimited fields in `keep`, None
    for every other record (skipped without reading it)."""
    while f.tell() < end:
        key = _varint(f)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _Malformed("field number 0")
        if wire == 0:
            _varint(f)
            yield field, None
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            yield field, None
        elif wire == 2:
            n = _varint(f)
            if f.tell() + n > end:
                raise _Malformed("length past the end")
            if field in keep and n <= _MAX_ENTRY:
                yield field, f.read(n)
            else:
                f.seek(n, os.SEEK_CUR)
                yield field, None
        else:
            raise _Malformed(f"wire type {wire}")


def read_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The metadata_props of an ONNX file as a dict, without loading its graph or weights; None when the file
    cannot be read as a protobuf (the caller then lets ONNX Runtime report what is wrong with it)."""
    try:
        size = os.path.getsize(path)
        meta: dict[str, str] = {}
        with open(path, "rb") as f:
            for field, value in _fields(f, size, (_METADATA_PROPS,)):
                if field != _METADATA_PROPS or value is None:
                    continue
                entry = {k: v for k, v in _fields(io.BytesIO(value), len(value), (1, 2)) if v is not None}
                meta[entry.get(1, b"").decode()] = entry.get(2, b"").decode()
        return meta
    except (OSError, _Malformed, UnicodeDecodeError):
        return None


def data_file(path: str | os.PathLike, metadata: dict[str, str] | None = None) -> DataFile | None:
    """The external data file a cfr-export graph records in its metadata; None for a single-file graph."""
    meta = read_metadata(path) if metadata is None else metadata
    if not meta or DATA_META_KEY not in meta:
        return None
    return DataFile.from_json(meta[DATA_META_KEY], str(path))


def check_data_file(path: str | os.PathLike, metadata: dict[str, str] | None = None) -> DataFile | None:
    """Refuse a graph whose external data file is missing or is not the one it was exported with (size, then
    sha256 of the whole file: about 1.5 s for ViT-H's 2.6 GB). Returns the record (None: no data file)."""
    path = Path(path)
    record = data_file(path, metadata)
    if record is None:
        return None
    data = path.parent / record.name
    if not data.is_file():
        raise ContractError(f"{path}: its weights are stored in {record.name} beside it (ONNX external data, used "
                            f"for graphs past 2 GB), and {data} is missing; copy or move the two files together")
    size = data.stat().st_size
    if size != record.size:
        raise ContractError(f"{path}: its data file {data} has {size} bytes, the graph was exported with "
                            f"{record.size}: it was truncated, altered or belongs to another export; copy it "
                            "again or re-export")
    have = file_sha256(data)
    if have != record.sha256:
        raise ContractError(f"{path}: its data file {data} does not match the graph (sha256 {have[:16]}..., "
                            f"recorded {record.sha256[:16]}...): it was altered or belongs to another export; "
                            "copy it again or re-export")
    return record
