"""How long and with what optimizer and schedule a model is trained: the family's recipe and what overrides it."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal, Optional

from ..flags import explained
from .checks import check_float, check_int
from .section import Section


@dataclass(frozen=True)
class Recipe:
    """Optimizer and schedule of one model family."""

    optimizer: Literal["sgd", "adamw"]
    lr: float  # peak learning rate for a global batch of 256, scaled linearly with the batch size
    weight_decay: float
    momentum: float  # SGD (Nesterov) momentum; AdamW beta1
    schedule: Literal["onecycle", "cosine"]
    warmup: float  # fraction of all steps spent warming up linearly from 0
    grad_clip: float  # max gradient norm; 0 = off
    label_smoothing: float


RECIPES = {
    # SGD + Nesterov, one-cycle (linear up, linear down to 0): the usual fast CIFAR ResNet recipe
    "cnn": Recipe("sgd", lr=0.1, weight_decay=5e-4, momentum=0.9, schedule="onecycle", warmup=0.15,
                  grad_clip=0.0, label_smoothing=0.0),
    # AdamW, warm-up then cosine, gradient clipping: ViTs trained from scratch need all three
    "vit": Recipe("adamw", lr=1e-3, weight_decay=0.05, momentum=0.9, schedule="cosine", warmup=0.1,
                  grad_clip=1.0, label_smoothing=0.1),
}


@explained
@dataclass
class OptimConfig(Section):
    """Epochs, batch size, and the recipe's optimizer and schedule with any field overridden."""

    epochs: int = 30
    """Training epochs (passes over the training set)."""
    batch_size: int = 256
    """Global batch size: every optimizer step sees this many images, split evenly across processes and
    --grad-accum micro-batches (the last incomplete batch of an epoch is dropped)."""
    recipe: Literal["auto", "cnn", "vit"] = "auto"
    """Optimizer/schedule family; auto = the model's family."""
    optimizer: Optional[Literal["sgd", "adamw"]] = None
    """sgd (Nesterov) or adamw. Default: the recipe's (cnn: sgd, vit: adamw)."""
    lr: Optional[float] = None
    """Peak learning rate. Default: the recipe's (cnn 0.1, vit 1e-3), scaled by --batch-size / 256."""
    weight_decay: Optional[float] = None
    """Weight decay, on weights only (not biases, norms, embeddings). Default: the recipe's (cnn 5e-4, vit 0.05)."""
    momentum: Optional[float] = None
    """SGD momentum, or AdamW's beta1. Default: the recipe's (0.9)."""
    schedule: Optional[Literal["onecycle", "cosine"]] = None
    """Learning-rate schedule after the warm-up: onecycle (linear to 0) or cosine. Default: the recipe's (cnn
    onecycle, vit cosine)."""
    warmup: Optional[float] = None
    """Fraction of all steps spent warming up linearly from 0. Default: the recipe's (cnn 0.15, vit 0.1)."""
    grad_clip: Optional[float] = None
    """Maximum gradient norm (0: off). Default: the recipe's (cnn off, vit 1.0)."""
    label_smoothing: Optional[float] = None
    """Label smoothing of the hard-label CE. Default: --aug-recipe's if it has one, else the recipe's (cnn 0, vit
    0.1)."""

    def check(self) -> None:
        for name in ("epochs", "batch_size"):
            check_int(self, name, 1)
        check_float(self, "lr", 0.0, low_open=True)
        check_float(self, "weight_decay", 0.0)
        check_float(self, "momentum", 0.0, 1.0)
        check_float(self, "warmup", 0.0, 1.0)
        check_float(self, "grad_clip", 0.0)
        check_float(self, "label_smoothing", 0.0, 1.0)

    def resolved_recipe(self, family: str) -> Recipe:
        """The recipe of the family (or --recipe) with every field given here; the lr scaled by the batch size."""
        base = RECIPES[family if self.recipe == "auto" else self.recipe]
        overrides = {f.name: getattr(self, f.name) for f in fields(Recipe) if getattr(self, f.name) is not None}
        recipe = replace(base, **overrides)
        if self.lr is None:
            recipe = replace(recipe, lr=base.lr * self.batch_size / 256)
        return recipe
