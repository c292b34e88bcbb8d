"""The 14 ops of torchvision's RandAugment on uint8 batches, with one magnitude per image.

`apply_op` is the reference: torchvision.transforms.v2.functional called as torchvision's RandAugment calls it,
one magnitude per call. `apply_op_batch` takes one magnitude per image, which torchvision's functions do not: the
ops without a magnitude (AutoContrast, Equalize) are torchvision's own batched kernels; the others run
torchvision's formulas with a per-image factor (the blends of Brightness, Color, Contrast and Sharpness,
Posterize's mask, Solarize's threshold) or its affine matrices (torchvision's `_get_inverse_affine_matrix` and
sampling grid, one grid_sample for the group). Tested equal, pixel for pixel, to `apply_op` on each image alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms.v2.functional._color import _rgb_to_grayscale_image
from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix

from ..transfer import Parcel


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


def _affine_batch(images: torch.Tensor, rescaled: torch.Tensor) -> torch.Tensor:
    """torchvision's _affine_grid + _apply_grid_transform (nearest, no fill) with one matrix per image, given as
    torchvision's rescaled theta (G, 3, 2) on the device."""
    G, _, h, w = images.shape
    dev = images.device
    base = torch.empty(1, h, w, 3, device=dev)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=dev))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=dev).unsqueeze_(-1))
    base[..., 2].fill_(1)
    grid = base.view(1, h * w, 3).expand(G, -1, -1).bmm(rescaled).view(G, h, w, 2)
    out = F.grid_sample(images.to(torch.float32), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(images.dtype)


def _autocontrast(images: torch.Tensor) -> torch.Tensor:
    """torchvision's autocontrast_image on uint8 images, with torch.where where it assigns through a boolean mask
    (a mask index makes a GPU wait): the same pixels."""
    x = images.to(torch.float32)
    minimum = x.amin(dim=(-2, -1), keepdim=True)
    maximum = x.amax(dim=(-2, -1), keepdim=True)
    flat = maximum == minimum
    inv_scale = torch.where(flat, 1.0, maximum.sub_(minimum).mul_(1.0 / 255))
    return x.sub_(torch.where(flat, 0.0, minimum)).div_(inv_scale).clamp_(0, 255).to(images.dtype)


def _blend_batch(images: torch.Tensor, op: str, r: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """Brightness, Color, Contrast, Sharpness with factor r = 1 + m per image (float32 (G, 1, 1, 1) on the device,
    rest = 1 - r): torchvision's _blend (x·r + y·(1 − r), fused as torchvision's add with alpha)."""
    if op == "Brightness":
        return images.mul(r).clamp_(0, 255).to(images.dtype)
    if op == "Sharpness":
        out = images.to(torch.float32, copy=True)
        # the blur in float64: each sum is k/13, at least 1/26 from a rounding tie, so rounding gives torchvision's
        # float32 result on any device (a GPU's float32 convolution may run in TF32, 10 bits: not close enough)
        kernel = torch.full((images.shape[1], 1, 3, 3), 1.0 / 13.0, dtype=torch.float64, device=images.device)
        kernel[:, :, 1, 1] = 5.0 / 13.0
        blurred = F.conv2d(out.double(), kernel, groups=images.shape[1]).round_().float()
        view = out[..., 1:-1, 1:-1]
        view.addcmul_(blurred.sub_(view), rest)
        return out.clamp_(0, 255).to(images.dtype)
    gray = _rgb_to_grayscale_image(images, num_output_channels=1, preserve_dtype=False).floor_()
    if op == "Contrast":
        gray = gray.mean(dim=(-3, -2, -1), keepdim=True)
    return torch.addcmul(images.mul(r), gray, rest).clamp_(0, 255).to(images.dtype)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float32).view(-1, 1, 1, 1)


def plan_op_batch(op: str, magnitudes: torch.Tensor, h: int, w: int, parcel: Parcel) -> dict:
    """The host's part of one op on a group of images of size (h, w), one magnitude each (float64 (G,), CPU): what
    the device needs, added to the parcel (name -> handle; "fast": the rotations by multiples of 90 degrees)."""
    if op in ("Identity", "AutoContrast", "Equalize"):
        return {}
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):  # r and 1 - r rounded to float32 as torchvision's
        return {"r": parcel.add(_per_image(1.0 + magnitudes)), "rest": parcel.add(_per_image(1.0 - (1.0 + magnitudes)))}
    if op == "Posterize":
        bits = magnitudes.long()
        masks = torch.where(bits >= 8, 255, ((1 << bits) - 1) << (8 - bits)).to(torch.uint8)
        return {"masks": parcel.add(masks.view(-1, 1, 1, 1))}
    if op == "Solarize":
        return {"threshold": parcel.add(_per_image(255.0 * magnitudes))}
    values, inverse = torch.unique(magnitudes, return_inverse=True)
    matrices = [inverse_matrix(op, v, h, w) for v in values.tolist()]
    fast = torch.tensor([m is None for m in matrices])
    general = (~fast[inverse]).nonzero().squeeze(1)
    table = torch.tensor([m or [0.0] * 6 for m in matrices], dtype=torch.float64)
    theta = table[inverse[general]].to(torch.float32).reshape(-1, 2, 3)
    rescaled = theta.transpose(1, 2).div(torch.tensor([0.5 * w, 0.5 * h]))  # torchvision's, on the host
    plan = {"general": parcel.add(general), "rescaled": parcel.add(rescaled), "fast": []}
    for k in fast.nonzero().squeeze(1).tolist():  # rotations by multiples of 90 degrees: torchvision's transposes
        plan["fast"].append((parcel.add((inverse == k).nonzero().squeeze(1)), float(values[k])))
    return plan


def run_op_batch(images: torch.Tensor, op: str, plan: dict, parcel: Parcel) -> torch.Tensor:
    """The device's part: the op on uint8 images (G, C, H, W) with what plan_op_batch sent."""
    if op == "Identity":
        return images
    if op == "AutoContrast":
        return _autocontrast(images)
    if op == "Equalize":
        return apply_op(images, op, 0.0)
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return _blend_batch(images, op, parcel[plan["r"]], parcel[plan["rest"]])
    if op == "Posterize":
        return images & parcel[plan["masks"]]
    if op == "Solarize":
        return torch.where(images >= parcel[plan["threshold"]], 255 - images, images)
    out = images.clone()
    general = parcel[plan["general"]]
    if len(parcel.host[plan["general"]]):  # the host's copy: no sync
        out[general] = _affine_batch(images[general], parcel[plan["rescaled"]])
    for members, angle in plan["fast"]:
        out[parcel[members]] = apply_op(images[parcel[members]], op, angle)
    return out


def apply_op_batch(images: torch.Tensor, op: str, magnitudes: torch.Tensor) -> torch.Tensor:
    """One op on uint8 images (G, C, H, W) with one magnitude per image (float64 (G,), CPU): equal to apply_op on
    each image with its magnitude. (apply_policy plans every op of a batch first, then sends them in one copy.)"""
    parcel = Parcel(images.device)
    plan = plan_op_batch(op, magnitudes, *images.shape[-2:], parcel)
    return run_op_batch(images, op, plan, parcel.send())
