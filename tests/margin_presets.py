"""Named margin settings for the tests (ArcFace, CosFace, plain normalised softmax); jobs set
ranray.config.MarginConfig's fields directly."""

from __future__ import annotations

from ranray.config import MarginConfig

PRESETS: dict[str, MarginConfig] = {
    "arcface": MarginConfig(scale=64.0, m1=1.0, m2=0.5, m3=0.0),
    "cosface": MarginConfig(scale=64.0, m1=1.0, m2=0.0, m3=0.4),
    "softmax": MarginConfig(scale=64.0, m1=1.0, m2=0.0, m3=0.0),  # normalised softmax, no margin
}


def margin_preset(name: str, **overrides: float | bool) -> MarginConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown margin preset '{name}' (known: {', '.join(sorted(PRESETS))})")
    return MarginConfig(**{**PRESETS[name].__dict__, **overrides})
