"""Teacher-logit cache: the teacher's logits for every (augmentation seed, sample), precomputed into HDF5.

    accelerate launch -m kdfast.cache build --teacher models_saved/cnn_teacher.pth --slots 16 --out cache/cnn_teacher.h5
    kdfast cache info cache/cnn_teacher.h5
    kdfast cache verify cache/cnn_teacher.h5 --teacher models_saved/cnn_teacher.pth --samples 64

Layout (see DESIGN.md): /train/logits float16 [S, N, C] (or /train/topk_values, /train/topk_indices and
/train/rest_logit in top-k mode), /train/complete bool [S], /test/logits [N_test, C], /test/labels,
/test/complete, and attributes that pin what the logits mean. Slot k holds the views of augmentation
seed seeds[k] = epoch_seed(seed, k): the views epoch k of a run with the same --seed trains on.

A build writes NAME.partial, flushes after each slot, then marks the slot complete; a killed build
resumes where it stopped, and the file is renamed to NAME only once every slot is complete.
"""
from __future__ import annotations

import gc
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Annotated, Literal, Optional

import torch
import tyro

from . import __version__, schemas
from .augment import AugmentSpec, epoch_seed
from .augment.recipes import RECIPES as AUG_RECIPES, apply_recipe
from .checkpoint import load_teacher, read_meta, weights_sha256
from .config import (DIST_TIMEOUT_S, DatasetName, Precision, check_augment, check_data_flags, check_float, check_int,
                     check_numbers, resolved_store_size)
from .data import HUB_PREFIX, Dataset, view_batches
from .preflight import check_model_input, view_sizes
from .engine import Runtime, accuracy_and_loss, load_data, make_runtime, on_main, predict
from .errors import Interrupted, KdfastError, io_errno, io_error_line, user_errors_exit
from .files import FileLock, check_file_target, remove_quietly
from .flags import explained
from .models import model_entry

FORMAT = "kdfast-teacher-logits"
FORMAT_VERSION = 1
CHUNK_SAMPLES = 8192
AUTO_TOPK = 10  # --topk -1 above AUTO_DENSE_CLASSES classes (TinyViT keeps 10 of ImageNet-1k's 1,000 per view)
AUTO_DENSE_CLASSES = 100
BUILD_CHUNK = 50_000  # samples per teacher pass of a slot: what a process holds of a slot while building it
# attributes that must equal the run's for the logits to mean what the run needs
MATCHED_ATTRS = ("format", "format_version", "dataset_fingerprint", "classes", "augment")
# attributes that also pin a build (a resumed or reused build must have the very same teacher and seeds)
BUILD_ATTRS = MATCHED_ATTRS + ("teacher_model", "teacher_sha256", "seeds", "topk", "train_size", "test_size")


# the data flags a build takes from its teacher's .json when they are not given, and their values when it has none
DATA_DEFAULTS = {"data": None, "dataset": "cifar10", "train_per_class": 0, "test_per_class": 0, "val_per_class": 0,
                 "val_seed": 0, "store_size": 0}


class CacheError(KdfastError):
    """A logit cache that cannot be used, with a message naming the file and the fix."""


