"""Images per second of kdfast's two storage tiers at ImageNet resolution against torchvision's ImageFolder +
RandomResizedCrop + DataLoader, beside what a ResNet-18 and a ResNet-50 train step consume.

    python benchmarks/make_images.py --data cifar10-jpeg.tar.gz --out runs/photos --train-per-class 100 --test-per-class 10
    python benchmarks/loader.py --data runs/photos --size 224 --workers 2

One run, one table: the machine (CPU model and flags, GPU), versions and config first; saved as JSON in
benchmarks/results/. Every loader row delivers normalized float batches of RandomResizedCrop + flip views at
--size; the streamed tier with --workers decoding processes, the device tier from decoded images in memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kdfast.augment import AugmentSpec  # noqa: E402
from kdfast.config import resolved_store_size  # noqa: E402
from kdfast.data import TrainLoader, load_dataset  # noqa: E402
from kdfast.machine import describe, resolve_precision  # noqa: E402
from results_table import print_and_save  # noqa: E402
from timing import rate, train_step_rate  # noqa: E402


def torchvision_loader(root: str, size: int, batch_size: int, workers: int, spec: AugmentSpec):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    transform = T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(spec.mean, spec.std)])
    ds = ImageFolder(os.path.join(root, "train"), transform=transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    while True:
        yield from ((x, y) for x, y in loader)


def kdfast_loader(split, size: int, batch_size: int, workers: int, spec: AugmentSpec, device):
    loader = TrainLoader(split, batch_size, 0, spec, device, workers=workers)
    epoch = 0
    while True:
        yield from loader.epoch(epoch, epoch)
        epoch += 1


def model_rate(name: str, size: int, batch_size: int, steps: int, device, precision: str) -> float:
    import torchvision

    return train_step_rate(torchvision.models.get_model(name, num_classes=10), size, batch_size, steps, device,
                           precision)


def gpu_decode_rate(root: str, batch_size: int, steps: int) -> float:
    """torchvision.io.decode_jpeg on the GPU (nvjpeg), batched, files read from disk: decoding alone."""
    import torchvision

    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "train")) for f in fs if f.endswith(".jpg")]
    blobs = [torchvision.io.read_file(f) for f in files[:batch_size * (steps + 1)]]

    def batches():  # round and round the files read: as many batches as the steps ask for
        starts = range(0, max(1, len(blobs) - batch_size + 1), batch_size)
        while True:
            for i in starts:
                yield torchvision.io.decode_jpeg(blobs[i:i + batch_size], device="cuda")

    return rate(batches(), batch_size, steps, 1, torch.device("cuda"))


def read_rates(root: str, split, cache_dir: str, n: int = 2000) -> list[dict]:
    """Random reads of one encoded image per second from the three random-access stores considered: kdfast's Arrow
    IPC file (pyarrow, memory-mapped), a Hugging Face `datasets` Arrow table (load_from_disk, row indexing) and
    the image files themselves (open + read). What chose the first."""
    import random

    try:
        import datasets
    except ImportError:  # the GPU machine's image has no Hugging Face datasets: that row is left out
        datasets = None

    rows = list(range(len(split)))
    order = [random.Random(0).choice(rows) for _ in range(n)]
    store = split.store
    t0 = time.perf_counter()
    for r in order:
        store.read(r)
    arrow = n / (time.perf_counter() - t0)
    hf = float("nan")
    if datasets is not None:
        table = datasets.Dataset.from_dict({"bytes": [store.read(r) for r in rows]})
        table.save_to_disk(os.path.join(cache_dir, "hf-table"))
        table = datasets.load_from_disk(os.path.join(cache_dir, "hf-table"))
        t0 = time.perf_counter()
        for r in order:
            table[r]["bytes"]
        hf = n / (time.perf_counter() - t0)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "train")) for f in fs)
    t0 = time.perf_counter()
    for r in order:
        with open(files[r % len(files)], "rb") as f:
            f.read()
    folder = n / (time.perf_counter() - t0)
    return [{"what": "random reads: kdfast Arrow IPC file (pyarrow memory map)", "img_s": arrow},
            {"what": "random reads: Hugging Face datasets table (load_from_disk, ds[i])", "img_s": hf},
            {"what": "random reads: the image files (open + read, page cache warm)", "img_s": folder}]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="an ImageNet-style folder (train/<class>/*.jpg, val/<class>/*)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--store-size", type=int, default=0, help="0: kdfast's default for --size (round(size / 0.875))")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--model-batch-size", type=int, default=16)
    p.add_argument("--model-steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", default=None, help="where kdfast keeps its copies (default: a temporary folder)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    spec = AugmentSpec(view="rrc", crop_size=args.size).for_dataset("cifar10")
    store = args.store_size or resolved_store_size(spec, 0)
    machine = describe()
    precision, _ = resolve_precision("auto", device.type)
    print(f"machine: {json.dumps(machine)}")
    print(f"config: {args.size} px views, store {store} px, batch {args.batch_size}, {args.workers} workers, "
          f"{args.steps} timed batches after {args.warmup}, device {device}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="kdfast-loader-")
    rows = []
    tv = rate(torchvision_loader(args.data, args.size, args.batch_size, args.workers, spec), args.batch_size,
              args.steps, args.warmup, device)
    rows.append({"what": f"torchvision ImageFolder + RandomResizedCrop + DataLoader({args.workers} workers)", "img_s": tv})
    stream = load_dataset(args.data, cache_dir, store_size=store, tier="stream", log=lambda *a: None).train
    st = rate(kdfast_loader(stream, args.size, args.batch_size, args.workers, spec, device), args.batch_size,
              args.steps, args.warmup, device)
    rows.append({"what": f"kdfast streamed tier ({args.workers} workers)", "img_s": st, "vs_torchvision": st / tv})
    rows += read_rates(args.data, stream, cache_dir)
    held = load_dataset(args.data, cache_dir, store_size=store, tier="device", log=lambda *a: None).train
    dv = rate(kdfast_loader(held, args.size, args.batch_size, 0, spec, device), args.batch_size, args.steps,
              args.warmup, device)
    rows.append({"what": f"kdfast device tier (views on {device.type})", "img_s": dv, "vs_torchvision": dv / tv})
    if device.type == "cuda":
        rows.append({"what": "GPU JPEG decoding (torchvision.io.decode_jpeg, nvjpeg, batched)",
                     "img_s": gpu_decode_rate(args.data, args.batch_size, args.steps)})
    for name in ("resnet18", "resnet50"):
        r = model_rate(name, args.size, args.model_batch_size, args.model_steps, device, precision)
        rows.append({"what": f"{name} train step at {args.size} px ({precision}, batch {args.model_batch_size})",
                     "img_s": r})
    print_and_save(rows, args.out, f"loader-{device.type}", machine, {**vars(args), "store_size": store},
                   "vs_torchvision", "vs torchvision", width=72)


if __name__ == "__main__":
    main()
