"""RandAugment and TrivialAugmentWide keyed per sample, batch-wise, with torchvision's ops and magnitudes.

torchvision's semantics (transforms.v2.RandAugment / TrivialAugmentWide), not timm's ``rand-m9-mstd0.5-inc1``:
its 14 ops, 31 magnitude bins, a random sign for the signed ops, nearest interpolation and a black fill. Every
per-sample choice (each op slot's op, sign and, for TrivialAugment, magnitude bin) is a pure function of
(augmentation seed, sample index) drawn from the keyed hash on the CPU, so it is the same on every device. Each
op slot groups the batch by op and runs the op once on its group with a magnitude per sample (ops.py).
"""
from __future__ import annotations

import torch

from .keyed import uniforms
from ..transfer import Parcel
from .ops import plan_op_batch, run_op_batch

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


def magnitudes_of(space: dict, op: str, level: torch.Tensor, negative: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The magnitudes torchvision uses for op at bins `level` (0..30), negated for a signed op drawn negative:
    float64 (G,) on the CPU."""
    table, signed = space[op]
    if table is None:
        return torch.zeros(len(level), dtype=torch.float64)
    m = table(h, w).to(torch.float64)[level]  # torchvision's float(magnitudes[bin])
    return torch.where(negative, -m, m) if signed else m


def plan_policy(parcel: Parcel, indices: torch.Tensor, seed: int, policy: str, ops: int, magnitude: int, h: int,
                w: int):
    """The policy's draws for the samples `indices` (host) on views of size (h, w): each op slot's groups and their
    op inputs, added to the parcel; returns the function of the uint8 views (B, C, h, w) that applies them."""
    if policy == "none" or len(indices) == 0:
        return lambda views: views
    space = SPACES[policy]
    op, level, negative = policy_params(seed, indices, policy, ops, magnitude)
    slots = []
    for s in range(op.shape[1]):
        groups = []
        for o in torch.unique(op[:, s]).tolist():
            name = OPS[o]
            if name == "Identity":
                continue
            members = (op[:, s] == o).nonzero().squeeze(1)
            m = magnitudes_of(space, name, level[members, s], negative[members, s], h, w)
            groups.append((name, parcel.add(members), plan_op_batch(name, m, h, w, parcel)))
        slots.append(groups)

    def run(views: torch.Tensor) -> torch.Tensor:
        out = views
        for groups in slots:
            if not groups:  # Identity for all
                continue
            result = out.clone()
            for name, members, plan in groups:
                on_device = parcel[members]
                result[on_device] = run_op_batch(out[on_device], name, plan, parcel)
            out = result
        return out

    return run


def apply_policy(images_u8: torch.Tensor, indices: torch.Tensor, seed: int, policy: str, ops: int = 2,
                 magnitude: int = 9) -> torch.Tensor:
    """The policy's ops on uint8 views (B, C, H, W) of the samples `indices` under seed `seed`; uint8 out.

    Each op slot groups the batch by op and transforms each group with one magnitude per sample; the host plans
    every slot first and sends it all in one copy."""
    parcel = Parcel(images_u8.device)
    run = plan_policy(parcel, indices, seed, policy, ops, magnitude, *images_u8.shape[-2:])
    parcel.send()
    return run(images_u8)