@explained
@dataclass
class BuildConfig:
    """Precompute a teacher's logits for each augmentation seed into an HDF5 file (no teacher pass at KD time)."""

    teacher: str = "models_saved/cnn_teacher.pth"
    """Teacher checkpoint (.pth or .safetensors with its .json beside it; `kdfast import` makes the .json of an
    outside one)."""
    teacher_weights: Optional[str] = None
    """With --teacher a model name (resnet18, timm:NAME, torchvision:NAME): its weights, a plain state dict (.pth or
    .safetensors, as trained outside kdfast), for a head of the data's number of classes. Default: none (--teacher
    is a checkpoint)."""
    teacher_pretrained: bool = False
    """With --teacher a library model name: the library's pretrained weights (downloaded once), e.g. an ImageNet
    teacher for ImageNet data."""
    out: Optional[str] = None
    """Output file; default: cache/<teacher name>.h5 (in --cache-dir)."""
    slots: int = 16
    """Number of slots, one augmentation seed each: epoch e of a student trains on slot e mod SLOTS. One per student
    epoch makes cached KD equal online KD."""
    seed: int = 0
    """Run seed: slot k holds the views that epoch k of a run with this --seed trains on."""
    dataset: Optional[DatasetName] = None
    """Which torchvision dataset a torchvision folder holds; also picks the normalization. Default: the teacher's."""
    data: Optional[str] = None
    """Data source; must be the data the student trains on. Default: the teacher's (as recorded in its .json, where
    that path exists), else $KDFAST_DATA, else ./data."""
    cache_dir: str = "cache"
    """Where decoded datasets are kept (and the cache itself, without --out)."""
    train_per_class: Optional[int] = None
    """Training images per class (0: all). Default: the teacher's subset, as recorded in its .json."""
    test_per_class: Optional[int] = None
    """Test images per class (0: all). Default: the teacher's."""
    val_per_class: Optional[int] = None
    """Training images per class held out as the validation split (see kdfast train --help). Default: the teacher's."""
    val_seed: Optional[int] = None
    """Seed of the validation split's draw. Default: the teacher's."""
    store_size: Optional[int] = None
    """Longest side of images as stored (0: auto; see kdfast train --help): must be the students' too. Default: the
    teacher's."""
    data_tier: Literal["auto", "device", "stream"] = "auto"
    """device, stream or auto (by --data-budget-gb); see kdfast train --help."""
    data_budget_gb: float = 0.0
    """Memory the device tier may take, in GB (0: half the device's free memory)."""
    data_workers: int = 2
    """Background processes decoding the streamed tier's batches."""
    batch_size: int = 1000
    """Images per teacher forward pass (per process)."""
    precision: Precision = "auto"
    """Teacher precision (auto: bf16 where it is fast)."""
    topk: int = -1
    """Store only the k largest logits per sample (+ one logit standing for the rest); 0: dense; -1: auto (dense up
    to 100 classes, top-AUTO_TOPK above: a 1,000-class slot of 1.28 M images is then 51 MiB, not 2.4 GiB)."""
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    """The students' training views (see kdfast train --help): slot k holds the teacher's logits of these views."""
    aug_recipe: Literal[tuple(AUG_RECIPES)] = "none"  # type: ignore[valid-type]
    """A named augmentation recipe (see kdfast train --help): the students' views, mixed ones included."""
    overwrite: bool = False
    """Replace an existing cache (or partial build) made with other settings."""
    dist_timeout: float = DIST_TIMEOUT_S
    """Several processes: seconds one waits for the others in a collective (see kdfast train --help)."""
    progress: bool = True
    """Show progress bars (main process only)."""

    def __post_init__(self):
        self.augment = apply_recipe(self.augment, self.aug_recipe).for_dataset(self.dataset or "cifar10")

    def with_teacher_data(self, meta: dict, say) -> "BuildConfig":
        """The data flags left unset, taken from the teacher's .json (its run's config): said in the log."""
        recorded = meta.get("config", {})
        taken = {}
        for name, fallback in DATA_DEFAULTS.items():
            if getattr(self, name) is None:
                value = recorded.get(name, fallback)
                if name == "data":  # where it still is; trained elsewhere: the default source
                    value = recorded_source(value or (meta.get("data") or {}).get("source"))
                taken[name] = value
        cfg = replace(self, **taken)
        if "dataset" in taken and cfg.dataset != "cifar10":  # the normalization follows the dataset
            cfg = replace(cfg, augment=cfg.augment.for_dataset(cfg.dataset))
        shown = {k: v for k, v in taken.items() if v != DATA_DEFAULTS[k]}
        if shown:
            say(f"[cache] as the teacher was trained ({self.teacher}): "
                + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in shown.items()))
        return cfg

    def validate(self) -> None:
        check_numbers(self)
        for name in ("slots", "batch_size"):
            check_int(self, name, 1)
        check_int(self, "seed", 0)
        for name in DATA_DEFAULTS:
            if name not in ("data", "dataset") and getattr(self, name) is not None:
                check_int(self, name, 0)
        check_int(self, "topk", -1)
        check_float(self, "dist_timeout", 1.0)
        check_augment(self.augment)
        check_data_flags(self)


@explained
@dataclass
class InfoConfig:
    """Summarise a logit cache: teacher, data, seeds, completeness, teacher test accuracy."""

    file: Annotated[str, tyro.conf.Positional]
    """The cache (.h5)."""


@explained
@dataclass
class VerifyConfig:
    """Recompute random cache entries with the teacher online and report the largest difference."""

    file: Annotated[str, tyro.conf.Positional]
    """The cache (.h5)."""
    teacher: str = "models_saved/cnn_teacher.pth"
    """The teacher checkpoint the cache was built from."""
    samples: int = 64
    """How many random (slot, sample) entries to recompute."""
    data: Optional[str] = None
    """Data source (default: the one the cache was built on)."""
    train_per_class: Optional[int] = None
    """Default: the subset the cache was built on."""
    test_per_class: Optional[int] = None
    """Default: the test subset the cache was built on."""
    data_tier: Literal["auto", "device", "stream"] = "auto"
    """device, stream or auto (by --data-budget-gb); see kdfast train --help."""
    data_budget_gb: float = 0.0
    """Memory the device tier may take, in GB (0: half the device's free memory)."""
    cache_dir: str = "cache"
    """Where decoded datasets are kept."""
    precision: Optional[Precision] = None
    """Default: the precision the cache was built with."""
    seed: int = 0
    """Seed of the random choice of entries."""


