"""What a run writes: the start lines, a metrics record per epoch (and to the trackers), the checkpoint and its
.json."""
from __future__ import annotations

import json
from contextlib import contextmanager

import torch
import torch.nn as nn

from .. import collectives
from ..checkpoint import save_checkpoint
from ..data import Dataset
from ..models import count_parameters, model_entry
from .best import Best, best_model, save_best
from .evaluation import evaluations
from .trainer import Trainer

FEW_STEPS = 10  # fewer optimizer steps per epoch than this: said at the start of the run
ESTIMATE_STEPS = 10  # the run's time is estimated once, from its first steps after the first (warm-up, compiling)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def time_estimate(name: str, step_s: float, steps_per_epoch: int, steps_left: int, measured: int) -> str:
    """The start's estimate: an epoch's and the rest of the run's training time from `measured` steps of step_s s."""
    return (f"[{name}] estimated from {measured} steps: {duration(step_s * steps_per_epoch)} an epoch, "
            f"{duration(step_s * steps_left)} for the training left (evaluation not counted)")


class RunReporter:
    """One run: one metrics file, one checkpoint. extra_meta: what its NAME.json adds (the KD metadata)."""

    def __init__(self, extra_meta: dict | None = None):
        self.extra_meta, self.records, self.evals, self.img_s = extra_meta or {}, [], {}, 0.0
        self.stopped = False

    def start(self, tr: Trainer, data: Dataset, progress: dict) -> None:
        cfg, acc = tr.cfg, tr.acc
        kept = [r for r in tr.run_dir.read_metrics(tr.run_dir.metrics_path()) if r["epoch"] < progress["epoch"]] \
            if progress["epoch"] else []  # the epochs kept; those to be redone are dropped
        self.records = kept if acc.is_main_process else []
        self.best = Best(cfg, data, [(r["epoch"], r["val_accuracy"]) for r in kept
                                     if r.get("val_accuracy") is not None])
        for line in batch_warnings(len(data.train), cfg.batch_size, len(tr.loader)):
            tr.runtime.print(f"[{cfg.run_name}] {line}")
        val = f" / {len(data.val)} val" if data.val is not None else ""
        tr.runtime.print(f"[{cfg.run_name}] {cfg.model}: {count_parameters(tr.exported()):,} params | "
                         f"{len(data.train)} train{val} / {len(data.test)} test | {cfg.epochs} epochs x "
                         f"{len(tr.loader)} steps of {cfg.batch_size} | {tr.recipe.optimizer} lr {tr.recipe.lr:g} "
                         f"{tr.recipe.schedule} | {tr.runtime.precision} ({tr.runtime.precision_reason}) on "
                         f"{tr.runtime.device} x{acc.num_processes}")
        if self.extra_meta.get("kd"):
            tr.runtime.print(f"[{cfg.run_name}] " + kd_line(self.extra_meta["kd"]))
        tr.runtime.print(f"[{cfg.run_name}] {cfg.augment.describe()} | data: {data.tier} tier"
                         + (f", stored at up to {data.store_size} px" if data.store_size else "")
                         + (f" | EMA {cfg.ema:g}" if cfg.ema else "")
                         + (f" | TTA {cfg.tta}" if cfg.tta != "none" else ""))

    def end_epoch(self, tr: Trainer, data: Dataset, epoch: int, epoch_time: float, wall: float) -> None:
        """The epoch's record (train sums, img/s, the validation or test set when due), printed, written, logged."""
        cfg, acc = tr.cfg, tr.acc
        sums = tr.global_sums()  # over the whole epoch and every process, resumed parts included
        record = epoch_record(tr, sums["loss"], sums["correct"], sums["seen"], epoch, epoch_time, wall)
        fields, self.evals = evaluations(cfg, tr.runtime, tr.exported(), data, tr.loader.channels_last, epoch)
        record.update(fields)
        self.img_s = record["img_per_s"]
        shown = "".join(f" {k.split('_')[0]} {record[k]:.4f}" for k in ("val_accuracy", "test_accuracy") if k in record)
        tr.runtime.print(f"[{cfg.run_name}] epoch {epoch + 1}/{cfg.epochs} loss {record['train_loss']:.4f} train "
                         f"{record['train_accuracy']:.4f}" + shown + f" | {record['img_per_s']:,.0f} img/s | "
                         f"{epoch_time:.1f}s")
        if acc.is_main_process:
            self.records.append(record)
            tr.run_dir.write_metrics(self.records)
        if cfg.log_with != "none":  # the same numbers as the metrics line, at step = epochs done
            acc.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"}, step=epoch + 1)
        if "val" in self.evals and self.best.record(epoch, self.evals["val"]["accuracy"]) and self.best.save:
            if acc.is_main_process:  # its test accuracy is measured at the end
                save_best(cfg.out_dir, cfg.run_name, tr.exported(), {
                    "model": cfg.model, "family": model_entry(cfg.model).family, "classes": data.classes,
                    "best_epoch": epoch + 1, "val_accuracy": self.evals["val"]["accuracy"],
                    "val_samples": self.evals["val"]["samples"], "data": data.describe(), "config": cfg.to_dict(),
                    **self.extra_meta})
            collectives.barrier()
        self.stopped = self.best.stop() and epoch + 1 < cfg.epochs  # at the last epoch the run ends anyway
        if self.stopped:
            best = self.best.best()
            tr.runtime.print(f"[{cfg.run_name}] early stop: no better validation accuracy in {self.best.patience} "
                             f"evaluations (best {best[1]:.4f} at epoch {best[0] + 1}); stopped after epoch "
                             f"{epoch + 1} of {cfg.epochs}")

    def stop_early(self) -> bool:
        return self.stopped

    def finish(self, tr: Trainer, data: Dataset, wall: float) -> dict:
        """Evaluate if needed, write the checkpoint, remove the state; returns the checkpoint's metadata."""
        cfg, acc = tr.cfg, tr.acc
        model = tr.exported()
        evals = self.evals if "test" in self.evals else final_evaluations(tr, model, data)  # nothing left to train
        stopped = self.stopped and self.best.best()
        meta = checkpoint_meta(cfg, tr, data, evals, count_parameters(model), self.img_s, wall, {
            **self.extra_meta, **({"early_stop": {"patience": self.best.patience, "best_epoch": stopped[0] + 1,
                                                  "epochs_trained": self.best.history[-1][0] + 1}} if stopped else {})})
        if self.best.save and self.best.best():
            self.finish_best(tr, data, model, wall)
        if acc.is_main_process:
            save_checkpoint(cfg.out_dir, cfg.run_name, model, meta, metrics=tr.run_dir.metrics_path())
            tr.runtime.print(f"[{cfg.run_name}] " + (f"val accuracy {evals['val']['accuracy']:.4f} | " if "val" in evals
                                                     else "") + f"test accuracy {evals['test']['accuracy']:.4f} | "
                             f"wall {wall:.1f}s | saved {tr.run_dir.paths['pth']}")
            tr.run_dir.state.clear()
        collectives.barrier()
        acc.free_memory()
        return meta

    def finish_best(self, tr: Trainer, data: Dataset, model: nn.Module, wall: float) -> None:
        """NAME.best with its test accuracy (every process evaluates; the main one writes)."""
        cfg, epoch = tr.cfg, self.best.best()[0]
        best = best_model(model, cfg.out_dir, cfg.run_name)
        evals = final_evaluations(tr, best, data)
        meta = checkpoint_meta(cfg, tr, data, evals, count_parameters(best), self.img_s, wall,
                               {**self.extra_meta, "best_epoch": epoch + 1})
        if tr.acc.is_main_process:
            save_best(cfg.out_dir, cfg.run_name, best, meta)
            tr.runtime.print(f"[{cfg.run_name}] best on validation: epoch {epoch + 1}, val accuracy "
                             f"{evals['val']['accuracy']:.4f} | test accuracy {evals['test']['accuracy']:.4f} | saved "
                             f"{tr.run_dir.paths['pth'][:-4]}.best.pth")
        collectives.barrier()


