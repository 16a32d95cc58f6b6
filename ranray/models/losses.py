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

import math

from typing import Callable

import torch
import torch.nn.functional as F


# Where the RB margin is measured. "softmax": the official code (Challenge-condition-FER-dataset,
# attention_rank_loss.py) softmaxes the K sigmoid weights first; "sigmoid": the paper's formula on
# mu itself. A 0.1 gap in softmax space is a 0.4-0.5 gap between sigmoid weights, so the same margin
# keeps the loss active far longer in softmax space.
RB_SPACES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda mu: torch.softmax(mu, dim=1),
    "sigmoid": lambda mu: mu,
}

# The official code's margins (ranray's loss.rb_margin default, by the prepared dataset's source).
# RAF-DB has no official trainer; it takes the paper's in-the-wild value (docs/REPRODUCE.md).
RB_MARGINS: dict[str, float] = {"ferplus": 0.1, "affectnet": 0.02, "rafdb": 0.02}
RB_MARGIN_FALLBACK = 0.1


def region_biased_loss(mu: torch.Tensor, margin: float = 0.1, space: str = "softmax") -> torch.Tensor:
    """mean_b max(0, margin - (max_{i>0} w_i - w_0)), w = mu in `space`; mu (B, K), whole face at 0.

    Pushes the best region's attention above the whole face's by at least `margin`.
    """
    if mu.dim() != 2 or mu.shape[1] < 2:
        raise ValueError(f"mu must be (B, K) with K >= 2 (whole face + regions), got {tuple(mu.shape)}")
    to_space = RB_SPACES.get(space)
    if to_space is None:
        raise ValueError(f"unknown RB-loss space '{space}'; known: {', '.join(RB_SPACES)}")
    w = to_space(mu.float())
    gap = w[:, 1:].max(dim=1).values - w[:, 0]
    return F.relu(margin - gap).mean()


def share_concentration(mu: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
    """mean_b (log K - H(s_b)), s = mu * nu normalised over the K regions: 0 when every region has the
    same share of the decision, log K when one region has it all (the collapse docs/RESULTS.md shows)."""
    if mu.dim() != 2 or mu.shape != nu.shape:
        raise ValueError(f"mu and nu must both be (B, K), got {tuple(mu.shape)} and {tuple(nu.shape)}")
    w = mu.float() * nu.float()
    s = w / w.sum(dim=1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)
    entropy = -(s * s.clamp(min=torch.finfo(s.dtype).tiny).log()).sum(dim=1)
    return (math.log(mu.shape[1]) - entropy).mean()


def rb_margin_for(source: str | None, margin: float | None) -> float:
    """loss.rb_margin if set, else the official margin of the dataset's source."""
    return margin if margin is not None else RB_MARGINS.get(source or "", RB_MARGIN_FALLBACK)


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
