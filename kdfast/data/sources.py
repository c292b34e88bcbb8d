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

def _entry(relpath: str):
    """(split, class, filename) for a path split/<class>/<file> relative to the data's root, else None. One rule for
    every source kind: an image suffix (any case), nothing hidden (no part starting with "."), exactly that depth."""
    parts = [p for p in relpath.replace("\\", "/").split("/") if p and p != "."]
    if len(parts) != 3 or parts[0] not in ("train",) + EVAL_SPLITS or any(p.startswith(".") for p in parts):
        return None
    return tuple(parts) if parts[2].lower().endswith(IMAGE_SUFFIXES) else None


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


def folder_entries(root: str):
    """(split, class, name, path) of every image an image folder lists, and {split: class folders}: links followed
    (a link to a missing file is refused), hidden files and folders skipped (_entry)."""
    entries, dirs = [], {}
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
                if not _entry(f"{split}/{cls}/{name}"):
                    continue
                if os.path.islink(path) and not os.path.exists(path):
                    raise DataError(f"{path}: a link to {os.readlink(path)}, which does not exist. Fix the link or "
                                    "remove it.")
                if os.path.isfile(path):
                    entries.append((split, cls, name, path))
    return entries, dirs


def list_image_folder(root: str) -> Listing:
    entries, dirs = folder_entries(root)
    files = {}
    for split, cls, name, path in entries:
        files.setdefault(split, {}).setdefault(cls, []).append((name, path))

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    return _listing(root, files, dirs, read)


MAX_IMAGE_BYTES = 1 << 30  # an archive member declaring more is damaged or not an image (the largest photos: ~200 MB)


def _archive_root(names: list[str], path: str) -> str:
    """The folder inside an archive that holds its split folders (its top, or a folder below it): where its images
    are, at split/<class>/<file>; several such folders are refused."""
    roots = set()
    for name in names:
        parts = _norm(name).split("/")
        if len(parts) >= 3 and _entry("/".join(parts[-3:])) and not any(p.startswith(".") for p in parts[:-3]):
            roots.add("/".join(parts[:-3]))
    if len(roots) > 1:
        shown = ", ".join(sorted(r or "its top" for r in roots)[:4])
        raise DataError(f"{path}: the archive has images in several places ({shown}). Keep one dataset (one folder "
                        "with train/ and test/) per archive.")
    return roots.pop() if roots else ""


def list_archive(path: str, budget: int | None = None) -> Listing:
    """The archive is read once, its image bytes kept in memory (up to `budget` bytes, default a quarter of the
    available memory: a larger one is refused, to be extracted first). Links inside the archive are followed as a
    folder's are; a link to outside it is refused."""
    budget = budget if budget is not None else _memory_budget()
    try:
        with tarfile.open(path, "r:*") as tar:
            members, whole = _members(tar, path), _ends_with_marker(tar)
            root = _archive_root([m.name for m in members], path)
            files, dirs, blobs = _read_members(tar, members, root, path, budget)
    except (tarfile.TarError, EOFError, OSError) as e:
        reason = str(e).splitlines()[0].rstrip(":") if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a readable .tar.gz archive ({reason}). Check the file, or download it "
                        "again.") from None
    if not whole:
        raise DataError(f"{path}: the archive ends after {sum(len(v) for c in files.values() for v in c.values()):,} "
                        "images without tar's end-of-archive marker: it is incomplete (cut while being downloaded "
                        "or copied). Copy or download it again.")
    return _listing(path, files, dirs, blobs.__getitem__)


def _members(tar: tarfile.TarFile, path: str) -> list:
    """Every member's header (no data read), each declared size checked."""
    members = []
    for member in tar:
        if member.size > MAX_IMAGE_BYTES or member.size < 0:
            raise DataError(f"{path}: the member {member.name} declares {member.size:,} bytes, more than any image "
                            f"({MAX_IMAGE_BYTES >> 20:,} MB): the archive is damaged. Download or copy it again.")
        members.append(member)
    return members


