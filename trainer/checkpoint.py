"""One loader for official SimpleClick/CFR-ICL checkpoints and ours, and an atomic writer.

Official files pickle a loss object (`CrossEntropyLoss`) inside their config, which a plain
`torch.load(weights_only=True)` refuses. We keep torch's restricted unpickler and allowlist exactly
those two names, mapped to inert stand-ins: nothing else is ever resolved, so a crafted pickle cannot
run code. Ours store a plain-data config and load with `weights_only=True` unchanged.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from cfr_runtime.errors import CheckpointError, InputError
from cfr_runtime.fileio import file_sha256, staged_file

from .models.configs import OFFICIAL_CLASS, build_model, identify_arch
from .models.plainvit import PlainVitModel, resize_pos_embed

FORMAT_VERSION = 1
_LOSS_MODULE = "isegm.model.modeling.transformer_helper.cross_entropy_loss"


class OfficialLossPlaceholder:
    """Inert stand-in for the official `CrossEntropyLoss` pickled in the config; holds its fields only."""

    def __setstate__(self, state: dict) -> None:
        self.state = {k: v for k, v in state.items() if not k.startswith("_")}

    def __repr__(self) -> str:
        return "CrossEntropyLoss()"


def _refused_function(*_args: Any, **_kwargs: Any) -> None:
    raise CheckpointError("the official loss function is not available in cfr-icl")


_ALLOWED = [
    (OfficialLossPlaceholder, f"{_LOSS_MODULE}.CrossEntropyLoss"),
    (_refused_function, f"{_LOSS_MODULE}.cross_entropy"),
]


def _safe_load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): torch.save "
                              "files are zip archives; re-save legacy pre-1.6 files with a current torch")
    try:
        with torch.serialization.safe_globals(_ALLOWED):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
        tail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()
        detail = f"it references the global {found.group(1)}" if found else (tail[0] if tail else text[:200])
        raise CheckpointError(
            f"{path}: refused to unpickle ({detail}). Only tensors, plain data and the official "
            "config's loss object are accepted; nothing in the file was executed"
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {exc}") from None


def _plain_params(config_params: dict) -> dict:
    """Official `{'name': {'type', 'value', 'specified'}}` -> constructor kwargs (loss objects dropped)."""
    params = {}
    for name, entry in config_params.items():
        value = entry["value"] if isinstance(entry, dict) and "value" in entry else entry
        params[name] = copy.deepcopy(value)
    head = params.get("head_params")
    if isinstance(head, dict):
        head.pop("loss_decode", None)
    return params


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(constructor params, state_dict, extras) of an official or cfr-icl checkpoint, validated."""
    path = Path(path)
    ckpt = _safe_load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: expected a SimpleClick/CFR-ICL checkpoint with 'state_dict' and 'config', found {keys}"
        )
    config = ckpt["config"]
    cls = config.get("class") if isinstance(config, dict) else None
    if cls != OFFICIAL_CLASS:
        raise CheckpointError(
            f"{path}: checkpoint of another architecture ({cls!r}); cfr-icl loads {OFFICIAL_CLASS} "
            "(SimpleClick / CFR-ICL ViT) models only"
        )
    try:
        params = _plain_params(config["params"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: malformed config ({exc})") from None
    state = ckpt["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'state_dict' is not a mapping of names to tensors")
    extras = {k: v for k, v in ckpt.items() if k not in ("state_dict", "config")}
    return params, state, extras


def _check_keys(path: Path, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:4]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[:4]})")
        raise CheckpointError(f"{path}: state_dict does not match its config: " + "; ".join(parts))
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in want.items() if state[k].shape != v.shape]
    if bad:
        k, have, exp = bad[0]
        raise CheckpointError(
            f"{path}: {len(bad)} tensors have the wrong shape, e.g. '{k}' is {have}, the config implies {exp}"
        )


def check_input_size(size: int, patch: int) -> None:
    """Refuse an input size the windowed ViT cannot run: a multiple of the patch, cut into whole 224 px windows
    (or smaller than one window). One rule for training from scratch, fine-tuning and export."""
    window = 224 // patch
    grid = size // patch
    if size < patch or size % patch or grid % window and grid > window:
        ok = [k * patch * window for k in range(1, 5)]
        raise InputError(f"input size {size} must be a multiple of the patch ({patch}) with whole 224 px "
                         f"windows, e.g. {', '.join(map(str, ok))}")


