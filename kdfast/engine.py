"""The one training loop, on HF Accelerate: teachers, baseline students and KD students all run here."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import parse_flag_from_env
from tqdm.auto import tqdm

from .augment import epoch_seed
from .checkpoint import checkpoint_paths, save_checkpoint, write_json
from .config import Recipe, TrainConfig
from .data import Batch, Dataset, Split, TrainLoader, eval_batches
from .machine import accelerate_mixed_precision, resolve_precision
from .models import count_parameters, model_entry

LossStep = Callable[[nn.Module, Batch], "tuple[torch.Tensor, torch.Tensor]"]  # -> (loss, student logits)
LOG_EVERY = 25  # steps between progress-bar updates (each one is a host-device sync)


@dataclass
class Runtime:
    accelerator: Accelerator
    precision: str
    precision_reason: str

    @property
    def device(self):
        return self.accelerator.device

    def print(self, *args):
        self.accelerator.print(*args)


def _use_cpu() -> bool:
    # without cpu=True, torchrun on a machine with no GPU gives N independent single-process jobs
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def process_state() -> PartialState:
    """This process's place in the (possibly distributed) job; set up once per process."""
    return PartialState(cpu=_use_cpu())


def make_runtime(precision: str = "auto") -> Runtime:
    """An Accelerator with the precision that is really fast here (see machine.resolve_precision)."""
    device_type = process_state().device.type
    used, reason = resolve_precision(precision, device_type)
    if device_type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    AcceleratorState._reset_state()  # lets one process run several runs (the lab, tests) in turn
    accelerator = Accelerator(cpu=_use_cpu(), mixed_precision=accelerate_mixed_precision(used))
    return Runtime(accelerator, used, reason)


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """Weight decay on weights only: not on biases, norms, position embeddings or class tokens."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(recipe.momentum, 0.999))


def lr_factor(step: int, total: int, recipe: Recipe) -> float:
    """Multiplier of the peak lr at a step: linear warm-up, then linear (onecycle) or cosine decay to 0."""
    warm = max(1, round(recipe.warmup * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if recipe.schedule == "onecycle":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def predict(model: nn.Module, split: Split, spec, runtime: Runtime, batch_size: int, channels_last: bool = False,
            aug_seed: int | None = None) -> torch.Tensor:
    """Logits (N, C) float32 of every sample of a split, in index order, on every process.

    Each process runs its share; aug_seed=None: unaugmented images, else the views of that seed.
    """
    acc = runtime.accelerator
    model.eval()
    logits_all, indices_all = [], []
    for batch in eval_batches(split, batch_size, spec, runtime.device, acc.process_index, acc.num_processes,
                              channels_last, aug_seed):
        with acc.autocast():
            logits_all.append(model(batch.images).float())
        indices_all.append(batch.indices)
    logits, index = acc.gather(torch.cat(logits_all)), acc.gather(torch.cat(indices_all))
    valid = index >= 0
    logits, index = logits[valid], index[valid]
    return logits[index.argsort()]


def accuracy_and_loss(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    labels = labels.to(logits.device)
    return {"accuracy": (logits.argmax(1) == labels).sum().item() / len(labels),
            "loss": nn.functional.cross_entropy(logits, labels).item(), "samples": len(labels)}


def evaluate_model(model: nn.Module, split: Split, spec, runtime: Runtime, batch_size: int,
                   channels_last: bool = False) -> dict:
    """Test accuracy and mean CE, each sample counted once whatever the number of processes."""
    return accuracy_and_loss(predict(model, split, spec, runtime, batch_size, channels_last), split.labels)


class _State:
    """Saves and finds the resumable state of a run: Accelerate's state plus a progress record."""

    def __init__(self, runtime: Runtime, state_dir: str):
        self.runtime, self.dir = runtime, state_dir

    def save(self, epoch_done: int, record: dict) -> None:
        acc = self.runtime.accelerator
        tmp = self.dir + ".tmp"
        if acc.is_main_process and os.path.exists(tmp):
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:  # swap in the new state only once it is whole
            write_json(os.path.join(tmp, "progress.json"), {"epochs_done": epoch_done, **record})
            old = self.dir + ".old"
            if os.path.exists(self.dir):
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.dir, old)
            os.replace(tmp, self.dir)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def load(self) -> dict | None:
        for d in (self.dir, self.dir + ".old"):
            if os.path.exists(os.path.join(d, "progress.json")):
                self.runtime.accelerator.load_state(d)
                with open(os.path.join(d, "progress.json")) as f:
                    return json.load(f)
        return None

    def clear(self) -> None:
        if self.runtime.accelerator.is_main_process:
            for d in (self.dir, self.dir + ".tmp", self.dir + ".old"):
                shutil.rmtree(d, ignore_errors=True)


