"""Where images come from: each source lists its samples (label, name, a key to read the file's bytes) per split.

  * an image folder: train/<class>/* with test/<class>/* or val/<class>/* (ImageNet's layout), any image size,
  * a .tar.gz / .tgz / .tar of the same layout (a top-level folder inside is fine),
  * a Hugging Face `datasets` image dataset: a `save_to_disk` folder, a folder of parquet files
    (train-*.parquet and test-* / validation-*.parquet, the hub's layout), or hf:NAME from the hub (needs network),
  * torchvision's CIFAR-10 / CIFAR-100 folder (decoded arrays), downloaded by torchvision (progress bar, MD5 check)
    when missing: always into the default ./data, into an explicit folder with --download.
"""
from __future__ import annotations

import glob
import hashlib
import os
import tarfile
from dataclasses import dataclass
from typing import Callable

import torch

from .types import DataError, Split

DATA_ENV = "KDFAST_DATA"
DEFAULT_DATA = "data"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
EVAL_SPLITS = ("test", "val", "validation")  # the first one present is the evaluation split
CACHE_FORMAT = 2  # 2: images larger than the store size are kept as their reduced JPEG (decode.prepare)
HUB_PREFIX = "hf:"


@dataclass(frozen=True)
class TorchvisionSet:
    title: str
    cls: str  # the torchvision.datasets class
    folder: str  # what torchvision keeps under the root
    size_mb: int


DATASETS = {"cifar10": TorchvisionSet("CIFAR-10", "CIFAR10", "cifar-10-batches-py", 170),
            "cifar100": TorchvisionSet("CIFAR-100", "CIFAR100", "cifar-100-python", 169)}
LOCAL_COPY = ("a folder or .tar.gz with train/<class>/* and test/<class>/* (or val/<class>/*) images, a Hugging Face "
              "datasets folder (save_to_disk or parquet files), or a folder holding torchvision's cifar-10-batches-py/ "
              "or cifar-100-python/")


@dataclass
class Listing:
    """The samples of an encoded source: per split, (label, name, key) in sample order; read(key) -> bytes."""

    source: str
    classes: list[str]
    splits: dict[str, list[tuple[int, str, object]]]  # "train" and "test" (the evaluation split)
    read: Callable[[object], bytes]
    eval_split: str = "test"  # the name the evaluation split had in the source


def resolve_source(path: str | None) -> str:
    return path or os.environ.get(DATA_ENV) or DEFAULT_DATA


# ---------------------------------------------------------------- image folders and archives

def _split_class_file(relpath: str):
    """(split, class, filename) for a path like [prefix/]train/<class>/<file>, else None."""
    parts = [p for p in relpath.replace("\\", "/").split("/") if p and p != "."]
    if len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_SUFFIXES) or parts[-1].startswith("."):
        return None
    split, cls = parts[-3], parts[-2]
    return (split, cls, parts[-1]) if split in ("train",) + EVAL_SPLITS else None


def _listing(source: str, files: dict, dirs: dict, read) -> Listing:
    """files: {split: {class: [(name, key)]}}; classes sorted by name, files by name within a class."""
    for split, classes in dirs.items():
        for cls in sorted(classes):
            try:
                cls.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{source}: the class folder {split}/{cls.encode('utf-8', 'surrogateescape')!r} has "
                                "a name that is not UTF-8 text (class names are saved as text). Rename it.") from None
            if not files.get(split, {}).get(cls):
                raise DataError(f"{source}: class folder {split}/{cls} has no images. Add images or remove the folder.")
    eval_split = next((s for s in EVAL_SPLITS if files.get(s)), None)
    if not files.get("train") or eval_split is None:
        missing = "train" if not files.get("train") else "test (or val)"
        raise DataError(f"{source}: no {missing}/<class>/<image> files found. Expected train/<class>/*.jpg|png and "
                        "test/<class>/*.jpg|png or val/<class>/* (see README: bring your own images).")
    train_classes, test_classes = sorted(files["train"]), sorted(files[eval_split])
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(f"{source}: train and {eval_split} have different classes (only in train: {only_train}, "
                        f"only in {eval_split}: {only_test}). Give both splits the same class folders.")
    splits = {}
    for split, name in (("train", "train"), ("test", eval_split)):
        splits[split] = [(label, f"{source}:{name}/{cls}/{file}", key) for label, cls in enumerate(train_classes)
                         for file, key in sorted(files[name][cls])]
    return Listing(source, train_classes, splits, read, eval_split)


