"""Normalized Focal Loss (RITM), sigmoid form: alpha 0.5, gamma 2, label -1 ignored."""

from __future__ import annotations

import torch


def normalized_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.5, gamma: float = 2.0,
                          eps: float = 1e-12, ignore_label: int = -1) -> torch.Tensor:
    """Per-sample loss (B,). The focal term is rescaled so its sum over valid pixels equals their count
    (the delimiter is detached, as the official implementation does)."""
    logits, target = logits.float(), target.float()
    prob = torch.sigmoid(logits)
    valid = (target != ignore_label).float()
    positive = target > 0.5
    a = torch.where(positive, alpha * valid, (1 - alpha) * valid)
    pt = torch.where(valid > 0, 1.0 - (target - prob).abs(), torch.ones_like(prob))
    beta = (1 - pt) ** gamma
    mult = (valid.sum(dim=(-1, -2), keepdim=True) / (beta.sum(dim=(-1, -2), keepdim=True) + eps)).detach()
    loss = -a * beta * mult * torch.log(torch.clamp(pt + eps, max=1.0))
    dims = tuple(range(1, loss.dim()))
    return (loss * valid).sum(dim=dims) / (valid.sum(dim=dims) + eps)