def _read_members(tar: tarfile.TarFile, members: list, root: str, path: str, budget: int):
    """files {split: {class: [(name, key)]}}, class folders {split: set}, and the image bytes by key, of the members
    under root (links followed: a class folder that is a link lists its target's files, as a folder would)."""
    by_name = {_norm(m.name): m for m in members}
    files, dirs, blobs, total = {}, {}, {}, 0
    for member in members:
        rel = os.path.relpath(_norm(member.name), root or ".")
        parts = [p for p in (rel or "").split("/") if p and p != "."]
        if rel.startswith("..") or len(parts) < 2 or parts[0] not in ("train",) + EVAL_SPLITS:
            continue
        target = _link_target(member, by_name, path) if member.issym() or member.islnk() else member
        if len(parts) == 2 and not parts[1].startswith(".") and target.isdir():
            dirs.setdefault(parts[0], set()).add(parts[1])
            if target is not member:  # a class folder that is a link: its target's files, under the link's name
                inside = _norm(target.name)
                for inner in members:
                    if os.path.dirname(_norm(inner.name)) == inside:
                        total += _add(tar, files, blobs, f"{rel}/{os.path.basename(_norm(inner.name))}", inner,
                                      by_name, path)
            continue
        if target.isfile() and (parsed := _entry(rel)):
            dirs.setdefault(parsed[0], set()).add(parsed[1])
            total += _add(tar, files, blobs, rel, member, by_name, path)
        if total > budget:
            raise DataError(f"{path}: the archive's images take more than {budget >> 20:,} MB, a quarter of the "
                            "available memory, which reading it in place needs. Extract it (tar xf) and point --data "
                            "at the folder.")
    return files, dirs, blobs


def _add(tar, files, blobs, rel: str, member, by_name, path) -> int:
    """Add one image member (a link: its target's bytes) as rel; returns the bytes read."""
    parsed = _entry(rel)
    if not parsed:
        return 0
    target = _link_target(member, by_name, path) if member.issym() or member.islnk() else member
    if not target.isfile():
        return 0
    split, cls, name = parsed
    blobs[rel] = tar.extractfile(target).read()
    files.setdefault(split, {}).setdefault(cls, []).append((name, rel))
    return len(blobs[rel])


def _link_target(member, by_name: dict, path: str):
    """The member a link member points to, inside the archive (links of links followed); refused when outside."""
    seen = set()
    while member.issym() or member.islnk():
        if member.name in seen:
            raise DataError(f"{path}: the link {member.name} is a loop. Fix the archive.")
        seen.add(member.name)
        base = os.path.dirname(_norm(member.name)) if member.issym() else ""
        name = None if member.linkname.startswith("/") else _norm(os.path.join(base, member.linkname))
        if name is None or name.startswith("..") or name not in by_name:
            raise DataError(f"{path}: the link {member.name} points to {member.linkname}, outside the archive. "
                            "Make the archive with tar -h (links replaced by their files), or point --data at the "
                            "folder.")
        member = by_name[name]
    return member


def _norm(name: str) -> str:
    """A member's name without ./ parts or a trailing /."""
    return os.path.normpath(name.rstrip("/") or ".")


def _memory_budget() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", info.get("MemFree", 16 << 30)) // 4
    except (OSError, ValueError, IndexError):
        return 4 << 30


def _ends_with_marker(tar: tarfile.TarFile) -> bool:
    """Whether a tar archive read to its end has the end-of-archive marker (a zero block) after its last member:
    tarfile takes an archive cut exactly between two members for a whole one."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE


# ---------------------------------------------------------------- Hugging Face datasets

def _hf_splits(source: str, cache_dir: str):
    """{split name: datasets.Dataset} of a save_to_disk folder, a folder of parquet files or hf:NAME; what `datasets`
    converts or downloads is kept under cache_dir/huggingface (not under HF_HOME)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: reading Hugging Face datasets needs the `datasets` package: pip install datasets") from None
    hf_cache = os.path.join(cache_dir, "huggingface")
    try:
        if source.startswith(HUB_PREFIX):
            loaded = datasets.load_dataset(source[len(HUB_PREFIX):], cache_dir=hf_cache)
        elif glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True) and not _is_saved_dataset(source):
            data_files = {}
            for path in sorted(glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True)):
                split = os.path.basename(path).split("-")[0].split(".")[0]
                data_files.setdefault(split, []).append(path)
            loaded = datasets.load_dataset("parquet", data_files=data_files, cache_dir=hf_cache)
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


