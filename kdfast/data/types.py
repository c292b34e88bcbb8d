"""What the data layer hands up: splits of stored images with labels, a dataset, its fingerprint."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from ..errors import KdfastError


class DataError(KdfastError):
    """Data that cannot be used, with a message naming the path and the fix."""


class WorkerLost(KdfastError):
    """A data worker process died (a signal: the OOM killer's SIGKILL, a bus error); signum: its signal, or 0."""

    def __init__(self, message: str, signum: int = 0):
        super().__init__(message)
        self.signum = signum


def _uniform_sizes(images: torch.Tensor) -> torch.Tensor:
    return torch.tensor([images.shape[-2:]], dtype=torch.int32).expand(len(images), 2).contiguous()


@dataclass
class Split:
    """Images held decoded (the device tier): uint8 (N, 3, H, W), each image top-left in that box."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    sizes: torch.Tensor | None = None  # (N, 2) int32: each image's true (h, w) inside the box; None: the whole box
    digests: list[bytes] | None = field(default=None, repr=False)  # per image: what the fingerprint hashes

    def __post_init__(self):
        if self.sizes is None:
            self.sizes = _uniform_sizes(self.images)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def box(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def subset(self, keep: torch.Tensor) -> "Split":
        digests = None if self.digests is None else [self.digests[i] for i in keep.tolist()]
        return Split(self.images[keep].contiguous(), self.labels[keep].contiguous(), self.sizes[keep].contiguous(),
                     digests)


@dataclass
class Dataset:
    train: Split  # or a StreamedSplit (data.stream): the same labels, sizes and digests, images kept encoded
    test: Split
    classes: list[str]
    fingerprint: str  # content hash of the images (their digests), labels, class names and stored size
    source: str
    tier: str = "device"  # "device": decoded in memory; "stream": encoded, decoded per batch by workers
    store_size: int = 0  # the longest side images are stored at (0: their own size)
    val: Split | None = None  # held out of the training set (--val-per-class): what per-epoch metrics measure

    def describe(self) -> dict:
        return {"source": self.source, "fingerprint": self.fingerprint, "classes": self.classes,
                "train_size": len(self.train), "test_size": len(self.test), "tier": self.tier,
                "store_size": self.store_size, "image_shape": [3, *self.train.box],
                **({"val_size": len(self.val)} if self.val is not None else {})}


def _is_uniform(split) -> bool:
    return bool((split.sizes == torch.tensor(split.box, dtype=split.sizes.dtype)).all())


def fingerprint(train, test, classes: list[str], store_size: int = 0) -> str:
    """A content hash of what the runs see: the classes, labels and images, and the stored size.

    Images read from encoded files hash each file's digest (the same in both tiers, so a logit cache built on one
    serves the other). torchvision's CIFAR arrays hash their pixels, exactly as kdfast always did (older caches
    of them stay valid)."""
    h = hashlib.sha256(json.dumps(classes).encode())
    if all(s.digests is None and _is_uniform(s) for s in (train, test)) and not store_size:
        for t in (train.images, train.labels, test.images, test.labels):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]
    h.update(f"v2:store{store_size}".encode())
    for split in (train, test):
        h.update(str(len(split)).encode())
        h.update(split.labels.contiguous().numpy().tobytes())
        h.update(b"".join(split.digests) if split.digests is not None else split.images.contiguous().numpy().tobytes())
        h.update(split.sizes.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def class_balanced(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """Indices of the first `per_class` samples of each class, in stored order."""
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in labels.unique()])
    return keep.sort().values


def held_out(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of `per_class` samples of each class drawn by a permutation fixed by `seed` (on the CPU: the same
    everywhere), sorted; refused when a class has no more than `per_class` samples (none would be left to train)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    ranked = labels[order]
    keep = []
    for c in labels.unique().tolist():
        members = order[ranked == c]
        if len(members) <= per_class:
            raise DataError(f"--val-per-class {per_class}: class {c} has only {len(members)} training images, so none "
                            "would be left to train on. Lower --val-per-class.")
        keep.append(members[:per_class])
    return torch.cat(keep).sort().values


def split_validation(train, per_class: int, seed: int):
    """(the training split without the held-out images, the validation split): disjoint, class-balanced."""
    val_index = held_out(train.labels, per_class, seed)
    rest = torch.ones(len(train.labels), dtype=torch.bool)
    rest[val_index] = False
    return train.subset(torch.nonzero(rest).flatten()), train.subset(val_index)


def subset_per_class(split, per_class: int):
    """The first `per_class` samples of each class, in stored order (class-balanced, deterministic)."""
    if per_class <= 0:
        return split
    return split.subset(class_balanced(split.labels, per_class))
