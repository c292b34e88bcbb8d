"""What the steps of a run share: the prepared model and optimizer, the schedule, the loader, the loss step, and the
epoch's running sums. One model, or K students together (kdfast.group): the loss step and the clip say which."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from accelerate import Accelerator
from torch.optim.swa_utils import AveragedModel

from .. import collectives
from ..config import Recipe
from ..data import Batch, Dataset, TrainLoader
from ..models import model_entry, plain_module
from ..rundir import RunDir
from .optimizer import build_optimizer, make_ema, make_scheduler
from .runtime import Runtime

LossStep = Callable[[nn.Module, Batch], "tuple[torch.Tensor, torch.Tensor]"]  # -> (loss, student logits)
Clip = Callable[[Accelerator, nn.Module, float], object]  # (accelerator, prepared model, max norm): clips in place
STEP_LOSS_SUM = "sum of step losses"  # saved sums' meaning of "loss"; states saved before it summed over processes


def clip_whole(acc: Accelerator, model: nn.Module, max_norm: float):
    """One model: clip_grad_norm_ over all its parameters (through Accelerate: fp16 gradients are unscaled first)."""
    return acc.clip_grad_norm_(model.parameters(), max_norm)


@dataclass
class Trainer:
    """A run's training state. loss_step returns the step's loss, () for one model or (K,) for K students trained
    together (loss_shape), and the logits ((B, classes) or (K, B, classes)); the gradient is that of the sum."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: TrainLoader
    loss_step: LossStep
    recipe: Recipe
    runtime: Runtime
    run_dir: RunDir
    cfg: object  # the run's TrainConfig (a group's: its shared config)
    export: Callable[[nn.Module], nn.Module]  # the trained module -> the model that is evaluated and saved
    clip: Clip = clip_whole
    loss_shape: tuple[int, ...] = ()
    ema: AveragedModel | None = None  # --ema: the moving average of the exported model's weights and buffers
    # per-epoch sums (device tensors, this process's part) and the first non-finite step (-1: none)
    sums: dict = field(default_factory=dict)
    bad_step: torch.Tensor | None = None

    @property
    def acc(self) -> Accelerator:
        return self.runtime.accelerator

    def unwrapped(self) -> nn.Module:
        """The trained module without DDP and compile wrappers (plain state-dict keys)."""
        return plain_module(self.model)

    def modules(self) -> dict[str, nn.Module]:
        modules = {"model": self.unwrapped()}
        return modules | ({"ema": self.ema} if self.ema is not None else {})

    def trained(self) -> nn.Module:
        """The trained model unwrapped, without helpers such as a hint regressor."""
        return self.export(self.unwrapped())

    def exported(self) -> nn.Module:
        """The model to evaluate and save: the trained one, or its moving average with --ema."""
        return self.trained() if self.ema is None else self.ema.module

    def reset_sums(self, saved: dict | None = None) -> None:
        """Zero the epoch's sums; a resumed epoch starts from the saved global sums (on the main process)."""
        dev = self.runtime.device
        saved = saved if (saved and self.acc.is_main_process) else {}
        zero = torch.zeros(self.loss_shape).tolist()
        self.sums = {"loss": torch.tensor(saved_step_losses(saved, zero, self.acc.num_processes), dtype=torch.float32,
                                          device=dev),
                     "correct": torch.tensor(saved.get("correct", zero), device=dev).long(),
                     "seen": torch.tensor(int(saved.get("seen", 0)), device=dev)}
        self.bad_step = torch.full((), -1, dtype=torch.long, device=dev)

    def global_sums(self) -> dict:
        """The epoch's sums over every process: "loss" is the sum over its steps of each step's loss (the mean over
        the processes), so that it means the same whatever the number of processes; correct / seen are counts."""
        reduced = {k: collectives.all_reduce(v.clone(), "sum") for k, v in self.sums.items()}
        return {"loss": reduced["loss"].tolist(), "correct": reduced["correct"].tolist(),
                "seen": int(reduced["seen"].item()), "loss_is": STEP_LOSS_SUM}


def saved_step_losses(saved: dict, zero, processes: int):
    """The loss sum of a saved epoch part as a sum of step losses. A state saved before STEP_LOSS_SUM summed each
    process's losses: read as saved by as many processes as now (what its resume assumed)."""
    loss = saved.get("loss", zero)
    if saved and saved.get("loss_is") != STEP_LOSS_SUM:
        loss = [v / processes for v in loss] if isinstance(loss, list) else loss / processes
    return loss


def make_trainer(model: nn.Module, loss_step: LossStep, data: Dataset, cfg, runtime: Runtime, run_dir: RunDir,
                 export: Callable[[nn.Module], nn.Module] | None = None, clip: Clip = clip_whole,
                 loss_shape: tuple[int, ...] = ()) -> Trainer:
    """The loader, optimizer and schedule of the run, the model prepared (channels-last for CNNs, SyncBatchNorm,
    compiled, DDP), and the EMA copy of the exported model."""
    acc = runtime.accelerator
    export = export or (lambda m: m)
    entry = model_entry(cfg.model)
    channels_last = entry.family == "cnn"
    recipe = cfg.resolved_recipe(entry.family, entry.light)
    loader = TrainLoader(data.train, cfg.batch_size, cfg.seed, cfg.augment, runtime.device,
                         acc.process_index, acc.num_processes, channels_last, cfg.data_workers, cfg.grad_accum)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, cfg.epochs * len(loader), recipe)
    if cfg.sync_bn and acc.num_processes > 1:  # one process: plain BatchNorm computes the same
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model, optimizer = acc.prepare(model, optimizer)  # the scheduler is stepped by hand, once per optimizer step
    if cfg.compile:  # around DDP, as torch recommends (DDPOptimizer splits the graph at its buckets)
        model = torch.compile(model)
    ema = make_ema(export(plain_module(model)), cfg.ema) if cfg.ema else None
    return Trainer(model, optimizer, scheduler, loader, loss_step, recipe, runtime, run_dir, cfg, export, clip,
                   loss_shape, ema=ema)
