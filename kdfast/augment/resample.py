"""Crop-and-resize of a box per sample, exactly as Pillow computes it: on the CPU by Pillow itself, one image at a
time (its C code is several times faster than tensor gathers there), batch-wise in torch on a GPU.

The torch path is Pillow's algorithm (libImaging/Resample.c, crop then resize): per output pixel the weights of the
filter (bilinear: the triangle; bicubic: Keys' cubic with a = -0.5, support 2), widened by the scale factor when
downscaling (its antialiasing), normalized and quantized to 22 fractional bits (rounded away from zero); two passes (horizontal first unless the height shrinks by more than twice the width), each accumulated in integers from a half
and clipped to 0..255, in Pillow's order of the passes. Integer arithmetic is exact, so the result does not depend on summation order, batch size,
batch composition or device, and equals Pillow's `img.crop(box).resize(size, Image.BILINEAR)` pixel for pixel
(torchvision's RandomResizedCrop on a PIL image), and `Image.BICUBIC` likewise, which the tests check.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..transfer import Parcel

PRECISION_BITS = 32 - 8 - 2  # Pillow's, for 8-bit images
INTERPOLATIONS = ("bilinear", "bicubic")
CPU_BACKEND = "pillow"  # what crop_resize runs on a CPU (faster there; the same pixels as "torch", a GPU's)


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp(min=0.0)


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    a, x = -0.5, x.abs()  # Pillow's bicubic_filter
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0)}  # (filter, support)


def _coefficients(in_size: torch.Tensor, out: int, interpolation: str = "bilinear"):
    """Pillow's precompute_coeffs for boxes [0, in_size) (B,) -> out: first input pixel (B, out) int64, count of
    taps (B, out) int64 and integer weights (B, out, K) int32, K the widest filter of the batch."""
    kernel, kernel_support = FILTERS[interpolation]
    size = in_size.to(torch.float64)
    scale = size / out  # (B,)
    filterscale = scale.clamp(min=1.0)
    support = kernel_support * filterscale  # the filter's support, widened by the filter scale
    ksize = int(math.ceil(float(support.max()))) * 2 + 1
    center = (torch.arange(out, dtype=torch.float64) + 0.5)[None, :] * scale[:, None]  # (B, out)
    xmin = torch.trunc(center - support[:, None] + 0.5).clamp(min=0)  # C's (int) truncates toward zero
    xmax = torch.minimum(torch.trunc(center + support[:, None] + 0.5), size[:, None]) - xmin
    x = torch.arange(ksize, dtype=torch.float64)
    arg = ((x[None, None, :] + xmin[:, :, None] - center[:, :, None] + 0.5) * (1.0 / filterscale)[:, None, None])
    w = kernel(arg)
    w = torch.where(x[None, None, :] < xmax[:, :, None], w, torch.zeros_like(w))
    total = w.sum(-1, keepdim=True)
    w = torch.where(total != 0, w / total, w)
    q = torch.trunc(w * (1 << PRECISION_BITS) + torch.where(w < 0, -0.5, 0.5))  # Pillow's (int)(±0.5 + w * 2^22)
    return xmin.long(), xmax.long(), q.to(torch.int32)


def _pass(x: torch.Tensor, offset: torch.Tensor, first: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Resample the last dim of x (B, C, R, W) uint8 for boxes starting at `offset` (B,): -> (B, C, R, out) uint8.
    One gather and integer multiply-add per filter tap, for the whole batch."""
    B, C, R, W = x.shape
    out = first.shape[1]
    acc = torch.full((B, C, R, out), 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=x.device)
    for k in range(weights.shape[-1]):
        pos = (offset[:, None] + first + k).clamp_(0, W - 1)  # (B, out); zero weight beyond the filter's taps
        picked = x.gather(3, pos[:, None, None, :].expand(B, C, R, out)).to(torch.int32)
        acc += picked * weights[:, None, None, :, k]
    return (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def _plan_torch(top, left, height, width, out_h: int, out_w: int, flip, interpolation: str, parcel: Parcel):
    """The host's part of the torch resize (both pass orders' groups and filter tables, added to the parcel); returns
    the device's part: images (B, C, H, W) uint8 -> (B, C, out_h, out_w) uint8, once the parcel is sent."""
    # Pillow's pass order: vertical first when the height shrinks by more than twice what the width does
    horizontal_first = ~(((height - out_h) > 0) & ((height - out_h) > (width - out_w) * 2))
    passes = []
    for order in (True, False):
        group = torch.nonzero(horizontal_first == order).flatten()
        if len(group) == 0:
            continue
        t, l, h, w = top[group], left[group], height[group], width[group]
        cols, rows = _coefficients(w, out_w, interpolation), _coefficients(h, out_h, interpolation)
        crop = (int((t + h).max()), int((l + w).max()))
        passes.append((order, crop, [parcel.add(x) for x in (group, t, l, cols[0], cols[2], rows[0], rows[2])]))
    flipped = None if flip is None else parcel.add(flip)

    def run(images_u8: torch.Tensor) -> torch.Tensor:
        B, C = images_u8.shape[:2]
        out = torch.empty(B, C, out_h, out_w, dtype=torch.uint8, device=images_u8.device)
        for order, (bottom, right), handles in passes:
            group, t, l, col_first, col_weights, row_first, row_weights = (parcel[k] for k in handles)
            x = images_u8[group][:, :, :bottom, :right]
            if order:  # horizontal (B, C, H, out_w), then vertical on the transposed rows
                y = _pass(x, l, col_first, col_weights)
                z = _pass(y.transpose(2, 3).contiguous(), t, row_first, row_weights).transpose(2, 3)
            else:  # vertical (B, C, out_h, W), then horizontal
                y = _pass(x.transpose(2, 3).contiguous(), t, row_first, row_weights).transpose(2, 3).contiguous()
                z = _pass(y, l, col_first, col_weights)
            out[group] = z
        if flipped is not None:
            out = torch.where(parcel[flipped][:, None, None, None], out.flip(-1), out)
        return out

    return run


def _threads(n: int) -> int:
    """Threads for a batch of Pillow calls (Pillow releases the GIL while it resizes): torch's count, none in a
    DataLoader worker (torch sets 1 there) or for small batches."""
    return min(torch.get_num_threads(), max(1, n // 8))


def _map(fn, n: int):
    threads = _threads(n)
    if threads <= 1:
        return [fn(i) for i in range(n)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, range(n)))


def pillow_crop_resize(images: list, top, left, height, width, out_h: int, out_w: int, flip=None,
                       interpolation: str = "bilinear") -> torch.Tensor:
    """Pillow RGB images -> (B, 3, out_h, out_w) uint8: each `img.crop(box).resize(size, BILINEAR or BICUBIC)`,
    mirrored where flip is set. (What the streamed tier's workers run on images they have just decoded.)"""
    from PIL import Image

    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    out = np.empty((len(images), 3, out_h, out_w), dtype=np.uint8)
    flips = [False] * len(images) if flip is None else flip.tolist()
    boxes = list(zip(top.tolist(), left.tolist(), height.tolist(), width.tolist()))

    def one(i):
        t, l, h, w = boxes[i]
        img = images[i].crop((l, t, l + w, t + h)).resize((out_w, out_h), resample)
        out[i] = np.asarray(img.transpose(Image.FLIP_LEFT_RIGHT) if flips[i] else img).transpose(2, 0, 1)

    _map(one, len(images))
    return torch.from_numpy(out)


def _pillow_crop_resize(images_u8, top, left, height, width, out_h: int, out_w: int, flip,
                        interpolation: str = "bilinear") -> torch.Tensor:
    from PIL import Image

    planes = images_u8.numpy()  # (B, C, H, W)
    boxes = list(zip(top.tolist(), left.tolist(), height.tolist(), width.tolist()))

    def crop(i):  # (h, w, C) for Pillow: np.stack is the fastest such copy here
        t, l, h, w = boxes[i]
        return Image.fromarray(np.stack([p[t:t + h, l:l + w] for p in planes[i]], -1))

    zero = torch.zeros(len(boxes), dtype=torch.long)
    return pillow_crop_resize(_map(crop, len(boxes)), zero, zero, height, width, out_h, out_w, flip, interpolation)


def plan_crop_resize(parcel: Parcel, channels: int, top, left, height, width, out_h: int, out_w: int,
                     flip: torch.Tensor | None = None, backend: str = "auto", interpolation: str = "bilinear"):
    """crop_resize in two parts: what the host computes now (added to the parcel, sent with the rest of a batch's
    parameters), and the returned function of the images that runs once the parcel is sent."""
    if backend == "auto":
        backend = CPU_BACKEND if parcel.device.type == "cpu" and channels == 3 else "torch"
    if backend == "pillow":
        return lambda images_u8: _pillow_crop_resize(images_u8, top, left, height, width, out_h, out_w, flip,
                                                     interpolation)
    return _plan_torch(top, left, height, width, out_h, out_w, flip, interpolation, parcel)


def crop_resize(images_u8: torch.Tensor, top, left, height, width, out_h: int, out_w: int,
                flip: torch.Tensor | None = None, backend: str = "auto", interpolation: str = "bilinear") -> torch.Tensor:
    """Each sample's box (top, left, height, width: (B,) whole pixels inside its image) of (B, C, H, W) uint8 images,
    resized to out_h x out_w (antialiased bilinear or bicubic) and optionally mirrored; uint8 (B, C, out_h, out_w).

    backend: auto (Pillow for 3-channel images on the CPU, torch elsewhere), pillow or torch: the same pixels."""
    parcel = Parcel(images_u8.device)
    run = plan_crop_resize(parcel, images_u8.shape[1], top, left, height, width, out_h, out_w, flip, backend,
                           interpolation)
    parcel.send()
    return run(images_u8)
