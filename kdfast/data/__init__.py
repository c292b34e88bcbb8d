"""Data: sources of any image size, two storage tiers, and the loader that turns indices into batches.

    sources  where images come from: image folders, archives, Hugging Face datasets, torchvision's CIFAR
    decode   one file -> the stored image (both tiers hold or produce exactly these pixels)
    store    the device tier: decoded once into uint8 (N, 3, H, W), cached under cache/datasets/
    stream   the streamed tier: encoded bytes in a memory-mapped Arrow file, decoded per batch by workers
    loader   one permutation per epoch, this process's share of each global batch, the views
    types    Split, Dataset, the fingerprint, class-balanced subsets

With no source and no $KDFAST_DATA the source is ./data, where torchvision downloads CIFAR when it is missing;
an explicit source is downloaded into only with download=True.
"""
from __future__ import annotations

import dataclasses
import glob
import os

import torch

from ..files import FileLock, OutputError, remove_quietly
from ..progress import bar as progress_bar

from .decode import decode_image, image_size, stored_size
from .loader import Batch, TrainLoader, check_view, eval_batches, is_streamed, view_batches
from .sources import (DATA_ENV, DATASETS, DEFAULT_DATA, HUB_PREFIX, LOCAL_COPY, list_source, read_torchvision,
                      resolve_source, source_key, source_kind)
from .store import cache_path, decode_split, load_decoded, save_decoded
from .stream import StaleStore, StreamedSplit, write_encoded
from .types import DataError, Dataset, Split, fingerprint, split_validation, subset_per_class

__all__ = ["Batch", "DataError", "Dataset", "Split", "StreamedSplit", "TrainLoader", "DATA_ENV", "DATASETS",
           "DEFAULT_DATA", "LOCAL_COPY", "TIERS", "check_view", "decode_image", "default_budget", "eval_batches", "fingerprint",
           "is_streamed", "load_dataset", "resolve_source", "source_kind", "stored_size", "subset_per_class",
           "view_batches"]
TIERS = ("auto", "device", "stream")
ARCHIVES = (".tar.gz", ".tgz", ".tar")  # a missing archive cannot be downloaded into