def list_image_folder(root: str) -> Listing:
    files, dirs = {}, {}
    for split in ("train",) + EVAL_SPLITS:
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            continue
        for cls in os.listdir(split_dir):
            cls_dir = os.path.join(split_dir, cls)
            if not os.path.isdir(cls_dir) or cls.startswith("."):
                continue
            dirs.setdefault(split, set()).add(cls)
            for name in os.listdir(cls_dir):
                path = os.path.join(cls_dir, name)
                if _split_class_file(f"{split}/{cls}/{name}") and os.path.isfile(path):
                    files.setdefault(split, {}).setdefault(cls, []).append((name, path))

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    return _listing(root, files, dirs, read)


def list_archive(path: str) -> Listing:
    """The archive is read once, its image bytes kept in memory (a large archive is better extracted first)."""
    files, dirs, blobs = {}, {}, {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = [p for p in member.name.split("/") if p and p != "."]
                if member.isdir() and len(parts) >= 2 and parts[-2] in ("train",) + EVAL_SPLITS:
                    dirs.setdefault(parts[-2], set()).add(parts[-1])
                if not member.isfile() or not (parsed := _split_class_file(member.name)):
                    continue
                split, cls, name = parsed
                dirs.setdefault(split, set()).add(cls)
                blobs[member.name] = tar.extractfile(member).read()
                files.setdefault(split, {}).setdefault(cls, []).append((name, member.name))
            whole = _ends_with_marker(tar)
    except (tarfile.TarError, EOFError, OSError) as e:
        reason = str(e).splitlines()[0].rstrip(":") if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a readable .tar.gz archive ({reason}). Check the file, or download it "
                        "again.") from None
    if not whole:
        raise DataError(f"{path}: the archive ends after {sum(len(v) for c in files.values() for v in c.values()):,} "
                        "images without tar's end-of-archive marker: it is incomplete (cut while being downloaded "
                        "or copied). Copy or download it again.")
    return _listing(path, files, dirs, blobs.__getitem__)


def _ends_with_marker(tar: tarfile.TarFile) -> bool:
    """Whether a tar archive read to its end has the end-of-archive marker (a zero block) after its last member:
    tarfile takes an archive cut exactly between two members for a whole one."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE


# ---------------------------------------------------------------- Hugging Face datasets

def _hf_splits(source: str):
    """{split name: datasets.Dataset} of a save_to_disk folder, a folder of parquet files or hf:NAME."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: reading Hugging Face datasets needs the `datasets` package: pip install datasets") from None
    try:
        if source.startswith(HUB_PREFIX):
            loaded = datasets.load_dataset(source[len(HUB_PREFIX):])
        elif glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True) and not _is_saved_dataset(source):
            data_files = {}
            for path in sorted(glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True)):
                split = os.path.basename(path).split("-")[0].split(".")[0]
                data_files.setdefault(split, []).append(path)
            loaded = datasets.load_dataset("parquet", data_files=data_files)
        else:
            loaded = datasets.load_from_disk(source)
    except DataError:
        raise
    except Exception as e:  # datasets' and the hub's errors have no common base
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise DataError(f"{source}: not a readable Hugging Face dataset ({type(e).__name__}: {first}). Point --data at a "
                        "save_to_disk folder, a folder of train-*.parquet / test-*.parquet files, or hf:NAME with "
                        "network.") from None
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "dataset_info.json", "state.json"))