def _append_metrics(path: str, record: dict, keep_epochs_below: int | None = None) -> None:
    if keep_epochs_below is not None and os.path.exists(path):  # resuming: drop epochs that will be redone
        with open(path) as f:
            lines = [l for l in f if l.strip() and json.loads(l)["epoch"] < keep_epochs_below]
        with open(path, "w") as f:
            f.writelines(lines)
    if record:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def fit(model: nn.Module, loss_step: LossStep, data: Dataset, cfg: TrainConfig, runtime: Runtime,
        extra_meta: dict | None = None, aug_seed_for_epoch: Callable[[int], int] | None = None) -> dict:
    """Train `model` with `loss_step` for cfg.epochs; save the checkpoint; return its metadata.

    Epoch e trains on the views of augmentation seed aug_seed_for_epoch(e) (default: a seed per epoch
    derived from cfg.seed). Every process runs this; only the main process prints and writes files.
    """
    aug_seed_for_epoch = aug_seed_for_epoch or (lambda epoch: epoch_seed(cfg.seed, epoch))
    acc = runtime.accelerator
    entry = model_entry(cfg.model)
    channels_last = entry.family == "cnn"
    recipe = cfg.resolved_recipe(entry.family)
    paths = checkpoint_paths(cfg.out_dir, cfg.run_name)
    loader = TrainLoader(data.train, cfg.batch_size, cfg.seed, cfg.augment, runtime.device,
                         acc.process_index, acc.num_processes, channels_last)
    total_steps = cfg.epochs * len(loader)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = count_parameters(model)
    optimizer = build_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, recipe))
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = acc.prepare(model, optimizer)
    acc.register_for_checkpointing(scheduler)  # stepped once per optimizer step, on every process
    state = _State(runtime, paths["state"])

    start_epoch, wall_before = 0, 0.0
    progress = state.load() if cfg.resume else None
    if progress:
        start_epoch, wall_before = progress["epochs_done"], progress.get("wall_time_s", 0.0)
        runtime.print(f"[{cfg.run_name}] resuming after epoch {start_epoch} from {paths['state']}")
    if acc.is_main_process:
        os.makedirs(cfg.out_dir, exist_ok=True)
        _append_metrics(paths["metrics"], {}, keep_epochs_below=start_epoch)
    runtime.print(f"[{cfg.run_name}] {cfg.model}: {params:,} params | {len(data.train)} train / {len(data.test)} test "
                  f"| {cfg.epochs} epochs x {len(loader)} steps of {cfg.batch_size} | {recipe.optimizer} lr {recipe.lr:g} "
                  f"{recipe.schedule} | {runtime.precision} ({runtime.precision_reason}) on {runtime.device} "
                  f"x{acc.num_processes}")

    wall_start = time.perf_counter()
    test = {"accuracy": float("nan")}
    train_img_s = 0.0
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        loss_sum = torch.zeros((), device=runtime.device)
        correct = torch.zeros((), device=runtime.device, dtype=torch.long)
        seen = 0
        t0 = time.perf_counter()
        bar = tqdm(total=len(loader), desc=f"{cfg.run_name} {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (cfg.progress and acc.is_local_main_process), dynamic_ncols=True)
        for step, batch in enumerate(loader.epoch(epoch, aug_seed_for_epoch(epoch))):
            loss, logits = loss_step(model, batch)
            optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            if recipe.grad_clip > 0:
                acc.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == batch.labels).sum()
            seen += len(batch.labels)
            bar.update(1)
            if step % LOG_EVERY == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.3g}")
        bar.close()
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        epoch_time = time.perf_counter() - t0
        train_img_s = seen * acc.num_processes / epoch_time
        train_loss = acc.reduce(loss_sum, "mean").item() / len(loader)
        train_acc = acc.reduce(correct, "sum").item() / (seen * acc.num_processes)
        record = {"epoch": epoch, "train_loss": round(train_loss, 5), "train_accuracy": round(train_acc, 5),
                  "lr": scheduler.get_last_lr()[0], "img_per_s": round(train_img_s, 1),
                  "epoch_time_s": round(epoch_time, 2), "precision": runtime.precision}
        if epoch + 1 == cfg.epochs:
            eval_model = acc.unwrap_model(model, keep_torch_compile=False)  # what is saved and reloaded
        elif cfg.eval_every and (epoch + 1) % cfg.eval_every == 0:
            eval_model = model
        else:
            eval_model = None
        if eval_model is not None:
            test = evaluate_model(eval_model, data.test, cfg.augment, runtime, cfg.eval_batch_size, channels_last)
            record.update(test_accuracy=test["accuracy"], test_loss=round(test["loss"], 5))
        wall = wall_before + time.perf_counter() - wall_start
        record["wall_time_s"] = round(wall, 1)
        if acc.is_main_process:
            _append_metrics(paths["metrics"], record)
        runtime.print(f"[{cfg.run_name}] epoch {epoch + 1}/{cfg.epochs} loss {train_loss:.4f} train {train_acc:.4f}"
                      + (f" test {record['test_accuracy']:.4f}" if "test_accuracy" in record else "")
                      + f" | {train_img_s:,.0f} img/s | {epoch_time:.1f}s")
        state.save(epoch + 1, {"wall_time_s": wall, "config": cfg.to_dict()})

    final_model = acc.unwrap_model(model, keep_torch_compile=False)
    if start_epoch >= cfg.epochs or "samples" not in test:  # nothing left to train after a resume
        test = evaluate_model(final_model, data.test, cfg.augment, runtime, cfg.eval_batch_size, channels_last)
    # the reported accuracy is the last epoch's, measured on the unwrapped model with the eval batches and
    # precision recorded below: exactly what a reload with `kdfast evaluate` reproduces
    wall = wall_before + time.perf_counter() - wall_start
    meta = {
        "model": cfg.model, "family": entry.family, "parameters": params, "classes": data.classes,
        "test_accuracy": test["accuracy"], "test_samples": test["samples"],
        "epochs": cfg.epochs, "seed": cfg.seed, "train_img_per_s": round(train_img_s, 1),
        "wall_time_s": round(wall, 1), "precision": runtime.precision, "precision_reason": runtime.precision_reason,
        "device": str(runtime.device), "num_processes": acc.num_processes,
        "distributed_type": acc.distributed_type.value,
        "eval_batch_size": cfg.eval_batch_size, "data": data.describe(), "recipe": recipe.__dict__,
        "config": cfg.to_dict(), **(extra_meta or {}),
    }
    if acc.is_main_process:
        save_checkpoint(cfg.out_dir, cfg.run_name, final_model, meta)
        runtime.print(f"[{cfg.run_name}] test accuracy {test['accuracy']:.4f} | wall {wall:.1f}s | saved {paths['pth']}")
    acc.wait_for_everyone()
    state.clear()
    acc.free_memory()
    return meta
