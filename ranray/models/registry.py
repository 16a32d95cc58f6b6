"""Model registry: `create_model(name, **kwargs)` builds any backbone registered with `@register_model`.

Jobs and checkpoints name backbones by string (ModelConfig.backbone, PretrainConfig.backbone), so
the string -> constructor map lives in one place and an unknown name fails with the known list.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from torch import nn

F = TypeVar("F", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: F) -> F:
    """Register a model constructor under its function name."""
    name = fn.__name__
    if name in _MODELS and _MODELS[name] is not fn:
        raise ValueError(f"model '{name}' is registered twice")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model `name`; kwargs go to its constructor (e.g. num_features, dropout)."""
    try:
        fn = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(list_models())}") from None
    return fn(**kwargs)
