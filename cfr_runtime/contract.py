"""The exported graph's contract, defined once: tensor names, shapes and the metadata the runtime reads.

`export` writes graphs that satisfy it and `cfr_runtime` checks every model file against it, so a file
from elsewhere fails at load time with a clear message instead of producing wrong masks.

Two graphs exist, chosen at export time (`graph` in the metadata):
- "square": the network at S x S; zoom-in crop/paste run on the host (numpy).
- "full": the whole forward at the image's own resolution: crop-resize of the uint8 image and of the
  previous probabilities through host-made index/weight tables, click mapping, disks, flip, sigmoid,
  paste-back, and the few numbers the host needs next (box of probs > 0.5, A-CFR change count).
Version 3 changed the click input of both graphs: instead of click coordinates (`points` / `clicks`) that the
graph turned into disks in float32, the host decides every disk pixel with the official float64 arithmetic
(`cfr_runtime.disks`) and the graph only places the rows it is given (`disk_rows`), for the plain and the
flipped click. Files of versions 1 and 2 still parse (their metadata can be read), but no engine runs them:
their disks differ from the official ones on tied pixels, so they are refused with the re-export command.

Batch axis (square graph, `max_batch` > 1, `cfr-export --max-batch N`): the leading dimension of `image`,
`prev_mask`, `disk_rows` and `probs` is the symbolic "B" instead of 1, so one engine call runs the forwards of
up to `max_batch` sessions (item i of every input gives item i of `probs`; flip averaging is per item). Runners
still bind batch-1 buffers, so nothing changes for a Session; `Engine.run_batch` stacks runners. It needs no new
contract version: the field defaults to 1 (every file written before it: static, batch 1), and a runtime that
does not know the field runs such a file at batch 1, as before.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import ContractError, InputError

CONTRACT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # version 1: square graph only, no `graph` / image-size fields
RUNNABLE_VERSIONS = (3,)  # versions 1-2 take click coordinates and draw float32 disks (see the docstring)

GRAPH_SQUARE = "square"
GRAPH_FULL = "full"
GRAPHS = (GRAPH_SQUARE, GRAPH_FULL)

INPUT_IMAGE = "image"  # (1, 3, S, S) float32 RGB in [0, 1]
INPUT_PREV_MASK = "prev_mask"  # (1, 1, S, S) float32 probabilities
# (1, F, 2P, K, 3) float32 integers: per click, K = 2 * disk_radius + 2 rows (row, first column, end column
# (exclusive)) of its disk in network pixels, decided on the host (`cfr_runtime.disks`); row -1: no row.
# F = 2 with flip (index 0 the clicks, 1 the flipped clicks), else 1; P positives from click 0, then P negatives.
# Both graphs take it; the leading 1 is the batch.
INPUT_DISK_ROWS = "disk_rows"
OUTPUT_PROBS = "probs"  # (1, 1, S, S) float32, sigmoid applied

INPUT_NAMES = (INPUT_IMAGE, INPUT_PREV_MASK, INPUT_DISK_ROWS)
OUTPUT_NAMES = (OUTPUT_PROBS,)
DIM_BATCH = "B"  # symbolic leading dim of the square graph's tensors when exported with max_batch > 1

# ---- the full-resolution graph ("full"); H x W is the image's own size, dynamic within the recorded limits
FULL_IMAGE = "image_u8"  # (1, H, W, 3) uint8 RGB as the app holds it
FULL_PREV = "prev_probs"  # (H, W) float32, the previous forward's full-resolution probabilities
FULL_DISK_ROWS = INPUT_DISK_ROWS  # the clicks, mapped into the zoom-in crop on the host (as the square graph's)
FULL_THRESHOLDS = "thresholds"  # (2,) float32: (mask threshold for the A-CFR count, zoom-in prob threshold)
FULL_CROP_INDEX = "crop_index"  # (4, S) int64: row i0, row i1, col i0, col i1 of the crop-resize
FULL_CROP_WEIGHT = "crop_weight"  # (4, S) float32: row w0, row w1, col w0, col w1
FULL_PASTE_ROWS = "paste_row_index"  # (2, H) int64: i0, i1 into the S net rows (0 outside the box)
FULL_PASTE_ROW_W = "paste_row_weight"  # (2, H) float32: w0, w1 (both 0 outside the box: paste onto zeros)
FULL_PASTE_COLS = "paste_col_index"  # (2, W) int64
FULL_PASTE_COL_W = "paste_col_weight"  # (2, W) float32
FULL_OUT_PROBS = "probs_full"  # (H, W) float32, the new probabilities (zero outside the box)
FULL_OUT_BOX = "mask_box"  # (4,) int64 (rmin, rmax, cmin, cmax) of probs > zoom threshold; rmin > rmax: empty
FULL_OUT_CHANGED = "changed"  # (1,) int64 pixels whose (p > mask threshold) differs from prev_probs's
FULL_OUT_NET = "net_probs"  # (S, S) float32 probabilities before paste-back (undo history keeps these)

FULL_INPUT_NAMES = (FULL_IMAGE, FULL_PREV, FULL_DISK_ROWS, FULL_THRESHOLDS, FULL_CROP_INDEX, FULL_CROP_WEIGHT,
                    FULL_PASTE_ROWS, FULL_PASTE_ROW_W, FULL_PASTE_COLS, FULL_PASTE_COL_W)
FULL_OUTPUT_NAMES = (FULL_OUT_PROBS, FULL_OUT_BOX, FULL_OUT_CHANGED, FULL_OUT_NET)
FULL_SMALL_INPUTS = (FULL_DISK_ROWS, FULL_THRESHOLDS, FULL_CROP_INDEX, FULL_CROP_WEIGHT,
                     FULL_PASTE_ROWS, FULL_PASTE_ROW_W, FULL_PASTE_COLS, FULL_PASTE_COL_W)
DIM_H, DIM_W = "H", "W"  # symbolic dims of the full graph

# Default image-size limits of a full graph (crop/paste tables and the A-CFR count stay exact well past them).
DEFAULT_MAX_SIDE = 8192
DEFAULT_OPT_SIDE = 1024

META_KEY = "cfr_icl.contract"  # one JSON document in the ONNX metadata_props

DEFAULT_SIZE = 448
DEFAULT_MAX_POINTS = 24
DEFAULT_THRESHOLD = 0.49  # the official predictor's probability threshold
DISK_RADIUS = 5


@dataclass(frozen=True)
class Contract:
    """What one exported network computes, as recorded in its metadata."""

    input_size: int = DEFAULT_SIZE
    max_points: int = DEFAULT_MAX_POINTS
    disk_radius: int = DISK_RADIUS
    flip: bool = True
    threshold: float = DEFAULT_THRESHOLD
    precision: str = "fp32"
    arch: dict = field(default_factory=dict)
    checkpoint_sha256: str = ""
    package_version: str = ""
    contract_version: int = CONTRACT_VERSION
    graph: str = GRAPH_SQUARE
    # full graph only: image sizes (H, W) the engine accepts (min, TensorRT's optimisation point, max)
    min_image: tuple[int, int] = (1, 1)
    opt_image: tuple[int, int] = (DEFAULT_OPT_SIDE, DEFAULT_OPT_SIDE)
    max_image: tuple[int, int] = (DEFAULT_MAX_SIDE, DEFAULT_MAX_SIDE)
    # square graph only: forwards one engine call may run (1: no batch axis, every tensor's leading dim is 1)
    max_batch: int = 1

    @property
    def full(self) -> bool:
        return self.graph == GRAPH_FULL

    @property
    def batched(self) -> bool:
        """The graph has a batch axis: `Engine.run_batch` runs up to `max_batch` forwards in one call."""
        return self.max_batch > 1 and not self.full

    def batch_shapes(self, b: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the square graph's tensors for a call on `b` items (b <= max_batch)."""
        return {name: (b, *shape[1:]) for name, shape in self.shapes().items()}

    @property
    def disk_rows_shape(self) -> tuple[int, int, int, int, int]:
        """(1, F, 2P, K, 3) of `disk_rows`: F = 2 with flip, K = 2 * disk_radius + 2 rows per click."""
        return (1, 2 if self.flip else 1, 2 * self.max_points, 2 * self.disk_radius + 2, 3)

    def check_runnable(self, source: str = "model") -> None:
        """Refuse a file whose graph decides click disks itself in float32 (contract versions 1 and 2)."""
        if self.contract_version not in RUNNABLE_VERSIONS:
            raise ContractError(
                f"{source}: exported by an older cfr-export (contract version {self.contract_version}): its graph "
                "draws click disks in float32, which differs from the official float64 decision on pixels at "
                "exactly the disk radius, so it is not run. Re-export the checkpoint with this package's "
                "cfr-export (same command), which writes contract version "
                f"{CONTRACT_VERSION}")

    def input_names(self) -> tuple[str, ...]:
        return FULL_INPUT_NAMES if self.full else INPUT_NAMES

    def output_names(self) -> tuple[str, ...]:
        return FULL_OUTPUT_NAMES if self.full else OUTPUT_NAMES

    def io(self, h: int | str = DIM_H, w: int | str = DIM_W) -> dict[str, tuple[tuple, type]]:
        """name -> (shape, numpy dtype) of every tensor; the full graph's H / W symbolic unless given."""
        if not self.full:
            return {name: (shape, np.float32) for name, shape in self.shapes().items()}
        s = self.input_size
        f32, i64 = np.float32, np.int64
        return {
            FULL_IMAGE: ((1, h, w, 3), np.uint8), FULL_PREV: ((h, w), f32), FULL_DISK_ROWS: (self.disk_rows_shape, f32),
            FULL_THRESHOLDS: ((2,), f32), FULL_CROP_INDEX: ((4, s), i64),
            FULL_CROP_WEIGHT: ((4, s), f32), FULL_PASTE_ROWS: ((2, h), i64), FULL_PASTE_ROW_W: ((2, h), f32),
            FULL_PASTE_COLS: ((2, w), i64), FULL_PASTE_COL_W: ((2, w), f32),
            FULL_OUT_PROBS: ((h, w), f32), FULL_OUT_BOX: ((4,), i64), FULL_OUT_CHANGED: ((1,), i64),
            FULL_OUT_NET: ((s, s), f32),
        }

    def check_image_size(self, h: int, w: int) -> None:
        """Refuse an image outside the sizes a full graph was exported (and, for TensorRT, built) for."""
        (h0, w0), (h1, w1) = self.min_image, self.max_image
        if not (h0 <= h <= h1 and w0 <= w <= w1):
            raise InputError(f"image {w}x{h} (W x H) is outside the sizes this engine accepts "
                             f"({w0}x{h0} .. {w1}x{h1}); re-export with cfr-export --graph full --max-image, "
                             "or resize the image")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self.full:
            return {name: shape for name, (shape, _) in self.io().items()}
        s = self.input_size
        return {
            INPUT_IMAGE: (1, 3, s, s),
            INPUT_PREV_MASK: (1, 1, s, s),
            INPUT_DISK_ROWS: self.disk_rows_shape,
            OUTPUT_PROBS: (1, 1, s, s),
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> Contract:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ContractError(f"{source}: the '{META_KEY}' metadata is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ContractError(f"{source}: the '{META_KEY}' metadata is not a JSON object")
        version = data.get("contract_version")
        if version not in READABLE_VERSIONS:
            raise ContractError(
                f"{source}: contract version {version!r} is not supported (this runtime reads versions "
                f"{list(READABLE_VERSIONS)}); re-export the model with this package's cfr-export"
            )
        known = set(cls.__dataclass_fields__)
        validate_metadata(data, source)
        fields = {k: v for k, v in data.items() if k in known}
        try:
            for key in ("min_image", "opt_image", "max_image"):
                if key in fields:
                    fields[key] = tuple(int(v) for v in fields[key])
            contract = cls(**fields)
        except (TypeError, ValueError) as exc:
            raise ContractError(f"{source}: malformed contract metadata ({exc})") from None
        if contract.graph not in GRAPHS:
            raise ContractError(f"{source}: unknown graph kind {contract.graph!r} (this runtime knows {GRAPHS}); "
                                "upgrade cfr-icl or re-export the model")
        if contract.full and contract.max_batch != 1:
            raise ContractError(f"{source}: a full-resolution graph has no batch axis (max_batch "
                                f"{contract.max_batch}); the file is corrupt or was not written by cfr-export")
        return contract


# Bounds on what a model file may ask the runtime to allocate: input_size 4096 means 200 MB of image
# buffer per session already; beyond that a file is corrupt or hostile, not a model.
MAX_INPUT_SIZE = 4096
MAX_POINTS_LIMIT = 4096
MAX_IMAGE_SIDE = 1 << 16  # full graph: image sides a file may declare
MAX_DISK_RADIUS = 64  # the official models use 5; the host writes 2 * radius + 2 rows per click
MAX_BATCH_LIMIT = 1024  # forwards per call a file may declare (an engine allocates max_batch input sets)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_metadata(data: dict, source: str = "model") -> None:
    """Type and range checks of the contract fields present in `data`, before anything is allocated.

    Metadata comes from a file, so it may say `max_points: "24"`, `threshold: null` or `input_size: 100000`;
    each is refused with a ContractError naming the field instead of a TypeError or a huge allocation later.
    """
    def bad(key: str, want: str) -> ContractError:
        return ContractError(f"{source}: contract metadata field {key!r} is {data[key]!r}; expected {want}. "
                             "The file is corrupt or was not written by cfr-export; re-export the checkpoint")

    checks = {
        "input_size": (lambda v: _is_int(v) and 1 <= v <= MAX_INPUT_SIZE, f"an integer in [1, {MAX_INPUT_SIZE}]"),
        "max_points": (lambda v: _is_int(v) and 1 <= v <= MAX_POINTS_LIMIT,
                       f"an integer in [1, {MAX_POINTS_LIMIT}]"),
        "disk_radius": (lambda v: _is_int(v) and 0 <= v <= MAX_DISK_RADIUS, f"an integer in [0, {MAX_DISK_RADIUS}]"),
        "flip": (lambda v: isinstance(v, bool), "true or false"),
        "threshold": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1,
                      "a number strictly between 0 and 1"),
        "precision": (lambda v: v in ("fp32", "fp16", "bf16", "int8"), "'fp32', 'fp16', 'bf16' or 'int8'"),
        "arch": (lambda v: isinstance(v, dict), "a JSON object"),
        "checkpoint_sha256": (lambda v: isinstance(v, str), "a string"),
        "package_version": (lambda v: isinstance(v, str), "a string"),
        "graph": (lambda v: isinstance(v, str), "a graph kind name"),
        "max_batch": (lambda v: _is_int(v) and 1 <= v <= MAX_BATCH_LIMIT, f"an integer in [1, {MAX_BATCH_LIMIT}]"),
        **{key: (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(d) and 1 <= d <= MAX_IMAGE_SIDE
                                                                                 for d in v),
                 f"[H, W] with integer sides in [1, {MAX_IMAGE_SIDE}]")
           for key in ("min_image", "opt_image", "max_image")},
    }
    for key, (ok, want) in checks.items():
        if key in data and not ok(data[key]):
            raise bad(key, want)


