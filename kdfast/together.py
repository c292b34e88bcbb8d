"""K students of one architecture trained together on the same batches, each with its own initialisation, loss
(alpha, tau) and optimizer state: what each would compute alone, in one pass.

CNNs (the CIFAR ResNet family) by horizontal fusion: the K networks become one whose convolutions are grouped
(groups=K; the first one concatenates the K filter banks over the shared input image) and whose BatchNorms
have K*C channels. BatchNorm normalizes each channel on its own, so batch statistics and running buffers stay
exactly per student. The fused network keeps the plain one's parameter names; each tensor is the K students'
tensors concatenated along dim 0, so fusing and splitting are one rule.

ViTs (no BatchNorm) with torch.func: the K parameter sets stacked (K, ...) and the model called through
vmap(functional_call). Random draws (drop-path masks) are the same for every student (randomness="same"): each
draws what its run alone draws from the same RNG state, as in a sweep, where the students of a pass share the
seed; so equality with runs alone holds with drop-path on.

Optimizers are elementwise (SGD, AdamW), so one optimizer over the fused or stacked tensors updates each
student's slice as its own optimizer would; gradient clipping is done per student (`clip_per_student`).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import plain_module
from .models.resnet import CifarResNet


# ---------------------------------------------------------------- CNNs: horizontal fusion

class FusedBlock(nn.Module):
    """K BasicBlocks side by side: (B, K*in, H, W) -> (B, K*planes, H', W')."""

    def __init__(self, k: int, in_planes: int, planes: int, stride: int, pad_channels: int, projection: bool):
        super().__init__()
        self.k, self.pad_channels = k, pad_channels
        self.conv1 = nn.Conv2d(k * in_planes, k * planes, 3, stride, 1, bias=False, groups=k)
        self.bn1 = nn.BatchNorm2d(k * planes)
        self.conv2 = nn.Conv2d(k * planes, k * planes, 3, 1, 1, bias=False, groups=k)
        self.bn2 = nn.BatchNorm2d(k * planes)
        self.shortcut = nn.Sequential()
        if projection:
            self.shortcut = nn.Sequential(nn.Conv2d(k * in_planes, k * planes, 1, stride, bias=False, groups=k),
                                          nn.BatchNorm2d(k * planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad_channels:  # akamaster's option A, per student: pad each student's channels, not the stack's
            b, kc, h, w = x.shape
            p = self.pad_channels
            skip = F.pad(x[:, :, ::2, ::2].reshape(b, self.k, kc // self.k, h // 2, w // 2), (0, 0, 0, 0, p, p))
            skip = skip.reshape(b, -1, h // 2, w // 2)
        else:
            skip = self.shortcut(x)
        return F.relu(out + skip)


class FusedCifarResNet(nn.Module):
    """K CifarResNets as one network; forward returns logits (K, B, classes)."""

    def __init__(self, models: list[CifarResNet]):
        super().__init__()
        k, base = len(models), models[0]
        self.k, self.num_classes = k, base.fc.out_features
        self.conv1 = nn.Conv2d(3, k * 16, 3, 1, 1, bias=False)  # the input is shared: filter banks side by side
        self.bn1 = nn.BatchNorm2d(k * 16)
        for name in ("layer1", "layer2", "layer3"):
            blocks = [FusedBlock(k, b.conv1.in_channels, b.conv1.out_channels, b.conv1.stride[0], b.pad_channels,
                                 len(b.shortcut) > 0) for b in getattr(base, name)]
            setattr(self, name, nn.Sequential(*blocks))
        self.fc = nn.Linear(base.fc.in_features, k * self.num_classes)  # K heads, as one (K*classes, 64) matrix
        self.to(device=base.fc.weight.device, dtype=base.fc.weight.dtype)
        self.load_state_dict(fuse_states([m.state_dict() for m in models]))

    def forward(self, x):  # (B, 3, H, W) -> (K, B, classes)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, K*64, h, w)
        b = x.shape[0]
        x = F.adaptive_avg_pool2d(x, 1).reshape(b, self.k, -1)  # (B, K, 64)
        w = self.fc.weight.reshape(self.k, self.num_classes, -1)  # (K, classes, 64)
        return torch.einsum("bkc,koc->kbo", x, w) + self.fc.bias.reshape(self.k, 1, self.num_classes)

    def student_state(self, i: int) -> dict[str, torch.Tensor]:
        return split_state(self.state_dict(), self.k, i)


def fuse_states(states: list[dict]) -> dict[str, torch.Tensor]:
    """Each tensor: the students' tensors concatenated along dim 0; counters (0-d) are shared."""
    return {name: states[0][name].clone() if states[0][name].ndim == 0 else torch.cat([s[name] for s in states])
            for name in states[0]}


