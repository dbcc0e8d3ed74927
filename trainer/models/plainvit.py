"""SimpleClick / CFR-ICL `PlainVitModel`, written to compute the official forward with the official names.

Module and attribute names mirror `isegm.model.is_plainvit_model` so that official state_dicts load with
strict=True. Only inference-relevant behaviour is reproduced (no random token shuffling).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WINDOW_PIXELS = 224  # MAE pre-training size: windowed attention works on 224 px windows
USE_SDPA = True  # benchmarks switch it off to measure the explicit attention chain


def fused_attention_enabled() -> bool:
    """Attention through `F.scaled_dot_product_attention` everywhere except in ONNX export.

    In torch (eager, compiled, AOTInductor) SDPA picks flash / memory-efficient kernels. The ONNX exporter
    would decompose it into a MatMul/Softmax chain whose softmax runs in the graph's compute dtype (fp16 in
    half-precision exports); the explicit chain keeps the exported softmax in fp32, as the contract says.
    """
    return USE_SDPA and not torch.onnx.is_in_onnx_export()


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if fused_attention_enabled():
            # flash / memory-efficient kernels: softmax statistics in fp32 inside the kernel, no n x n
            # matrix in memory; the same function as below up to float rounding
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            # softmax in fp32 whatever the compute dtype (a no-op in fp32 models)
            attn = ((q @ k.transpose(-2, -1)) * self.scale).float().softmax(dim=-1).to(v.dtype)
            out = attn @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (ViT activations overflow half precision); same names as nn.LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class GroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32 (its sums over whole feature maps overflow half precision)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = tuple(img_size)
        self.patch_size = tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """MAE ViT with SimpleClick's windowed/global attention schedule (`forward_backbone`)."""

    def __init__(self, img_size=(448, 448), patch_size=(16, 16), in_chans=3, num_classes=1000,
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, **_unused):
        super().__init__()
        if depth % 4 != 0 or depth < 8:
            raise ValueError(f"ViT depth must be a multiple of 4 and at least 8, got {depth}")
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])
        self.fc_norm = LayerNorm(embed_dim, eps=1e-6)  # unused in the forward; kept for the names
        self.head = nn.Linear(embed_dim, num_classes)  # unused in the forward; kept for the names
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def _windows(self) -> tuple[int, int]:
        gh, gw = self.patch_embed.grid_size
        ph, pw = self.patch_embed.patch_size
        # inputs smaller than one 224 px window (test sizes) run as a single window: global attention
        return max(1, gh // (WINDOW_PIXELS // ph)), max(1, gw // (WINDOW_PIXELS // pw))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) row-major tokens -> (B * windows, N / windows, C), windows in row-major order."""
        b, n, c = x.shape
        gh, gw = self.patch_embed.grid_size
        wh, ww = self._windows()
        x = x.view(b, wh, gh // wh, ww, gw // ww, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b * wh * ww, n // (wh * ww), c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        gh, gw = self.patch_embed.grid_size
        wh, ww = self._windows()
        x = x.view(b // (wh * ww), wh, ww, gh // wh, gw // ww, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b // (wh * ww), wh * ww * n, c)

    def forward_backbone(self, x: torch.Tensor, additional_features: torch.Tensor | None = None,
                         shuffle: bool = False) -> torch.Tensor:
        if shuffle:
            raise ValueError("random token shuffling (random_split=True) is a training option cfr-icl does not support")
        x = self.patch_embed(x)
        if additional_features is not None:
            x = x + additional_features
        x = x + self.pos_embed[:, 1:]
        depth = len(self.blocks)
        group = 6 if depth == 12 else depth // 4
        windowed = False
        for i in range(1, depth + 1):
            if i % group:
                if not windowed:
                    x = self.patchify(x)
                    windowed = True
            elif windowed:
                x = self.unpatchify(x)
                windowed = False
            x = self.blocks[i - 1](x)
        return x


class SimpleFPN(nn.Module):
    def __init__(self, in_dim: int = 768, out_dims=(128, 256, 512, 1024)):
        super().__init__()
        c4 = max(out_dims[0] * 2, in_dim // 2)
        self.down_4 = nn.Sequential(
            nn.ConvTranspose2d(in_dim, c4, 2, stride=2), GroupNorm(1, c4), nn.GELU(),
            nn.ConvTranspose2d(c4, c4 // 2, 2, stride=2), GroupNorm(1, c4 // 2),
            nn.Conv2d(c4 // 2, out_dims[0], 1), GroupNorm(1, out_dims[0]), nn.GELU(),
        )
        c8 = max(out_dims[1], in_dim // 2)
        self.down_8 = nn.Sequential(
            nn.ConvTranspose2d(in_dim, c8, 2, stride=2), GroupNorm(1, c8),
            nn.Conv2d(c8, out_dims[1], 1), GroupNorm(1, out_dims[1]), nn.GELU(),
        )
        self.down_16 = nn.Sequential(nn.Conv2d(in_dim, out_dims[2], 1), GroupNorm(1, out_dims[2]), nn.GELU())
        c32 = max(out_dims[3], in_dim * 2)
        self.down_32 = nn.Sequential(
            nn.Conv2d(in_dim, c32, 2, stride=2), GroupNorm(1, c32),
            nn.Conv2d(c32, out_dims[3], 1), GroupNorm(1, out_dims[3]), nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.down_4(x), self.down_8(x), self.down_16(x), self.down_32(x)]


class ConvModule(nn.Module):
    """mmcv's ConvModule as the head uses it: a 1x1 conv with bias, then ReLU (`.conv` keeps the name)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.activate = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.conv(x))


class SwinTransfomerSegHead(nn.Module):  # (sic) the official class name
    """SegFormer-style all-MLP head, upsample 'x1' (up_conv1/up_conv2 exist only for the state_dict)."""

    def __init__(self, in_channels=(128, 256, 512, 1024), channels: int = 256, num_classes: int = 1,
                 dropout_ratio: float = 0.1, align_corners: bool = False, upsample: str = "x1",
                 in_index=(0, 1, 2, 3), **_unused):
        super().__init__()
        if upsample != "x1":
            raise ValueError(f"only upsample='x1' (the released models) is supported, got {upsample!r}")
        self.align_corners = align_corners
        self.in_index = list(in_index)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.convs = nn.ModuleList([ConvModule(c, channels) for c in in_channels])
        self.fusion_conv = ConvModule(channels * len(in_channels), channels)
        self.up_conv1 = nn.Sequential(
            nn.ConvTranspose2d(channels, channels // 2, 2, stride=2), GroupNorm(1, channels // 2),
            nn.Conv2d(channels // 2, channels // 2, 1), GroupNorm(1, channels // 2), nn.GELU(),
        )
        self.up_conv2 = nn.Sequential(
            nn.ConvTranspose2d(channels // 2, channels // 4, 2, stride=2), GroupNorm(1, channels // 4),
            nn.Conv2d(channels // 4, channels // 4, 1), GroupNorm(1, channels // 4), nn.GELU(),
        )

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        inputs = [inputs[i] for i in self.in_index]
        size = inputs[0].shape[2:]
        outs = [
            F.interpolate(conv(x), size=size, mode="bilinear", align_corners=self.align_corners)
            for conv, x in zip(self.convs, inputs)
        ]
        return self.conv_seg(self.dropout(self.fusion_conv(torch.cat(outs, dim=1))))


def click_disks(points: torch.Tensor, rows: int, cols: int, radius: float) -> torch.Tensor:
    """Official `DistMaps` with use_disks: (B, 2N, 3) points -> (B, 2, H, W) positive/negative disks (float32).

    The arithmetic is the official one for float32 and float64 points alike: the pixel grid is float32, the
    subtraction runs in the points' dtype and is rounded once to float32, squares and sum are float32 (the
    official predictor's points are float64 after zoom-in; the training sampler's are float32). The exported
    graphs do not use this: they place rows decided on the host (`place_disks`, `cfr_runtime.disks`)."""
    if points.dtype not in (torch.float32, torch.float64):  # e.g. fp16: subtract in float32 as before
        points = points.float()
    b, n2, _ = points.shape
    y = points[:, :, 0].reshape(b, n2, 1, 1)
    x = points[:, :, 1].reshape(b, n2, 1, 1)
    invalid = (torch.maximum(points[:, :, 0], points[:, :, 1]) < 0).reshape(b, n2, 1, 1)
    r = torch.arange(rows, dtype=torch.float32, device=points.device).reshape(1, 1, rows, 1)
    c = torch.arange(cols, dtype=torch.float32, device=points.device).reshape(1, 1, 1, cols)
    dy = (r.to(points.dtype) - y).float()
    dx = (c.to(points.dtype) - x).float()
    d2 = dy * dy + dx * dx
    # a Python scalar, not torch.tensor(...): a tensor built here would be a host-to-device copy inside
    # the forward, which breaks CUDA graph capture (tests/test_capturable.py guards this)
    d2 = torch.where(invalid, 1e6, d2)
    d2 = d2.reshape(b, 2, n2 // 2, rows, cols).amin(dim=2)
    return (d2 <= radius * radius).float()


def place_disks(disk_rows: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, 2N, K, 3) rows (row, first column, end column; row -1: none) -> (B, 2, H, W) float32 disks.

    The host decided every pixel with the official float64 arithmetic (`cfr_runtime.disks`); this only places
    integers, so it is exact on every engine and precision. Per group, with M = N * K stencil rows, a 0/1
    (M, H) "this stencil row is pixel row i" matrix times a 0/1 (M, W) "column j is in its span" matrix counts
    the stencil rows covering each pixel (an integer <= M, exact in fp32, TF32 and fp16 alike); a pixel is in
    the disk when the count is positive. One (H x M) @ (M x W) MatMul per group instead of a (2N, H, W)
    elementwise pass: measured about 3x cheaper than drawing distances on ONNX Runtime CPU at S = 448, N = 24
    (bench/disk_rounding.py)."""
    b, n2, k, _ = disk_rows.shape
    flat = disk_rows.reshape(b, 2, (n2 // 2) * k, 3)
    r = torch.arange(rows, dtype=torch.float32, device=disk_rows.device).reshape(1, 1, 1, rows)
    c = torch.arange(cols, dtype=torch.float32, device=disk_rows.device).reshape(1, 1, 1, cols)
    on_row = (flat[..., 0:1] == r).float()  # (B, 2, M, H)
    in_span = ((c >= flat[..., 1:2]) & (c < flat[..., 2:3])).float()  # (B, 2, M, W)
    return (torch.matmul(on_row.transpose(-1, -2), in_span) > 0).float()


class PlainVitModel(nn.Module):
    """`forward(image, points)`: image B x 4 x H x W (RGB in [0, 1] + prev-mask probabilities) -> logits."""

    def __init__(self, backbone_params: dict, neck_params: dict, head_params: dict,
                 norm_radius: float = 5, use_disks: bool = True, with_prev_mask: bool = True,
                 random_split: bool = False, **_unused):
        super().__init__()
        if not use_disks or not with_prev_mask:
            raise ValueError("only use_disks=True, with_prev_mask=True models (SimpleClick/CFR-ICL) are supported")
        self.norm_radius = norm_radius
        self.with_prev_mask = True
        self.random_split = random_split
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.patch_embed_coords = PatchEmbed(
            backbone_params["img_size"], backbone_params["patch_size"], 3, backbone_params["embed_dim"]
        )
        self.backbone = VisionTransformer(**backbone_params)
        self.neck = SimpleFPN(**neck_params)
        self.head = SwinTransfomerSegHead(**head_params)

    def backbone_forward(self, image: torch.Tensor, coord_features: torch.Tensor) -> torch.Tensor:
        coords = self.patch_embed_coords(coord_features)
        feats = self.backbone.forward_backbone(image, coords, self.random_split and self.training)
        b, _, c = feats.shape
        gh, gw = self.backbone.patch_embed.grid_size
        feats = feats.transpose(-1, -2).reshape(b, c, gh, gw)
        return self.head(self.neck(feats))

    def forward(self, image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Logits B x 1 x H x W. Inputs stay fp32; a half model casts after normalisation and disks."""
        return upsample_logits(self.lowres_logits(image, points), image.shape[2:])

    def lowres_logits(self, image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Head logits at 1/4 of the input size, in the model's compute dtype (before the final upsample)."""
        disks = click_disks(points, image.shape[2], image.shape[3], self.norm_radius)
        return self.lowres_logits_from_disks(image, disks)

    def lowres_logits_from_disks(self, image: torch.Tensor, disks: torch.Tensor) -> torch.Tensor:
        """`lowres_logits` with the (B, 2, H, W) click disks given (fp32 0/1; cast after, so exact in fp16)."""
        dtype = self.backbone.patch_embed.proj.weight.dtype
        rgb = ((image[:, :3] - self._mean) / self._std).to(dtype)
        coords = torch.cat([image[:, 3:4], disks], dim=1).to(dtype)
        return self.backbone_forward(rgb, coords)

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters kept only for the official names (cls token, classifier, fc_norm, up_conv1/2)."""
        mods = [self.backbone.fc_norm, self.backbone.head, self.head.up_conv1, self.head.up_conv2]
        return [self.backbone.cls_token] + [p for m in mods for p in m.parameters()]

    def half_precision(self, dtype: torch.dtype = torch.float16) -> PlainVitModel:
        """fp16 (or bf16) weights and matmuls; normalisation layers and their parameters stay fp32."""
        self.to(dtype)
        for m in self.modules():
            if isinstance(m, (LayerNorm, GroupNorm)):
                m.float()
        self._mean, self._std = self._mean.float(), self._std.float()
        return self


def upsample_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """The official final resize: bilinear, align_corners=True, to the input size."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Official `interpolate_pos_embed_inference`: bicubic (align_corners=False) resize of the patch grid."""
    n = pos_embed.shape[1] - 1
    old = int(math.isqrt(n))
    if old * old != n:
        raise ValueError(f"position embedding of {n} tokens is not a square grid")
    if (old, old) == tuple(grid):
        return pos_embed
    tokens = pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], tokens.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