# ---------------------------------------------------------------- reading

def _h5py():
    import h5py

    return h5py


def _read_attrs(f) -> dict:
    attrs = {}
    for key, value in f.attrs.items():
        try:
            if key in ("classes", "augment"):
                value = json.loads(value)
            elif key == "seeds":
                value = [int(s) for s in value]
            elif hasattr(value, "item") and getattr(value, "size", 1) == 1:
                value = value.item()
        except (ValueError, TypeError) as e:
            raise ValueError(f"attribute {key!r} is unreadable ({e})") from None
        attrs[key] = value
    return attrs


def expected_attrs(data: Dataset, spec: AugmentSpec) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "dataset_fingerprint": data.fingerprint,
            "classes": data.classes, "augment": spec.to_dict(), "train_size": len(data.train),
            "test_size": len(data.test)}


def recorded_source(source: str | None) -> str | None:
    """A data source recorded in a cache or checkpoint, if it can still be read here (else None: the default one)."""
    return source if source and (source.startswith(HUB_PREFIX) or os.path.exists(source)) else None


def served_data(attrs: dict) -> dict:
    """The data flags of the runs a cache serves, as it was built: source, dataset, subsets, validation split, views
    and stored size (0 where it is the views' automatic size, as the runs that built it record it)."""
    spec = AugmentSpec.from_dict(attrs["augment"]) if "augment" in attrs else AugmentSpec()
    store = attrs.get("store_size", 0)
    return {"data": recorded_source(attrs.get("data_source")), "dataset": attrs.get("dataset", "cifar10"),
            **{k: attrs.get(k, 0) for k in ("train_per_class", "test_per_class", "val_per_class", "val_seed")},
            "augment": spec, "store_size": 0 if store == resolved_store_size(spec, 0) else store}


def differences(found: dict, wanted: dict, keys) -> list[str]:
    return [f"{k}: cache has {found.get(k)!r}, run needs {wanted.get(k)!r}" for k in keys
            if k in wanted and found.get(k) != wanted[k]]


