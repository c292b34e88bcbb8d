"""Training img/s on this device: the bare step (one batch on the device: forward, cross-entropy, backward, kdfast's
fused optimizer) and the full engine (kdfast train: views, loss step, sums, checks) for each model, batch size,
precision, compiled or not. A row past --budget-s is left out (said), so a cut run still prints what it measured.

    python benchmarks/gpu_speed.py                                   # on the GPU: the table of issue #26
    python benchmarks/gpu_speed.py --models resnet8 --batches 16 --steps 2 --engine-images 96   # plumbing
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from kdfast.config import RECIPES  # noqa: E402
from kdfast.engine.optimizer import build_optimizer  # noqa: E402
from kdfast.machine import describe  # noqa: E402
from kdfast.models import create_model, model_entry  # noqa: E402
from throughput import timed  # noqa: E402

if os.environ.get("KDFAST_TEST_COMPILE"):  # a quick backend for the plumbing (gpu_checks.sh SHORT=1)
    import functools

    torch.compile = functools.partial(torch.compile, backend=os.environ["KDFAST_TEST_COMPILE"])


def bare(name: str, batch: int, precision: str, compiled: bool, steps: int, device) -> float:
    model = create_model(name, num_classes=10).to(device)
    cnn = model_entry(name).family == "cnn"
    x = torch.randn(batch, 3, 32, 32, device=device)
    if cnn:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    optimizer = build_optimizer(model, RECIPES[model_entry(name).family])
    forward = torch.compile(model) if compiled else model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(forward(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return batch / timed(step, steps, 3, device)


def engine(name: str, batch: int, precision: str, compiled: bool, images: int, work: str) -> float:
    """kdfast train's second epoch img/s on `images` synthetic images (the first epoch warms up, compiles)."""
    from kdfast import train
    from kdfast.config import TrainConfig
    from tests.conftest import write_image_folder

    data = os.path.join(work, f"tiny{images}")
    if not os.path.exists(data):
        write_image_folder(data, n_train=-(-images // 3))
    out = tempfile.mkdtemp(dir=work)
    with contextlib.redirect_stdout(io.StringIO()):
        train.run(TrainConfig(model=name, data=data, cache_dir=os.path.join(work, "cache"), out_dir=out, epochs=2,
                              batch_size=batch, precision=precision, progress=False, eval_every=0,
                              compile=compiled, data_workers=0))
    return [json.loads(line) for line in open(os.path.join(out, f"{name}.metrics.jsonl"))][-1]["img_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet8", "resnet18", "vit_tiny", "vit_student"])
    parser.add_argument("--batches", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--compiled", nargs="+", default=["no", "yes"], choices=["no", "yes"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--engine-images", type=int, default=20_480, help="per engine epoch (0: no engine rows)")
    parser.add_argument("--budget-s", type=float, default=240)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"machine: {describe()}")
    print("| model | batch | precision | compiled | bare step img/s | engine img/s | engine / bare |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for compiled in args.compiled:
            for name in args.models:
                for batch in args.batches:
                    for precision in args.precisions:
                        if time.perf_counter() - t0 > args.budget_s:
                            print(f"| {name} | {batch} | {precision} | {compiled} | (over --budget-s) | | |")
                            continue
                        c = compiled == "yes"
                        try:
                            b = bare(name, batch, precision, c, args.steps, device)
                            e = engine(name, batch, precision, c, max(args.engine_images, 2 * batch), work) \
                                if args.engine_images and batch == args.batches[0] else None
                        except Exception as ex:  # one row's failure (a compile, memory) is a row, not the end
                            print(f"| {name} | {batch} | {precision} | {compiled} | failed: "
                                  f"{type(ex).__name__}: {str(ex).splitlines()[0][:120]} | | |", flush=True)
                            continue
                        engine_cells = f"{e:,.0f} | {e / b:.2f}" if e else " | "
                        print(f"| {name} | {batch} | {precision} | {compiled} | {b:,.0f} | {engine_cells} |",
                              flush=True)


if __name__ == "__main__":
    main()
