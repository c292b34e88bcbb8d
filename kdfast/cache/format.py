"""The logit cache on disk: its HDF5 layout, its attributes and what they must equal for a run.

    /train/<codec's datasets>  [S, N, ...]   one slot per augmentation seed, chunked per slot (codecs.py)
    /train/complete            bool [S]      set after a slot is fully written and flushed
    /test/logits, /test/labels               the unaugmented test set: the teacher's accuracy
    /test/complete             bool          set after the test logits are written
    attrs                                    what pins the logits' meaning (format, data, views, teacher, seeds)
"""
from __future__ import annotations

import json
import os

from ..augment import AugmentSpec
from ..config import resolved_store_size
from ..data import HUB_PREFIX, Dataset
from ..errors import KdfastError
from .codecs import CHUNK_SAMPLES, Codec, codec_of

FORMAT = "kdfast-teacher-logits"
FORMAT_VERSION = 1
# attributes that must equal the run's for the logits to mean what the run needs
MATCHED_ATTRS = ("format", "format_version", "dataset_fingerprint", "classes", "augment")
# attributes that also pin a build (a resumed or reused build must have the very same teacher and seeds)
BUILD_ATTRS = MATCHED_ATTRS + ("teacher_model", "teacher_sha256", "seeds", "topk", "train_size", "test_size")
JSON_ATTRS = ("classes", "augment")  # stored as JSON text


class CacheError(KdfastError):
    """A logit cache that cannot be used, with a message naming the file and the fix."""


def h5py():
    import h5py as module  # imported where a cache is opened: h5py takes a while to import

    return module


def read_attrs(f) -> dict:
    attrs = {}
    for key, value in f.attrs.items():
        try:
            if key in JSON_ATTRS:
                value = json.loads(value)
            elif key == "seeds":
                value = [int(s) for s in value]
            elif hasattr(value, "item") and getattr(value, "size", 1) == 1:
                value = value.item()
        except (ValueError, TypeError) as e:
            raise ValueError(f"attribute {key!r} is unreadable ({e})") from None
        attrs[key] = value
    return attrs


def codec_for(attrs: dict) -> Codec:
    return codec_of(len(attrs["classes"]), attrs.get("topk", 0))


def layout(attrs: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every dataset of a cache with these attributes: name -> (shape, dtype)."""
    S, N, T, C = len(attrs["seeds"]), attrs["train_size"], attrs["test_size"], len(attrs["classes"])
    train = {name: ((S, N, *shape), dtype) for name, (shape, dtype) in codec_for(attrs).datasets().items()}
    return {**train, "train/complete": ((S,), "bool"), "test/logits": ((T, C), "float16"),
            "test/labels": ((T,), "int64"), "test/complete": ((), "bool")}


def create(path: str, attrs: dict):
    """A new, empty cache file with its attributes and preallocated datasets (flushed)."""
    f = h5py().File(path, "w")
    for key, value in attrs.items():
        f.attrs[key] = json.dumps(value) if key in JSON_ATTRS else value
    chunk = min(attrs["train_size"], CHUNK_SAMPLES)
    for name, (shape, dtype) in layout(attrs).items():
        per_slot = name.startswith("train/") and name != "train/complete"
        f.create_dataset(name, shape, dtype, chunks=(1, chunk, *shape[2:]) if per_slot else None,
                         fillvalue=False if dtype == "bool" else None)
    f.flush()
    return f


def cache_bytes(attrs: dict) -> int:
    """The size of a whole cache's data: its slots as the codec stores them, and the test logits and labels."""
    C = len(attrs["classes"])
    return len(attrs["seeds"]) * slot_bytes(attrs) + attrs["test_size"] * (2 * C + 8)


def slot_bytes(attrs: dict) -> int:
    """What a run holds on its device for one slot: the slot as stored (float16 values; int16 classes, int32 from
    2^15)."""
    return attrs["train_size"] * codec_for(attrs).bytes_per_sample()


def expected_attrs(data: Dataset, spec: AugmentSpec) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "dataset_fingerprint": data.fingerprint,
            "classes": data.classes, "augment": spec.to_dict(), "train_size": len(data.train),
            "test_size": len(data.test)}


def differences(found: dict, wanted: dict, keys) -> list[str]:
    return [f"{k}: cache has {found.get(k)!r}, run needs {wanted.get(k)!r}" for k in keys
            if k in wanted and found.get(k) != wanted[k]]


def recorded_source(source: str | None) -> str | None:
    """A data source recorded in a cache or checkpoint, if it can still be read here (else None: the default one)."""
    return source if source and (source.startswith(HUB_PREFIX) or os.path.exists(source)) else None


def served_data(attrs: dict) -> dict:
    """What a cache recorded of the runs it serves, as a config's fields: source, dataset, subsets, validation split,
    views and stored size (0 where it is the views' automatic size, as the runs that built it record it)."""
    spec = AugmentSpec.from_dict(attrs["augment"]) if "augment" in attrs else AugmentSpec()
    store = attrs.get("store_size", 0)
    return {"data": recorded_source(attrs.get("data_source")), "dataset": attrs.get("dataset", "cifar10"),
            **{k: attrs.get(k, 0) for k in ("train_per_class", "test_per_class", "val_per_class", "val_seed")},
            "augment": spec, "store_size": 0 if store == resolved_store_size(spec, 0) else store}