def split_state(state: dict, k: int, i: int) -> dict[str, torch.Tensor]:
    return {name: t.clone() if t.ndim == 0 else t.chunk(k)[i].clone() for name, t in state.items()}


# ---------------------------------------------------------------- ViTs: stacked parameters, vmap

class StackedModel(nn.Module):
    """K copies of one architecture with stacked parameters (K, ...), run with vmap(functional_call)."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        from torch.func import stack_module_state

        self.k = len(models)
        self.base = [copy.deepcopy(models[0]).to("meta")]  # a list: not a submodule, holds no real weights
        params, buffers = stack_module_state(models)
        self.names = list(params)
        self.stacked = nn.ParameterList([nn.Parameter(params[n].detach().clone()) for n in self.names])
        for n, b in buffers.items():
            self.register_buffer("buf_" + n.replace(".", "__"), b.clone())
        self.buffer_names = list(buffers)

    def forward(self, x):  # (B, ...) -> (K, B, classes)
        from torch.func import functional_call, vmap

        params = dict(zip(self.names, self.stacked))
        buffers = {n: getattr(self, "buf_" + n.replace(".", "__")) for n in self.buffer_names}

        def one(p, b, images):
            return functional_call(self.base[0], (p, b), (images,))

        return vmap(one, in_dims=(0, 0, None), randomness="same")(params, buffers, x)

    def student_state(self, i: int) -> dict[str, torch.Tensor]:
        state = {n: p[i].detach().clone() for n, p in zip(self.names, self.stacked)}
        state.update({n: getattr(self, "buf_" + n.replace(".", "__"))[i].clone() for n in self.buffer_names})
        return state

    def decay_params(self) -> list[tuple[str, nn.Parameter, int]]:
        """(name in the plain model, stacked parameter, per-student ndim): what decides weight decay."""
        return [(n, p, p.ndim - 1) for n, p in zip(self.names, self.stacked)]

    def no_weight_decay(self) -> set[str]:
        return set(getattr(self.base[0], "no_weight_decay", lambda: set())())


def together(models: list[nn.Module]) -> nn.Module:
    """The fastest exact way to train these K models of one architecture side by side."""
    if all(isinstance(m, CifarResNet) for m in models):
        return FusedCifarResNet(models)
    return StackedModel(models)


# ---------------------------------------------------------------- clipping per student

def clip_students(acc, model: nn.Module, max_norm: float) -> torch.Tensor:
    """The gradient clip of K students trained together (engine.Trainer's clip): each on its own slice."""
    acc.unscale_gradients()  # fp16: clip the true gradients, as clip_grad_norm_ does
    return clip_per_student(plain_module(model), max_norm)


def clip_per_student(model: nn.Module, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ for each student on its own slice of every gradient (dim 0 holds the K students in both the
    fused and the stacked form); returns the K norms before clipping."""
    k = model.k
    grads = [p.grad.reshape(k, -1) for p in model.parameters() if p.grad is not None]
    norms = torch.stack([g.float().pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (K,)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ formula, per student
    for g in grads:
        g.mul_(scale[:, None].to(g.dtype))
    return norms