class LogitCache:
    """A complete logit cache, opened read-only and checked; slots are read whole (N x C, 1 MB for CIFAR-10)."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            hint = " A build was interrupted: run the same build again to resume it." if os.path.exists(path + ".partial") else ""
            raise CacheError(f"{path}: no such logit cache.{hint} Build it with "
                             f"`kdfast cache build --teacher CKPT --out {path}`.")
        if os.path.isdir(path):
            raise CacheError(f"{path}: a folder, not a logit cache file. Point --teacher-cache at the .h5 file that "
                             "`kdfast cache build` wrote.")
        try:
            self.file = _h5py().File(path, "r")
        except OSError as e:
            raise CacheError(f"{path}: not a readable HDF5 file ({str(e).splitlines()[0][:200]}); it is truncated or corrupt. "
                             "Delete it and build it again.") from None
        self.path = path
        try:
            self.attrs = _read_attrs(self.file)
            found = schemas.problems(self.attrs, schemas.CACHE_ATTRS) if self.attrs.get("format") == FORMAT else []
            if found:
                raise ValueError(f"attribute {found[0][len('field '):]}")
            self._check_structure()
        except (ValueError, KeyError, TypeError, OSError) as e:  # attributes or datasets unreadable
            self.file.close()
            raise CacheError(f"{path}: damaged logit cache ({type(e).__name__}: {e}). Delete it and build it "
                             "again.") from None
        except KdfastError:
            self.file.close()
            raise

    def _check_structure(self) -> None:
        f, a = self.file, self.attrs
        if a.get("format") != FORMAT:
            raise CacheError(f"{self.path}: not a kdfast logit cache (format {a.get('format')!r}).")
        if a.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{self.path}: format version {a.get('format_version')}, this kdfast reads "
                             f"{FORMAT_VERSION}. Rebuild it with this kdfast.")
        S, N, C = len(a["seeds"]), a["train_size"], len(a["classes"])
        k = a.get("topk", 0)
        wanted = {"train/complete": (S,), "test/logits": (a["test_size"], C)}
        wanted.update({"train/topk_values": (S, N, k), "train/topk_indices": (S, N, k), "train/rest_logit": (S, N)}
                      if k else {"train/logits": (S, N, C)})
        for name, shape in wanted.items():
            if name not in f:
                raise CacheError(f"{self.path}: dataset /{name} is missing; the file is damaged. Build it again.")
            if tuple(f[name].shape) != shape:
                raise CacheError(f"{self.path}: /{name} has shape {tuple(f[name].shape)}, expected {shape} "
                                 "from its attributes; the file is damaged. Build it again.")
        incomplete = [i for i, done in enumerate(f["train/complete"][:]) if not done]
        if incomplete:
            raise CacheError(f"{self.path}: slots {incomplete} are not complete. Run the build again to finish them.")

    @property
    def seeds(self) -> list[int]:
        return self.attrs["seeds"]

    def check_matches(self, data: Dataset, spec: AugmentSpec) -> None:
        """Refuse a cache whose logits were computed on other data, classes or augmentation."""
        diff = differences(self.attrs, expected_attrs(data, spec), MATCHED_ATTRS + ("train_size",))
        if diff:
            raise CacheError(f"{self.path} does not match this run:\n  " + "\n  ".join(diff)
                             + f"\nIt was built with {self.build_flags()} (and its views: {self.views()}); pass "
                             "the same, or leave them unset to take the cache's, or build a cache with the run's.")

    def build_flags(self) -> str:
        """The data flags the cache was built with, as a command line would give them."""
        a = self.attrs
        flags = [f"--data {a['data_source']}"] if a.get("data_source") else []
        flags += [f"--{k.replace('_', '-')} {a[k]}" for k in ("dataset", "train_per_class", "test_per_class",
                                                              "val_per_class", "val_seed", "store_size")
                  if a.get(k) not in (None, 0, "cifar10")]
        return " ".join(flags) or "the default data and no subset"

    def views(self) -> str:
        return AugmentSpec.from_dict(self.attrs["augment"]).describe() if "augment" in self.attrs else "unknown"

    def slot_parts(self, slot: int) -> list[torch.Tensor]:
        """One slot as stored (float16, int16/int32): [logits (N, C)], or top-k [values (N, k), indices (N, k), rest (N,)]."""
        f = self.file
        try:
            if self.attrs.get("topk", 0):
                parts = [torch.from_numpy(f["train/topk_values"][slot]),
                         torch.from_numpy(f["train/topk_indices"][slot]),
                         torch.from_numpy(f["train/rest_logit"][slot])]
                if parts[1].numel() and (parts[1].min() < 0 or parts[1].max() >= len(self.attrs["classes"])):
                    raise RuntimeError("top-k indices out of range")
            else:
                parts = [torch.from_numpy(f["train/logits"][slot])]
        except (OSError, RuntimeError) as e:  # a damaged chunk, or top-k indices out of range
            raise CacheError(f"{self.path}: slot {slot} cannot be read ({e}); the file is damaged. Delete it and "
                             "build it again.") from None
        if not all(torch.isfinite(p).all() for p in parts if p.is_floating_point()):
            raise CacheError(f"{self.path}: slot {slot} holds NaN or inf logits. Build the cache again "
                             "(with --precision fp32 if the teacher overflows in half precision).")
        return parts

    def slot_logits(self, slot: int) -> torch.Tensor:
        """Dense logits (N, C) float32 of one slot; top-k slots get the rest logit in the other classes."""
        parts = self.slot_parts(slot)
        return parts[0].float() if len(parts) == 1 else densify(*parts, len(self.attrs["classes"]))

    def test_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's logits (N_test, C) on the unaugmented test set, and the labels; damage is named."""
        try:
            logits = torch.from_numpy(self.file["test/logits"][:]).float()
            labels = torch.from_numpy(self.file["test/labels"][:]).long()
        except (OSError, KeyError) as e:
            raise CacheError(f"{self.path}: the test logits cannot be read ({e}); the file is damaged. Delete it "
                             "and build it again.") from None
        if not torch.isfinite(logits).all() or labels.numel() != logits.shape[0] or \
                labels.min() < 0 or labels.max() >= logits.shape[1]:
            raise CacheError(f"{self.path}: the test logits or labels are damaged (NaN/inf or labels out of range). "
                             "Delete the file and build it again.")
        return logits, labels

    def close(self) -> None:
        self.file.close()


class CachedTeacher:
    """Serves a batch's teacher logits from the cache: one slot on the device at a time, indexed by sample.

    A slot is held as stored (float16 logits; top-k: float16 values, int16 classes and the rest logit), converted per
    batch (float16 -> float32 is exact): a 1,000-class slot of 1.28 M images costs a run 51 MiB in top-k, 2.4 GiB
    dense, instead of 4.8 GiB of float32."""

    def __init__(self, cache: LogitCache, num_slots: int, device):
        self.cache, self.device = cache, device
        self.seeds = cache.seeds[:num_slots]
        self.slot_of_seed = {s: k for k, s in enumerate(self.seeds)}
        self.slot, self.held = None, None

    def aug_seed(self, epoch: int) -> int:
        return self.seeds[epoch % len(self.seeds)]

    def __call__(self, batch) -> torch.Tensor:
        slot = self.slot_of_seed[batch.aug_seed]
        if slot != self.slot:  # once per epoch: the slot to the device
            self.slot = slot
            self.held = [t.to(self.device) for t in self.cache.slot_parts(slot)]
        if len(self.held) == 1:
            return self.held[0][batch.indices].float()
        values, indices, rest = (t[batch.indices] for t in self.held)
        return densify(values, indices, rest, len(self.cache.attrs["classes"]))