def kd_line(kd: dict) -> str:
    """The start's line of a distilled run: its teacher, method and parameters, and where the teacher's logits come
    from."""
    params = " ".join(f"{k.replace('dkd_', '')} {kd[k]:g}" for k in ("alpha", "tau", "dkd_alpha", "dkd_beta",
                                                                        "hint_weight") if kd.get(k) is not None)
    source = (f"logits from the cache {kd['teacher_cache']} ({kd['cache_slots']} slots)" if kd.get("mode") == "cached"
              else f"teacher run online ({kd.get('teacher')})")
    accuracy = f", test accuracy {kd['teacher_accuracy']:.4f}" if kd.get("teacher_accuracy") is not None else ""
    return (f"distilling from {kd.get('teacher_model')}{accuracy} | {kd.get('method', 'kd')} {params}"
            + (" + logit std" if kd.get("logit_std") else "") + f" | {source}")


def final_evaluations(tr: Trainer, model: nn.Module, data: Dataset) -> dict:
    """The end's evaluations ({"val": ..., "test": ...}) of a model of the run."""
    return evaluations(tr.cfg, tr.runtime, model, data, tr.loader.channels_last)[1]


def epoch_record(tr: Trainer, loss_sum: float, correct: int, seen: int, epoch: int, epoch_time: float,
                 wall: float) -> dict:
    """An epoch's metrics line from its sums (a student of a group: its own loss and correct counts)."""
    return {"epoch": epoch, "train_loss": round(loss_sum / len(tr.loader), 5),  # the mean of the step losses
            "train_accuracy": round(correct / max(1, seen), 5), "lr": tr.scheduler.get_last_lr()[0],
            "img_per_s": round(seen / max(epoch_time, 1e-9), 1), "epoch_time_s": round(epoch_time, 2),
            "precision": tr.runtime.precision, "wall_time_s": round(wall, 1)}


