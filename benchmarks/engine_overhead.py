"""The full engine (kdfast train: the loader's views, the loss step, the sums, the progress checks) against the bare
step (one fixed batch already on the device: forward, cross-entropy, backward, the same fused SGD) at the same batch
size and precision, in img/s, alternated twice in one run; the engine's cost is what it adds to the bare step.

    python benchmarks/engine_overhead.py --data ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/engine_overhead.py --models resnet8 --train-per-class 200     # quicker

The engine's img/s is its second epoch's (training only; the first warms up), from its metrics file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kdfast import train  # noqa: E402
from kdfast.config import TrainConfig  # noqa: E402
from kdfast.engine.optimizer import build_optimizer  # noqa: E402
from kdfast.machine import describe, resolve_precision  # noqa: E402
from kdfast.models import create_model, model_entry  # noqa: E402


def bare_step(name: str, precision: str, batch: int, steps: int, recipe) -> float:
    """img/s of the bare step on one fixed batch (CPU)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, recipe)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def engine(name: str, precision: str, batch: int, data: str, per_class: int, work: str) -> tuple[float, object]:
    """img/s of kdfast train's second epoch, and the run's recipe."""
    out = tempfile.mkdtemp(dir=work)
    cfg = TrainConfig(model=name, data=data, cache_dir=os.path.join(work, "cache"), out_dir=out, epochs=2,
                      batch_size=batch, precision=precision, progress=False, train_per_class=per_class,
                      test_per_class=10, eval_every=0)
    train.run(cfg)
    records = [json.loads(line) for line in open(os.path.join(out, f"{name}.metrics.jsonl"))]
    return records[-1]["img_per_s"], cfg.resolved_recipe(model_entry(name).family)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("KDFAST_DATA"), help="CIFAR-10 (the offline .tar.gz)")
    parser.add_argument("--models", nargs="+", default=["resnet8", "resnet18"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-per-class", type=int, default=0, help="0: resnet8 500, resnet18 60")
    args = parser.parse_args()
    precision, _ = resolve_precision("auto", "cpu")
    print(f"machine: {describe()}\nprecision {precision}, batch {args.batch_size}")
    print("| model | round | bare step img/s | engine img/s | engine / bare |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            per_class = args.train_per_class or (500 if name == "resnet8" else 60)
            steps = max(3, per_class * 10 // args.batch_size)  # as many steps as an engine epoch
            for round_ in (1, 2):
                import contextlib
                import io

                with contextlib.redirect_stdout(io.StringIO()):
                    img_s, recipe = engine(name, precision, args.batch_size, args.data, per_class, work)
                bare = bare_step(name, precision, args.batch_size, steps, recipe)
                print(f"| {name} | {round_} | {bare:,.0f} | {img_s:,.0f} | {img_s / bare:.2f} |", flush=True)


if __name__ == "__main__":
    main()
