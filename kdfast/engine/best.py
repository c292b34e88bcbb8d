"""The best epoch on the validation split: NAME.best (its weights saved when it happens, its test accuracy measured at
the end), and early stopping after --early-stop evaluations without a better one. Decided alike on every process (the
validation accuracy is the same everywhere)."""
from __future__ import annotations

import copy

import torch.nn as nn

from ..checkpoint import checkpoint_paths, save_checkpoint
from ..data import Dataset

BEST = ".best"  # NAME.best.pth, .safetensors, .json beside NAME.pth


class Best:
    """The validation accuracies of a run so far (a resumed run's from its metrics file), the best, and the stop."""

    def __init__(self, cfg, data: Dataset, history: list[tuple[int, float]]):
        self.save = cfg.save_best if cfg.save_best is not None else data.val is not None
        for flag, on in (("--save-best", cfg.save_best), ("--early-stop", cfg.early_stop)):
            if on and data.val is None:
                raise ValueError(f"{flag} chooses on the validation split, and this run has none: add "
                                 "--val-per-class N (images per class held out of training)")
        if cfg.early_stop and not cfg.eval_every:
            raise ValueError("--early-stop counts validation evaluations, and --eval-every 0 evaluates the last epoch "
                             "only: give --eval-every 1 (or N)")
        self.patience, self.history = cfg.early_stop, list(history)

    def best(self) -> tuple[int, float] | None:
        """(epoch, accuracy) of the best evaluation, the earliest of equals."""
        return max(self.history, key=lambda h: (h[1], -h[0])) if self.history else None

    def record(self, epoch: int, accuracy: float) -> bool:
        """Add an evaluation; True when it is better than every one before."""
        new = all(accuracy > a for _, a in self.history)
        self.history.append((epoch, accuracy))
        return new

    def since_best(self) -> int:
        best = self.best()
        return sum(1 for e, _ in self.history if best and e > best[0])

    def stop(self) -> bool:
        return bool(self.patience) and self.since_best() >= self.patience


def best_model(model: nn.Module, out_dir: str, name: str) -> nn.Module:
    """A copy of the run's model with the weights of NAME.best (read on every process)."""
    from safetensors.torch import load_file

    best = copy.deepcopy(model)
    state = load_file(checkpoint_paths(out_dir, name + BEST)["safetensors"], device="cpu")
    best.load_state_dict(state)
    return best


def save_best(out_dir: str, name: str, model: nn.Module, meta: dict) -> None:
    save_checkpoint(out_dir, name + BEST, model, meta)
