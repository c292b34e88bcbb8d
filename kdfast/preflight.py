"""What a run will feed its models, checked before the first step: each model (student, online teacher, the teacher
of a cache build) runs once on a batch of zeros at every input size of the run, so that a model made for another
size fails at start-up with one line that says what to change, not with an assertion at the first step."""
from __future__ import annotations

import torch
import torch.nn as nn

from .errors import KdfastError


class InputSizeError(KdfastError):
    """A model that cannot take the run's images."""


def view_sizes(spec, data) -> dict[str, tuple[int, int]]:
    """The (h, w) of the images each kind of view gives: training views, evaluation views."""
    train = (spec.crop_size, spec.crop_size)
    if spec.view == "cifar":  # evaluation: the image itself
        evaluation = tuple(data.test.box)
    else:
        size = spec.eval_size or spec.crop_size
        evaluation = (size, size)
    return {"training views": train, "evaluation views": evaluation}


@torch.no_grad()
def check_model_input(model: nn.Module, name: str, role: str, sizes: dict[str, tuple[int, int]], classes: int,
                      device) -> None:
    """Run `model` (eval mode, no RNG drawn, no statistics updated) on two zero images of each size; refuse at once
    when it cannot take them or does not return (batch, classes) logits."""
    was_training = model.training
    model.eval()
    try:
        seen = set()
        for what, (h, w) in sizes.items():
            if (h, w) in seen:
                continue
            seen.add((h, w))
            try:
                out = model(torch.zeros(2, 3, h, w, device=device))
            except (AssertionError, RuntimeError, ValueError, IndexError, TypeError) as e:
                raise InputSizeError(f"{role} {name} cannot take the {what} ({h}x{w} px): "
                                     f"{_first_line(e)}. {_advice(model, name, (h, w))}") from None
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise InputSizeError(f"{role} {name} returns {shape} for a batch of 2 at {h}x{w} px, not (2, "
                                     f"{classes}) class logits: it is not a classifier kdfast can train. Choose a "
                                     "classification model (`kdfast models`).")
    finally:
        model.train(was_training)


def _advice(model: nn.Module, name: str, size: tuple[int, int]) -> str:
    expected = _expected_size(model)
    if expected and expected != size:
        base, views = name.partition("@")[0], "--augment.crop-size, --augment.eval-size with --augment.view rrc"
        if ":" in base:  # a library model: @SIZE resizes on the device
            return (f"It is made for {expected[0]}x{expected[1]} images: {base}@{expected[0]} resizes the views to "
                    f"that on the device, or make the views that size ({views}).")
        return f"It is made for {expected[0]}x{expected[1]} images: make the views that size ({views})."
    return ("Give training and evaluation views the size the model takes (--augment.crop-size; with --augment.view "
            "rrc also --augment.eval-size), or choose another model.")


def _expected_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size a model is built for: its patch embedding's (timm ViTs), else its pretrained_cfg's."""
    for m in model.modules():
        size = getattr(getattr(m, "patch_embed", None), "img_size", None)
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
            return tuple(size)
    for m in model.modules():
        cfg = getattr(m, "pretrained_cfg", None)
        if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)) and len(cfg["input_size"]) == 3:
            return tuple(cfg["input_size"][1:])
    return None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200].rstrip(".!")
