"""What benchmarks time with: images per second of an iterator, and of a model's train step."""
from __future__ import annotations

import time

import torch


def rate(batches, batch_size: int, steps: int, warmup: int, device) -> float:
    """Images per second over `steps` batches of an iterator, after `warmup` batches (workers started, caches warm)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
    if device.type == "cuda":
        torch.cuda.synchronize()
    del batch
    return batch_size * steps / (time.perf_counter() - t0)


def train_step_rate(model: torch.nn.Module, size: int, batch_size: int, steps: int, device, precision: str,
                    channels_last: bool = True) -> float:
    """Images per second of SGD train steps of `model` on random (batch_size, 3, size, size) input."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, size, size, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    y = torch.randint(0, 10, (batch_size,), device=device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else None

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return rate((step() for _ in iter(int, 1)), batch_size, steps, 1, device)
