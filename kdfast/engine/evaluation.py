"""Evaluation: logits of a split (each sample once, whatever the number of processes), accuracy, and what a run
evaluates after an epoch."""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import collectives
from ..data import Dataset, Split, eval_batches
from ..tta import tta_logits
from .runtime import Runtime


@torch.no_grad()
def predict(model: nn.Module, split: Split, spec, runtime: Runtime, batch_size: int, channels_last: bool = False,
            aug_seed: int | None = None, workers: int = 2, lo: int = 0, hi: int | None = None,
            tta: str = "none") -> torch.Tensor:
    """Logits (hi - lo, C) float32 of samples lo..hi-1 of a split (default: all), in index order, on every process.

    Each process runs its share; aug_seed=None: evaluation views, else the training views of that seed; tta: the
    test-time augmentation of each view (tta.py).
    """
    acc = runtime.accelerator
    model.eval()
    logits_all, indices_all = [], []
    for batch in eval_batches(split, batch_size, spec, runtime.device, acc.process_index, acc.num_processes,
                              channels_last, aug_seed, workers, lo, hi):
        with acc.autocast():
            logits_all.append(tta_logits(model, batch.images, tta))
        indices_all.append(batch.indices)
    logits = collectives.all_gather(torch.cat(logits_all))
    index = collectives.all_gather(torch.cat(indices_all))
    valid = index >= 0
    logits, index = logits[valid], index[valid]
    return logits[index.argsort()]  # indices lo..hi-1, each once


def accuracy_and_loss(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 accuracy, mean CE and the sample count; top-5 accuracy too where there are more than 10 classes."""
    labels = labels.to(logits.device)
    result = {"accuracy": (logits.argmax(1) == labels).sum().item() / len(labels),
              "loss": nn.functional.cross_entropy(logits, labels).item(), "samples": len(labels)}
    if logits.shape[1] > 10:
        top5 = logits.topk(5, dim=1).indices
        result["top5"] = (top5 == labels[:, None]).any(1).sum().item() / len(labels)
    if logits.shape[1] <= MAX_CONFUSION_CLASSES:
        result["confusion"] = confusion(logits.argmax(1), labels, logits.shape[1])
    return result


MAX_CONFUSION_CLASSES = 100  # a checkpoint's .json keeps the confusion matrix up to this many classes (10,000 counts)


def confusion(predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> list[list[int]]:
    """counts[true class][predicted class] of a split."""
    flat = torch.bincount(labels.long() * classes + predicted.long(), minlength=classes * classes)
    return flat.view(classes, classes).tolist()


def evaluate_model(model: nn.Module, split: Split, spec, runtime: Runtime, batch_size: int,
                   channels_last: bool = False, workers: int = 2, tta: str = "none") -> dict:
    """Test accuracy and mean CE, each sample counted once whatever the number of processes."""
    return accuracy_and_loss(predict(model, split, spec, runtime, batch_size, channels_last, workers=workers,
                                     tta=tta), split.labels)


def evaluations(cfg, runtime: Runtime, model: nn.Module, data: Dataset, channels_last: bool,
                epoch: int | None = None) -> tuple[dict, dict]:
    """(metric fields, {"val": result, "test": result}) of what is evaluated after an epoch (None: at the end).

    With a validation split it is the per-epoch metric (every --eval-every epochs and the last) and the test set
    is evaluated at the last epoch only; without one the test set is evaluated as the validation split would be."""
    last = epoch is None or epoch + 1 == cfg.epochs
    due = last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)
    splits = ([("val", data.val)] if due and data.val is not None else []) + \
        ([("test", data.test)] if last or (due and data.val is None) else [])
    fields, evals = {}, {}
    for name, split in splits:
        evals[name] = evaluate_model(model, split, cfg.augment, runtime, cfg.eval_batch_size, channels_last,
                                     cfg.data_workers, cfg.tta)
        fields.update(prefixed(name, evals[name]))
    return fields, evals


def prefixed(split: str, result: dict) -> dict:
    """A split's evaluation as metric fields: val_accuracy, val_loss (rounded), val_top5."""
    out = {f"{split}_accuracy": result["accuracy"], f"{split}_loss": round(result["loss"], 5)}
    return out | ({f"{split}_top5": result["top5"]} if "top5" in result else {})
