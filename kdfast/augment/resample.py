"""Crop-and-resize of a box per sample, batch-wise and exact: antialiased bilinear as two banded passes.

A resize is linear along each axis: output pixel o is a weighted sum of the input pixels near its center, with
triangle-filter weights (the filter widened by the scale factor when downscaling: the antialiasing of Pillow's
and torchvision's bilinear resize). The crop is the box's zero weights outside it, the flip the reversed output
order, the letterbox of a stored image (padding beyond its true size) never inside a box. Each pass is one
row gather and multiply-add per filter tap (not per sample) for a whole batch of boxes.

Exact: weights are quantized to multiples of 2^-10 that sum to 1 per output pixel and each pass is rounded to
whole pixel values, so every partial sum is a multiple of 2^-10 below 256, exactly representable in float32:
the result does not depend on summation order, hence not on batch size, batch composition or device.
"""
from __future__ import annotations

import math

import torch

WEIGHT_BITS = 10
_ONE = 1 << WEIGHT_BITS


def box_taps(start: torch.Tensor, length: torch.Tensor, out: int, flip: torch.Tensor | None = None):
    """The filter taps of the boxes [start, start + length) of an axis resized to `out` pixels.

    start, length: (B,) whole pixels, each box inside its image. Returns first (B, out) int64, the first input
    pixel of each output pixel's taps, and weights (B, out, K) float32 (multiples of 2^-10, summing to 1).
    flip: (B,) bool, reverse the output pixels.
    """
    device = start.device
    start, length = start.to(torch.float32), length.to(torch.float32)
    scale = length / out  # (B,) input pixels per output pixel
    support = scale.clamp(min=1.0)  # the triangle's half-width: widened when downscaling
    taps = int(math.ceil(2 * float(support.max()))) + 2
    centers = start[:, None] + (torch.arange(out, device=device, dtype=torch.float32) + 0.5) * scale[:, None]
    first = torch.floor(centers - support[:, None] - 0.5).long() + 1  # (B, out)
    pos = first[:, :, None] + torch.arange(taps, device=device)  # (B, out, K) input pixels
    w = (1.0 - (pos + 0.5 - centers[:, :, None]).abs() / support[:, None, None]).clamp_(min=0.0)
    inside = (pos >= start[:, None, None]) & (pos < (start + length)[:, None, None])
    w = w * inside
    q = torch.round(w / w.sum(-1, keepdim=True) * _ONE)  # the nearest pixel always weighs > 0
    q.scatter_add_(-1, q.argmax(-1, keepdim=True), _ONE - q.sum(-1, keepdim=True))  # rows sum to exactly 1
    if flip is not None:
        flip = flip.to(device)[:, None]
        first = torch.where(flip, first.flip(1), first)
        q = torch.where(flip[:, :, None], q.flip(1), q)
    return first, q / _ONE


def _rows_pass(x: torch.Tensor, first: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Resample the rows of x (B, C, H, W) uint8 -> (B, C, out, W) uint8: per tap, one index_select of whole
    contiguous rows of the flattened batch, then a multiply-add into one buffer; rounded to whole pixel values."""
    B, C, H, W = x.shape
    out = first.shape[1]
    rows = x.reshape(B * C * H, W)
    base = (torch.arange(B * C, device=x.device) * H).view(B, C, 1)  # (B, C, 1) first row of each image plane
    picked = torch.empty(B * C * out, W, dtype=torch.uint8, device=x.device)
    as_float = torch.empty(B, C, out, W, dtype=torch.float32, device=x.device)
    acc = torch.zeros(B, C, out, W, dtype=torch.float32, device=x.device)
    for k in range(weights.shape[-1]):
        pos = (first + k).clamp_(0, H - 1)[:, None, :]  # (B, 1, out); zero weight where clamped
        torch.index_select(rows, 0, (base + pos).reshape(-1), out=picked)
        as_float.view(-1, W).copy_(picked)
        acc.addcmul_(as_float, weights[:, None, :, k, None])  # exact: see the module's docstring
    return acc.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)


def _crop_resize(images_u8, top, left, height, width, out_h: int, out_w: int, flip) -> torch.Tensor:
    device = images_u8.device
    rows = box_taps(top.to(device), height.to(device), out_h)
    cols = box_taps(left.to(device), width.to(device), out_w, flip)
    y = _rows_pass(images_u8.contiguous(), *rows)  # (B, C, out_h, W)
    z = _rows_pass(y.transpose(2, 3).contiguous(), *cols)  # columns as rows: (B, C, out_w, out_h)
    return z.transpose(2, 3).contiguous()


def crop_resize(images_u8: torch.Tensor, top, left, height, width, out_h: int, out_w: int,
                flip: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's box (top, left, height, width: (B,) whole pixels) of (B, C, H, W) uint8 images resized to
    out_h x out_w, optionally flipped; uint8 (B, C, out_h, out_w).

    On the CPU in chunks of a few images: buffers of a few MB are reused by the allocator and stay in cache
    (whole-batch buffers of 40+ MB cost more in page faults than the arithmetic).
    """
    B, C, _, W = images_u8.shape
    flip = torch.zeros(B, dtype=torch.bool) if flip is None else flip
    chunk = B if images_u8.device.type != "cpu" else max(1, (1 << 22) // (C * out_h * max(W, out_w) * 4))
    parts = [_crop_resize(images_u8[i:i + chunk], top[i:i + chunk], left[i:i + chunk], height[i:i + chunk],
                          width[i:i + chunk], out_h, out_w, flip[i:i + chunk]) for i in range(0, B, chunk)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
