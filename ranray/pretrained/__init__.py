"""The models that ship inside the package: weights, config, data card, model card, test figures.

    SHIPPED / DEFAULT_MODEL     every shipped model by name; the one predict and evaluate use when
                                no --model is given
    shipped_weights(name)       its weights file (verified on load like any other: best.pt.meta.json)
    ShippedModel.card           card.json: summary, protocol, training command, time and hardware
    ShippedModel.figures        test_metrics.json as the model's own test wrote it

Each folder is a `model/` folder of a training run (best.pt + .yaml + .data.json + metrics) with
card.json beside it; the whole folder is at most 20 MB (tests/test_shipped_model.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ShippedModel:
    name: str

    @property
    def folder(self) -> Path:
        return HERE / self.name

    @property
    def weights(self) -> Path:
        return self.folder / "best.pt"

    @property
    def card(self) -> dict[str, Any]:
        return json.loads((self.folder / "card.json").read_text())

    @property
    def figures(self) -> dict[str, float]:
        return json.loads((self.folder / "test_metrics.json").read_text())


SHIPPED: dict[str, ShippedModel] = {m.name: m for m in (ShippedModel("ferplus_ran_pooled"),)}
DEFAULT_MODEL = "ferplus_ran_pooled"


def shipped_weights(name: str = DEFAULT_MODEL) -> Path:
    if name not in SHIPPED:
        raise ValueError(f"no shipped model {name!r}; shipped: {', '.join(SHIPPED)}")
    return SHIPPED[name].weights


def is_shipped(path: str | Path) -> bool:
    """Whether `path` lies inside the package's shipped models (read-only where ranray is installed)."""
    return Path(path).resolve().is_relative_to(HERE)
