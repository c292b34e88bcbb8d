"""Several teacher-logit caches served as one teacher: their probabilities at tau (or their logits) averaged.

An ensemble of cached teachers costs no teacher pass: each batch reads every cache's slot of the epoch. The caches
must serve the same samples with the same views: the same data, subset, split, classes, views and augmentation seeds
(slots), which `check_agreement` checks and names where they differ.
"""
from __future__ import annotations

import torch

from ..losses import ensemble_logits
from .format import MATCHED_ATTRS, CacheError
from .reader import CachedTeacher, LogitCache

# what several caches must share to be one teacher's: the samples, their views and the seeds of the slots
AGREED_ATTRS = MATCHED_ATTRS + ("train_size", "test_size", "seeds")


def disagreements(caches: list[LogitCache]) -> list[str]:
    """One line per attribute in which a cache differs from the first."""
    first = caches[0]
    lines = []
    for other in caches[1:]:
        for key in AGREED_ATTRS:
            if first.attrs.get(key) != other.attrs.get(key):
                shown = [_short(c.attrs.get(key)) for c in (first, other)]
                lines.append(f"{key}: {first.path} has {shown[0]}, {other.path} has {shown[1]}")
    return lines


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def check_agreement(caches: list[LogitCache]) -> None:
    """Refuse caches that do not serve the same samples and views, naming what differs."""
    lines = disagreements(caches)
    if lines:
        raise CacheError("--teacher-cache: these caches were not built on the same data and views, so their teachers "
                         "cannot be averaged:\n  " + "\n  ".join(lines) + "\nBuild each with the same data flags, "
                         "--seed and --slots (kdfast cache build).")


def normalized_weights(weights: tuple[float, ...] | None, count: int) -> list[float]:
    """--cache-weights (checked by TeacherCacheConfig: one > 0 a cache) scaled to sum 1; equal when not given."""
    if weights is None:
        return [1.0 / count] * count
    return [w / sum(weights) for w in weights]


def ensemble_test_logits(caches: list[LogitCache], weights: list[float], tau: float,
                         mode: str = "probs") -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The ensemble's logits on the test set, the labels, and each teacher's own test logits."""
    parts = [c.test_logits() for c in caches]
    own = [logits for logits, _ in parts]
    return ensemble_logits(own, weights, tau, mode), parts[0][1], own


class EnsembleTeacher:
    """A batch's logits of several cached teachers combined (losses.ensemble_logits): what CachedTeacher serves for
    one cache. Each cache holds one slot on the device at a time."""

    def __init__(self, caches: list[LogitCache], num_slots: int, device, weights: list[float], tau: float,
                 mode: str = "probs"):
        self.members = [CachedTeacher(c, num_slots, device) for c in caches]
        self.weights, self.tau, self.mode = weights, tau, mode
        self.seeds = self.members[0].seeds

    def aug_seed(self, epoch: int) -> int:
        return self.members[0].aug_seed(epoch)

    def __call__(self, batch) -> torch.Tensor:
        return ensemble_logits([m(batch) for m in self.members], self.weights, self.tau, self.mode)