def batch_warnings(n: int, batch: int, steps: int) -> list[str]:
    """What the log says of an epoch's batches: the dropped tail (once), and too few steps to learn."""
    lines = []
    if n % batch:
        lines.append(f"note: {n % batch} of the {n:,} training images are left out of each epoch (the last incomplete "
                     f"batch of the epoch's shuffle is dropped; each epoch another {n % batch})")
    if steps < FEW_STEPS:
        better = max(1, n // FEW_STEPS)
        lines.append(f"warning: only {steps} optimizer step{'s' * (steps != 1)} per epoch ({n:,} training images in "
                     f"batches of {batch}): too few to learn much; lower --batch-size (about {better} gives "
                     f"{n // better} steps) or use more data")
    return lines


def checkpoint_meta(cfg, tr: Trainer, data: Dataset, evals: dict, params: int, train_img_s: float, wall: float,
                    extra_meta: dict | None) -> dict:
    """What a checkpoint's .json says of the run `cfg` (a student of a group passes its own config).

    The reported accuracy is the last epoch's, measured on the unwrapped model with the eval batches and
    precision recorded here: exactly what a reload with `kdfast evaluate` reproduces.
    """
    runtime, acc = tr.runtime, tr.acc
    described = data.describe()
    if data.tier == "stream":  # collective: every process computes the metadata
        count = torch.tensor([tr.loader.decoded], device=runtime.device)
        described["decoded_per_process"] = collectives.all_gather(count).tolist()
    return {
        "model": cfg.model, "family": model_entry(cfg.model).family, "parameters": params, "classes": data.classes,
        "test_accuracy": evals["test"]["accuracy"], "test_samples": evals["test"]["samples"],
        **({"test_top5": evals["test"]["top5"]} if "top5" in evals["test"] else {}),
        **({"test_confusion": evals["test"]["confusion"]} if "confusion" in evals["test"] else {}),
        **({"val_accuracy": evals["val"]["accuracy"], "val_samples": evals["val"]["samples"]} if "val" in evals else {}),
        "epochs": cfg.epochs, "seed": cfg.seed, "train_img_per_s": round(train_img_s, 1),
        "wall_time_s": round(wall, 1), "precision": runtime.precision, "precision_reason": runtime.precision_reason,
        "device": str(runtime.device), "num_processes": acc.num_processes,
        "distributed_type": acc.distributed_type.value,
        "eval_batch_size": cfg.eval_batch_size, "data": described, "recipe": tr.recipe.__dict__,
        "config": cfg.to_dict(), **(extra_meta or {}),
    }


def tracker_config(cfg) -> dict:
    """The resolved config as flat scalars (what every tracker accepts as hyperparameters)."""
    flat = {}
    for key, value in cfg.to_dict().items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, v in items:
            name = f"{key}.{sub}" if sub else key
            flat[name] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return flat


@contextmanager
def tracking(tr: Trainer):
    """Accelerate's trackers for the run (--log-with): opened with the resolved config, closed at the end."""
    cfg, acc = tr.cfg, tr.acc
    if cfg.log_with == "none":
        yield
        return
    recipe = {f"recipe.{k}": v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
              for k, v in tr.recipe.__dict__.items()}  # scalars, as tracker_config's (milestones: a list)
    acc.init_trackers(cfg.run_name, config={**tracker_config(cfg), **recipe})
    try:
        yield
    finally:
        acc.end_training()