def densify(values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor, classes: int) -> torch.Tensor:
    """Top-k logits (B, k) at class indices (B, k), the rest logit (B,) in every other class: (B, classes) float32."""
    return rest.float()[:, None].expand(-1, classes).clone().scatter_(1, indices.long(), values.float())


def slot_bytes(attrs: dict) -> int:
    """What a run holds on its device for one slot: as stored (float16 values; int16 classes, int32 from 2^15)."""
    n, k, classes = attrs["train_size"], attrs.get("topk", 0), len(attrs["classes"])
    return n * (k * (2 + (2 if classes < 2**15 else 4)) + 2) if k else n * classes * 2


# ---------------------------------------------------------------- building

def cache_bytes(attrs: dict, num_classes: int, topk: int) -> int:
    """The size of a whole cache's data: float16 logits (or top-k values, int16/int32 indices and the rest logit)."""
    S, N, T = len(attrs["seeds"]), attrs["train_size"], attrs["test_size"]
    per_sample = 2 * num_classes if not topk else topk * (2 + (2 if num_classes < 2**15 else 4)) + 2
    return S * N * per_sample + T * (2 * num_classes + 8)


def check_free_space(path: str, needed: int) -> None:
    """Refuse a build the disk cannot hold, before any teacher pass (HDF5 reports a full disk only from its
    destructors, when some chunks are already lost)."""
    folder = os.path.dirname(os.path.abspath(path))
    have = shutil.disk_usage(folder).free + (os.path.getsize(path) if os.path.exists(path) else 0)
    margin = needed // 20 + (1 << 16)  # HDF5's own metadata and chunk index
    if have < needed + margin:
        raise CacheError(f"{path}: the cache needs about {_size(needed + margin)} and {folder} has {_size(have)} "
                         "free. Free space, choose another --out, or build fewer --slots "
                         "(or --topk K for many classes).")


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MB" if n >= 2**20 else f"{n / 1024:,.0f} KB"


def _create(path: str, attrs: dict, num_classes: int, topk: int):
    h5py = _h5py()
    S, N, T = len(attrs["seeds"]), attrs["train_size"], attrs["test_size"]
    f = h5py.File(path, "w")
    for key, value in attrs.items():
        f.attrs[key] = json.dumps(value) if key in ("classes", "augment") else value
    chunk = min(N, CHUNK_SAMPLES)
    if topk:
        f.create_dataset("train/topk_values", (S, N, topk), "float16", chunks=(1, chunk, topk))
        f.create_dataset("train/topk_indices", (S, N, topk), "int16" if num_classes < 2**15 else "int32",
                         chunks=(1, chunk, topk))
        f.create_dataset("train/rest_logit", (S, N), "float16", chunks=(1, chunk))
    else:
        f.create_dataset("train/logits", (S, N, num_classes), "float16", chunks=(1, chunk, num_classes))
    f.create_dataset("train/complete", (S,), bool, fillvalue=False)
    f.create_dataset("test/logits", (T, num_classes), "float16")
    f.create_dataset("test/labels", (T,), "int64")
    f.create_dataset("test/complete", (), bool, fillvalue=False)
    f.flush()
    return f


def _check_finite(logits: torch.Tensor, what: str) -> None:
    if not torch.isfinite(logits).all():
        raise CacheError(f"the teacher produced NaN or inf logits for {what}; nothing of it was written. "
                         "Check the teacher checkpoint, or build with --precision fp32.")
    if logits.abs().max() > 60000:
        raise CacheError(f"the teacher's logits for {what} exceed float16's range (|x| > 60000); nothing of it was written.")


def _write_rows(f, slot: int, start: int, logits: torch.Tensor, topk: int) -> None:
    """Samples start.. of a slot (a chunk of it): dense float16 logits, or the top k, their classes and the rest."""
    end = start + len(logits)
    if topk:
        values, indices = logits.topk(topk, dim=1)
        rest = logits.scatter(1, indices, float("-inf"))
        n_rest = logits.shape[1] - topk
        # one logit standing for each class outside the top k: their log-mean-exp (exact mass at tau = 1)
        rest_logit = torch.logsumexp(rest, dim=1) - math.log(max(n_rest, 1))
        f["train/topk_values"][slot, start:end] = values.numpy().astype("float16")
        f["train/topk_indices"][slot, start:end] = indices.numpy()
        f["train/rest_logit"][slot, start:end] = rest_logit.numpy().astype("float16")
    else:
        f["train/logits"][slot, start:end] = logits.numpy().astype("float16")


