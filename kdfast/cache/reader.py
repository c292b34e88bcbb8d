"""Reading a complete logit cache: checked on opening, a slot at a time, served to a run by sample index."""
from __future__ import annotations

import os

import torch

from .. import schemas
from ..augment import AugmentSpec
from ..data import Dataset
from ..errors import KdfastError
from ..transfer import upload
from .format import (FORMAT, FORMAT_VERSION, MATCHED_ATTRS, CacheError, codec_for, differences, expected_attrs, h5py,
                     layout, read_attrs)


class LogitCache:
    """A complete logit cache, opened read-only and checked; slots are read whole (N x C, 1 MB for CIFAR-10)."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            hint = (" A build was interrupted: run the same build again to resume it."
                    if os.path.exists(path + ".partial") else "")
            raise CacheError(f"{path}: no such logit cache.{hint} Build it with "
                             f"`kdfast cache build --teacher CKPT --out {path}`.")
        if os.path.isdir(path):
            raise CacheError(f"{path}: a folder, not a logit cache file. Point --teacher-cache at the .h5 file that "
                             "`kdfast cache build` wrote.")
        try:
            self.file = h5py().File(path, "r")
        except OSError as e:
            raise CacheError(f"{path}: not a readable HDF5 file ({str(e).splitlines()[0][:200]}); it is truncated or "
                             "corrupt. Delete it and build it again.") from None
        self.path = path
        try:
            self.attrs = read_attrs(self.file)
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
        self.codec = codec_for(self.attrs)

    def _check_structure(self) -> None:
        f, a = self.file, self.attrs
        if a.get("format") != FORMAT:
            raise CacheError(f"{self.path}: not a kdfast logit cache (format {a.get('format')!r}).")
        if a.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{self.path}: format version {a.get('format_version')}, this kdfast reads "
                             f"{FORMAT_VERSION}. Rebuild it with this kdfast.")
        for name, (shape, _) in layout(a).items():
            if name in ("test/labels", "test/complete"):
                continue  # read (and checked) with the test logits
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
        """One slot as stored (the codec's datasets, in its order: float16 values, int16/int32 classes)."""
        try:
            parts = [torch.from_numpy(self.file[name][slot]) for name in self.codec.names]
            self.codec.check(parts)
        except (OSError, RuntimeError) as e:  # a damaged chunk, or stored values the codec cannot have written
            raise CacheError(f"{self.path}: slot {slot} cannot be read ({e}); the file is damaged. Delete it and "
                             "build it again.") from None
        if not all(torch.isfinite(p).all() for p in parts if p.is_floating_point()):
            raise CacheError(f"{self.path}: slot {slot} holds NaN or inf logits. Build the cache again "
                             "(with --precision fp32 if the teacher overflows in half precision).")
        return parts

    def slot_logits(self, slot: int) -> torch.Tensor:
        """Dense logits (N, C) float32 of one slot (top-k: the rest logit in the other classes)."""
        return self.codec.decode(self.slot_parts(slot), slice(None))

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

    A slot is held as stored (float16 logits; top-k: float16 values, int16 classes and the rest logit), decoded per
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
            self.held = list(upload(*self.cache.slot_parts(slot), device=self.device))
        return self.cache.codec.decode(self.held, batch.indices)
