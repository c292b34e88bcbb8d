"""One registry for every model: build by name, like timm's create_model."""
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[..., nn.Module]
    family: str  # "cnn" or "vit": picks the training recipe and memory format
    description: str
    light: bool = False  # a light student (MobileNet, ShuffleNet): the tables' recipe trains it at a lower lr


class Registry:
    """Entries by name, with close-match suggestions for unknown names (models here, methods in kdfast.methods)."""

    def __init__(self, kind: str, flag: str = ""):
        self.kind, self.flag, self.entries = kind, flag, {}

    def add(self, entry) -> None:
        self.entries[entry.name] = entry

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str):
        if name not in self.entries:
            close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.4)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            prefix = f"{self.flag}: " if self.flag else ""
            raise ValueError(f"{prefix}unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(self.names())}")
        return self.entries[name]


def first_doc_line(fn) -> str:
    return (fn.__doc__ or "").strip().splitlines()[0]


_REGISTRY = Registry("model")


def register_model(family: str, light: bool = False):
    """Decorator: register a builder function under its own name."""

    def wrap(fn):
        _REGISTRY.add(ModelEntry(fn.__name__, fn, family, first_doc_line(fn), light))
        return fn

    return wrap


def register_scratch_model(name: str, family: str, doc: str, make: Callable[[int], nn.Module],
                           light: bool = False) -> None:
    """Register make(num_classes) under name: a model with no pretrained weights (the KD tables' zoo)."""

    def build(num_classes: int = 10, pretrained: bool = False) -> nn.Module:
        if pretrained:
            raise ValueError(f"{name} has no pretrained weights; train it with kdfast train")
        return make(num_classes)

    build.__name__, build.__doc__ = name, doc
    register_model(family, light)(build)


def list_models() -> list[str]:
    return _REGISTRY.names()


def model_entry(name: str) -> ModelEntry:
    """A registered model, or a library one (timm:NAME, torchvision:NAME[@SIZE], see kdfast.models.library)."""
    from . import library

    if library.is_library_name(name):
        lib, model, size = library.check_name(name)
        resized = f", input resized to {size}x{size} on the device" if size else ""
        return ModelEntry(name, functools.partial(library.build, name), library.family(name),
                          f"{lib}'s {model}{resized}")
    try:
        return _REGISTRY.get(name)
    except ValueError as e:
        libs = [lib for lib in library.LIBRARIES if name in library.library_models(lib)]
        hint = f" {name!r} is a library model: --model {libs[0]}:{name}." if libs else ""
        raise ValueError(f"{e}.{hint} Library models: {library.NAMING}.") from None


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; None-valued kwargs are dropped so CLI defaults never override model defaults."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return model_entry(name).build(**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def plain_module(model: nn.Module) -> nn.Module:
    """model without its DDP, DataParallel and torch.compile wrappers, whichever wraps which (Accelerate's unwrap
    stops at a compiled module inside DDP): its state dict has the plain keys every loader reads."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model
