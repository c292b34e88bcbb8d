"""Random erasing keyed per sample (Zhong et al. 2020, as timm's RandomErasing in its 'const' mode, one box).

With probability p a box of area uniform in `area` (fraction of the image) and aspect ratio log-uniform in
`ratio` is set to 0 in the normalized view (the dataset's mean color), up to 10 tries for a box that fits, as
timm draws it; the box is a pure function of (seed, index), drawn on the CPU in float64.
"""
from __future__ import annotations

import math

import torch

from ..transfer import Parcel
from .keyed import uniforms

STREAM = 300
ATTEMPTS = 10


def erase_boxes(seed: int, indices: torch.Tensor, h: int, w: int, p: float, area: tuple[float, float],
                ratio: tuple[float, float]) -> torch.Tensor:
    """(B, 4) int64 (top, bottom, left, right) of each sample's erased box, bottom/right exclusive; empty where the
    sample is not erased."""
    idx = indices.detach().to("cpu", torch.int64)
    u = uniforms(seed, idx, STREAM, 1 + 4 * ATTEMPTS)
    erased = u[:, 0] < p
    box = torch.zeros(len(idx), 4, dtype=torch.int64)
    found = ~erased
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    for k in range(ATTEMPTS):
        target = h * w * (area[0] + (area[1] - area[0]) * u[:, 1 + 4 * k])
        aspect = torch.exp(log_r0 + (log_r1 - log_r0) * u[:, 2 + 4 * k])
        bh = torch.round(torch.sqrt(target * aspect)).long()
        bw = torch.round(torch.sqrt(target / aspect)).long()
        ok = (bw < w) & (bh < h) & ~found
        top = (u[:, 3 + 4 * k] * (h - bh + 1)).long()
        left = (u[:, 4 + 4 * k] * (w - bw + 1)).long()
        box = torch.where(ok[:, None], torch.stack([top, top + bh, left, left + bw], 1), box)
        found |= ok
    return box


def box_mask(boxes: torch.Tensor, h: int, w: int, device) -> torch.Tensor:
    """(B, 1, h, w) bool: inside each sample's box (top, bottom, left, right; on `device`), bottom/right exclusive."""
    rows = torch.arange(h, device=device)[None, :]
    cols = torch.arange(w, device=device)[None, :]
    in_rows = (rows >= boxes[:, :1]) & (rows < boxes[:, 1:2])
    in_cols = (cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4])
    return in_rows[:, None, :, None] & in_cols[:, None, None, :]


def plan_erase(parcel: Parcel, boxes: torch.Tensor):
    """Each sample's box (boxes: (B, 4) on the host) added to the parcel; returns the function that zeroes them in
    normalized views (B, C, H, W)."""
    handle = parcel.add(boxes)
    return lambda images: images.masked_fill(box_mask(parcel[handle], *images.shape[-2:], images.device), 0.0)


def erase(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Zero each sample's box (boxes: (B, 4) on the host) in normalized views (B, C, H, W)."""
    parcel = Parcel(images.device)
    run = plan_erase(parcel, boxes)
    parcel.send()
    return run(images)
