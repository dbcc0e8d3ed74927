"""An official-style predictor loop in torch: `BasePredictor` + `ZoomIn` + `AddHorizontalFlip`, restated.

It uses torch's F.interpolate for every crop and paste and handles flip and clicks in Python, as the
official code does: clicks are mapped into the crop and flipped with Python floats (float64), and the points
tensor is float64, so the model's `click_disks` decides the disks as the official `DistMaps` does (the
subtraction in float64, rounded once to float32). It shares nothing with `cfr_runtime.disks`, which makes it
an independent check of the runtime's host-side disk decision. Tests use it to prove the numpy Session
reproduces the official protocol; the latency benchmark uses it as the baseline the runtime is compared
against.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cfr_runtime.zoom import ZoomParams, next_roi
from trainer.models.plainvit import PlainVitModel


class ReferencePredictor:
    def __init__(self, model: PlainVitModel, size: int = 448, flip: bool = True, cfr: int = 0,
                 adaptive: bool = False, cfr_clicks: int | None = 1, zoom_in: bool = True,
                 threshold: float = 0.49, device: str = "cpu"):
        self.net, self.size, self.flip = model.eval().to(device), size, flip
        self.cfr, self.adaptive, self.cfr_clicks, self.zoom_in = cfr, adaptive, cfr_clicks, zoom_in
        self.threshold, self.device, self.zoom = threshold, torch.device(device), ZoomParams()
        self.forwards: list[int] = []

    def set_image(self, rgb: np.ndarray) -> None:
        self.image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255).to(self.device)
        self.prev = torch.zeros_like(self.image[:, :1])
        self.roi = None
        self.clicks: list[tuple[float, float, bool]] = []  # (y, x, positive)
        self.forwards = []

    def add_click(self, x: float, y: float, positive: bool) -> np.ndarray:
        self.clicks.append((y, x, positive))
        steps = 1 + self.cfr if self.cfr > 0 and (self.cfr_clicks is None or len(self.clicks) <= self.cfr_clicks) \
            else 1
        before, used = None, 0
        for _ in range(steps):
            pred = self._forward()
            used += 1
            if self.adaptive and before is not None and ((pred > 0.49) != (before > 0.49)).sum() <= 20:
                break
            before = pred
        self.forwards.append(used)
        return pred > self.threshold

    @torch.inference_mode()
    def _forward(self) -> np.ndarray:
        h, w = self.image.shape[2:]
        s = self.size
        positives = [(cy, cx) for cy, cx, p in self.clicks if p]
        prev_np = self.prev[0, 0].cpu().numpy()
        self.roi = next_roi(self.roi, prev_np, positives, self.zoom) if self.zoom_in else (0, h - 1, 0, w - 1)
        r0, r1, c0, c1 = self.roi
        x = torch.cat([self.image, self.prev], 1)[:, :, r0:r1 + 1, c0:c1 + 1]
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=True)
        # official ZoomIn._transform_clicks: crop_h * (y - rmin) / (rmax - rmin + 1), in Python floats
        clicks = [(s * (cy - r0) / (r1 - r0 + 1), s * (cx - c0) / (c1 - c0 + 1), i, p)
                  for i, (cy, cx, p) in enumerate(self.clicks)]
        lists = [clicks]
        if self.flip:
            x = torch.cat([x, x.flip(3)], 0)
            lists.append([(cy, s - cx - 1, i, p) for cy, cx, i, p in clicks])  # AddHorizontalFlip, float64
        n = max(1, max(max(sum(p for *_, p in cl), sum(not p for *_, p in cl)) for cl in lists))
        rows = []
        for cl in lists:
            pos = [(cy, cx, i) for cy, cx, i, p in cl if p]
            neg = [(cy, cx, i) for cy, cx, i, p in cl if not p]
            rows.append(pos + [(-1, -1, -1)] * (n - len(pos)) + neg + [(-1, -1, -1)] * (n - len(neg)))
        # float64 like the official torch.tensor(list of numpy float64): DistMaps subtracts in float64
        logits = self.net(x, torch.tensor(rows, dtype=torch.float64, device=self.device))
        if self.flip:
            logits = 0.5 * (logits[:1] + logits[1:].flip(3))
        probs = torch.sigmoid(logits)
        probs = F.interpolate(probs, size=(r1 - r0 + 1, c1 - c0 + 1), mode="bilinear", align_corners=True)
        full = torch.zeros_like(self.prev)
        full[:, :, r0:r1 + 1, c0:c1 + 1] = probs
        self.prev = full
        return full[0, 0].cpu().numpy()
