"""Test-time augmentation: the logits of a batch of evaluation views averaged over simple transforms of them.

    flip       the mean of the logits of each view and of its mirror image
    translate  airbench's: 1/2 the flip pair of the view, 1/4 each the flip pairs of the view shifted by one pixel
               up-left and down-right (reflect padding)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

TTA_MODES = ("none", "flip", "translate")


def _mirrored(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return 0.5 * (model(images).float() + model(images.flip(-1)).float())


def tta_logits(model: nn.Module, images: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """float32 logits of normalized views (B, C, H, W) under test-time augmentation `mode`."""
    if mode == "none":
        return model(images).float()
    if mode == "flip":
        return _mirrored(model, images)
    if mode != "translate":
        raise ValueError(f"unknown test-time augmentation {mode!r}: one of {', '.join(TTA_MODES)}")
    h, w = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[..., :h, :w], padded[..., 2:h + 2, 2:w + 2]]
    return 0.5 * _mirrored(model, images) + 0.25 * (_mirrored(model, shifted[0]) + _mirrored(model, shifted[1]))
