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
    # foreach: a few kernels for all the parameters, on a CPU too (a for-loop over them launches about 5 per tensor)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov, foreach=True)
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(recipe.momentum, 0.999), foreach=True)


def lr_factor(step: int, total: int, recipe: Recipe) -> float:
    """Multiplier of the peak lr at a step: linear warm-up, then linear (onecycle) or cosine decay to 0, or x0.1 at
    each milestone passed (step: a milestone m takes effect at step round(m * total), an epoch's first step where m
    times the epochs is whole)."""
    warm = max(1, round(recipe.warmup * total))
    if step < warm:
        return (step + 1) / warm
    if recipe.schedule == "step":
        return 0.1 ** sum(step >= round(m * total) for m in recipe.milestones)
    progress = (step - warm) / max(1, total - warm)
    if recipe.schedule == "onecycle":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, recipe: Recipe):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, recipe))


class Ema(AveragedModel):
    """torch's AveragedModel as an EMA of parameters and buffers (the same state dict: module.*, n_averaged): its
    first update copies the weights, each later one sets ema = decay * ema + (1 - decay) * weights, with torch's
    update function. Unlike AveragedModel's own update it never reads n_averaged on the host nor copies it to the
    device in a step: whether the average has started is read once, after the state is set."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.started: bool | None = None  # None: read n_averaged at the next update

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.started = None
        return super().load_state_dict(state_dict, strict, assign)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        mine = [t.detach() for t in (*self.module.parameters(), *self.module.buffers())]
        theirs = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if self.started is None:
            self.started = bool(self.n_averaged > 0)  # once per run (a resumed one has started)
        if not self.started:
            torch._foreach_copy_(mine, theirs)
        else:  # per dtype, as AveragedModel groups them (lerp for floats, torch's formula for integer buffers)
            for kind in {(t.device, t.dtype) for t in mine}:
                pairs = [(a, b) for a, b in zip(mine, theirs) if (a.device, a.dtype) == kind]
                self.multi_avg_fn([a for a, _ in pairs], [b for _, b in pairs], None)
        self.started = True
        self.n_averaged += 1  # stays where it is: on the host, as AveragedModel keeps it


def make_ema(model: nn.Module, decay: float) -> Ema:
    """The moving average of model's weights and buffers with this decay (Ema)."""
    return Ema(model, decay)
