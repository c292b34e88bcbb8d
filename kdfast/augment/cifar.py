"""The CIFAR view: pad + random crop + horizontal flip at the image's own size, batch-wise on the device.

The crop offsets and flip of sample ``i`` under seed ``s`` are a pure function of ``(s, i)`` (keyed.sample_hash);
two gathers (rows, then columns) do crop, padding and flip at once, with no padded copy. uint8 in, uint8 out.
"""
from __future__ import annotations

import torch

from .keyed import sample_hash, shr
from .spec import AugmentSpec


def crop_flip_params(seed: int, indices: torch.Tensor, spec: AugmentSpec):
    """Per-sample (dy, dx, flip) as int64/bool tensors; a pure function of (seed, index)."""
    h = sample_hash(seed, indices)
    span = 2 * spec.padding + 1
    dy = shr(h, 40) % span  # offsets into the padded image, 0..2*padding
    dx = (shr(h, 20) & 0xFFFFF) % span
    flip = (h & 1).bool() if spec.flip else torch.zeros_like(h, dtype=torch.bool)
    return dy, dx, flip


def _source_coords(offset: torch.Tensor, padding: int, size: int, out: int, mode: str):
    """Source row/column of each output pixel for a crop at `offset` of the padded image.

    Returns (coords [B, out] clamped into the image, valid mask [B, out]).
    """
    pos = offset[:, None] + torch.arange(out, device=offset.device) - padding  # (B, out)
    if mode == "reflect":
        pos = pos.abs()
        pos = torch.where(pos > size - 1, 2 * (size - 1) - pos, pos)
        return pos, None
    valid = (pos >= 0) & (pos < size)
    return pos.clamp(0, size - 1), valid


def cifar_view(images_u8: torch.Tensor, indices: torch.Tensor, seed: int, spec: AugmentSpec) -> torch.Tensor:
    """Random crop (with padding) and horizontal flip, batch-wise; uint8 in, uint8 out.

    images_u8: (B, C, H, W) uint8, the samples `indices` of the training set.
    Two gathers (rows, then columns) do crop, padding and flip at once, with no padded copy.
    """
    B, C, H, W = images_u8.shape
    size = spec.crop_size
    dy, dx, flip = crop_flip_params(seed, indices.to(images_u8.device), spec)
    rows, row_ok = _source_coords(dy, spec.padding, H, size, spec.pad_mode)  # (B, size)
    cols, col_ok = _source_coords(dx, spec.padding, W, size, spec.pad_mode)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = images_u8.gather(2, rows[:, None, :, None].expand(B, C, size, W))  # (B, C, size, W)
    out = out.gather(3, cols[:, None, None, :].expand(B, C, size, size))  # (B, C, size, size)
    if row_ok is not None:
        col_ok = torch.where(flip[:, None], col_ok.flip(1), col_ok)
        out = out * (row_ok[:, None, :, None] & col_ok[:, None, None, :]).to(out.dtype)
    return out
