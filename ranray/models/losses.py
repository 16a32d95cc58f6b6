"""RAN losses: the region-biased loss and the FERPlus label-mode losses, all computed in float32.

FERPlus label modes follow the dataset authors (Barsoum et al., "Training Deep Networks for Facial
Expression Recognition with Crowd-Sourced Label Distribution", ICMI 2016, and their reference
code microsoft/FERPlus src/train.py + ferplus.py). `targets` is the per-class distribution that
`prepare` stored for the chosen mode (vote counts work too: rows are renormalised here):

- majority:     cross-entropy against the hard label (the majority vote).
- probability:  "probabilistic label drawing": each time a face is seen, one class is drawn from
                its target distribution and used as a hard label (the authors redraw per epoch;
                redrawing per step is the same in distribution).
- crossentropy: cross-entropy against the soft target, -sum_j t_j log p_j.
- multi_target: every class the target accepts (t_j > 0) counts as correct, and the loss is
                -log max_{j accepted} p_j: the network is not pushed to split its mass over the
                accepted classes, only to put it on one of them (the authors' -log max(t * p)).

A row whose targets sum to zero falls back to its hard label, so no mode produces NaN.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def region_biased_loss(mu: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """mean_b max(0, margin - (max_{i>0} mu_i - mu_0)); mu (B, K) with the whole face at index 0.

    Pushes the best region's attention above the whole face's by at least `margin` (RAN paper:
    0.1 on FERPlus, 0.03 on AffectNet).
    """
    if mu.dim() != 2 or mu.shape[1] < 2:
        raise ValueError(f"mu must be (B, K) with K >= 2 (whole face + regions), got {tuple(mu.shape)}")
    mu = mu.float()
    gap = mu[:, 1:].max(dim=1).values - mu[:, 0]
    return F.relu(margin - gap).mean()


def _target_distribution(labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    t = targets.float().clamp(min=0.0)
    total = t.sum(dim=1, keepdim=True)
    hard = F.one_hot(labels, t.shape[1]).float()
    return torch.where(total > 0, t / total.clamp(min=torch.finfo(t.dtype).tiny), hard)


def _majority(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def _probability(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    drawn = torch.multinomial(_target_distribution(labels, targets), 1).squeeze(1)
    return F.cross_entropy(logits, drawn)


def _crossentropy(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    t = _target_distribution(labels, targets)
    return -(t * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _multi_target(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    accepted = (_target_distribution(labels, targets) > 0)
    logp = F.log_softmax(logits, dim=1).masked_fill(~accepted, float("-inf"))
    return -logp.max(dim=1).values.mean()


LABEL_MODES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "majority": _majority,
    "probability": _probability,
    "crossentropy": _crossentropy,
    "multi_target": _multi_target,
}


def expression_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None,
                    mode: str = "majority") -> torch.Tensor:
    """Mean loss over the batch: logits (B, C), labels (B,) long, targets (B, C) distribution or votes."""
    fn = LABEL_MODES.get(mode)
    if fn is None:
        raise ValueError(f"unknown label mode '{mode}'; known: {', '.join(LABEL_MODES)}")
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (B, C) and labels (B,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if targets is None:
        if mode != "majority":
            raise ValueError(f"label mode '{mode}' needs targets (B, C)")
        targets = F.one_hot(labels, logits.shape[1])
    if targets.shape != logits.shape:
        raise ValueError(f"targets must match logits {tuple(logits.shape)}, got {tuple(targets.shape)}")
    with torch.autocast(logits.device.type, enabled=False):
        return fn(logits.float(), labels.long(), targets)
