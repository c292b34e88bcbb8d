"""Throughput of kdfast's loader against torchvision's DataLoader, and of each model's train step and inference.

    python benchmarks/throughput.py --data ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/throughput.py --synthetic          # no dataset needed

Prints one table with the machine (CPU model and flags, GPU), versions and config, and saves it as
JSON in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kdfast.augment import AugmentSpec  # noqa: E402
from kdfast.data import Split, TrainLoader, load_dataset  # noqa: E402
from kdfast.machine import describe  # noqa: E402
from kdfast.models import create_model, model_entry  # noqa: E402
from results_table import print_and_save  # noqa: E402

MODELS = ("resnet18", "resnet8", "vit_tiny", "vit_student")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, n: int, warmup: int, device) -> float:
    """Seconds per call of fn, after warm-up calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def bench_kdfast_loader(split: Split, batch_size: int, steps: int, device) -> float:
    loader = TrainLoader(split, batch_size, 0, AugmentSpec(), device)
    it = iter(loader.epoch(0, 0))
    t = timed(lambda: next(it), steps, 2, device)
    return batch_size / t


def bench_torchvision_loader(split: Split, batch_size: int, steps: int, workers: int) -> float:
    import torchvision.transforms as T
    from PIL import Image

    spec = AugmentSpec()
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    images = split.images.permute(0, 2, 3, 1).numpy()
    labels = split.labels.tolist()

    class PILDataset(torch.utils.data.Dataset):  # what torchvision.datasets.CIFAR10 does per sample
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return transform(Image.fromarray(images[i])), labels[i]

    loader = torch.utils.data.DataLoader(PILDataset(), batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    it = iter(loader)
    t = timed(lambda: next(it), steps, 2, torch.device("cpu"))
    return batch_size / t


def bench_model(name: str, precision: str, batch_size: int, steps: int, warmup: int, device) -> dict:
    model = create_model(name).to(device)
    channels_last = model_entry(name).family == "cnn"
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def train_step():
        with autocast:
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.inference_mode()
    def infer():
        with autocast:
            model(x)

    model.train()
    train = batch_size / timed(train_step, steps, warmup, device)
    model.eval()
    inference = batch_size / timed(infer, steps, warmup, device)
    return {"model": name, "precision": precision, "train_img_s": round(train, 1), "inference_img_s": round(inference, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="dataset source (default: $KDFAST_DATA or ./data)")
    p.add_argument("--synthetic", action="store_true", help="random uint8 images instead of a dataset")
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--loader-steps", type=int, default=20)
    p.add_argument("--model-steps", type=int, default=3, help="timed steps per model and precision")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--skip-loaders", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    machine = describe()
    print(f"machine: {json.dumps(machine)}")
    print(f"config: batch {args.batch_size}, loader steps {args.loader_steps}, model steps {args.model_steps}, device {device}")

    rows = []
    if not args.skip_loaders:
        if args.synthetic:
            n = args.batch_size * (args.loader_steps + 4)
            split = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (n,)))
        else:
            split = load_dataset(args.data, args.cache_dir).train
        kd = bench_kdfast_loader(split, args.batch_size, args.loader_steps, device)
        rows.append({"what": f"loader: kdfast TrainLoader ({device.type})", "img_s": round(kd, 1)})
        for workers in (0, 2):
            tv = bench_torchvision_loader(split, args.batch_size, args.loader_steps, workers)
            rows.append({"what": f"loader: torchvision DataLoader+PIL, {workers} workers", "img_s": round(tv, 1),
                         "kdfast_speedup": round(kd / tv, 1)})
    for name in args.models:
        for precision in args.precisions:
            r = bench_model(name, precision, args.batch_size, args.model_steps, args.warmup, device)
            rows.append({"what": f"{name} {precision} train step", "img_s": r["train_img_s"]})
            rows.append({"what": f"{name} {precision} inference", "img_s": r["inference_img_s"]})

    print_and_save(rows, args.out, f"throughput-{device.type}", machine, vars(args), "kdfast_speedup", "kdfast x")


if __name__ == "__main__":
    main()