def _mark_complete(f, slot: int) -> None:
    f.flush()  # the slot's data is on disk before it is marked complete
    f["train/complete"][slot] = True
    f.flush()


def resolve_topk(topk: int, classes: int, say) -> int:
    """--topk -1 (auto): dense up to AUTO_DENSE_CLASSES classes, top-AUTO_TOPK above, said in the log."""
    if topk >= 0:
        return topk
    if classes <= AUTO_DENSE_CLASSES:
        return 0
    say(f"[cache] {classes} classes: storing the top {AUTO_TOPK} logits per view and one for the rest (--topk -1, "
        f"auto, above {AUTO_DENSE_CLASSES} classes; --topk 0 keeps them all)")
    return AUTO_TOPK


def _open_for_build(cfg: BuildConfig, path: str, attrs: dict, num_classes: int, say):
    """The partial file to continue (resume) or a new one; None when `path` is already this very cache."""
    partial = path + ".partial"
    build_keys = [k for k in BUILD_ATTRS if k in attrs]
    if os.path.exists(path):
        try:
            with _h5py().File(path, "r") as f:
                diff = differences(_read_attrs(f), attrs, build_keys)
        except OSError:
            diff = ["the file is unreadable"]
        if not diff:
            say(f"{path}: already complete with this teacher, data and seeds; kept")
            return None
        if not cfg.overwrite:
            raise CacheError(f"{path} exists and was built differently:\n  " + "\n  ".join(diff)
                             + "\nPass --overwrite to replace it, or choose another --out.")
    if os.path.exists(partial):
        try:
            f = _h5py().File(partial, "r+")
            diff = differences(_read_attrs(f), attrs, build_keys)
        except OSError:
            f, diff = None, ["the file is unreadable"]
        if not diff:
            done = int(f["train/complete"][:].sum())
            say(f"{partial}: resuming an interrupted build ({done}/{len(attrs['seeds'])} slots complete)")
            return f
        if f is not None:
            f.close()
        if not cfg.overwrite:
            raise CacheError(f"{partial}: an interrupted build with other settings is in the way:\n  " + "\n  ".join(diff)
                             + "\nPass --overwrite to discard it, or delete it.")
        os.remove(partial)
    return _create(partial, attrs, num_classes, attrs["topk"])


def default_cache_path(teacher: str, cache_dir: str) -> str:
    return os.path.join(cache_dir, os.path.splitext(os.path.basename(teacher))[0] + ".h5")


def build(cfg: BuildConfig, runtime: Runtime | None = None) -> str:
    """Build (or resume, or keep) the cache; returns its path. Every process computes, the main one writes.

    The main process holds NAME.lock for the whole build: a second build of the same file refuses at once.
    """
    cfg.validate()
    runtime = runtime or make_runtime(cfg.precision, dist_timeout=cfg.dist_timeout)
    path = cfg.out or default_cache_path(cfg.teacher, cfg.cache_dir)
    held = []

    def claim():
        check_file_target(path, "--out")
        held.append(FileLock(path + ".lock", f"the logit cache {path}", "choose another --out").acquire(runtime.print))

    on_main(runtime.accelerator, claim)
    opened = []  # the HDF5 file being written (main process)
    try:
        with stoppable(path):
            return _build_locked(cfg, runtime, path, opened)
    except Exception as e:
        if not io_errno(e) or isinstance(e, KdfastError):
            raise
        traceback.clear_frames(e.__traceback__)  # the build's frames hold HDF5 objects: closed below, quietly
        for f in opened:  # a write that failed part-way leaves HDF5 metadata that cannot be trusted
            _close_quietly(f)
            remove_quietly(path + ".partial")
        raise CacheError(io_error_line(path + ".partial", e, "writing the cache") + " The partial file is removed "
                         "(a failed HDF5 write can leave it inconsistent): the same command builds it again.") from None
    finally:
        for f in opened:
            _close_quietly(f)
        for lock in held:
            lock.release()


@contextmanager
def stoppable(path: str):
    """SIGINT / SIGTERM stop a build between two Python steps (never inside an HDF5 call): the slots marked complete
    stay in NAME.partial, and the message says how to continue."""
    def stop(signum, frame):
        raise Interrupted(signum, f"{signal.Signals(signum).name}: the cache build stopped; the slots completed so far "
                                  f"are kept in {path}.partial. Run the same command again to continue it.")

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _close_quietly(f) -> None:
    """Close an HDF5 file a failed write left open. Its close, and the release of its objects, can fail the same way
    (the disk is full): HDF5 then reports from its destructors, which is not shown."""
    hooks = sys.unraisablehook, sys.excepthook  # Cython destructors print through both
    sys.unraisablehook, sys.excepthook = (lambda unraisable: None), (lambda *exc: None)
    try:
        if f.id.valid:
            f.close()
    except Exception:
        pass
    finally:
        gc.collect()
        sys.unraisablehook, sys.excepthook = hooks


