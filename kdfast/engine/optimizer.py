"""The optimizer (weight decay on weights only), the learning-rate schedule, and the moving average of the weights."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config import Recipe


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """Weight decay on weights only: not on biases, norms, position embeddings or class tokens.

    A model that stacks several students (together.StackedModel) says each tensor's plain name and ndim.
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    named = model.decay_params() if hasattr(model, "decay_params") else \
        [(n, p, p.ndim) for n, p in model.named_parameters()]
    decay, no_decay = [], []
    for name, p, ndim in named:
        if p.requires_grad:
            (no_decay if ndim <= 1 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(recipe.momentum, 0.999))


def lr_factor(step: int, total: int, recipe: Recipe) -> float:
    """Multiplier of the peak lr at a step: linear warm-up, then linear (onecycle) or cosine decay to 0."""
    warm = max(1, round(recipe.warmup * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if recipe.schedule == "onecycle":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, recipe: Recipe):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, recipe))


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """torch's AveragedModel as an EMA of parameters and buffers: its first update copies the weights, each later
    one sets ema = decay * ema + (1 - decay) * weights."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
