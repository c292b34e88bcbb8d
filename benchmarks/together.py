"""K students trained together (one fused pass) against one at a time, img/s per student, for K = 1, 2, 4, 8, 16.

    python benchmarks/together.py                     # ResNet-8 (fused grouped convolutions) and the ViT student (vmap)
    python benchmarks/together.py --models resnet8 --ks 1 2 4 8 16 --batch-size 256

Each mode runs full KD training steps (forward, KD loss against fixed teacher logits, backward, SGD) on the same
random batches; "alone" is one student's step time, so K students one at a time cost K times that. Prints the
machine and saves the table as JSON in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kdfast.engine import make_runtime  # noqa: E402
from kdfast.losses import kd_loss  # noqa: E402
from kdfast.machine import describe  # noqa: E402
from kdfast.models import create_model, model_entry  # noqa: E402
from kdfast.together import together  # noqa: E402


def step_time(model, batches, warmup: int, autocast) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x, y, t):
        with autocast():
            logits = model(x)
        logits = logits[None] if logits.ndim == 2 else logits  # a plain model: (B, C) -> (1, B, C)
        loss = sum(kd_loss(logits[i], t, y, 0.5, 4.0) for i in range(logits.shape[0]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for b in batches[:warmup]:
        step(*b)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        step(*b)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (len(batches) - warmup)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet8", "vit_student"])
    p.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--vit-ks", nargs="+", type=int, default=[1, 2, 4], help="K for ViTs (vmap is slower to scale)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--vit-batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    runtime = make_runtime(args.precision)
    device, autocast = runtime.device, runtime.accelerator.autocast
    machine = describe()
    print(f"machine: {json.dumps(machine)}\nprecision: {runtime.precision} ({runtime.precision_reason}), device {device}")
    rows = []
    for name in args.models:
        cnn = model_entry(name).family == "cnn"
        batch = args.batch_size if cnn else args.vit_batch_size
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randn(batch, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device),
                    torch.randn(batch, 10, generator=g).to(device)) for _ in range(args.steps + args.warmup)]
        if cnn:
            batches = [(x.contiguous(memory_format=torch.channels_last), y, t) for x, y, t in batches]
        alone = step_time(create_model(name).to(device), batches, args.warmup, autocast)
        for k in (args.ks if cnn else args.vit_ks):
            models = [create_model(name).to(device) for _ in range(k)]
            fused = together(models).to(device)
            t = step_time(fused, batches, args.warmup, autocast)
            row = {"model": name, "k": k, "batch": batch, "together_step_s": t, "alone_step_s": alone,
                   "student_img_s_together": batch * k / t, "student_img_s_one_at_a_time": batch / alone,
                   "speedup": alone * k / t}
            rows.append(row)
            print(f"{name:<12} K={k:<3} together {t * 1000:8.1f} ms/step  alone {alone * 1000:7.1f} ms/step  "
                  f"K one at a time {alone * k * 1000:8.1f} ms  ->  {row['speedup']:.2f}x "
                  f"({batch * k / t:,.0f} student-img/s together vs {batch / alone:,.0f} one at a time)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(args.out, f"together-{device.type}-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"machine": machine, "config": vars(args), "precision": runtime.precision, "rows": rows}, f, indent=2)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