def set_input_size(model: PlainVitModel, size: int) -> None:
    """Run the model at another square input size, resizing the position embedding as the official eval does."""
    patch = model.backbone.patch_embed.patch_size
    check_input_size(size, patch[0])
    grid = (size // patch[0], size // patch[1])
    pos = resize_pos_embed(model.backbone.pos_embed.data, grid)
    model.backbone.pos_embed = torch.nn.Parameter(pos)
    for embed in (model.backbone.patch_embed, model.patch_embed_coords):
        embed.img_size = (size, size)
        embed.grid_size = grid
        embed.num_patches = grid[0] * grid[1]


# Sanity bounds on a config read from a file: far above every released model (ViT-H: 1280 wide, 32 deep),
# far below what would make building the model allocate gigabytes before the state_dict is even checked.
_LIMITS = {"embed_dim": 16384, "depth": 256, "num_heads": 1024, "img_size": 8192, "patch_size": 1024,
           "channels": 16384, "out_dims": 16384, "mlp_ratio": 64, "in_chans": 16}


def _pos_int(v: object, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= hi


def validate_params(params: dict, path: Path | str = "checkpoint") -> None:
    """Types and ranges of the constructor parameters that size the network, checked before building it.

    A config is data from a file: `patch_size 0`, `embed_dim -5` or `img_size 10**6` must be a CheckpointError
    that names the field, not a ZeroDivisionError from inside the model or a multi-GB allocation.
    """
    def bad(field: str, value: object, want: str) -> CheckpointError:
        return CheckpointError(f"{path}: config field {field} = {value!r} is invalid ({want})")

    try:
        b, neck, head = params["backbone_params"], params["neck_params"], params["head_params"]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: config lacks backbone/neck/head parameters ({exc})") from None
    if not all(isinstance(x, dict) for x in (b, neck, head)):
        raise CheckpointError(f"{path}: backbone/neck/head parameters must be mappings")
    for key in ("img_size", "patch_size"):
        v = b.get(key)
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_pos_int(x, _LIMITS[key]) for x in v)):
            raise bad(f"backbone_params.{key}", v, f"two integers in [1, {_LIMITS[key]}]")
    if any(s < p for s, p in zip(b["img_size"], b["patch_size"])):
        raise bad("backbone_params.patch_size", b["patch_size"], f"larger than img_size {b['img_size']}")
    for key in ("embed_dim", "depth", "num_heads", "in_chans"):
        if not _pos_int(b.get(key), _LIMITS[key]):
            raise bad(f"backbone_params.{key}", b.get(key), f"an integer in [1, {_LIMITS[key]}]")
    if b["embed_dim"] % b["num_heads"]:
        raise bad("backbone_params.num_heads", b["num_heads"], f"must divide embed_dim {b['embed_dim']}")
    ratio = b.get("mlp_ratio", 4)
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio <= _LIMITS["mlp_ratio"]):
        raise bad("backbone_params.mlp_ratio", ratio, f"a number in (0, {_LIMITS['mlp_ratio']}]")
    if neck.get("in_dim") != b["embed_dim"]:
        raise bad("neck_params.in_dim", neck.get("in_dim"), f"must equal embed_dim {b['embed_dim']}")
    dims = neck.get("out_dims")
    if not (isinstance(dims, (list, tuple)) and len(dims) == 4 and all(_pos_int(x, _LIMITS["out_dims"])
                                                                       for x in dims)):
        raise bad("neck_params.out_dims", dims, f"four integers in [1, {_LIMITS['out_dims']}]")
    if list(head.get("in_channels", dims)) != list(dims):
        raise bad("head_params.in_channels", head.get("in_channels"), f"must equal neck out_dims {list(dims)}")
    channels = head.get("channels", 256)
    if not (_pos_int(channels, _LIMITS["channels"]) and channels % 4 == 0):
        raise bad("head_params.channels", channels, f"a multiple of 4 in [4, {_LIMITS['channels']}]")
    radius = params.get("norm_radius", 5)
    if not (isinstance(radius, (int, float)) and not isinstance(radius, bool) and 0 < radius <= 1024):
        raise bad("norm_radius", radius, "a positive number")


def load_model(path: str | os.PathLike, input_size: int | None = None) -> tuple[PlainVitModel, dict]:
    """Build the model a checkpoint describes, load it strictly, optionally move it to another input size.

    The config is validated and the architecture built first on the meta device (no memory), so a config
    that does not match its state_dict is refused before any real allocation.
    Returns (model in eval mode, info) where info has the params, arch name and the file's sha256.
    """
    path = Path(path)
    params, state, extras = read_checkpoint(path)
    validate_params(params, path)
    try:
        with torch.device("meta"):
            skeleton = build_model(params)
    except (TypeError, KeyError, ValueError, ZeroDivisionError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: config does not describe a buildable PlainVitModel ({exc})") from None
    _check_keys(path, skeleton, state)
    del skeleton
    model = build_model(params)
    model.load_state_dict(state, strict=True)
    if input_size is not None and input_size != params["backbone_params"]["img_size"][0]:
        try:
            set_input_size(model, input_size)
        except ValueError as exc:
            raise InputError(f"{path}: {exc}") from None
    model.eval()
    info = {
        "params": params,
        "arch": identify_arch(params) or "custom",
        "sha256": file_sha256(path),
        "extras": {k: v for k, v in extras.items() if k == "cfr_icl"},
    }
    return model, info


def official_config(params: dict) -> dict:
    """Our plain-data config in the official layout (the loss object kept as its name, a string)."""
    params = copy.deepcopy(params)
    params["head_params"] = dict(params["head_params"], loss_decode="CrossEntropyLoss()")
    return {"class": OFFICIAL_CLASS,
            "params": {k: {"type": "builtin", "value": v, "specified": True} for k, v in params.items()}}


def save_checkpoint(path: str | os.PathLike, model: PlainVitModel, params: dict, **extras: Any) -> Path:
    """Write atomically (temp file + rename): a killed run never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": official_config(params),
        "cfr_icl": {"format": FORMAT_VERSION, **extras.pop("meta", {})},
        **extras,
    }
    with staged_file(path, ".tmp") as tmp:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    return path
