"""Batch-wise augmentation on the device, keyed by (augmentation seed, sample index).

The crop offsets and flip of sample ``i`` under seed ``s`` are a pure function of ``(s, i)``:
a splitmix64 hash on int64 tensors. The result does not depend on batch size, batch
composition, device, number of workers or number of processes, which is what makes teacher
logits cacheable per augmentation seed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# the normalization of each dataset: --augment.mean/--augment.std left at CIFAR-10's take the dataset's
DATASET_STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}


@dataclass(frozen=True)
class AugmentSpec:
    """What an augmentation does; saved with every run and every logit cache."""

    crop_size: int = 32
    padding: int = 4
    pad_mode: str = "reflect"  # "reflect" or "zeros"
    flip: bool = True
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD

    def for_dataset(self, dataset: str) -> "AugmentSpec":
        """The dataset's mean and std where these are still CIFAR-10's defaults (explicit values are kept)."""
        mean, std = DATASET_STATS[dataset]
        return replace(self, mean=mean if self.mean == CIFAR10_MEAN else self.mean,
                       std=std if self.std == CIFAR10_STD else self.std)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentSpec":
        """The spec saved by to_dict (in a run's config or a cache's attributes)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _u64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _u64(0x9E3779B97F4A7C15)
_MIX1 = _u64(0xBF58476D1CE4E5B9)
_MIX2 = _u64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer on int64 tensors (multiplication wraps mod 2^64 on CPU and CUDA)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def sample_hash(seed: int, indices: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash of (seed, index) for each index; int64 [B]."""
    seed_key = splitmix64(torch.tensor([seed], dtype=torch.int64, device=indices.device))
    return splitmix64(seed_key ^ indices.to(torch.int64))


def crop_flip_params(seed: int, indices: torch.Tensor, spec: AugmentSpec):
    """Per-sample (dy, dx, flip) as int64/bool tensors; a pure function of (seed, index)."""
    h = sample_hash(seed, indices)
    span = 2 * spec.padding + 1
    dy = _shr(h, 40) % span  # offsets into the padded image, 0..2*padding
    dx = (_shr(h, 20) & 0xFFFFF) % span
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


def augment(images_u8: torch.Tensor, indices: torch.Tensor, seed: int, spec: AugmentSpec) -> torch.Tensor:
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


def normalize(images_u8: torch.Tensor, spec: AugmentSpec, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 normalized with the spec's mean and std."""
    shift = torch.tensor(spec.mean, device=images_u8.device).view(1, -1, 1, 1) * 255
    scale = 1 / (torch.tensor(spec.std, device=images_u8.device).view(1, -1, 1, 1) * 255)
    out = images_u8.float().sub_(shift).mul_(scale)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out.contiguous()


def epoch_seed(run_seed: int, epoch: int) -> int:
    """The augmentation seed of an epoch of a run: distinct per epoch, fixed by the run seed."""
    return (run_seed * 1_000_003 + epoch) % (1 << 62)
