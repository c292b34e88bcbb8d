"""RandAugment and TrivialAugmentWide keyed per sample, batch-wise, with torchvision's ops and magnitudes.

torchvision's semantics (transforms.v2.RandAugment / TrivialAugmentWide), not timm's ``rand-m9-mstd0.5-inc1``:
its 14 ops, 31 magnitude bins, a random sign for the signed ops, nearest interpolation and a black fill. Every
per-sample choice (each op slot's op, sign and, for TrivialAugment, magnitude bin) is a pure function of
(augmentation seed, sample index) drawn from the keyed hash on the CPU, so it is the same on every device. A
sample's parameters then lie on a finite grid (op, bin, sign), and the pixels are computed by calling
torchvision.transforms.v2.functional once per group of samples that share them: the library's own kernels,
fed kdfast's parameters; no per-sample Python, and a group's images are transformed independently of each
other, so a view does not depend on who else is in the batch.
"""
from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF

from .keyed import uniforms

BINS = 31  # torchvision's num_magnitude_bins
STREAM = 100  # the policy's keyed streams: STREAM + 3 * slot + (op, sign, magnitude)

# name -> (magnitudes over the bins for an image of (h, w), or None; signed)
_RAND = {
    "Identity": (None, False),
    "ShearX": (lambda h, w: torch.linspace(0.0, 0.3, BINS), True),
    "ShearY": (lambda h, w: torch.linspace(0.0, 0.3, BINS), True),
    "TranslateX": (lambda h, w: torch.linspace(0.0, 150.0 / 331.0 * w, BINS), True),
    "TranslateY": (lambda h, w: torch.linspace(0.0, 150.0 / 331.0 * h, BINS), True),
    "Rotate": (lambda h, w: torch.linspace(0.0, 30.0, BINS), True),
    "Brightness": (lambda h, w: torch.linspace(0.0, 0.9, BINS), True),
    "Color": (lambda h, w: torch.linspace(0.0, 0.9, BINS), True),
    "Contrast": (lambda h, w: torch.linspace(0.0, 0.9, BINS), True),
    "Sharpness": (lambda h, w: torch.linspace(0.0, 0.9, BINS), True),
    "Posterize": (lambda h, w: (8 - (torch.arange(BINS) / ((BINS - 1) / 4))).round().int(), False),
    "Solarize": (lambda h, w: torch.linspace(1.0, 0.0, BINS), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
}
_WIDE = {
    **_RAND,
    "ShearX": (lambda h, w: torch.linspace(0.0, 0.99, BINS), True),
    "ShearY": (lambda h, w: torch.linspace(0.0, 0.99, BINS), True),
    "TranslateX": (lambda h, w: torch.linspace(0.0, 32.0, BINS), True),
    "TranslateY": (lambda h, w: torch.linspace(0.0, 32.0, BINS), True),
    "Rotate": (lambda h, w: torch.linspace(0.0, 135.0, BINS), True),
    "Brightness": (lambda h, w: torch.linspace(0.0, 0.99, BINS), True),
    "Color": (lambda h, w: torch.linspace(0.0, 0.99, BINS), True),
    "Contrast": (lambda h, w: torch.linspace(0.0, 0.99, BINS), True),
    "Sharpness": (lambda h, w: torch.linspace(0.0, 0.99, BINS), True),
    "Posterize": (lambda h, w: (8 - (torch.arange(BINS) / ((BINS - 1) / 6))).round().int(), False),
}
SPACES = {"randaugment": _RAND, "trivialaugment": _WIDE}
OPS = tuple(_RAND)  # the same 14 ops, in torchvision's order, in both spaces
_FREE = torch.tensor([_RAND[o][0] is None for o in OPS])
_SIGNED = torch.tensor([_RAND[o][1] for o in OPS])


def apply_op(images: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """One op on uint8 images (G, C, H, W), exactly as torchvision's RandAugment applies it (fill None)."""
    if op == "Identity":
        return images
    if op in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return TF.affine(images, angle=0.0, translate=[0, 0], scale=1.0, center=[0, 0],
                         shear=[shear, 0.0] if op == "ShearX" else [0.0, shear],
                         interpolation=TF.InterpolationMode.NEAREST, fill=None)
    if op in ("TranslateX", "TranslateY"):
        shift = int(magnitude)
        return TF.affine(images, angle=0.0, translate=[shift, 0] if op == "TranslateX" else [0, shift], scale=1.0,
                         shear=[0.0, 0.0], interpolation=TF.InterpolationMode.NEAREST, fill=None)
    if op == "Rotate":
        return TF.rotate(images, angle=magnitude, interpolation=TF.InterpolationMode.NEAREST, fill=None)
    if op == "Brightness":
        return TF.adjust_brightness(images, 1.0 + magnitude)
    if op == "Color":
        return TF.adjust_saturation(images, 1.0 + magnitude)
    if op == "Contrast":
        return TF.adjust_contrast(images, 1.0 + magnitude)
    if op == "Sharpness":
        return TF.adjust_sharpness(images, 1.0 + magnitude)
    if op == "Posterize":
        return TF.posterize(images, bits=int(magnitude))
    if op == "Solarize":
        return TF.solarize(images, threshold=255.0 * magnitude)
    if op == "AutoContrast":
        return TF.autocontrast(images)
    if op == "Equalize":
        return TF.equalize(images)
    raise ValueError(f"unknown op {op}")


def magnitude_of(space: dict, op: str, level: int, negative: bool, h: int, w: int) -> float:
    """The magnitude torchvision uses for op at bin `level` (0..30), negated for a signed op drawn negative."""
    table, signed = space[op]
    if table is None:
        return 0.0
    m = float(table(h, w)[level])
    return -m if signed and negative else m


def policy_params(seed: int, indices: torch.Tensor, policy: str, ops: int, magnitude: int):
    """Per sample and op slot: (op index (B, S), bin (B, S), negative (B, S)), int64/bool on the CPU.

    randaugment: `ops` slots at the fixed bin `magnitude`; trivialaugment: one slot at a uniform bin.
    """
    idx = indices.detach().to("cpu", torch.int64)
    slots = ops if policy == "randaugment" else 1
    u = uniforms(seed, idx, STREAM, 3 * slots).view(-1, slots, 3)
    op = (u[..., 0] * len(OPS)).long()
    negative = u[..., 1] < 0.5
    drawn = (u[..., 2] * BINS).long()
    level = drawn if policy == "trivialaugment" else torch.full_like(drawn, magnitude)
    return op, level, negative


def apply_policy(images_u8: torch.Tensor, indices: torch.Tensor, seed: int, policy: str, ops: int = 2,
                 magnitude: int = 9) -> torch.Tensor:
    """The policy's ops on uint8 views (B, C, H, W) of the samples `indices` under seed `seed`; uint8 out.

    Each op slot groups the batch by (op, bin, sign) and runs torchvision's kernel once per group.
    """
    if policy == "none" or len(images_u8) == 0:
        return images_u8
    space = SPACES[policy]
    h, w = images_u8.shape[-2:]
    op, level, negative = policy_params(seed, indices, policy, ops, magnitude)
    out = images_u8
    for s in range(op.shape[1]):
        o = op[:, s]
        free, signed = _FREE[o], _SIGNED[o]  # magnitude-free ops: one group whatever the bin and sign
        key = (o * BINS + torch.where(free, 0, level[:, s])) * 2 + (negative[:, s] & signed).long()
        groups = torch.unique(key)
        if len(groups) == 1 and OPS[int(groups[0]) // (2 * BINS)] == "Identity":
            continue
        result = out.clone()
        for g in groups.tolist():
            name = OPS[g // (2 * BINS)]
            if name == "Identity":
                continue
            members = (key == g).nonzero().squeeze(1).to(out.device)
            m = magnitude_of(space, name, (g // 2) % BINS, bool(g & 1), h, w)
            result[members] = apply_op(out[members], name, m)
        out = result
    return out