def default_budget(device) -> int:
    """Bytes the device tier may take by default: half the device's free memory (host memory for a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", info.get("MemFree", 0)) // 2
    except (OSError, ValueError, IndexError):
        return 4 << 30


def _torchvision_dataset(source: str, dataset: str, cache_dir: str, download: bool, log) -> Dataset:
    key_file = None
    if os.path.isdir(os.path.join(source, DATASETS[dataset].folder)):
        key_file = cache_path(cache_dir, source, source_key(source, "torchvision", dataset), 0)
        loaded = load_decoded(key_file, need_digests=False) if os.path.exists(key_file) else None
        if loaded:
            train, test, meta = loaded
            return Dataset(train, test, meta["classes"], meta["fingerprint"], meta["source"])
    train, test, classes = read_torchvision(source, dataset, download, log)
    ds = Dataset(train, test, classes, fingerprint(train, test, classes), os.path.abspath(source))
    return _save(cache_path(cache_dir, source, source_key(source, "torchvision", dataset), 0), ds, cache_dir, log)


def _save(path: str, ds: Dataset, cache_dir: str, log) -> Dataset:
    """Write the decoded data to its cache file and return it read back memory-mapped, as the other processes of the
    node read it: one copy of the pages for all of them (the decoded one in this process's memory is let go)."""
    try:
        save_decoded(path, ds.train, ds.test, {"classes": ds.classes, "fingerprint": ds.fingerprint,
                                               "source": ds.source, "store_size": ds.store_size})
        log(f"cached decoded data in {path}")
    except OSError as e:
        log(f"note: could not write the data cache under {cache_dir} ({e}); decoding again next time")
        return ds
    loaded = load_decoded(path, need_digests=ds.train.digests is not None)
    return ds if loaded is None else dataclasses.replace(ds, train=loaded[0], test=loaded[1])


def _choose_tier(tier: str, n: int, side: int, budget: int | None, log) -> str:
    """auto: the device tier when n images of up to side x side decoded fit the budget, else streamed; said in the log."""
    if tier != "auto":
        return tier
    need = n * 3 * side * side
    budget = 4 << 30 if budget is None else budget
    chosen = "device" if need <= budget else "stream"
    verdict = "fits" if chosen == "device" else "exceeds"
    log(f"data: {n:,} images at up to {side}x{side} px take about {need / 2**20:,.0f} MB decoded, which {verdict} the "
        f"budget of {budget / 2**20:,.0f} MB (--data-budget-gb): "
        + ("held decoded on the device" if chosen == "device" else "streamed (kept encoded, decoded per batch by workers)"))
    return chosen


SIDE_SAMPLE = 256  # images whose headers the tier estimate reads, spread evenly over both splits


def _listed_side(listing, store_size: int) -> int:
    """The side the tier estimate assumes: the store size, else the longest side among SIDE_SAMPLE images spread over
    the listing (their headers only)."""
    if store_size:
        return store_size
    entries = listing.splits["train"] + listing.splits["test"]
    step = max(1, len(entries) // SIDE_SAMPLE)
    return max(max(image_size(listing.read(key), name)) for _, name, key in entries[::step][:SIDE_SAMPLE])


def _encoded_dataset(source: str, kind: str, dataset: str, cache_dir: str, store_size: int, tier: str,
                     budget: int | None, log, progress: bool) -> Dataset:
    """The dataset of an image source in a tier: what was prepared before (validated), else prepared now by one
    writer (a second run preparing the same data waits for the first, then reads what it wrote)."""
    key = source_key(source, kind, dataset)
    decoded_file = cache_path(cache_dir, source, key, store_size)
    found = _prepared(source, decoded_file, store_size, tier, budget, log)
    if found is not None:
        return found
    lock = FileLock(decoded_file.rsplit(".", 1)[0] + ".lock", f"the prepared data of {source}", "wait for it")
    try:
        lock.acquire(log, wait=True)
    except OutputError as e:  # an unwritable cache folder: the device tier decodes anyway (it cannot save either)
        if tier == "stream":
            raise
        log(f"note: {e}")
    try:
        if lock.fd is not None:
            _remove_leftovers(decoded_file, log)
        found = _prepared(source, decoded_file, store_size, tier, budget, log)  # written meanwhile by another run
        return found if found is not None else _prepare(source, kind, decoded_file, store_size, tier, budget, log,
                                                        progress, cache_dir)
    finally:
        lock.release()


def _remove_leftovers(decoded_file: str, log) -> None:
    """The temporary files of writers killed before they finished (SIGKILL, a lost node): with the lock held, no
    one else writes them. Each can be as large as the dataset."""
    for path in [p for f in [decoded_file, *_arrows(decoded_file)] for p in glob.glob(glob.escape(f) + ".tmp*")]:
        log(f"{path}: left by a preparation that was killed; removed")
        remove_quietly(path)


def _arrows(decoded_file: str) -> list[str]:
    stem = decoded_file[:-len(".safetensors")]
    return [f"{stem}-{split}.arrow" for split in ("train", "test")]


def _prepared(source: str, decoded_file: str, store_size: int, tier: str, budget: int | None, log) -> Dataset | None:
    """The data as prepared before, or None: the decoded file (device tier), else the Arrow files (streamed tier; a
    damaged, cut or older one is removed with a line, to be written again)."""
    where = source if source.startswith(HUB_PREFIX) else os.path.abspath(source)
    if tier in ("auto", "device") and os.path.exists(decoded_file) and \
            (tier == "device" or os.path.getsize(decoded_file) <= (budget or 4 << 30)):
        loaded = load_decoded(decoded_file, need_digests=True)
        if loaded:
            train, test, meta = loaded
            return Dataset(train, test, meta["classes"], meta["fingerprint"], meta["source"], "device", store_size)
    arrows = _arrows(decoded_file)
    if tier not in ("auto", "stream") or not all(map(os.path.exists, arrows)):
        return None
    try:
        train, test = (StreamedSplit.open(path, store_size) for path in arrows)  # indexed before: no listing
    except StaleStore as e:
        log(f"{str(e).rstrip('.')}: writing it again")
        for path in arrows:
            remove_quietly(path)
        return None
    side = max(max(train.box), max(test.box))
    if tier == "auto" and _choose_tier(tier, len(train) + len(test), side, budget, log) == "device":
        return None
    return Dataset(train, test, train.classes, fingerprint(train, test, train.classes, store_size), where, "stream",
                   store_size)


def _prepare(source: str, kind: str, decoded_file: str, store_size: int, tier: str, budget: int | None, log,
             progress: bool, cache_dir: str) -> Dataset:
    """List the source, then decode it (device tier) or write its Arrow files (streamed tier)."""
    where = source if source.startswith(HUB_PREFIX) else os.path.abspath(source)
    listing = list_source(source, kind, cache_dir, log)
    total = sum(len(v) for v in listing.splits.values())
    if tier == "auto":
        tier = _choose_tier(tier, total, _listed_side(listing, store_size), budget, log)
    if tier == "device":
        log(f"decoding {source} ({kind}) into uint8 tensors" + (f" at up to {store_size} px" if store_size else "")
            + ", once ...")
        with progress_bar(total, "decode", progress, unit="img") as bar:
            train, test = (decode_split(listing, s, store_size, bar) for s in ("train", "test"))
        ds = Dataset(train, test, listing.classes, fingerprint(train, test, listing.classes, store_size), where,
                     "device", store_size)
        return _save(decoded_file, ds, cache_dir, log)
    splits = []
    for split, path in zip(("train", "test"), _arrows(decoded_file)):
        if not os.path.exists(path):
            log(f"writing the encoded {split} images of {source} into {path} (each decoded once to check it; "
                "memory-mapped, read per batch) ...")
            with progress_bar(len(listing.splits[split]), f"index {split}", progress, unit="img") as bar:
                write_encoded(listing, split, path, store_size, bar)
        splits.append(StreamedSplit.open(path, store_size))
    train, test = splits
    return Dataset(train, test, listing.classes, fingerprint(train, test, listing.classes, store_size), where,
                   "stream", store_size)


def class_counts(labels: torch.Tensor, classes: list[str], split: str) -> str:
    """A split's images per class in a few words, so that missing data shows: "train 50,000 images, 5,000 in each
    of 10 classes", or the fewest and the most when they differ."""
    counts = torch.bincount(labels.long(), minlength=len(classes)).tolist()
    head = f"{split} {sum(counts):,} images"
    if len(set(counts)) == 1:
        return f"{head}, {counts[0]:,} in each of {len(classes)} classes"
    order = sorted(range(len(classes)), key=lambda c: (counts[c], classes[c]))
    fewest = ", ".join(f"{classes[c]} {counts[c]:,}" for c in order[:3])
    return f"{head} in {len(classes)} classes, not equally many: fewest {fewest}; most {classes[order[-1]]} " \
           f"{counts[order[-1]]:,}"


def load_dataset(source: str | None = None, cache_dir: str = "cache", download: bool = False,
                 train_per_class: int = 0, test_per_class: int = 0, log=print, dataset: str = "cifar10",
                 store_size: int = 0, tier: str = "device", budget: int | None = None,
                 progress: bool = False, val_per_class: int = 0, val_seed: int = 0) -> Dataset:
    """The dataset of a source, in the tier asked for (auto: by the memory budget, in bytes), optionally
    class-balanced subsets. store_size: the longest side images are stored at (0: their own size).

    val_per_class: that many training images per class (drawn by val_seed) are held out as a validation split,
    before the training subset (train_per_class) is taken from what is left: the split does not depend on it."""
    if dataset not in DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if tier not in TIERS:
        raise ValueError(f"--data-tier must be one of {', '.join(TIERS)}, got {tier!r}")
    download = download or (source is None and not os.environ.get(DATA_ENV))
    source = resolve_source(source)
    hub = source.startswith(HUB_PREFIX)
    if not hub and not os.path.exists(source) and (not download or source.endswith(ARCHIVES)):
        fetch = "" if source.endswith(ARCHIVES) else (f"; or add --download to fetch {DATASETS[dataset].title} into that "
                                                      "folder with torchvision (needs internet)")
        raise DataError(f"{source}: no such file or folder. Point --data (or {DATA_ENV}) at {LOCAL_COPY}{fetch}.")
    kind = source_kind(source) if hub or os.path.exists(source) else "torchvision"
    if kind == "torchvision":
        if tier == "stream":
            log(f"data: torchvision's {DATASETS[dataset].title} is held decoded on the device (150 MB); "
                "--data-tier stream applies to image files")
        ds = _torchvision_dataset(source, dataset, cache_dir, download, log)
    else:
        ds = _encoded_dataset(source, kind, dataset, cache_dir, store_size, tier, budget, log, progress)
    log("data: " + "; ".join(class_counts(split.labels, ds.classes, name) for name, split in
                             (("train", ds.train), ("test", ds.test))))
    if not (train_per_class or test_per_class or val_per_class):
        return ds
    train, val = split_validation(ds.train, val_per_class, val_seed) if val_per_class else (ds.train, None)
    train, test = subset_per_class(train, train_per_class), subset_per_class(ds.test, test_per_class)
    return Dataset(train, test, ds.classes, fingerprint(train, test, ds.classes, ds.store_size), ds.source, ds.tier,
                   ds.store_size, val)
