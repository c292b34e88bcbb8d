"""The keyed hash every augmentation draws from: a pure function of (augmentation seed, sample index, stream).

splitmix64 on int64 tensors (multiplication wraps mod 2^64 on CPU and CUDA), so a sample's parameters do not
depend on batch size, batch composition, device, number of workers or number of processes. That is what
makes teacher logits cacheable per augmentation seed.
"""
from __future__ import annotations

import torch


def _u64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _u64(0x9E3779B97F4A7C15)
_MIX1 = _u64(0xBF58476D1CE4E5B9)
_MIX2 = _u64(0x94D049BB133111EB)


def shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer on int64 tensors."""
    x = x + _GOLDEN
    x = (x ^ shr(x, 30)) * _MIX1
    x = (x ^ shr(x, 27)) * _MIX2
    return x ^ shr(x, 31)


def splitmix64_int(x: int) -> int:
    """splitmix64 of one Python int, as the int64 with the bits splitmix64 gives on a tensor (no tensor is made, so
    nothing is copied to a device)."""
    mask = (1 << 64) - 1
    x = (x + _GOLDEN) & mask
    x = ((x ^ (x >> 30)) * (_MIX1 & mask)) & mask
    x = ((x ^ (x >> 27)) * (_MIX2 & mask)) & mask
    return _u64(x ^ (x >> 31))


def sample_hash(seed: int, indices: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash of (seed, index) for each index; int64 [B]. (The CIFAR crop + flip reads its bits.)"""
    return splitmix64(indices.to(torch.int64) ^ splitmix64_int(seed))


def stream_hash(seed: int, indices: torch.Tensor, stream: int) -> torch.Tensor:
    """An independent 64-bit hash per (seed, index, stream): one stream per random decision of a view."""
    return splitmix64(sample_hash(seed, indices) ^ splitmix64_int(stream * 0x10001 + 1))


def uniform(seed: int, indices: torch.Tensor, stream: int) -> torch.Tensor:
    """Uniform floats in [0, 1) per (seed, index, stream), float64 [B] (53 bits of the hash)."""
    return shr(stream_hash(seed, indices, stream), 11).to(torch.float64) * 2.0 ** -53


def uniforms(seed: int, indices: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """uniform(seed, indices, first + k) for k < count at once, float64 (B, count): the same bits, one hash chain."""
    streams = torch.arange(first, first + count, dtype=torch.int64, device=indices.device) * 0x10001 + 1
    keys = splitmix64(streams)[None, :]  # as stream_hash keys each stream
    bits = splitmix64(sample_hash(seed, indices)[:, None] ^ keys)
    return shr(bits, 11).to(torch.float64) * 2.0 ** -53


def epoch_seed(run_seed: int, epoch: int) -> int:
    """The augmentation seed of an epoch of a run: distinct per epoch, fixed by the run seed."""
    return (run_seed * 1_000_003 + epoch) % (1 << 62)
