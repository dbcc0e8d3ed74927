"""The contract function as a torch module: what gets exported, and what the torch reference backend runs."""

from __future__ import annotations

import torch
from torch import nn

from .plainvit import PlainVitModel, place_disks, upsample_logits


class ContractGraph(nn.Module):
    """(image, prev_mask, disk_rows) -> probs, with the official predictor's flip averaging and sigmoid.

    Click disks arrive decided (`disk_rows`, made on the host with the official float64 arithmetic by
    `cfr_runtime.disks`, for the clicks and, with flip, for the flipped clicks x'' = (S - x') - 1); the graph
    places them (`place_disks`), so no float rounding in any engine can move a disk pixel.

    Flip as `AddHorizontalFlip`: a batch of [x, flip(x)] with the plain and the flipped disks, the two logit
    maps averaged after un-flipping, then the sigmoid. The official code upsamples both logit maps to S x S
    and then averages. Bilinear upsampling with align_corners=True is linear and commutes with a horizontal
    flip (sample positions mirror exactly), so averaging the 1/4-scale maps first and upsampling once is the
    same function up to float rounding, with one full-size upsample instead of two and a batch-1 tail; it runs
    in fp32 (the maps are small).
    """

    def __init__(self, model: PlainVitModel, flip: bool = True):
        super().__init__()
        self.model = model
        self.flip = flip

    def forward(self, image: torch.Tensor, prev_mask: torch.Tensor, disk_rows: torch.Tensor) -> torch.Tensor:
        x = torch.cat([image, prev_mask], dim=1)
        rows, cols = image.shape[2], image.shape[3]
        if not self.flip:
            disk_rows = disk_rows[:, 0:1]  # the plain clicks only (a flipped block, if given, is not used)
        b, f = disk_rows.shape[0], disk_rows.shape[1]
        # (B, F, 2P, K, 3) -> (F * B, ...): all plain items first, then all flipped ones, as the batch below
        disks = place_disks(disk_rows.transpose(0, 1).reshape((f * b,) + tuple(disk_rows.shape[2:])), rows, cols)
        if not self.flip:
            return torch.sigmoid(upsample_logits(self.model.lowres_logits_from_disks(x, disks).float(), (rows, cols)))
        return self.flip_average(x, disks)

    def flip_average(self, x: torch.Tensor, disks: torch.Tensor) -> torch.Tensor:
        """sigmoid of the mean of the logits of [x, flip(x)] with disks (2B, 2, S, S) (plain items, then
        flipped ones), averaged at 1/4 scale, then one upsample (see the class docstring)."""
        b = x.shape[0]
        logits = self.model.lowres_logits_from_disks(torch.cat([x, x.flip(3)], dim=0), disks).float()
        return torch.sigmoid(upsample_logits(0.5 * (logits[:b] + logits[b:].flip(3)), x.shape[2:]))
