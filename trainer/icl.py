"""One training step's forward and loss: ICL (iterative click loss) or the RITM baseline."""

from __future__ import annotations

import random

import numpy as np
import torch

from .data.clicks import add_error_clicks
from .losses import normalized_focal_loss


def icl_loss(net: torch.nn.Module, image: torch.Tensor, target: torch.Tensor, points: torch.Tensor,
             rng: np.random.Generator, weights: tuple[float, ...] = (1.0, 2.0, 3.0), iterloss: bool = True,
             max_steps: int | None = None) -> tuple[torch.Tensor, dict]:
    """ICL: 1..len(weights) steps; step k sees the detached sigmoid of step k-1 and one more error click,
    its NFL weighted by weights[k]. RITM baseline (iterloss=False): the extra clicks come from no-grad
    iterations and only the last forward is trained."""
    steps = int(rng.integers(1, (max_steps or len(weights)) + 1))
    prev = torch.zeros_like(image[:, :1])
    gt_np = target[:, 0].cpu().numpy()
    if iterloss:
        loss = image.new_zeros(())
        for k in range(steps):
            logits = net(torch.cat([image, prev.detach()], 1), points)
            loss = loss + weights[k] * normalized_focal_loss(logits, target).mean()
            prev = torch.sigmoid(logits.float())
            if k < steps - 1:
                points = _next(prev, gt_np, points, rng)
    else:
        with torch.no_grad():
            for _ in range(steps - 1):
                prev = torch.sigmoid(net(torch.cat([image, prev], 1), points).float())
                points = _next(prev, gt_np, points, rng)
        logits = net(torch.cat([image, prev], 1), points)
        loss = normalized_focal_loss(logits, target).mean()
    with torch.no_grad():
        pred = logits.float() > 0
        valid = target != -1
        inter = (pred & (target > 0.5) & valid).sum().item()
        union = ((pred | (target > 0.5)) & valid).sum().item()
    return loss, {"steps": steps, "iou": inter / max(union, 1)}


class ICLStep(torch.nn.Module):
    """The whole ICL step as one module, so DistributedDataParallel sees one forward per backward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image, target, points, rng, weights, iterloss):
        return icl_loss(self.model, image, target, points, rng, weights, iterloss)


def _next(prev: torch.Tensor, gt: np.ndarray, points: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    new = add_error_clicks(prev[:, 0].detach().float().cpu().numpy(), gt, points.cpu().numpy(), rng)
    return torch.from_numpy(new).to(points.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
