"""Combined margin softmax (ArcFace / CosFace / SphereFace-style): s * (cos(m1*theta + m2) - m3).

The margin changes only the target logit. It is computed in float32 even under bf16/fp16 autocast:
acos near cos = +-1 has an unbounded derivative, and half precision rounds cos values near 1 to
exactly 1, which is where NaNs come from. Cosines are clamped to [-1 + eps, 1 - eps] first.

Past theta + m2 > pi, cos(theta + m2) starts to *rise* again with theta, so the loss would push a
far-away target further away; insightface then uses cos(theta) - m2 * sin(m2) (their "th / mm"
trick: th = cos(pi - m2), mm = sin(pi - m2) * m2), which keeps the target logit decreasing in theta.
For m1 != 1 the same fallback is used past m1 * theta + m2 > pi.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from ranray.config import MarginConfig

# float32 can represent 1 - 1e-6 exactly enough; acos' derivative there is about 707, not inf.
COS_EPS = 1e-6

def margin_target_cos(cos_target: torch.Tensor, cfg: MarginConfig) -> torch.Tensor:
    """cos(m1*theta + m2) - m3 for target cosines, in float32 (unscaled).

    `cos_target` may be any dtype; the result is float32 and differentiable.
    """
    with torch.autocast(device_type=cos_target.device.type, enabled=False):
        cos = cos_target.float().clamp(-1.0 + COS_EPS, 1.0 - COS_EPS)
        if cfg.m1 == 1.0 and cfg.m2 == 0.0:
            # CosFace / plain softmax: no angle needed, and no acos gradient to worry about.
            return cos - cfg.m3
        theta = torch.acos(cos)
        angle = cfg.m1 * theta + cfg.m2
        margined = torch.cos(angle) - cfg.m3
        if cfg.easy_margin:
            # Only targets already on the right side (theta < pi/2) get the margin.
            return torch.where(cos > 0, margined, cos)
        fallback = cos - math.sin(math.pi - cfg.m2) * cfg.m2 - cfg.m3
        return torch.where(angle <= math.pi, margined, fallback)


class CombinedMarginLoss(nn.Module):
    """Margin softmax head on cosine logits.

    `forward(cosine, labels)` returns float32 logits s * cos with the target column replaced by
    s * (cos(m1*theta + m2) - m3); rows whose label is -1 get no margin (insightface's convention,
    used by Partial FC for rows whose class lives on another rank). `loss(...)` is the mean CE.
    """

    def __init__(self, scale: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 easy_margin: bool = False) -> None:
        super().__init__()
        self.cfg = MarginConfig(scale=scale, m1=m1, m2=m2, m3=m3, easy_margin=easy_margin)

    @classmethod
    def from_config(cls, cfg: MarginConfig) -> "CombinedMarginLoss":
        return cls(cfg.scale, cfg.m1, cfg.m2, cfg.m3, cfg.easy_margin)

    @property
    def scale(self) -> float:
        return self.cfg.scale

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return self.cfg.scale * margin_target_cos(cos_target, self.cfg)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=cosine.device.type, enabled=False):
            # Non-target cosines need no clamp: only acos is singular at +-1.
            logits = cosine.float() * self.cfg.scale
            rows = torch.nonzero(labels >= 0, as_tuple=True)[0]
            cols = labels[rows]
            target = self.target_logit(cosine[rows, cols])
            return logits.index_put((rows, cols), target)

    def loss(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.forward(cosine, labels), labels, ignore_index=-1)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"s={c.scale}, m1={c.m1}, m2={c.m2}, m3={c.m3}, easy_margin={c.easy_margin}"
