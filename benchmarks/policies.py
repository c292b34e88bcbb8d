"""What each augmentation policy costs: kdfast's keyed views with RandAugment, TrivialAugment, mixup, CutMix and
random erasing (batch-wise, in the training process) against crop + flip alone and against timm's CPU pipeline
(create_transform with rand-m9-mstd0.5-inc1, DataLoader workers, timm's Mixup on the batch), beside the train
step of the lab's two students at the same batch size.

    python benchmarks/policies.py                      # 32 px CIFAR-size images, batch 256
    python benchmarks/policies.py --size 64 --batch-size 128

One run, one table: the machine (CPU model and flags, GPU), versions and config first; saved as JSON in
benchmarks/results/. Every row delivers normalized float batches (and, where mixed, the mixed targets).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kdfast.augment import AugmentSpec  # noqa: E402
from kdfast.augment.recipes import apply_recipe  # noqa: E402
from kdfast.data import Split, TrainLoader  # noqa: E402
from kdfast.machine import describe, resolve_precision  # noqa: E402
from kdfast.models import create_model  # noqa: E402
from results_table import print_and_save  # noqa: E402
from timing import rate, train_step_rate  # noqa: E402

BASE = AugmentSpec()
# timm's rand-m9-mstd0.5-inc1 with the magnitude capped at 9 (its noise then only lowers it): at 10 its increasing posterize keeps 0 bits, which
# Pillow 13 refuses (ValueError: bits must be between or equal to 1 and 8), so the uncapped policy crashes a worker
TIMM_POLICY = "rand-m9-mstd0.5-inc1-mmax9"
POLICIES = {
    "crop + flip (the CIFAR view)": BASE,
    "+ RandAugment 2 ops m9": replace(BASE, policy="randaugment"),
    "+ TrivialAugmentWide": replace(BASE, policy="trivialaugment"),
    "+ mixup 0.8": replace(BASE, mixup=0.8),
    "+ CutMix 1.0": replace(BASE, cutmix=1.0),
    "+ random erasing 0.25": replace(BASE, erasing=0.25),
    "recipe cct (RandAugment + mixup + CutMix)": apply_recipe(BASE, "cct"),
    "recipe deit (cct + erasing 0.25)": apply_recipe(BASE, "deit"),
}


def synthetic_split(n: int, size: int) -> Split:
    """Smooth random images (blurred noise), so that every op has something to change."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = (x * 200 + 28).round().clamp(0, 255).to(torch.uint8)
    return Split(images, torch.arange(n) % 10, torch.tensor([[size, size]] * n))


def kdfast_batches(split, spec, batch_size: int, device):
    loader = TrainLoader(split, batch_size, 0, spec, device)
    epoch = 0
    while True:
        yield from loader.epoch(epoch, epoch)
        epoch += 1


def timm_batches(split, size: int, batch_size: int, workers: int, re_prob: float, spec):
    """timm's CPU recipe: PIL images through create_transform(..., auto_augment='rand-m9-mstd0.5-inc1'), batched by a
    DataLoader with workers, then timm's Mixup (mixup 0.8, CutMix 1.0, label smoothing 0.1) on the batch."""
    from PIL import Image
    from timm.data import Mixup, create_transform

    transform = create_transform(size, is_training=True, auto_augment=TIMM_POLICY, re_prob=re_prob,
                                 mean=spec.mean, std=spec.std, interpolation="bicubic")
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in split.images]

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(pil)

        def __getitem__(self, i):
            return transform(pil[i]), int(split.labels[i])

    loader = torch.utils.data.DataLoader(Images(), batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    while True:
        for x, y in loader:
            yield mixup(x, y)


def step_seconds(name: str, size: int, batch_size: int, steps: int, device, precision: str) -> float:
    model = create_model(name, num_classes=10)
    return batch_size / train_step_rate(model, size, batch_size, steps, device, precision, name.startswith("resnet"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="timm pipeline's DataLoader workers")
    p.add_argument("--model-steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    machine = describe()
    precision, _ = resolve_precision("auto", device.type)
    import timm
    import torchvision
    print(f"machine: {json.dumps(machine)}")
    print(f"config: {args.size} px, batch {args.batch_size}, {args.images} images, {args.steps} timed batches after "
          f"{args.warmup}, device {device}, torch {torch.__version__}, torchvision {torchvision.__version__}, timm "
          f"{timm.__version__}, threads {torch.get_num_threads()}, timm workers {args.workers}")
    split = synthetic_split(args.images, args.size)
    steps = {name: step_seconds(name, args.size, args.batch_size, args.model_steps, device, precision)
             for name in ("resnet8", "vit_student")}
    rows = []
    for what, spec in POLICIES.items():
        img_s = rate(kdfast_batches(split, spec, args.batch_size, device), args.batch_size, args.steps, args.warmup,
                     device)
        rows.append({"what": f"kdfast {what}", "img_s": img_s, "batch_ms": 1000 * args.batch_size / img_s})
    base_ms = rows[0]["batch_ms"]
    for r in rows:
        r["extra_ms"] = r["batch_ms"] - base_ms
        for name, seconds in steps.items():
            r[f"of_{name}_step"] = r["batch_ms"] / (1000 * seconds)
    for re_prob, tag in ((0.0, "cct"), (0.25, "deit")):
        img_s = rate(timm_batches(split, args.size, args.batch_size, args.workers, re_prob, BASE), args.batch_size,
                     args.steps, args.warmup, torch.device("cpu"))
        rows.append({"what": f"timm CPU pipeline, {tag} ({args.workers} workers)", "img_s": img_s,
                     "batch_ms": 1000 * args.batch_size / img_s})
        ours = next(r for r in rows if r["what"].startswith(f"kdfast recipe {tag}"))
        ours["vs_timm"] = ours["img_s"] / img_s
    for name, seconds in steps.items():
        rows.append({"what": f"{name} train step ({precision}, batch {args.batch_size})",
                     "img_s": args.batch_size / seconds, "batch_ms": 1000 * seconds})
    print(f"\n{'what':<52} {'ms/batch':>9} {'extra ms':>9} {'of resnet8 step':>16} {'of vit_student step':>20}")
    for r in rows:
        extra = f"{r['extra_ms']:.1f}" if "extra_ms" in r else ""
        fr = f"{r['of_resnet8_step']:.2f}" if "of_resnet8_step" in r else ""
        fv = f"{r['of_vit_student_step']:.2f}" if "of_vit_student_step" in r else ""
        print(f"{r['what']:<52} {r['batch_ms']:>9.1f} {extra:>9} {fr:>16} {fv:>20}")
    print_and_save(rows, args.out, f"policies-{device.type}", machine, vars(args), "vs_timm", "vs timm", width=52)


if __name__ == "__main__":
    main()