def _hf_columns(ds, source: str) -> tuple[str, str]:
    import datasets

    feats = ds.features
    image = next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
    label = next((k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
    label = label or next((k for k in ("label", "labels", "fine_label") if k in feats), None)
    if image is None or label is None:
        raise DataError(f"{source}: needs an image column and a label column; it has {dict(feats)}. Cast the image "
                        "column to datasets.Image() and the label to datasets.ClassLabel.")
    return image, label


def list_hf(source: str) -> Listing:
    import datasets

    splits = _hf_splits(source)
    eval_split = next((s for s in EVAL_SPLITS if s in splits), None)
    if "train" not in splits or eval_split is None:
        raise DataError(f"{source}: needs a train split and a test (or validation) split; it has {sorted(splits)}.")
    image, label = _hf_columns(splits["train"], source)
    feature = splits["train"].features[label]
    if isinstance(feature, datasets.ClassLabel):
        classes = list(feature.names)
    else:
        classes = [str(c) for c in sorted(set(splits["train"][label]))]
    index = {c: i for i, c in enumerate(classes)}
    raw = {s: splits[s].cast_column(image, datasets.Image(decode=False)) for s in ("train", eval_split)}
    listed = {}
    for split, name in (("train", "train"), ("test", eval_split)):
        labels = raw[name][label]
        if not isinstance(feature, datasets.ClassLabel):
            missing = sorted({str(v) for v in labels} - set(index))
            if missing:
                raise DataError(f"{source}: the {name} split has labels {missing[:5]} that train does not have.")
            labels = [index[str(v)] for v in labels]
        elif labels and (min(labels) < 0 or max(labels) >= len(classes)):
            raise DataError(f"{source}: the {name} split has labels outside 0..{len(classes) - 1} (unlabelled rows?).")
        listed[split] = [(int(y), f"{source}:{name}[{row}]", (name, row)) for row, y in enumerate(labels)]

    def read(key):
        split, row = key
        cell = raw[split][row][image]
        if cell.get("bytes") is not None:
            return cell["bytes"]
        with open(cell["path"], "rb") as f:
            return f.read()

    return Listing(source, classes, listed, read, eval_split)


# ---------------------------------------------------------------- torchvision's CIFAR

def read_torchvision(root: str, dataset: str, download: bool, log=print):
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


# ---------------------------------------------------------------- which source, and its key

def source_kind(path: str) -> str:
    """archive, folder, hf or torchvision."""
    if path.startswith(HUB_PREFIX):
        return "hf"
    if os.path.isfile(path):
        if path.endswith((".tar.gz", ".tgz", ".tar")):
            return "archive"
        raise DataError(f"{path}: a file, but not a .tar.gz/.tgz/.tar archive. Point --data at a .tar.gz, an image "
                        "folder with train/ and test/, a Hugging Face datasets folder, or a torchvision CIFAR-10 folder.")
    if _is_saved_dataset(path):  # before the folder test: a saved DatasetDict has train/ and test/ folders too
        return "hf"
    if os.path.isdir(os.path.join(path, "train")) and any(os.path.isdir(os.path.join(path, s)) for s in EVAL_SPLITS):
        return "folder"
    if glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True):
        return "hf"
    if os.path.isdir(os.path.join(path, "train")) and not any(
            os.path.isdir(os.path.join(path, d)) for d in ("cifar-10-batches-py", "cifar-100-python")):
        raise DataError(f"{path}: has train/ but no test/ or val/ folder. An image folder needs both: "
                        "train/<class>/* and test/<class>/* (or val/<class>/*); hold images of each class out "
                        "into test/, or point --data at the folder that has them.")
    return "torchvision"


def list_source(path: str, kind: str) -> Listing:
    return {"folder": list_image_folder, "archive": list_archive, "hf": list_hf}[kind](path)


def source_key(path: str, kind: str, dataset: str) -> str:
    """A cheap key for the data caches: file content for archives, names/sizes/mtimes for folders."""
    h = hashlib.sha256(f"{CACHE_FORMAT}:{kind}".encode())
    if kind == "hf" and path.startswith(HUB_PREFIX):
        h.update(path.encode())
        return h.hexdigest()[:16]
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
            h.update(f"{os.path.relpath(os.path.join(dirpath, name), path)}:{st.st_size}:{st.st_mtime_ns}\n"
                     .encode("utf-8", "surrogateescape"))  # names that are not UTF-8 are named by _listing
    return h.hexdigest()[:16]

