"""ImageNet-style views of images of any size: RandomResizedCrop + flip for training, resize + center crop for
evaluation.

A training box is a pure function of (augmentation seed, sample index, the stored image's size), drawn as
torchvision's RandomResizedCrop draws it (area fraction uniform in `scale`, aspect ratio log-uniform in `ratio`,
up to 10 tries, then a center crop with the ratio clamped), from keyed uniforms computed in float64 on the CPU:
the same boxes on every device. The pixels are then cropped, resized and flipped on the device (resample.py).
"""
from __future__ import annotations

import math

import torch

from .keyed import uniform
from ..transfer import Parcel
from .resample import crop_resize, pillow_crop_resize, plan_crop_resize
from .spec import AugmentSpec

ATTEMPTS = 10
FLIP_STREAM = 4 * ATTEMPTS


def rrc_boxes(seed: int, indices: torch.Tensor, sizes: torch.Tensor, spec: AugmentSpec):
    """(top, left, height, width) int64 (B,) and flip bool (B,) on the CPU, for images of sizes (B, 2) = (h, w)."""
    idx = indices.detach().to("cpu", torch.int64)
    h, w = sizes[:, 0].to("cpu", torch.float64), sizes[:, 1].to("cpu", torch.float64)
    area = h * w
    (s0, s1), (r0, r1) = spec.scale, spec.ratio
    log_r0, log_r1 = math.log(r0), math.log(r1)
    # the fallback: the whole image, its aspect clamped into the ratio range, centered
    in_ratio = w / h
    ch = torch.where(in_ratio < r0, torch.round(w / r0), torch.where(in_ratio > r1, h, h))
    cw = torch.where(in_ratio < r0, w, torch.where(in_ratio > r1, torch.round(h * r1), w))
    top, left = torch.floor((h - ch) / 2), torch.floor((w - cw) / 2)
    found = torch.zeros(len(idx), dtype=torch.bool)
    for k in range(ATTEMPTS):
        target = area * (s0 + (s1 - s0) * uniform(seed, idx, 4 * k))
        aspect = torch.exp(log_r0 + (log_r1 - log_r0) * uniform(seed, idx, 4 * k + 1))
        bw, bh = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
        ok = (bw > 0) & (bw <= w) & (bh > 0) & (bh <= h) & ~found
        bt = torch.floor(uniform(seed, idx, 4 * k + 2) * (h - bh + 1))
        bl = torch.floor(uniform(seed, idx, 4 * k + 3) * (w - bw + 1))
        top, left = torch.where(ok, bt, top), torch.where(ok, bl, left)
        ch, cw = torch.where(ok, bh, ch), torch.where(ok, bw, cw)
        found |= ok
    flip = uniform(seed, idx, FLIP_STREAM) < 0.5 if spec.flip else torch.zeros(len(idx), dtype=torch.bool)
    return top.long(), left.long(), ch.long(), cw.long(), flip


def center_boxes(sizes: torch.Tensor, crop_fraction: float):
    """The evaluation box: the center square of crop_fraction of the shorter side (timm's resize + center crop)."""
    h, w = sizes[:, 0].to("cpu", torch.float64), sizes[:, 1].to("cpu", torch.float64)
    side = torch.round(torch.minimum(h, w) * crop_fraction).clamp(min=1)
    return torch.floor((h - side) / 2).long(), torch.floor((w - side) / 2).long(), side.long(), side.long()


def plan_rrc_view(parcel: Parcel, indices: torch.Tensor, seed: int, spec: AugmentSpec, sizes: torch.Tensor,
                  channels: int = 3):
    """The training views' boxes of the samples `indices` (host) with true sizes (B, 2), drawn now and added to the
    parcel; returns the function of the stored images (B, C, H, W) uint8 -> (B, C, crop, crop) uint8 views."""
    top, left, height, width, flip = rrc_boxes(seed, indices, sizes, spec)
    return plan_crop_resize(parcel, channels, top, left, height, width, spec.crop_size, spec.crop_size, flip,
                            interpolation=spec.interpolation)


def rrc_view(images_u8: torch.Tensor, indices: torch.Tensor, seed: int, spec: AugmentSpec,
             sizes: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) uint8 stored images (true sizes (B, 2)) -> (B, C, crop, crop) uint8 training views."""
    parcel = Parcel(images_u8.device)
    run = plan_rrc_view(parcel, indices, seed, spec, sizes, images_u8.shape[1])
    parcel.send()
    return run(images_u8)


def center_view(images_u8: torch.Tensor, spec: AugmentSpec, sizes: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) uint8 stored images -> (B, C, eval, eval) uint8 evaluation views."""
    size = spec.eval_resolution
    top, left, height, width = center_boxes(sizes, spec.crop_fraction)
    return crop_resize(images_u8, top, left, height, width, size, size, interpolation=spec.interpolation)


def rrc_view_pil(images: list, indices: torch.Tensor, seed: int, spec: AugmentSpec, sizes: torch.Tensor) -> torch.Tensor:
    """rrc_view of stored images given as Pillow images (a worker that has just decoded them): the same pixels."""
    top, left, height, width, flip = rrc_boxes(seed, indices, sizes, spec)
    return pillow_crop_resize(images, top, left, height, width, spec.crop_size, spec.crop_size, flip,
                              spec.interpolation)


def center_view_pil(images: list, spec: AugmentSpec, sizes: torch.Tensor) -> torch.Tensor:
    size = spec.eval_resolution
    return pillow_crop_resize(images, *center_boxes(sizes, spec.crop_fraction), size, size,
                              interpolation=spec.interpolation)
