"""The parts of an optimiser step that both training loops share: precision, optimizers, LR schedule.

The step itself (zero, scaled backward, clip, step, scaler update) is `Engine.apply_gradients`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ranray.config import OptimConfig


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # autocast dtype; None runs in float32
    scaled: bool  # fp16 needs a GradScaler, bf16 has float32's range and does not


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision(None, False),
    "bf16": Precision(torch.bfloat16, False),
    "fp16": Precision(torch.float16, True),
}

OPTIMIZERS: dict[str, Callable[[Iterable[nn.Parameter], OptimConfig], torch.optim.Optimizer]] = {
    "sgd": lambda params, o: torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay),
    "adamw": lambda params, o: torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay),
}


def _step_factor(step: int, steps_per_epoch: int, epochs: int, o: OptimConfig) -> float:
    # The RAN reference drops the LR when epoch int(m * E) starts: whole epochs decide, not steps,
    # and int() (not a comparison with m * E, i.e. ceil) so E = 10 and E = 7 drop where it does.
    epoch = step // steps_per_epoch
    return o.gamma ** sum(epoch >= int(m * epochs) for m in o.milestones)


def _cosine_factor(step: int, steps_per_epoch: int, epochs: int, o: OptimConfig) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / (steps_per_epoch * epochs))))


SCHEDULES: dict[str, Callable[[int, int, int, OptimConfig], float]] = {
    "step": _step_factor,
    "cosine": _cosine_factor,
}


def lr_factor(step: int, *, steps_per_epoch: int, epochs: int, o: OptimConfig) -> float:
    """LR multiplier before optimizer step `step + 1`: linear warm-up, then the schedule."""
    warmup = int(round(o.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    return SCHEDULES[o.schedule](step, steps_per_epoch, epochs, o)


def lr_scheduler(optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, epochs: int,
                 o: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps_per_epoch=steps_per_epoch, epochs=epochs, o=o))
