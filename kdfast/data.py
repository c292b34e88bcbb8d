"""CIFAR-style data: decode once into uint8 tensors, cache them, and load batches on the device.

Sources (``--data PATH`` or ``KDFAST_DATA``; default ``./data``):
  * a torchvision CIFAR-10 / CIFAR-100 folder (``cifar-10-batches-py`` / ``cifar-100-python`` inside it),
    downloaded by torchvision (progress bar, MD5 check) when missing: always into the default ``./data``,
    into an explicit folder with ``--download``,
  * a folder or ``.tar.gz`` holding ``train/<class>/*`` and ``test/<class>/*`` images (jpg/png).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass

import torch

from .augment import AugmentSpec, augment, normalize
from .errors import KdfastError

DATA_ENV = "KDFAST_DATA"
DEFAULT_DATA = "data"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CACHE_FORMAT = 1


class DataError(KdfastError):
    """Data that cannot be used, with a message naming the path and the fix."""


@dataclass(frozen=True)
class TorchvisionSet:
    title: str
    cls: str  # the torchvision.datasets class
    folder: str  # what torchvision keeps under the root
    size_mb: int


DATASETS = {"cifar10": TorchvisionSet("CIFAR-10", "CIFAR10", "cifar-10-batches-py", 170),
            "cifar100": TorchvisionSet("CIFAR-100", "CIFAR100", "cifar-100-python", 169)}
LOCAL_COPY = ("a folder or .tar.gz with train/<class>/* and test/<class>/* images, or a folder holding "
              "torchvision's cifar-10-batches-py/ or cifar-100-python/")


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    train: Split
    test: Split
    classes: list[str]
    fingerprint: str  # content hash of the decoded tensors and class names
    source: str

    def describe(self) -> dict:
        return {"source": self.source, "fingerprint": self.fingerprint, "classes": self.classes,
                "train_size": len(self.train), "test_size": len(self.test),
                "image_shape": list(self.train.images.shape[1:])}


def resolve_source(path: str | None) -> str:
    return path or os.environ.get(DATA_ENV) or DEFAULT_DATA


def fingerprint(train: Split, test: Split, classes: list[str]) -> str:
    h = hashlib.sha256(json.dumps(classes).encode())
    for t in (train.images, train.labels, test.images, test.labels):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- decoding the sources

def _decode_image(data: bytes, name: str, image_size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            if img.size != (image_size, image_size):
                raise DataError(f"{name}: image is {img.size[0]}x{img.size[1]}, expected {image_size}x{image_size}. "
                                f"Resize your images to {image_size}x{image_size} (or remove this file).")
            return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{name}: not a readable image ({e}). Remove or replace this file.") from None


def _split_class_file(relpath: str):
    """('train'|'test', class, filename) for a path like [prefix/]train/<class>/<file>, else None."""
    parts = [p for p in relpath.replace("\\", "/").split("/") if p and p != "."]
    if len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_SUFFIXES) or parts[-1].startswith("."):
        return None
    split, cls = parts[-3], parts[-2]
    return (split, cls, parts[-1]) if split in ("train", "test") else None


def _assemble(files: dict, source: str, image_size: int, read) -> tuple[Split, Split, list[str]]:
    """files: {split: {class: [(name, key)]}}; read(key) -> bytes. Classes sorted by name."""
    for split in ("train", "test"):
        if not files.get(split):
            raise DataError(f"{source}: no {split}/<class>/<image> files found. Expected train/<class>/*.jpg|png "
                            "and test/<class>/*.jpg|png (see README: bring your own data).")
    train_classes, test_classes = sorted(files["train"]), sorted(files["test"])
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(f"{source}: train and test have different classes (only in train: {only_train}, "
                        f"only in test: {only_test}). Give both splits the same class folders.")
    splits = []
    for split in ("train", "test"):
        images, labels = [], []
        for label, cls in enumerate(train_classes):
            entries = sorted(files[split][cls])
            for name, key in entries:
                images.append(_decode_image(read(key), f"{source}:{split}/{cls}/{name}", image_size))
                labels.append(label)
        splits.append(Split(torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels, dtype=torch.int64)))
    return splits[0], splits[1], train_classes


def _check_nonempty_classes(source: str, found_dirs: dict, files: dict):
    for split, classes in found_dirs.items():
        for cls in sorted(classes):
            if not files.get(split, {}).get(cls):
                raise DataError(f"{source}: class folder {split}/{cls} has no images. Add images or remove the folder.")


def _read_image_folder(root: str, image_size: int):
    files, dirs = {}, {}
    for split in ("train", "test"):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            continue
        for cls in os.listdir(split_dir):
            cls_dir = os.path.join(split_dir, cls)
            if not os.path.isdir(cls_dir) or cls.startswith("."):
                continue
            dirs.setdefault(split, set()).add(cls)
            for name in os.listdir(cls_dir):
                if _split_class_file(f"{split}/{cls}/{name}"):
                    files.setdefault(split, {}).setdefault(cls, []).append((name, os.path.join(cls_dir, name)))
    _check_nonempty_classes(root, dirs, files)

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    return _assemble(files, root, image_size, read)


def _read_archive(path: str, image_size: int):
    files, dirs, blobs = {}, {}, {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = [p for p in member.name.split("/") if p and p != "."]
                if member.isdir() and len(parts) >= 2 and parts[-2] in ("train", "test"):
                    dirs.setdefault(parts[-2], set()).add(parts[-1])
                if not member.isfile() or not (parsed := _split_class_file(member.name)):
                    continue
                split, cls, name = parsed
                dirs.setdefault(split, set()).add(cls)
                blobs[member.name] = tar.extractfile(member).read()
                files.setdefault(split, {}).setdefault(cls, []).append((name, member.name))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: not a readable .tar.gz archive ({e}). Check the file, or download it again.") from None
    _check_nonempty_classes(path, dirs, files)
    return _assemble(files, path, image_size, blobs.__getitem__)


def _read_torchvision(root: str, dataset: str, download: bool, log=print):
    """torchvision's CIFAR-10 / CIFAR-100 (it checks each file's MD5 before unpickling it), downloaded if asked."""
    import torchvision

    info = DATASETS[dataset]
    have = os.path.isdir(os.path.join(root, info.folder))
    if download and not have:
        log(f"{info.title} is not in {root}: downloading it with torchvision ({info.size_mb} MB, MD5-checked) ...")
    try:
        sets = [getattr(torchvision.datasets, info.cls)(root, train=t, download=download) for t in (True, False)]
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{root}: no {info.title} in torchvision's format here ({e}). Add --download to fetch it "
                        f"(needs internet), or point --data / {DATA_ENV} at {LOCAL_COPY}.") from None
    except OSError as e:  # URLError is an OSError: no network
        raise DataError(f"{root}: downloading {info.title} failed ({e}); no network? Without internet, point --data "
                        f"or {DATA_ENV} at a local copy: {LOCAL_COPY}.") from None
    splits = [Split(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets, dtype=torch.int64))
              for s in sets]
    return splits[0], splits[1], list(sets[0].classes)


def source_kind(path: str) -> str:
    if os.path.isfile(path):
        if path.endswith((".tar.gz", ".tgz", ".tar")):
            return "archive"
        raise DataError(f"{path}: a file, but not a .tar.gz/.tgz/.tar archive. Point --data at a .tar.gz, an image "
                        "folder with train/ and test/, or a torchvision CIFAR-10 folder.")
    if os.path.isdir(os.path.join(path, "train")) and os.path.isdir(os.path.join(path, "test")):
        return "folder"
    return "torchvision"


def _source_key(path: str, kind: str, dataset: str) -> str:
    """A cheap key for the decoded-tensor cache: file content for archives, names/sizes/mtimes for folders."""
    h = hashlib.sha256(f"{CACHE_FORMAT}:{kind}".encode())
    if kind == "torchvision":  # only the dataset's own folder: CIFAR-10 and -100 may share a root
        h.update(dataset.encode())
        path = os.path.join(path, DATASETS[dataset].folder)
    if kind == "archive":
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()[:16]
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            h.update(f"{os.path.relpath(os.path.join(dirpath, name), path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- the cached dataset

def _cache_path(cache_dir: str, source: str, key: str) -> str:
    stem = os.path.basename(os.path.normpath(source)).split(".")[0] or "data"
    return os.path.join(cache_dir, "datasets", f"{stem}-{key}.safetensors")


def _save_cache(path: str, ds: Dataset) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({"train_images": ds.train.images, "train_labels": ds.train.labels,
               "test_images": ds.test.images, "test_labels": ds.test.labels}, tmp,
              metadata={"classes": json.dumps(ds.classes), "fingerprint": ds.fingerprint, "source": ds.source})
    os.replace(tmp, path)


def _load_cache(path: str) -> Dataset | None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}
        return Dataset(Split(t["train_images"], t["train_labels"]), Split(t["test_images"], t["test_labels"]),
                       json.loads(meta["classes"]), meta["fingerprint"], meta["source"])
    except Exception:  # a damaged cache is rebuilt, never trusted
        return None


def subset_per_class(split: Split, per_class: int) -> Split:
    """The first `per_class` samples of each class, in stored order (class-balanced, deterministic)."""
    if per_class <= 0:
        return split
    keep = torch.cat([torch.nonzero(split.labels == c).flatten()[:per_class] for c in split.labels.unique()])
    keep = keep.sort().values
    return Split(split.images[keep].contiguous(), split.labels[keep].contiguous())


def load_dataset(source: str | None = None, cache_dir: str = "cache", download: bool = False,
                 train_per_class: int = 0, test_per_class: int = 0, image_size: int = 32,
                 log=print, dataset: str = "cifar10") -> Dataset:
    """Decode a source once into uint8 tensors (cached under cache_dir), optionally class-balanced subsets.

    With no source and no $KDFAST_DATA the source is ./data, where torchvision downloads the dataset when it
    is missing; an explicit source is downloaded into only with download=True.
    """
    if dataset not in DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    download = download or (source is None and not os.environ.get(DATA_ENV))
    source = resolve_source(source)
    if not os.path.exists(source) and not download:
        raise DataError(f"{source}: no such file or folder. Point --data (or {DATA_ENV}) at {LOCAL_COPY}; or add "
                        f"--download to fetch {DATASETS[dataset].title} there with torchvision (needs internet).")
    kind = source_kind(source) if os.path.exists(source) else "torchvision"
    ds = None
    if kind != "torchvision" or os.path.isdir(os.path.join(source, DATASETS[dataset].folder)):
        cache_file = _cache_path(cache_dir, source, _source_key(source, kind, dataset))
        ds = _load_cache(cache_file) if os.path.exists(cache_file) else None
    if ds is None:
        if kind == "archive":
            log(f"decoding {source} ({kind}) into uint8 tensors, once ...")
            train, test, classes = _read_archive(source, image_size)
        elif kind == "folder":
            log(f"decoding {source} ({kind}) into uint8 tensors, once ...")
            train, test, classes = _read_image_folder(source, image_size)
        else:
            train, test, classes = _read_torchvision(source, dataset, download, log)
        ds = Dataset(train, test, classes, fingerprint(train, test, classes), os.path.abspath(source))
        try:
            cache_file = _cache_path(cache_dir, source, _source_key(source, source_kind(source), dataset))
            _save_cache(cache_file, ds)
            log(f"cached decoded data in {cache_file}")
        except OSError as e:
            log(f"note: could not write the data cache under {cache_dir} ({e}); decoding again next time")
    if train_per_class or test_per_class:
        train, test = subset_per_class(ds.train, train_per_class), subset_per_class(ds.test, test_per_class)
        ds = Dataset(train, test, ds.classes, fingerprint(train, test, ds.classes), ds.source)
    return ds


# ---------------------------------------------------------------- batches on the device

@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) float, normalized
    labels: torch.Tensor  # (B,) int64
    indices: torch.Tensor  # (B,) int64, sample indices into the split
    aug_seed: int | None  # augmentation seed of these views (None: no augmentation)
    epoch: int = -1  # the training epoch (0-based) of these batches; -1 outside training


def _permutation_seed(seed: int, epoch: int) -> int:
    return (seed * 7919 + epoch * 104_729 + 17) % (1 << 62)


class TrainLoader:
    """Shuffled, augmented training batches from a uint8 tensor on the device; no DataLoader, no workers.

    batch_size is global: each step takes the next batch_size indices of the epoch's permutation
    (same on every process) and process k keeps its contiguous share, so results do not depend
    on the number of processes. The last incomplete batch is dropped.
    """

    def __init__(self, split: Split, batch_size: int, seed: int, spec: AugmentSpec, device,
                 process_index: int = 0, num_processes: int = 1, channels_last: bool = False):
        if batch_size % num_processes:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {num_processes}")
        if batch_size > len(split):
            raise ValueError(f"batch_size {batch_size} is larger than the training set ({len(split)} samples); lower --batch-size")
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size, self.seed, self.spec, self.device = batch_size, seed, spec, device
        self.rank, self.world = process_index, num_processes
        self.local_batch = batch_size // num_processes
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_permutation_seed(self.seed, epoch))
        return torch.randperm(len(self.labels), generator=g)  # on CPU: identical everywhere

    def epoch(self, epoch: int, aug_seed: int, start_step: int = 0):
        """The epoch's batches from start_step on (a resumed epoch skips the steps already done)."""
        perm = self.permutation(epoch).to(self.device)
        for step in range(start_step, len(self)):
            start = step * self.batch_size + self.rank * self.local_batch
            idx = perm[start:start + self.local_batch]
            views = augment(self.images[idx], idx, aug_seed, self.spec)
            yield Batch(normalize(views, self.spec, self.channels_last), self.labels[idx], idx, aug_seed, epoch)


def eval_batches(split: Split, batch_size: int, spec: AugmentSpec, device, process_index: int = 0,
                 num_processes: int = 1, channels_last: bool = False, aug_seed: int | None = None):
    """Batches of this process's share (strided) of a split, in index order, for evaluation or teacher passes.

    Every process gets the same number of batches of the same size, padded with index -1, so gathers line
    up and each sample counts once. aug_seed=None: no augmentation; else the views of that seed.
    """
    n = len(split)
    per_process = -(-n // num_processes)
    idx = torch.arange(process_index, process_index + per_process * num_processes, num_processes)
    idx = torch.where(idx < n, idx, torch.full_like(idx, -1))
    images, labels = split.images.to(device), split.labels.to(device)
    for start in range(0, per_process, batch_size):
        chunk = idx[start:start + batch_size].to(device)
        safe = chunk.clamp(min=0)
        views = images[safe] if aug_seed is None else augment(images[safe], safe, aug_seed, spec)
        yield Batch(normalize(views, spec, channels_last), labels[safe], chunk, aug_seed)
