"""The device tier: every image decoded once into one uint8 tensor (N, 3, H, W) at its stored size, kept in a
safetensors file under cache/datasets/ so later runs start in a fraction of a second."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .decode import decode_stored, digest, image_size, stored_size
from .sources import Listing
from .types import Split

DECODE_THREADS = os.cpu_count() or 1  # Pillow releases the GIL while it decodes


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


def load_decoded(path: str, need_digests: bool) -> tuple[Split, Split, dict] | None:
    """What save_decoded wrote, or None (a damaged or older cache is rebuilt, never trusted)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = {k: json.loads(v) for k, v in f.metadata().items()}
            t = {k: f.get_tensor(k) for k in f.keys()}
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
