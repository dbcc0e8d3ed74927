"""The exported graph's contract, defined once: tensor names, shapes and the metadata the runtime reads.

`export` writes graphs that satisfy it and `cfr_runtime` checks every model file against it, so a file
from elsewhere fails at load time with a clear message instead of producing wrong masks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .errors import ContractError

CONTRACT_VERSION = 1

INPUT_IMAGE = "image"  # (1, 3, S, S) float32 RGB in [0, 1]
INPUT_PREV_MASK = "prev_mask"  # (1, 1, S, S) float32 probabilities
INPUT_POINTS = "points"  # (1, 2P, 3) float32 (y, x, order); P positives then P negatives; pad -1
OUTPUT_PROBS = "probs"  # (1, 1, S, S) float32, sigmoid applied

INPUT_NAMES = (INPUT_IMAGE, INPUT_PREV_MASK, INPUT_POINTS)
OUTPUT_NAMES = (OUTPUT_PROBS,)

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

    def shapes(self) -> dict[str, tuple[int, ...]]:
        s, p = self.input_size, self.max_points
        return {
            INPUT_IMAGE: (1, 3, s, s),
            INPUT_PREV_MASK: (1, 1, s, s),
            INPUT_POINTS: (1, 2 * p, 3),
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
        if version != CONTRACT_VERSION:
            raise ContractError(
                f"{source}: contract version {version!r} is not supported (this runtime reads version "
                f"{CONTRACT_VERSION}); re-export the model with this package's cfr-export"
            )
        known = set(cls.__dataclass_fields__)
        validate_metadata(data, source)
        try:
            contract = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ContractError(f"{source}: malformed contract metadata ({exc})") from None
        return contract


# Bounds on what a model file may ask the runtime to allocate: input_size 4096 means 200 MB of image
# buffer per session already; beyond that a file is corrupt or hostile, not a model.
MAX_INPUT_SIZE = 4096
MAX_POINTS_LIMIT = 4096


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
        "disk_radius": (lambda v: _is_int(v) and 0 <= v <= MAX_INPUT_SIZE, "a non-negative integer"),
        "flip": (lambda v: isinstance(v, bool), "true or false"),
        "threshold": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1,
                      "a number strictly between 0 and 1"),
        "precision": (lambda v: v in ("fp32", "fp16", "bf16"), "'fp32', 'fp16' or 'bf16'"),
        "arch": (lambda v: isinstance(v, dict), "a JSON object"),
        "checkpoint_sha256": (lambda v: isinstance(v, str), "a string"),
        "package_version": (lambda v: isinstance(v, str), "a string"),
    }
    for key, (ok, want) in checks.items():
        if key in data and not ok(data[key]):
            raise bad(key, want)


def check_io(contract: Contract, inputs: dict[str, tuple], outputs: dict[str, tuple], source: str) -> None:
    """Check a graph's declared tensors (name -> shape, symbolic dims as str/None) against the contract."""
    want = contract.shapes()
    for names, have, kind in ((INPUT_NAMES, inputs, "input"), (OUTPUT_NAMES, outputs, "output")):
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
