"""RandAugment and TrivialAugmentWide keyed per sample, batch-wise, with torchvision's ops and magnitudes.

torchvision's semantics (transforms.v2.RandAugment / TrivialAugmentWide), not timm's ``rand-m9-mstd0.5-inc1``:
its 14 ops, 31 magnitude bins, a random sign for the signed ops, nearest interpolation and a black fill. Every
per-sample choice (each op slot's op, sign and, for TrivialAugment, magnitude bin) is a pure function of
(augmentation seed, sample index) drawn from the keyed hash on the CPU, so it is the same on every device.

The batch is grouped by op, one call per op present: the ops without a magnitude (AutoContrast, Equalize) are
torchvision.transforms.v2.functional's own batched kernels; the others take one magnitude per sample, which
torchvision's functions do not, so they run torchvision's formulas with a per-sample factor (the blends of
Brightness, Color, Contrast and Sharpness, Posterize's mask, Solarize's threshold) or its affine matrices
(torchvision's `_get_inverse_affine_matrix` and grid, one grid_sample for the batch). Every op is tested equal,
pixel for pixel, to torchvision's function called on each image alone (`apply_op`, the reference).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms.v2.functional._color import _rgb_to_grayscale_image
from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix

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


GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def inverse_matrix(op: str, magnitude: float, h: int, w: int) -> list[float] | None:
    """The inverse affine matrix torchvision's affine / rotate compute for this op (None: rotate's exact fast paths
    for multiples of 90 degrees, which it does by transposition)."""
    if op in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return _get_inverse_affine_matrix([-w * 0.5, -h * 0.5], 0.0, [0.0, 0.0], 1.0,
                                          [shear, 0.0] if op == "ShearX" else [0.0, shear])
    if op in ("TranslateX", "TranslateY"):
        shift = float(int(magnitude))
        return _get_inverse_affine_matrix([0.0, 0.0], 0.0, [shift, 0.0] if op == "TranslateX" else [0.0, shift], 1.0,
                                          [0.0, 0.0])
    angle = magnitude % 360
    if angle in (0, 90, 180, 270):
        return None
    return _get_inverse_affine_matrix([0.0, 0.0], -angle, [0.0, 0.0], 1.0, [0.0, 0.0])


def _affine_batch(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """torchvision's _affine_grid + _apply_grid_transform (nearest, no fill) with one matrix (G, 6) per image."""
    G, _, h, w = images.shape
    dev = images.device
    base = torch.empty(1, h, w, 3, device=dev)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=dev))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=dev).unsqueeze_(-1))
    base[..., 2].fill_(1)
    theta = matrices.to(dev, torch.float32).reshape(G, 2, 3)
    rescaled = theta.transpose(1, 2).div(torch.tensor([0.5 * w, 0.5 * h], device=dev))
    grid = base.view(1, h * w, 3).expand(G, -1, -1).bmm(rescaled).view(G, h, w, 2)
    out = F.grid_sample(images.to(torch.float32), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(images.dtype)


def _blend_batch(images: torch.Tensor, op: str, magnitudes: torch.Tensor) -> torch.Tensor:
    """Brightness, Color, Contrast, Sharpness with factor 1 + m per image: torchvision's _blend (x·r + y·(1 − r),
    fused as torchvision's add with alpha), r and 1 − r rounded to float32 from float64 as torchvision's are."""
    dev = images.device
    r = (1.0 + magnitudes).to(torch.float32).to(dev).view(-1, 1, 1, 1)
    rest = (1.0 - (1.0 + magnitudes)).to(torch.float32).to(dev).view(-1, 1, 1, 1)
    if op == "Brightness":
        return images.mul(r).clamp_(0, 255).to(images.dtype)
    if op == "Sharpness":
        out = images.to(torch.float32, copy=True)
        a, b = 1.0 / 13.0, 5.0 / 13.0
        kernel = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], device=dev).expand(images.shape[1], 1, 3, 3)
        blurred = F.conv2d(out, kernel, groups=images.shape[1]).round_()
        view = out[..., 1:-1, 1:-1]
        view.addcmul_(blurred.sub_(view), rest)
        return out.clamp_(0, 255).to(images.dtype)
    gray = _rgb_to_grayscale_image(images, num_output_channels=1, preserve_dtype=False).floor_()
    if op == "Contrast":
        gray = gray.mean(dim=(-3, -2, -1), keepdim=True)
    return torch.addcmul(images.mul(r), gray, rest).clamp_(0, 255).to(images.dtype)


