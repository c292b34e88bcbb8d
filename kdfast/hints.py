"""FitNets hints: forward hooks on named layers, and the regressor that maps student features to the teacher's.

A hook stores a layer's output only while it is armed (during the forward that needs it) and the loss
takes it at once, so no feature outlives its step; `remove()` detaches every hook at the end of a run.
"""
from __future__ import annotations

import difflib

import torch
import torch.nn as nn
import torch.nn.functional as F

# the middle of each registered model: where FitNets guides the student (and takes the teacher's hint)
DEFAULT_HINT_LAYERS = {"resnet18": "layer2", "vit_tiny": "blocks.5", "vit_student": "blocks.2",
                       **{f"resnet{d}": "layer2" for d in ("8", "20", "32", "44", "56", "110", "8x4", "32x4")},
                       **{f"wrn_{d}_{k}": "block2" for d in (16, 40) for k in (1, 2)}}


def hint_layers(spec: str | None, teacher_model: str, student_model: str) -> tuple[str, str]:
    """(teacher layer, student layer) from --hint TEACHER_LAYER:STUDENT_LAYER, or the pair's defaults."""
    if spec:
        parts = spec.split(":")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"--hint {spec!r}: expected TEACHER_LAYER:STUDENT_LAYER, for example layer2:layer2")
        return parts[0], parts[1]
    missing = [m for m in (teacher_model, student_model) if m not in DEFAULT_HINT_LAYERS]
    if missing:
        raise ValueError(f"--hint: no default hint layer for {', '.join(missing)}; pass --hint TEACHER_LAYER:STUDENT_LAYER")
    return DEFAULT_HINT_LAYERS[teacher_model], DEFAULT_HINT_LAYERS[student_model]


class FeatureHook:
    """Captures the output of one named layer of a model while armed."""

    def __init__(self, model: nn.Module, layer: str, role: str):
        modules = dict(model.named_modules())
        if layer not in modules or not layer:
            names = [n for n in modules if n]
            close = difflib.get_close_matches(layer, names, n=3, cutoff=0.5)
            shown = [n for n in names if n.count(".") <= 1][:40]
            raise ValueError(f"--hint: the {role} has no layer {layer!r}."
                             + (f" Did you mean {', '.join(close)}?" if close else "")
                             + f" Layers: {', '.join(shown)}")
        self.layer, self.armed, self.value = layer, False, None
        self.handle = modules[layer].register_forward_hook(self._store)

    def _store(self, module, inputs, output):
        if self.armed:
            self.value = output

    def capture(self, forward):
        """Run forward() with the hook armed; returns (its result, the captured feature)."""
        self.armed = True
        try:
            result = forward()
        finally:
            self.armed = False
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError(f"--hint: layer {self.layer!r} did not run in the forward pass")
        return result, value

    def remove(self) -> None:
        self.handle.remove()


class Resize(nn.Module):
    """Spatial resize of (B, C, H, W) features to the teacher's size: average pooling down, bilinear up."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = size

    def forward(self, x):
        if x.shape[-2] >= self.size[0] and x.shape[-1] >= self.size[1]:
            return F.adaptive_avg_pool2d(x, self.size)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


def make_regressor(student_shape: tuple, teacher_shape: tuple, layers: tuple[str, str]) -> nn.Module:
    """1x1 conv + BN (resized where the spatial sizes differ) for feature maps, linear for tokens."""
    t, s = tuple(teacher_shape), tuple(student_shape)
    if len(s) == 4 and len(t) == 4:
        parts = [nn.Conv2d(s[1], t[1], 1, bias=False), nn.BatchNorm2d(t[1])]
        if s[2:] != t[2:]:
            parts.append(Resize(t[2:]))
        return nn.Sequential(*parts)
    if len(s) == 3 and len(t) == 3 and s[1] == t[1]:
        return nn.Linear(s[2], t[2])
    raise ValueError(f"--hint {layers[0]}:{layers[1]}: the teacher's features {t[1:]} and the student's {s[1:]} "
                     "cannot be matched (feature maps (C, H, W) with feature maps, or tokens (N, C) with the same "
                     "number of tokens). Choose other layers.")


def feature_shape(model: nn.Module, layer: str, role: str, image_shape: tuple, device) -> tuple:
    """The shape of a layer's output on a 2-image batch (eval mode, no gradient, nothing kept)."""
    hook = FeatureHook(model, layer, role)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            _, value = hook.capture(lambda: model(torch.zeros(2, *image_shape, device=device)))
    finally:
        hook.remove()
        model.train(was_training)
    return tuple(value.shape)


class HintedStudent(nn.Module):
    """The student and its regressor trained together: forward returns (logits, regressed hint features).

    The regressor is part of the resumable state and never of the exported checkpoint (`.student`).
    """

    def __init__(self, student: nn.Module, layer: str, regressor: nn.Module):
        super().__init__()
        self.student, self.regressor = student, regressor
        self.hook = FeatureHook(student, layer, "student")

    def forward(self, x):
        logits, feature = self.hook.capture(lambda: self.student(x))
        return logits, self.regressor(feature)

    def no_weight_decay(self) -> set[str]:
        return {f"student.{n}" for n in getattr(self.student, "no_weight_decay", lambda: set())()}

    def remove_hooks(self) -> None:
        self.hook.remove()