def check_io(contract: Contract, inputs: dict[str, tuple], outputs: dict[str, tuple], source: str) -> None:
    """Check a graph's declared tensors (name -> shape, symbolic dims as str/None) against the contract."""
    want = contract.shapes()
    for names, have, kind in ((contract.input_names(), inputs, "input"), (contract.output_names(), outputs,
                                                                          "output")):
        if set(have) != set(names):
            raise ContractError(
                f"{source}: expected {kind}s {list(names)}, found {sorted(have)}; "
                "this file was not written by cfr-export"
            )
        for name in names:
            shape = tuple(have[name])
            if len(shape) != len(want[name]) or any(
                isinstance(d, int) and d != w for d, w in zip(shape, want[name])
            ):
                raise ContractError(
                    f"{source}: {kind} '{name}' has shape {shape}, the contract says {want[name]}"
                )
            if contract.batched and isinstance(shape[0], int):
                raise ContractError(f"{source}: {kind} '{name}' has a fixed leading dim {shape[0]}, but the "
                                    f"contract says it takes batches of up to {contract.max_batch}; re-export it")


# ---- external data: a graph past the 2 GB protobuf limit keeps its weights in one file beside it ---------
DATA_META_KEY = "cfr_icl.external_data"  # metadata_props entry next to META_KEY, present only in such graphs


@dataclass(frozen=True)
class DataFile:
    """The weights file of a graph saved with ONNX external data, as the graph's metadata records it: a bare
    file name beside the graph (e.g. `model.onnx.data`), its size and sha256, so that a missing, truncated,
    altered or swapped data file is refused instead of computing with other weights."""

    name: str
    size: int
    sha256: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> DataFile:
        try:
            data = json.loads(text)
            name, size, sha = data["name"], data["size"], data["sha256"]
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise ContractError(f"{source}: malformed '{DATA_META_KEY}' metadata ({exc!r}); the file is corrupt or "
                                "was not written by cfr-export") from None
        # a bare name only: a graph must not make the runtime read (or hash) files elsewhere on the disk
        if not (isinstance(name, str) and name and name not in (".", "..") and "/" not in name and "\\" not in name
                and "\x00" not in name):
            raise ContractError(f"{source}: its data file name {name!r} is not a plain file name beside the graph")
        if not (_is_int(size) and size >= 0) or not (isinstance(sha, str) and len(sha) == 64
                                                    and all(c in "0123456789abcdef" for c in sha)):
            raise ContractError(f"{source}: malformed '{DATA_META_KEY}' metadata (size {size!r}, sha256 {sha!r})")
        return cls(name, size, sha)