def _build_locked(cfg: BuildConfig, runtime: Runtime, path: str, opened: list) -> str:
    from tqdm.auto import tqdm

    acc = runtime.accelerator
    by_name = bool(cfg.teacher_weights or cfg.teacher_pretrained)
    cfg = cfg.with_teacher_data({} if by_name else read_meta(cfg.teacher), runtime.print)
    store_size = resolved_store_size(cfg.augment, cfg.store_size)
    data = load_data(cfg, runtime, cfg.data, cfg.train_per_class, cfg.test_per_class, cfg.dataset, store_size)
    teacher, meta = load_teacher(cfg.teacher, data.classes, runtime.device, cfg.teacher_weights, cfg.teacher_pretrained)
    check_model_input(teacher, cfg.teacher, "--teacher", view_sizes(cfg.augment, data), len(data.classes),
                      runtime.device)
    if cfg.topk >= len(data.classes):
        raise ValueError(f"--topk must be 0 (dense) or between 1 and {len(data.classes) - 1}, got {cfg.topk}")
    topk = resolve_topk(cfg.topk, len(data.classes), runtime.print)
    channels_last = model_entry(meta["model"]).family == "cnn"
    seeds = [epoch_seed(cfg.seed, k) for k in range(cfg.slots)]
    attrs = {**expected_attrs(data, cfg.augment), "data_source": data.source, "dataset": cfg.dataset,
             "train_per_class": cfg.train_per_class, "store_size": store_size,
             "test_per_class": cfg.test_per_class, "val_per_class": cfg.val_per_class, "val_seed": cfg.val_seed,
             "seeds": seeds, "topk": topk, "teacher_model": meta["model"],
             "teacher_sha256": weights_sha256(teacher), "teacher_checkpoint": meta.get("weights_from") and f"{cfg.teacher} ({meta['weights_from']})"
             or os.path.abspath(cfg.teacher),
             "precision": runtime.precision, "kdfast_version": __version__,
             "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    f, todo = None, [None]  # the main process opens the file and decides; everyone follows, refusals included
    if acc.is_main_process:
        try:
            check_free_space(path + ".partial", cache_bytes(attrs, len(data.classes), topk))
            f = _open_for_build(cfg, path, attrs, len(data.classes), runtime.print)
            opened.extend([f] if f is not None else [])
            todo = [None if f is None else {"test": not bool(f["test/complete"][()]),
                                            "slots": [k for k, done in enumerate(f["train/complete"][:]) if not done]}]
        except KdfastError as e:
            if acc.num_processes == 1:
                raise
            todo = [{"error": str(e)}]
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        todo = broadcast_object_list(todo)
    todo = todo[0]
    if todo is None:
        return path
    if "error" in todo:
        raise CacheError(todo["error"])

    t0 = time.perf_counter()
    if todo["test"]:
        test_logits = predict(teacher, data.test, cfg.augment, runtime, cfg.batch_size, channels_last,
                              workers=cfg.data_workers).cpu()
        if acc.is_main_process:
            _check_finite(test_logits, "the test set")
            f["test/logits"][:] = test_logits.numpy().astype("float16")
            f["test/labels"][:] = data.test.labels.numpy()
            f.flush()
            f["test/complete"][()] = True
            f.flush()
    bar = tqdm(total=len(todo["slots"]) * len(data.train), unit="img", desc=f"cache {os.path.basename(path)}",
               disable=not (cfg.progress and acc.is_main_process), dynamic_ncols=True)
    n = len(data.train)
    for slot in todo["slots"]:
        for start in range(0, n, BUILD_CHUNK):  # a slot in chunks: memory stays bounded whatever N
            end = min(n, start + BUILD_CHUNK)
            logits = predict(teacher, data.train, cfg.augment, runtime, cfg.batch_size, channels_last, seeds[slot],
                             cfg.data_workers, start, end).cpu()
            if acc.is_main_process:
                _check_finite(logits, f"slot {slot}")
                _write_rows(f, slot, start, logits, topk)
            bar.update(end - start)
        if acc.is_main_process:
            _mark_complete(f, slot)
        runtime.print(f"[cache] slot {slot + 1}/{cfg.slots} complete (seed {seeds[slot]})")
        acc.wait_for_everyone()
    bar.close()
    elapsed = time.perf_counter() - t0
    if acc.is_main_process:
        f.close()
        os.replace(path + ".partial", path)
        images = len(todo["slots"]) * len(data.train) + (len(data.test) if todo["test"] else 0)
        runtime.print(f"[cache] wrote {path}: {len(seeds)} slots x {len(data.train)} samples "
                      f"({images / max(elapsed, 1e-9):,.0f} img/s teacher inference, {runtime.precision}, {elapsed:.1f}s)")
    acc.wait_for_everyone()
    return path


# ---------------------------------------------------------------- info and verify

def info(cfg: InfoConfig) -> dict:
    cache = LogitCache(cfg.file)
    a = cache.attrs
    test_logits, test_labels = cache.test_logits()
    teacher_acc = accuracy_and_loss(test_logits, test_labels)["accuracy"]
    train_key = "train/topk_values" if a.get("topk") else "train/logits"
    summary = {"file": cfg.file, "size_mb": round(os.path.getsize(cfg.file) / 2**20, 2), "format_version": a["format_version"],
               "teacher_model": a["teacher_model"], "teacher_sha256": a["teacher_sha256"][:16],
               "teacher_test_accuracy": teacher_acc, "dataset_fingerprint": a["dataset_fingerprint"],
               "classes": len(a["classes"]), "train_size": a["train_size"], "test_size": a["test_size"],
               "slots": len(a["seeds"]), "seeds": a["seeds"], "topk": a.get("topk", 0),
               "shape": list(cache.file[train_key].shape), "precision": a.get("precision"),
               "memory_per_process_mb": round(slot_bytes(a) / 2**20, 2), "store_size": a.get("store_size", 0),
               "augment": a["augment"], "kdfast_version": a.get("kdfast_version"), "created_at": a.get("created_at")}
    cache.close()
    for key, value in summary.items():
        print(f"{key:>22}: {value}")
    return summary


def verify(cfg: VerifyConfig) -> dict:
    check_int(cfg, "samples", 1)
    cache = LogitCache(cfg.file)
    a = cache.attrs
    runtime = make_runtime(cfg.precision or a.get("precision", "auto"))
    teacher, meta = load_teacher(cfg.teacher, a["classes"], runtime.device)
    if weights_sha256(teacher) != a["teacher_sha256"]:
        raise CacheError(f"{cfg.teacher}: not the teacher this cache was built from "
                         f"({a['teacher_model']}, weights {a['teacher_sha256'][:16]}).")
    def built_with(key):
        return a.get(key, 0) if getattr(cfg, key) is None else getattr(cfg, key)

    data = load_data(cfg, runtime, cfg.data or a.get("data_source"), built_with("train_per_class"),
                     built_with("test_per_class"), a.get("dataset", "cifar10"), a.get("store_size", 0),
                     (a.get("val_per_class", 0), a.get("val_seed", 0)))  # as built
    spec = AugmentSpec.from_dict(a["augment"])
    cache.check_matches(data, spec)
    g = torch.Generator().manual_seed(cfg.seed)
    slots = torch.randint(0, len(cache.seeds), (cfg.samples,), generator=g)
    indices = torch.randint(0, len(data.train), (cfg.samples,), generator=g)
    channels_last = model_entry(meta["model"]).family == "cnn"
    largest, agree = 0.0, 0
    for slot in slots.unique().tolist():
        idx = indices[slots == slot]
        views, _, _, _ = next(view_batches(data.train, [idx], spec, cache.seeds[slot], runtime.device, channels_last, 0))
        with torch.no_grad(), runtime.accelerator.autocast():
            online = teacher(views).float().cpu()
        cached = cache.slot_logits(slot)[idx]
        largest = max(largest, (online - cached).abs().max().item())
        agree += (online.argmax(1) == cached.argmax(1)).sum().item()
    cache.close()
    result = {"samples": cfg.samples, "max_abs_diff": largest, "argmax_agreement": agree / cfg.samples,
              "precision": runtime.precision}
    print(f"{cfg.file}: {cfg.samples} random entries recomputed online ({runtime.precision}): largest |difference| "
          f"{largest:.4g}, argmax agreement {agree}/{cfg.samples}")
    return result


def parse(argv: list[str]):
    """build / info / verify and its flags, as a BuildConfig, InfoConfig or VerifyConfig."""
    return tyro.extras.subcommand_cli_from_dict({"build": BuildConfig, "info": InfoConfig, "verify": VerifyConfig},
                                                args=argv, prog="kdfast cache")


@user_errors_exit
def main(argv: list[str] | None = None):
    cfg = parse(sys.argv[1:] if argv is None else argv)
    if isinstance(cfg, BuildConfig):
        return build(cfg)
    if isinstance(cfg, InfoConfig):
        return info(cfg)
    return verify(cfg)


if __name__ == "__main__":
    main()