def apply_op_batch(images: torch.Tensor, op: str, magnitudes: torch.Tensor) -> torch.Tensor:
    """One op on uint8 images (G, C, H, W) with one magnitude per image (float64 (G,), CPU): equal to apply_op on
    each image with its magnitude."""
    if op == "Identity":
        return images
    if op in ("AutoContrast", "Equalize"):
        return apply_op(images, op, 0.0)
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return _blend_batch(images, op, magnitudes)
    dev = images.device
    if op == "Posterize":
        bits = magnitudes.long()
        masks = torch.where(bits >= 8, 255, ((1 << bits) - 1) << (8 - bits)).to(torch.uint8)
        return images & masks.to(dev).view(-1, 1, 1, 1)
    if op == "Solarize":
        threshold = (255.0 * magnitudes).to(torch.float32).to(dev).view(-1, 1, 1, 1)
        return torch.where(images >= threshold, 255 - images, images)
    h, w = images.shape[-2:]
    values, inverse = torch.unique(magnitudes, return_inverse=True)
    matrices = [inverse_matrix(op, v, h, w) for v in values.tolist()]
    fast = torch.tensor([m is None for m in matrices])
    out = images.clone()
    general = (~fast[inverse]).nonzero().squeeze(1)
    if len(general):
        table = torch.tensor([m or [0.0] * 6 for m in matrices], dtype=torch.float64)
        out[general.to(dev)] = _affine_batch(images[general.to(dev)], table[inverse[general]])
    for k in fast.nonzero().squeeze(1).tolist():  # rotations by multiples of 90 degrees: torchvision's transposes
        members = (inverse == k).nonzero().squeeze(1).to(dev)
        out[members] = apply_op(images[members], op, float(values[k]))
    return out


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


def magnitudes_of(space: dict, op: str, level: torch.Tensor, negative: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """magnitude_of for many samples of one op at once: float64 (G,) on the CPU."""
    table, signed = space[op]
    if table is None:
        return torch.zeros(len(level), dtype=torch.float64)
    m = table(h, w).to(torch.float64)[level]  # torchvision's float(magnitudes[bin])
    return torch.where(negative, -m, m) if signed else m


def apply_policy(images_u8: torch.Tensor, indices: torch.Tensor, seed: int, policy: str, ops: int = 2,
                 magnitude: int = 9) -> torch.Tensor:
    """The policy's ops on uint8 views (B, C, H, W) of the samples `indices` under seed `seed`; uint8 out.

    Each op slot groups the batch by op and transforms each group with one magnitude per sample.
    """
    if policy == "none" or len(images_u8) == 0:
        return images_u8
    space = SPACES[policy]
    h, w = images_u8.shape[-2:]
    op, level, negative = policy_params(seed, indices, policy, ops, magnitude)
    out = images_u8
    for s in range(op.shape[1]):
        present = torch.unique(op[:, s]).tolist()
        if present == [0]:  # Identity for all
            continue
        result = out.clone()
        for o in present:
            name = OPS[o]
            if name == "Identity":
                continue
            members = (op[:, s] == o).nonzero().squeeze(1)
            m = magnitudes_of(space, name, level[members, s], negative[members, s], h, w)
            on_device = members.to(out.device)
            result[on_device] = apply_op_batch(out[on_device], name, m)
        out = result
    return out
