"""The network computes the official forward, with the official names, for every named size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainer.checkpoint import load_model, set_input_size
from trainer.models import ARCHS, arch_config, build_model
from trainer.models.plainvit import resize_pos_embed


def _inputs(z, case: str) -> tuple[torch.Tensor, torch.Tensor]:
    rgb = torch.from_numpy(z["inputs/rgb_u8"].astype(np.float32) / np.float32(255))
    prev = torch.from_numpy(z["inputs/prev_soft"])
    zeros = torch.zeros(1, 1, 448, 448)
    image = {
        "prev_zero": lambda: torch.cat([rgb[0:1], zeros], 1),
        "prev_soft": lambda: torch.cat([rgb[0:1], prev], 1),
        "float_clicks": lambda: torch.cat([rgb[0:1], prev], 1),
        "batch2": lambda: torch.cat([rgb[0:2], torch.cat([prev, zeros], 0)], 1),
    }[case]()
    return image, torch.from_numpy(z[f"{case}/points"])


@pytest.mark.parametrize("name", ["tiny_s0", "tiny_d8_s1"])
def test_official_forward_parity(reference_dir, name):
    model, info = load_model(reference_dir / name / "model.pth")
    z = np.load(reference_dir / name / "forward.npz")
    cases = sorted({k.split("/")[0] for k in z.files} - {"inputs"})
    assert cases
    for case in cases:
        image, points = _inputs(z, case)
        with torch.no_grad():
            out = model(image, points)
        diff = (out - torch.from_numpy(z[f"{case}/instances"])).abs().max().item()
        assert diff < 1e-5, f"{name}/{case}: max abs diff {diff}"


def test_official_intermediates(reference_dir):
    """Tokens, backbone, neck and head outputs of tiny_s0 match the official intermediates."""
    model, _ = load_model(reference_dir / "tiny_s0" / "model.pth")
    z = np.load(reference_dir / "tiny_s0" / "forward.npz")
    image, points = _inputs(z, "prev_soft")
    seen = {}
    hooks = [
        model.backbone.patch_embed.register_forward_hook(lambda m, i, o: seen.__setitem__("image_tokens", o)),
        model.patch_embed_coords.register_forward_hook(lambda m, i, o: seen.__setitem__("coord_tokens", o)),
        model.neck.register_forward_hook(lambda m, i, o: seen.update({f"neck_out{k}": v for k, v in enumerate(o)})),
        model.neck.register_forward_hook(lambda m, i, o: seen.__setitem__("backbone_out", i[0])),
        model.head.register_forward_hook(lambda m, i, o: seen.__setitem__("head_out", o)),
    ]
    with torch.no_grad():
        model(image, points)
    for h in hooks:
        h.remove()
    for key in ["image_tokens", "coord_tokens", "backbone_out", "neck_out0", "neck_out1", "neck_out2",
                "neck_out3", "head_out"]:
        diff = (seen[key] - torch.from_numpy(z[f"prev_soft/{key}"])).abs().max().item()
        assert diff < 1e-5, f"{key}: {diff}"
    disks = torch.from_numpy(z["prev_soft/click_maps"])
    from trainer.models.plainvit import click_disks

    assert torch.equal(click_disks(points, 448, 448, 5), disks)


@pytest.mark.parametrize("name", ["tiny_s0", "tiny_d8_s1"])
def test_official_key_table(reference_dir, name):
    table = json.loads((reference_dir / name / "keys.json").read_text())
    model, _ = load_model(reference_dir / name / "model.pth")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(table["state_dict_shapes"])
    assert ours == table["state_dict_shapes"]
    assert sum(v.numel() for v in model.state_dict().values()) == table["num_params"]


@pytest.mark.parametrize("arch,keys,params", [
    ("vit_base", 214, 98_025_513), ("vit_large", 358, 324_206_377), ("vit_huge", 454, 662_184_793)])
def test_released_sizes(arch, keys, params):
    """Key and parameter counts of the released ViT-B/L/H configs (built on the meta device)."""
    with torch.device("meta"):
        model = build_model(arch_config(arch))
    sd = model.state_dict()
    assert len(sd) == keys
    assert sum(v.numel() for v in sd.values()) == params


def test_attention_schedule():
    """Global blocks: ViT-B at 6 and 12; depth 8 at 2, 4, 6, 8 (windows elsewhere)."""
    def schedule(depth):
        group = 6 if depth == 12 else depth // 4
        return [i for i in range(1, depth + 1) if i % group == 0]

    assert schedule(12) == [6, 12]
    assert schedule(24) == [6, 12, 18, 24]
    assert schedule(32) == [8, 16, 24, 32]
    model = build_model(arch_config("tiny"))
    tokens = torch.arange(28 * 28, dtype=torch.float32).view(1, 784, 1)
    windows = model.backbone.patchify(tokens)
    assert windows.shape == (4, 196, 1)
    assert windows[1, 0, 0].item() == 14  # second window starts at column 14 of row 0
    assert torch.equal(model.backbone.unpatchify(windows), tokens)


def test_input_size_672(reference_dir):
    model, _ = load_model(reference_dir / "tiny_s0" / "model.pth", input_size=672)
    assert model.backbone.pos_embed.shape == (1, 1 + 42 * 42, 64)
    pts = torch.tensor([[[300.0, 400.0, 0.0], [-1.0, -1.0, -1.0]]])
    with torch.no_grad():
        out = model(torch.rand(1, 4, 672, 672), pts)
    assert out.shape == (1, 1, 672, 672) and torch.isfinite(out).all()
    pos = torch.randn(1, 1 + 28 * 28, 8)
    resized = resize_pos_embed(pos, (42, 42))
    assert torch.equal(resized[:, :1], pos[:, :1]) and resized.shape == (1, 1 + 42 * 42, 8)


def test_bad_input_size():
    model = build_model(arch_config("tiny"))
    with pytest.raises(ValueError, match="multiple of the patch"):
        set_input_size(model, 450)


def test_named_archs_build():
    assert {"tiny", "xtiny", "vit_base", "vit_large", "vit_huge"} <= set(ARCHS)
    with pytest.raises(ValueError, match="unknown architecture"):
        arch_config("resnet50")
