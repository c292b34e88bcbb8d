"""The device tier: every image decoded once into one uint8 tensor (N, 3, H, W) at its stored size, kept in a
safetensors file under cache/datasets/ so later runs start in a fraction of a second."""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import torch

from .decode import decode_stored, digest, image_size, stored_size
from .sources import Listing
from .types import Split

DECODE_THREADS = os.cpu_count() or 1  # Pillow releases the GIL while it decodes
STEM_CHARS = 64


def _read_headers(listing: Listing, split: str, store_size: int, pool) -> torch.Tensor:
    """Stored (h, w) of every image of a split, from the files' headers."""
    entries = listing.splits[split]

    def size(entry):
        _, name, key = entry
        w, h = stored_size(*image_size(listing.read(key), name), store_size)
        return h, w

    return torch.tensor(list(pool.map(size, entries)), dtype=torch.int32).view(-1, 2)


def decode_split(listing: Listing, split: str, store_size: int, progress=None) -> Split:
    """Decode one split of a listing into a box-padded uint8 tensor (each image top-left), with sizes and digests."""
    entries = listing.splits[split]
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        sizes = _read_headers(listing, split, store_size, pool)
        box = (int(sizes[:, 0].max()), int(sizes[:, 1].max()))
        images = torch.zeros(len(entries), 3, *box, dtype=torch.uint8)
        digests = [b""] * len(entries)

        def work(i):
            _, name, key = entries[i]
            data = listing.read(key)
            img = decode_stored(data, name, store_size)
            images[i, :, :img.shape[1], :img.shape[2]] = img
            digests[i] = digest(data)
            return 1

        for done in pool.map(work, range(len(entries))):
            if progress is not None:
                progress.update(done)
    labels = torch.tensor([label for label, _, _ in entries], dtype=torch.int64)
    return Split(images, labels, sizes, digests)


def cache_path(cache_dir: str, source: str, key: str, store_size: int, suffix: str = ".safetensors") -> str:
    if source.startswith("hf:"):  # a hub name
        stem = "hf-" + source[3:].replace("/", "-")
    else:
        stem = os.path.basename(os.path.normpath(source)).split(".")[0] or "data"
    # a portable file name whatever the source's: ASCII letters, digits, - and _ (pyarrow, safetensors and other file
    # systems take no name that is not UTF-8), short enough for any suffix within the 255 bytes of a name
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:STEM_CHARS]
    store = f"-s{store_size}" if store_size else ""
    return os.path.join(cache_dir, "datasets", f"{stem}-{key}{store}{suffix}")


def save_decoded(path: str, train: Split, test: Split, meta: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensors = {}
    for name, split in (("train", train), ("test", test)):
        tensors.update({f"{name}_images": split.images, f"{name}_labels": split.labels, f"{name}_sizes": split.sizes})
        if split.digests is not None:
            tensors[f"{name}_digests"] = torch.frombuffer(bytearray(b"".join(split.digests)), dtype=torch.uint8).view(-1, 16)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)


SAFETENSORS_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                      "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                      "BOOL": torch.bool}


def mapped_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a .safetensors file memory-mapped (copy-on-write), and its metadata: the processes of a node
    that map one file share its pages (one copy in memory, however many processes), and pages are read when used."""
    import mmap
    import struct

    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    (size,) = struct.unpack("<Q", mapped[:8])
    header = json.loads(mapped[8:8 + size])
    meta = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count = (end - begin) // dtype.itemsize
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=8 + size + begin) if count else \
            torch.empty(0, dtype=dtype)
        tensors[name] = flat.view(info["shape"])
    return tensors, meta


def load_decoded(path: str, need_digests: bool) -> tuple[Split, Split, dict] | None:
    """What save_decoded wrote, memory-mapped (mapped_safetensors), or None (a damaged or older cache is rebuilt,
    never trusted)."""
    import warnings

    try:
        with warnings.catch_warnings():  # torch.frombuffer on a copy-on-write map: writable, no warning needed
            warnings.simplefilter("ignore")
            t, raw = mapped_safetensors(path)
        meta = {k: json.loads(v) for k, v in raw.items()}
        splits = []
        for name in ("train", "test"):
            digests = t.get(f"{name}_digests")
            if need_digests and digests is None:
                return None
            splits.append(Split(t[f"{name}_images"], t[f"{name}_labels"], t.get(f"{name}_sizes"),
                                None if digests is None else [bytes(d) for d in digests.numpy()]))
        return splits[0], splits[1], meta
    except Exception:
        return None
