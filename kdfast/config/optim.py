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
    momentum: float  # SGD momentum; AdamW beta1
    schedule: Literal["onecycle", "cosine", "step"]
    warmup: float  # fraction of all steps spent warming up linearly from 0
    grad_clip: float  # max gradient norm; 0 = off
    label_smoothing: float
    nesterov: bool = True  # SGD: Nesterov momentum
    milestones: tuple[float, ...] = ()  # step schedule: the lr is multiplied by 0.1 at these fractions of the steps
    light_lr: Optional[float] = None  # the lr (per 256) of the light students (MobileNet, ShuffleNet), if it differs


RECIPES = {
    # SGD + Nesterov, one-cycle (linear up, linear down to 0): the usual fast CIFAR ResNet recipe
    "cnn": Recipe("sgd", lr=0.1, weight_decay=5e-4, momentum=0.9, schedule="onecycle", warmup=0.15,
                  grad_clip=0.0, label_smoothing=0.0),
    # AdamW, warm-up then cosine, gradient clipping: ViTs trained from scratch need all three
    "vit": Recipe("adamw", lr=1e-3, weight_decay=0.05, momentum=0.9, schedule="cosine", warmup=0.1,
                  grad_clip=1.0, label_smoothing=0.1),
    # the CIFAR-100 KD tables' (CRD, Tian et al. 2020, RepDistiller's train_student.py; DKD, mdistiller): SGD 0.05 at
    # batch 64 (0.2 per 256), momentum 0.9 (not Nesterov), weight decay 5e-4, x0.1 at epochs 150, 180 and 210 of 240
    # (the same fractions of a shorter run), lr 0.01 at batch 64 for MobileNetV2 and the ShuffleNets
    "tables": Recipe("sgd", lr=0.2, weight_decay=5e-4, momentum=0.9, schedule="step", warmup=0.0, grad_clip=0.0,
                     label_smoothing=0.0, nesterov=False, milestones=(150 / 240, 180 / 240, 210 / 240), light_lr=0.04),
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
    recipe: Literal["auto", "cnn", "vit", "tables"] = "auto"
    """Optimizer/schedule family; auto = the model's family. tables: the published CIFAR-100 KD tables' SGD (0.05 at
    batch 64, x0.1 at 5/8, 3/4 and 7/8 of the epochs: 150, 180, 210 of 240; 0.01 for MobileNet and ShuffleNet)."""
    optimizer: Optional[Literal["sgd", "adamw"]] = None
    """sgd (Nesterov) or adamw. Default: the recipe's (cnn: sgd, vit: adamw)."""
    lr: Optional[float] = None
    """Peak learning rate. Default: the recipe's (cnn 0.1, vit 1e-3), scaled by --batch-size / 256."""
    weight_decay: Optional[float] = None
    """Weight decay, on weights only (not biases, norms, embeddings). Default: the recipe's (cnn 5e-4, vit 0.05)."""
    momentum: Optional[float] = None
    """SGD momentum, or AdamW's beta1. Default: the recipe's (0.9)."""
    schedule: Optional[Literal["onecycle", "cosine", "step"]] = None
    """Learning-rate schedule after the warm-up: onecycle (linear to 0), cosine, or step (x0.1 at the recipe's
    milestones). Default: the recipe's (cnn onecycle, vit cosine, tables step)."""
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

    def resolved_recipe(self, family: str, light: bool = False) -> Recipe:
        """The recipe of the family (or --recipe) with every field given here; the lr scaled by the batch size. light:
        the model is a light student (models.ModelEntry.light), which a recipe may train at its own lr."""
        base = RECIPES[family if self.recipe == "auto" else self.recipe]
        if light and base.light_lr is not None:
            base = replace(base, lr=base.light_lr)
        overrides = {f.name: getattr(self, f.name) for f in fields(Recipe) if getattr(self, f.name, None) is not None}
        recipe = replace(base, **overrides)
        if self.lr is None:
            recipe = replace(recipe, lr=base.lr * self.batch_size / 256)
        return recipe
