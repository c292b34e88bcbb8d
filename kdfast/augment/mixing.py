"""Mixup and CutMix keyed per sample: the partner, λ and the CutMix box are pure functions of (seed, index).

A sample's mixing partner is drawn by the hash from the whole training set (not from the batch), so sample i's
mixed view and its label weights are the same whatever the batch size, batch composition, device or number of
processes. Per sample, as timm's Mixup in its "elem" mode: with probability `mix_prob` the sample is mixed;
CutMix is chosen with probability `switch_prob` when both are on; λ ~ Beta(α, α); the CutMix box is timm's
(sides sqrt(1 − λ) of the image's, centered at a uniform point, clipped) and λ is then corrected to the area
that stayed, so the partner's label weight is exactly the pasted area. The parameters are drawn on the CPU in
float64; the pixels are mixed on the device, on the normalized views.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .erasing import box_mask
from .keyed import uniforms

STREAM = 200  # the mixing's keyed streams
GAMMA_TRIES = 16  # Marsaglia-Tsang accepts with probability > 0.95 per try: 16 tries fail ~1e-21 of the time


@dataclass
class MixParams:
    partner: torch.Tensor  # (B,) int64: index of each sample's partner in the training set
    lam: torch.Tensor  # (B,) float64: weight of the sample's own image and label (1: not mixed)
    cut: torch.Tensor  # (B,) bool: CutMix (else mixup, where lam < 1)
    box: torch.Tensor  # (B, 4) int64: CutMix (top, bottom, left, right), bottom/right exclusive

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.partner, self.lam, self.cut, self.box


def keyed_gamma(seed: int, idx: torch.Tensor, stream: int, a: float) -> torch.Tensor:
    """Gamma(a, 1) samples per index (float64, CPU): Marsaglia and Tsang's method on keyed uniforms, with the
    a < 1 boost Gamma(a) = Gamma(a + 1) * U^(1/a)."""
    a1 = a + 1.0 if a < 1 else a
    d = a1 - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    u = uniforms(seed, idx, stream, 3 * GAMMA_TRIES + 1)
    u1, u2, u3 = u[:, 0:-1:3], u[:, 1:-1:3], u[:, 2:-1:3]  # (B, tries) each
    x = torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * math.pi * u2)  # standard normals
    v = (1.0 + c * x) ** 3
    ok = (v > 0) & (torch.log1p(-u3) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp(min=1e-300)))
    first = ok.to(torch.uint8).argmax(1)  # the first accepted try (all rejected: d, about 1e-21 of the time)
    result = torch.where(ok.any(1), d * v.gather(1, first[:, None]).squeeze(1), torch.full_like(u1[:, 0], d))
    if a < 1:
        result = result * (1.0 - u[:, -1]) ** (1.0 / a)
    return result


def keyed_beta(seed: int, idx: torch.Tensor, stream: int, alpha: float) -> torch.Tensor:
    """Beta(alpha, alpha) per index, float64 on the CPU."""
    x = keyed_gamma(seed, idx, stream, alpha)
    y = keyed_gamma(seed, idx, stream + 100, alpha)
    return x / (x + y)


def mix_params(seed: int, indices: torch.Tensor, n: int, h: int, w: int, mixup: float, cutmix: float,
               mix_prob: float = 1.0, switch_prob: float = 0.5) -> MixParams:
    """Each sample's partner (uniform over the n training samples), λ and CutMix box, for views of h x w."""
    idx = indices.detach().to("cpu", torch.int64)
    u = uniforms(seed, idx, STREAM, 5)
    partner = (u[:, 0] * n).long().clamp(max=n - 1)
    mixed = u[:, 1] < mix_prob
    cut = u[:, 2] < switch_prob if cutmix > 0 and mixup > 0 else torch.full((len(idx),), cutmix > 0)
    cut &= mixed
    lam_mix = keyed_beta(seed, idx, STREAM + 10, mixup) if mixup > 0 else torch.ones(len(idx), dtype=torch.float64)
    lam_cut = keyed_beta(seed, idx, STREAM + 500, cutmix) if cutmix > 0 else torch.ones(len(idx), dtype=torch.float64)
    ratio = torch.sqrt(1.0 - lam_cut)
    cut_h, cut_w = torch.floor(h * ratio).long(), torch.floor(w * ratio).long()
    cy = (u[:, 3] * h).long().clamp(max=h - 1)
    cx = (u[:, 4] * w).long().clamp(max=w - 1)
    top, bottom = (cy - cut_h // 2).clamp(0, h), (cy + cut_h // 2).clamp(0, h)
    left, right = (cx - cut_w // 2).clamp(0, w), (cx + cut_w // 2).clamp(0, w)
    area = (bottom - top) * (right - left)
    lam_cut = 1.0 - area.double() / (h * w)
    lam = torch.where(cut, lam_cut, torch.where(mixed, lam_mix, torch.ones_like(lam_mix)))
    box = torch.stack([top, bottom, left, right], 1) * cut[:, None]  # an empty box where not CutMix
    return MixParams(partner, lam, cut, box)


def mix(images: torch.Tensor, partners: torch.Tensor, params: MixParams) -> torch.Tensor:
    """Mix float views (B, C, H, W) with their partners' views: CutMix pastes the partner's box, mixup blends
    λ·own + (1 − λ)·partner's; unmixed samples (λ = 1) come out unchanged. params: on the images' device."""
    lam = params.lam.to(torch.float32).view(-1, 1, 1, 1)
    rest = (1.0 - params.lam).to(torch.float32).view(-1, 1, 1, 1)
    pasted = box_mask(params.box, *images.shape[-2:], images.device)
    blended = images * lam + partners * rest
    cut = params.cut.view(-1, 1, 1, 1)
    return torch.where(cut, torch.where(pasted, partners, images), blended)
