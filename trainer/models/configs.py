"""Named architectures, expressed as the official `PlainVitModel` constructor parameters."""

from __future__ import annotations

import copy

from .plainvit import PlainVitModel

OFFICIAL_CLASS = "isegm.model.is_plainvit_model.PlainVitModel"


def _arch(patch: int, embed: int, depth: int, heads: int, out_dims: list[int], channels: int) -> dict:
    return {
        "backbone_params": {"img_size": [448, 448], "patch_size": [patch, patch], "in_chans": 3,
                            "embed_dim": embed, "depth": depth, "num_heads": heads, "mlp_ratio": 4,
                            "qkv_bias": True},
        "neck_params": {"in_dim": embed, "out_dims": list(out_dims)},
        "head_params": {"in_channels": list(out_dims), "in_index": [0, 1, 2, 3], "dropout_ratio": 0.1,
                        "num_classes": 1, "align_corners": False, "upsample": "x1", "channels": channels},
        "use_disks": True, "norm_radius": 5, "with_prev_mask": True, "random_split": False,
    }


ARCHS: dict[str, dict] = {
    # small enough for CI on two CPU cores; same attention schedule as the generic depth-8 model
    "tiny": _arch(16, 32, 8, 2, [16, 32, 64, 128], 32),
    "xtiny": _arch(16, 160, 8, 4, [96, 192, 288, 384], 128),
    "vit_base": _arch(16, 768, 12, 12, [128, 256, 512, 1024], 256),
    "vit_large": _arch(16, 1024, 24, 16, [192, 384, 768, 1536], 256),
    "vit_huge": _arch(14, 1280, 32, 16, [240, 480, 960, 1920], 256),
}


def arch_config(name: str, img_size: int = 448) -> dict:
    """The constructor parameters of a named architecture at a square input size."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHS)}")
    params = copy.deepcopy(ARCHS[name])
    params["backbone_params"]["img_size"] = [img_size, img_size]
    return params


def build_model(params: dict) -> PlainVitModel:
    return PlainVitModel(**copy.deepcopy(params))


def identify_arch(params: dict) -> str | None:
    """The name of a known architecture with these widths and depth (ignoring input size), if any."""
    def key(p: dict) -> tuple:
        b = p["backbone_params"]
        return (tuple(b["patch_size"]), b["embed_dim"], b["depth"], b["num_heads"],
                tuple(p["neck_params"]["out_dims"]), p["head_params"]["channels"])
    for name, arch in ARCHS.items():
        if key(arch) == key(params):
            return name
    return None
