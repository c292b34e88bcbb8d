"""One registry for every model: build by name, like timm's create_model."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[..., nn.Module]
    family: str  # "cnn" or "vit": picks the training recipe and memory format
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(family: str):
    """Decorator: register a builder function under its own name."""

    def wrap(fn):
        _REGISTRY[fn.__name__] = ModelEntry(fn.__name__, fn, family, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; None-valued kwargs are dropped so CLI defaults never override model defaults."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return model_entry(name).build(**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
