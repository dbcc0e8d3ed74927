"""The contract function as a torch module: what gets exported, and what the torch reference backend runs."""

from __future__ import annotations

import torch
from torch import nn

from .plainvit import PlainVitModel, upsample_logits


class ContractGraph(nn.Module):
    """(image, prev_mask, points) -> probs, with the official predictor's flip averaging and sigmoid.

    Flip as `AddHorizontalFlip`: a batch of [x, flip(x)], clicks x' = S - x - 1 (padding rows stay -1),
    the two logit maps averaged after un-flipping, then the sigmoid.

    The official code upsamples both logit maps to S x S and then averages. Bilinear upsampling with
    align_corners=True is linear and commutes with a horizontal flip (sample positions mirror exactly),
    so averaging the 1/4-scale maps first and upsampling once is the same function up to float rounding,
    with one full-size upsample instead of two and a batch-1 tail; it runs in fp32 (the maps are small).
    """

    def __init__(self, model: PlainVitModel, flip: bool = True):
        super().__init__()
        self.model = model
        self.flip = flip

    def forward(self, image: torch.Tensor, prev_mask: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        x = torch.cat([image, prev_mask], dim=1)
        size = image.shape[2:]
        if not self.flip:
            return torch.sigmoid(upsample_logits(self.model.lowres_logits(x, points).float(), size))
        width = image.shape[3]
        invalid = torch.maximum(points[..., 0:1], points[..., 1:2]) < 0
        flipped_x = torch.where(invalid, points[..., 1:2], (width - 1) - points[..., 1:2])
        flipped = torch.cat([points[..., 0:1], flipped_x, points[..., 2:3]], dim=-1)
        return self.flip_average(x, points, flipped)

    def flip_average(self, x: torch.Tensor, points: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        """sigmoid of the mean of the logits of [x, flip(x)] with click rows `points` / `flipped` (averaged at
        1/4 scale, then one upsample: see the class docstring)."""
        logits = self.model.lowres_logits(torch.cat([x, x.flip(3)], dim=0), torch.cat([points, flipped], dim=0))
        logits = logits.float()
        return torch.sigmoid(upsample_logits(0.5 * (logits[0:1] + logits[1:2].flip(3)), x.shape[2:]))
