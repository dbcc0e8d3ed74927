"""The full-resolution contract as a torch module: one click's forward at the image's own size.

Everything the square contract leaves to the host happens here, computing the host's function operation
for operation (so ONNX Runtime reproduces the numpy Session bit for bit on CPU):
- crop-resize of the uint8 image and of the previous probabilities to S x S, bilinear align_corners=True,
  as a row gather + lerp then a column gather + lerp over index/weight tables made on the host in float64
  (`cfr_runtime.resample.crop_tables`); the uint8 -> [0, 1] scaling is applied after the row gather (it is
  per pixel, so it commutes with the gather);
- the square `ContractGraph` (normalisation, disk placement, flip, averaged logits, sigmoid); the click disks
  arrive as `disk_rows`, decided on the host from the clicks and the zoom-in box with the official float64
  arithmetic (`cfr_runtime.disks`: mapping into the crop, flip, membership), exactly as for the square graph;
- paste-back into a zero H x W map through (2, H) / (2, W) tables whose weights are 0 outside the box;
- the box of probs > zoom threshold and the A-CFR count of pixels whose (p > threshold) changed.
"""

from __future__ import annotations

import torch
from torch import nn

from .graph import ContractGraph


def _lerp_rows(src: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
               scale: torch.Tensor | None = None) -> torch.Tensor:
    """src (R, ...) -> (n, ...) with index/weight (2, n): src[i0] * w0 + src[i1] * w1, each product rounded
    as numpy rounds it. One gather of both rows (a row is a contiguous block), one multiply, one add."""
    n = index.shape[1]
    rows = src.index_select(0, index.reshape(-1)).reshape((2, n) + tuple(src.shape[1:]))
    if scale is not None:  # uint8 image rows -> float32 in [0, 1] exactly as the host does (x * f32(1/255))
        rows = rows.to(torch.float32) * scale
    rows = rows * weight.reshape((2, n) + (1,) * (src.dim() - 1))
    return rows[0] + rows[1]


def _lerp_cols(src: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, transpose: bool = False
               ) -> torch.Tensor:
    """src (R, C, ...) -> (R, n, ...) along columns. A column gather copies one element (or pixel) at a time
    (slow in ONNX Runtime); `transpose` does it as a row gather of the transposed map instead (measured
    faster at 0.15 and 6 megapixels on CPU). The arithmetic is the same either way."""
    if transpose:
        return _lerp_rows(src.transpose(0, 1), index, weight).transpose(0, 1)
    n = index.shape[1]
    cols = src.index_select(1, index.reshape(-1))
    cols = cols.reshape((src.shape[0], 2, n) + tuple(src.shape[2:]))
    cols = cols * weight.reshape((1, 2, n) + (1,) * (src.dim() - 2))
    return cols[:, 0] + cols[:, 1]


class FullGraph(nn.Module):
    """(image_u8, prev_probs, disk_rows, thresholds, crop/paste tables) -> (probs_full, mask_box, changed,
    net_probs): see `cfr_runtime.contract` for the tensor layout."""

    def __init__(self, square: ContractGraph, size: int):
        super().__init__()
        self.square = square
        self.size = size
        self.register_buffer("_inv255", torch.tensor(1 / 255, dtype=torch.float32), persistent=False)

    def forward(self, image_u8: torch.Tensor, prev_probs: torch.Tensor, disk_rows: torch.Tensor,
                thresholds: torch.Tensor, crop_index: torch.Tensor, crop_weight: torch.Tensor,
                paste_row_index: torch.Tensor, paste_row_weight: torch.Tensor, paste_col_index: torch.Tensor,
                paste_col_weight: torch.Tensor):
        # crop-resize: rows then columns, as cfr_runtime.resample.Resampler
        rows = _lerp_rows(image_u8[0], crop_index[0:2], crop_weight[0:2], self._inv255)
        crop = _lerp_cols(rows, crop_index[2:4], crop_weight[2:4], transpose=True)  # (S, S, 3)
        image = crop.permute(2, 0, 1).unsqueeze(0)
        prev_rows = _lerp_rows(prev_probs, crop_index[0:2], crop_weight[0:2])
        prev = _lerp_cols(prev_rows, crop_index[2:4], crop_weight[2:4], transpose=True).reshape(
            1, 1, self.size, self.size)
        net = self.square(image, prev, disk_rows)[0, 0]  # (S, S)
        # paste back onto zeros (weights are 0 outside the box)
        pasted_rows = _lerp_rows(net, paste_row_index, paste_row_weight)
        probs = _lerp_cols(pasted_rows, paste_col_index, paste_col_weight, transpose=True)
        # the few numbers the host needs next
        zoom_t, mask_t = thresholds[1], thresholds[0]
        row_hit = probs.amax(dim=1) > zoom_t
        col_hit = probs.amax(dim=0) > zoom_t
        ri = torch.arange(probs.shape[0], device=probs.device)
        ci = torch.arange(probs.shape[1], device=probs.device)
        big = torch.full_like(ri, 1 << 30)
        none = torch.full_like(ri, -1)
        bigc = torch.full_like(ci, 1 << 30)
        nonec = torch.full_like(ci, -1)
        box = torch.stack([torch.where(row_hit, ri, big).amin(), torch.where(row_hit, ri, none).amax(),
                           torch.where(col_hit, ci, bigc).amin(), torch.where(col_hit, ci, nonec).amax()])
        # per-row counts in float32 are exact (a row has < 2**24 pixels); their total is summed as int64
        flips = ((probs > mask_t) != (prev_probs > mask_t)).to(torch.float32).sum(dim=1)
        changed = flips.to(torch.int64).sum().reshape(1)
        return probs, box, changed, net