def _class_names(ds, label: str) -> list[str] | None:
    import datasets

    feature = ds.features[label]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _hf_labels(source: str, name: str, ds, label: str, classes: list[str], log) -> list[int]:
    """A split's labels as indices into `classes` (train's): ClassLabel indices mapped by name when the split's own
    class list differs in order (said), refused when it names other classes; plain labels mapped by value."""
    index = {c: i for i, c in enumerate(classes)}
    labels, own = ds[label], _class_names(ds, label)
    if own is None:
        missing = sorted({str(v) for v in labels} - set(index))
        if missing:
            raise DataError(f"{source}: the {name} split has labels {missing[:5]} that train does not have.")
        return [index[str(v)] for v in labels]
    if labels and (min(labels) < 0 or max(labels) >= len(own)):
        raise DataError(f"{source}: the {name} split has labels outside 0..{len(own) - 1} (unlabelled rows?).")
    if own == classes:
        return labels
    if sorted(own) != sorted(classes):
        only_train, only_split = sorted(set(classes) - set(own)), sorted(set(own) - set(classes))
        raise DataError(f"{source}: train and {name} have different class lists (only in train: {only_train[:5]}, "
                        f"only in {name}: {only_split[:5]}); reading them index by index would mislabel. Give both "
                        "splits the same ClassLabel names.")
    log(f"data: {source}: the {name} split lists the classes in another order than train; its labels are mapped "
        "to train's by class name")
    mapped = [index[c] for c in own]
    return [mapped[y] for y in labels]


def list_hf(source: str, cache_dir: str = "cache", log=print) -> Listing:
    import datasets

    splits = _hf_splits(source, cache_dir)
    eval_split = next((s for s in EVAL_SPLITS if s in splits), None)
    if "train" not in splits or eval_split is None:
        raise DataError(f"{source}: needs a train split and a test (or validation) split; it has {sorted(splits)}.")
    image, label = _hf_columns(splits["train"], source)
    classes = _class_names(splits["train"], label) or [str(c) for c in sorted(set(splits["train"][label]))]
    raw = {s: splits[s].cast_column(image, datasets.Image(decode=False)) for s in ("train", eval_split)}
    listed = {}
    for split, name in (("train", "train"), ("test", eval_split)):
        if label not in raw[name].features:
            raise DataError(f"{source}: the {name} split has no {label!r} column, which train has.")
        labels = _hf_labels(source, name, raw[name], label, classes, log)
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


def list_source(path: str, kind: str, cache_dir: str = "cache", log=print) -> Listing:
    """The listing of an encoded source; Hugging Face's own caches go under cache_dir/huggingface."""
    if kind == "hf":
        return list_hf(path, cache_dir, log)
    return {"folder": list_image_folder, "archive": list_archive}[kind](path)


def source_key(path: str, kind: str, dataset: str) -> str:
    """A cheap key for the data caches that changes whenever what would be read changes: file content for archives;
    for image folders every listed file's name, link target, size, modification and change times and inode (an
    edit that restores the modification time still changes the change time); names, sizes and times of every file
    for other folders."""
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
    if kind == "folder":  # exactly what the listing reads: links followed, hidden files left out
        entries, _ = folder_entries(path)
        for split, cls, name, file in sorted(entries):
            st = os.stat(file)  # of the link's target
            real = os.path.realpath(file) if os.path.realpath(file) != os.path.abspath(file) else ""
            h.update(f"{split}/{cls}/{name}>{real}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}\n"
                     .encode("utf-8", "surrogateescape"))
        return h.hexdigest()[:16]
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            h.update(f"{os.path.relpath(os.path.join(dirpath, name), path)}:{st.st_size}:{st.st_mtime_ns}\n"
                     .encode("utf-8", "surrogateescape"))  # names that are not UTF-8 are named by _listing
    return h.hexdigest()[:16]

