"""The one training loop, on HF Accelerate: teachers, baseline students and KD students all run here."""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (DistributedDataParallelKwargs, GradientAccumulationPlugin, InitProcessGroupKwargs,
                              broadcast_object_list, parse_flag_from_env)
from tqdm.auto import tqdm

from .augment import epoch_seed
from .checkpoint import save_checkpoint
from . import cluster
from .config import DIST_TIMEOUT_S, Recipe, TrainConfig
from .data import Batch, DataError, Dataset, Split, TrainLoader, default_budget, eval_batches, load_dataset
from .errors import USER_ERRORS, Interrupted, KdfastError, user_message
from .machine import accelerate_mixed_precision, launcher_precision, resolve_precision
from .models import count_parameters, model_entry
from .rundir import RunDir, describe_progress, finished_run
from .together import clip_per_student
from .tta import tta_logits

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
        say(self.accelerator, *args)


def say(state: Accelerator | PartialState, *args) -> None:
    """print on the main process of the whole job only (Accelerate's print is per node: once on every node)."""
    if state.is_main_process:
        print(*args, flush=True)


def _use_cpu() -> bool:
    # without cpu=True, torchrun on a machine with no GPU gives N independent single-process jobs
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def process_state(dist_timeout: float | None = None) -> PartialState:
    """This process's place in the (possibly distributed) job; set up once per process: the first call's
    dist_timeout (seconds a collective waits for the others; default torch's) is the process group's."""
    if PartialState._shared_state:  # set up already
        return PartialState()
    timeout = timedelta(seconds=DIST_TIMEOUT_S if dist_timeout is None else dist_timeout)
    return PartialState(cpu=_use_cpu(), timeout=timeout, **cluster.process_group_store(timeout))


def decide_precision(precision: str, device_type: str) -> tuple[str, str]:
    """(precision used, what decided it): --precision when given; with auto, a precision `accelerate launch` was
    told (its --mixed_precision or config file) wins over kdfast's own choice."""
    launched = launcher_precision() if precision == "auto" else None
    if launched is None:
        return resolve_precision(precision, device_type)
    used, reason = resolve_precision(launched[0], device_type)
    return used, f"{launched[1]}, over --precision auto" + ("" if reason == "requested" else f"; {reason}")


def make_runtime(precision: str = "auto", find_unused_parameters: bool = False, log_with: str = "none",
                 logging_dir: str | None = None, accumulate: int = 1,
                 dist_timeout: float = DIST_TIMEOUT_S) -> Runtime:
    """An Accelerator with the precision that is really fast here (see decide_precision).

    find_unused_parameters: for losses that leave some parameters without a gradient in some steps
    (FitNets' stages), which DDP must then be told about. log_with: Accelerate's experiment trackers
    ("none", "tensorboard", "wandb", "mlflow", "aim", "all"), writing under logging_dir where they write files.
    accumulate: micro-batches per optimizer step (Accelerate's gradient accumulation). dist_timeout: seconds a
    collective waits for the other processes (Accelerate's InitProcessGroupKwargs), then the job stops (kdfast.cluster).
    """
    device_type = process_state(dist_timeout).device.type
    used, reason = decide_precision(precision, device_type)
    if device_type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    AcceleratorState._reset_state()  # lets one process run several runs (the lab, tests) in turn
    GradientState._reset_state()
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=dist_timeout))]
    handlers += [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    trackers = {} if log_with == "none" else {"log_with": log_with, "project_dir": logging_dir}
    accelerator = Accelerator(cpu=_use_cpu(), mixed_precision=accelerate_mixed_precision(used),
                              gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accumulate),
                              kwargs_handlers=handlers, **trackers)
    return Runtime(accelerator, used, reason)


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """Weight decay on weights only: not on biases, norms, position embeddings or class tokens.

    A model that stacks several students (together.StackedModel) says each tensor's plain name and ndim.
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    named = model.decay_params() if hasattr(model, "decay_params") else \
        [(n, p, p.ndim) for n, p in model.named_parameters()]
    decay, no_decay = [], []
    for name, p, ndim in named:
        if p.requires_grad:
            (no_decay if ndim <= 1 or name in skip else decay).append(p)
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


def data_budget(cfg, runtime: Runtime) -> int:
    """--data-budget-gb in bytes, else half the device's free memory (shared by the processes of a CPU host), as the
    main process sees it: every process then chooses the same tier."""
    if getattr(cfg, "data_budget_gb", 0):
        return int(cfg.data_budget_gb * 2**30)
    acc = runtime.accelerator
    share = acc.num_processes if runtime.device.type == "cpu" else 1
    return on_main(acc, lambda: default_budget(runtime.device) // share)


def load_data(cfg, runtime: Runtime, source: str | None, train_per_class: int, test_per_class: int, dataset: str,
              store_size: int, val: tuple[int, int] | None = None) -> Dataset:
    """A run's dataset in the tier its flags ask for; the main process decodes (or indexes) and caches it first,
    the others then read the cache. val: (per class, seed) of the validation split (default: cfg's)."""
    val = val or (getattr(cfg, "val_per_class", 0) or 0, getattr(cfg, "val_seed", 0) or 0)
    budget = data_budget(cfg, runtime)
    acc = runtime.accelerator
    with acc.main_process_first():
        data = load_dataset(source, cfg.cache_dir, getattr(cfg, "download", False), train_per_class, test_per_class,
                            log=runtime.print, dataset=dataset, store_size=store_size,
                            tier=getattr(cfg, "data_tier", "device"), budget=budget,
                            progress=getattr(cfg, "progress", True) and acc.is_main_process,
                            val_per_class=val[0], val_seed=val[1])
    batch = getattr(cfg, "batch_size", None) or 0
    one_batch = batch * 3 * data.train.box[0] * data.train.box[1]
    if getattr(cfg, "data_budget_gb", 0) and one_batch > budget:
        raise DataError(f"--data-budget-gb {cfg.data_budget_gb:g} is smaller than one batch: {batch} images of up to "
                        f"{data.train.box[0]}x{data.train.box[1]} px take {one_batch / 2**20:,.0f} MB decoded. Raise "
                        "--data-budget-gb, lower --batch-size or --store-size.")
    return data


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
    logits, index = acc.gather(torch.cat(logits_all)), acc.gather(torch.cat(indices_all))
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
    return result


def evaluate_model(model: nn.Module, split: Split, spec, runtime: Runtime, batch_size: int,
                   channels_last: bool = False, workers: int = 2, tta: str = "none") -> dict:
    """Test accuracy and mean CE, each sample counted once whatever the number of processes."""
    return accuracy_and_loss(predict(model, split, spec, runtime, batch_size, channels_last, workers=workers,
                                     tta=tta), split.labels)


def step_seed(run_seed: int, epoch: int, step: int, rank: int) -> int:
    """The torch RNG seed of one micro-batch (drop-path masks; rank: its piece of the global batch): resuming at any
    step needs no RNG state, and one process accumulating N micro-batches draws what N processes draw."""
    return (((run_seed * 1_000_003 + epoch) * 1_000_033 + step) * 131 + rank) % (1 << 62)


class NonFiniteLoss(KdfastError):
    """The loss became NaN or infinite: the run stops and writes no checkpoint."""


class Preemption:
    """SIGINT / SIGTERM / SIGUSR1 while training: the current step finishes, the state is saved, the run exits.

    A second Ctrl-C (SIGINT) interrupts at once (the state saved last is kept); a second SIGTERM does not: launchers
    and schedulers deliver it to every process of the job, some twice (torchrun forwards the one a `timeout` or
    Slurm sent to the whole group), and it must not cancel the save it asked for. Under several processes the
    request is shared at check points, so every process stops at the same step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # USR1: what clusters send before a time limit

    def __init__(self):
        self.signum, self.previous = 0, {}

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def requested(self, acc: Accelerator) -> int:
        """The signal number asked for on any process (0: none); collective when there are several."""
        if acc.num_processes == 1:
            return self.signum
        return int(acc.gather(torch.tensor([self.signum], device=acc.device)).max().item())


def on_main(acc: Accelerator | PartialState, fn):
    """fn() on the main process only; its (picklable) result, or the user error it raised, reaches every
    process, so that a refusal on the main process never leaves the others waiting in a collective."""
    result, error = None, None
    if acc.is_main_process:
        try:
            result = fn()
        except USER_ERRORS + (OSError,) as e:
            if acc.num_processes == 1:
                raise
            error = user_message(e)
    if acc.num_processes > 1:
        result, error = broadcast_object_list([result, error])
    if error:
        raise KdfastError(error)
    return result


@contextmanager
def open_run(cfg: TrainConfig, runtime: Runtime):
    """The run's directory, locked for the whole run, with `resume_from` decided (before any data work).

    Refuses: an invalid name, a second writer of the same output, an interrupted state without
    --resume / --fresh, a state written under another config, a finished run under another config without --fresh.
    """
    run_dir = RunDir(cfg.out_dir, cfg.run_name)
    check_sync_bn(cfg, runtime)
    restarted = cfg.auto_resume and cluster.restart_count() > 0

    def claim():
        run_dir.prepare()
        run_dir.lock.acquire(runtime.print)
        try:
            run_dir.remove_stale_temporaries(runtime.print)
            resume_from = run_dir.check_resume(cfg.to_dict(), cfg.resume or restarted, cfg.fresh, runtime.print)
            kept = finished_run(cfg) if restarted and resume_from is None else None
            if restarted:
                runtime.print(f"[{cfg.run_name}] --auto-resume: restart {cluster.restart_count()} of this job: " + (
                    "continuing its saved state" if resume_from else "its finished run is kept" if kept else
                    "no state was saved yet: starting"))
            if resume_from is None and kept is None:
                run_dir.check_overwrite(cfg.to_dict(), cfg.fresh, runtime.print)
            return resume_from, kept
        except BaseException:
            run_dir.lock.release()
            raise

    run_dir.resume_from, run_dir.kept = on_main(runtime.accelerator, claim)
    try:
        yield run_dir
    finally:
        run_dir.lock.release()


def check_sync_bn(cfg: TrainConfig, runtime: Runtime) -> None:
    """--sync-bn needs NCCL: torch's SyncBatchNorm has no CPU (gloo) kernel."""
    if cfg.sync_bn and runtime.device.type != "cuda":
        raise ValueError(f"--sync-bn: SyncBatchNorm needs GPUs with NCCL; torch has none on {runtime.device.type} "
                         "(gloo). Leave --sync-bn out here: each process then normalizes with its own batch's "
                         "statistics.")


@dataclass
class Training:
    """What the steps of one run share: the prepared model and optimizer, schedule, loader, loss."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: TrainLoader
    loss_step: LossStep
    recipe: Recipe
    runtime: Runtime
    run_dir: RunDir
    cfg: TrainConfig
    export: Callable[[nn.Module], nn.Module]  # the trained module -> the model that is evaluated and saved
    students: int = 0  # K students trained together (kdfast.group): losses and sums are (K,) vectors; 0: one model
    ema: AveragedModel | None = None  # --ema: the moving average of the exported model's weights and buffers
    # per-epoch sums (device tensors, this process's part) and the first non-finite step (-1: none)
    sums: dict = field(default_factory=dict)
    bad_step: torch.Tensor | None = None

    @property
    def acc(self) -> Accelerator:
        return self.runtime.accelerator

    def modules(self) -> dict[str, nn.Module]:
        modules = {"model": self.acc.unwrap_model(self.model, keep_torch_compile=False)}
        return modules | ({"ema": self.ema} if self.ema is not None else {})

    def trained(self) -> nn.Module:
        """The trained model unwrapped, without helpers such as a hint regressor."""
        return self.export(self.acc.unwrap_model(self.model, keep_torch_compile=False))

    def exported(self) -> nn.Module:
        """The model to evaluate and save: the trained one, or its moving average with --ema."""
        return self.trained() if self.ema is None else self.ema.module

    def reset_sums(self, saved: dict | None = None) -> None:
        """Zero the epoch's sums; a resumed epoch starts from the saved global sums (on the main process)."""
        dev = self.runtime.device
        saved = saved if (saved and self.acc.is_main_process) else {}
        zero = [0.0] * self.students if self.students else 0.0
        self.sums = {"loss": torch.tensor(saved_step_losses(saved, zero, self.acc.num_processes), dtype=torch.float32,
                                          device=dev),
                     "correct": torch.tensor(saved.get("correct", zero), device=dev).long(),
                     "seen": torch.tensor(int(saved.get("seen", 0)), device=dev)}
        self.bad_step = torch.full((), -1, dtype=torch.long, device=dev)

    def global_sums(self) -> dict:
        """The epoch's sums over every process: "loss" is the sum over its steps of each step's loss (the mean over
        the processes), so that it means the same whatever the number of processes; correct / seen are counts."""
        reduced = {k: self.acc.reduce(v.clone(), "sum") for k, v in self.sums.items()}
        return {"loss": reduced["loss"].tolist(), "correct": reduced["correct"].tolist(),
                "seen": int(reduced["seen"].item()), "loss_is": STEP_LOSS_SUM}


STEP_LOSS_SUM = "sum of step losses"  # saved sums' meaning of "loss"; states saved before it summed over processes


def saved_step_losses(saved: dict, zero, processes: int):
    """The loss sum of a saved epoch part as a sum of step losses. A state saved before STEP_LOSS_SUM summed each
    process's losses: read as saved by as many processes as now (what its resume assumed)."""
    loss = saved.get("loss", zero)
    if saved and saved.get("loss_is") != STEP_LOSS_SUM:
        loss = [v / processes for v in loss] if isinstance(loss, list) else loss / processes
    return loss


def train_step(tr: Training, micro_batches: list[Batch], global_step: int) -> torch.Tensor:
    """One optimizer step on the micro-batches of one global batch (one, unless --grad-accum), through Accelerate's
    gradient accumulation (no gradient sync before the last); returns the (detached) loss. No host-device sync.

    K students together: the loss is their (K,) losses and the logits (K, B, classes); the gradient of the sum
    reaches each student's own parameters only, and clipping is per student.
    """
    step_loss, acc = 0.0, tr.acc
    epoch, step = divmod(global_step, len(tr.loader))
    for m, batch in enumerate(micro_batches):  # micro-batch m of this process is piece m * processes + rank
        torch.manual_seed(step_seed(tr.cfg.seed, epoch, step, m * acc.num_processes + acc.process_index))
        with tr.acc.accumulate(tr.model):
            loss, logits = tr.loss_step(tr.model, batch)
            tr.acc.backward(loss.sum() if tr.students else loss)  # divided by the micro-batches per step
        loss = loss.detach()
        step_loss = step_loss + loss / len(micro_batches)
        tr.sums["correct"] += (logits.detach().argmax(-1) == batch.labels).sum(-1)
        tr.sums["seen"] += len(batch.labels)
    if tr.recipe.grad_clip > 0:
        if tr.students:
            tr.acc.unscale_gradients()  # fp16: clip the true gradients, as clip_grad_norm_ does
            clip_per_student(tr.acc.unwrap_model(tr.model), tr.recipe.grad_clip)
        else:
            tr.acc.clip_grad_norm_(tr.model.parameters(), tr.recipe.grad_clip)
    tr.optimizer.step()
    tr.scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    if tr.ema is not None:
        tr.ema.update_parameters(tr.trained())
    tr.sums["loss"] += step_loss / acc.num_processes  # summed over the processes: the step's mean loss
    tr.bad_step = torch.where((tr.bad_step < 0) & ~torch.isfinite(step_loss).all(), global_step, tr.bad_step)
    return step_loss.sum()


def grouped(batches, size: int):
    """Consecutive micro-batches in lists of `size`: one list per optimizer step."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def check_finite(tr: Training) -> None:
    """Stop at the first non-finite loss (collective under several processes); a host-device sync."""
    bad = tr.bad_step if tr.acc.num_processes == 1 else tr.acc.gather(tr.bad_step[None]).max()
    bad = int(bad.item())
    if bad < 0:
        return
    saved = tr.run_dir.state.saved()
    kept = (f"the last good state ({describe_progress(saved['progress'])}) is kept in {saved['dir']}" if saved
            else "no state was saved before it")
    steps = len(tr.loader)
    raise NonFiniteLoss(f"[{tr.cfg.run_name}] the loss became NaN or infinite at step {bad % steps + 1} of epoch "
                        f"{bad // steps + 1}; stopped, no checkpoint written; {kept}. Lower --lr (or raise --warmup / "
                        "set --grad-clip), then start over with --fresh.")


def save_progress(tr: Training, epoch: int, step: int, epoch_time: float, wall: float) -> None:
    """Save the resumable state: `step` steps of epoch `epoch` are done (step 0: the epoch before is whole)."""
    check_finite(tr)
    sums = tr.global_sums()  # collective
    if tr.acc.is_main_process:
        progress = {"epoch": epoch, "step": step, "sums": sums, "epoch_time_s": epoch_time, "wall_time_s": wall}
        tr.run_dir.state.save(tr.modules(), tr.optimizer, tr.scheduler, tr.acc.scaler, progress, tr.cfg.to_dict())
    tr.acc.wait_for_everyone()


def run_epoch(tr: Training, epoch: int, start_step: int, aug_seed: int, stop: Preemption,
              time_before: float, wall_at) -> float:
    """Train the rest of an epoch from start_step; returns its training time (s). Saves and raises on a stop."""
    cfg, acc, loader = tr.cfg, tr.acc, tr.loader
    check_every = 1 if acc.num_processes == 1 else LOG_EVERY  # a stop request is shared at check points
    finite_every = 1 if tr.runtime.device.type == "cpu" else LOG_EVERY  # .item() is a sync on a GPU
    show_every = max(1, min(LOG_EVERY, len(loader) // 10))  # the bar's loss: about 10 updates an epoch, or more
    bar = tqdm(total=len(loader), initial=start_step, desc=f"{cfg.run_name} {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not (cfg.progress and acc.is_main_process), dynamic_ncols=True)
    tr.model.train()  # evaluation left it in eval mode
    t0 = time.perf_counter()
    for step, micro in enumerate(grouped(loader.epoch(epoch, aug_seed, start_step), loader.accumulate),
                                 start=start_step):
        global_step = epoch * len(loader) + step
        loss = train_step(tr, micro, global_step)
        bar.update(1)
        done = step + 1
        if done % finite_every == 0:
            check_finite(tr)
        if done % show_every == 0 or done == len(loader):
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{tr.scheduler.get_last_lr()[0]:.3g}")
        signum = stop.requested(acc) if done % check_every == 0 or done == len(loader) else 0
        if signum or (cfg.checkpoint_every and (global_step + 1) % cfg.checkpoint_every == 0 and done < len(loader)):
            save_progress(tr, epoch, done, time_before + time.perf_counter() - t0, wall_at())
        if signum:
            bar.close()
            name = signal.Signals(signum).name
            raise Interrupted(signum, f"[{cfg.run_name}] {name}: stopped after step {done} of epoch {epoch + 1}; "
                                      f"the state is saved in {tr.run_dir.state_dir}. {resume_advice(cfg)}")
    bar.close()
    check_finite(tr)
    if tr.runtime.device.type == "cuda":
        torch.cuda.synchronize()
    return time_before + time.perf_counter() - t0


def setup_training(model: nn.Module, loss_step: LossStep, data: Dataset, cfg: TrainConfig, runtime: Runtime,
                   run_dir: RunDir, export: Callable[[nn.Module], nn.Module]) -> Training:
    acc = runtime.accelerator
    entry = model_entry(cfg.model)
    channels_last = entry.family == "cnn"
    recipe = cfg.resolved_recipe(entry.family)
    loader = TrainLoader(data.train, cfg.batch_size, cfg.seed, cfg.augment, runtime.device,
                         acc.process_index, acc.num_processes, channels_last, cfg.data_workers, cfg.grad_accum)
    total_steps = cfg.epochs * len(loader)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, recipe))
    if cfg.sync_bn and acc.num_processes > 1:  # one process: plain BatchNorm computes the same
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = acc.prepare(model, optimizer)  # the scheduler is stepped by hand, once per optimizer step
    ema = make_ema(export(acc.unwrap_model(model, keep_torch_compile=False)), cfg.ema) if cfg.ema else None
    return Training(model, optimizer, scheduler, loader, loss_step, recipe, runtime, run_dir, cfg, export, ema=ema)


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """torch's AveragedModel as an EMA of parameters and buffers: its first update copies the weights, each later
    one sets ema = decay * ema + (1 - decay) * weights."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def fit(model: nn.Module, loss_step: LossStep, data: Dataset, cfg: TrainConfig, runtime: Runtime, run_dir: RunDir,
        extra_meta: dict | None = None, aug_seed_for_epoch: Callable[[int], int] | None = None,
        export: Callable[[nn.Module], nn.Module] | None = None) -> dict:
    """Train `model` with `loss_step` for cfg.epochs in an opened run directory; save the checkpoint; return its metadata.

    Epoch e trains on the views of augmentation seed aug_seed_for_epoch(e) (default: a seed per epoch
    derived from cfg.seed). `export(model)` is what is evaluated and saved (default: the model itself;
    FitNets trains the student with its regressor and exports the student). Every process runs this;
    only the main process prints and writes files.
    """
    aug_seed_for_epoch = aug_seed_for_epoch or (lambda epoch: epoch_seed(cfg.seed, epoch))
    export = export or (lambda m: m)
    acc = runtime.accelerator
    params = count_parameters(export(model))
    tr = setup_training(model, loss_step, data, cfg, runtime, run_dir, export)
    progress = {"epoch": 0, "step": 0, "wall_time_s": 0.0}
    if run_dir.resume_from:
        progress = run_dir.state.restore(run_dir.resume_from, tr.modules(), tr.optimizer, tr.scheduler, acc.scaler)
        runtime.print(f"[{cfg.run_name}] resuming {describe_progress(progress)} from {run_dir.state_dir}")
    records = []  # the epochs kept (those to be redone are dropped); the file is rewritten after the next epoch
    if acc.is_main_process and progress["epoch"]:
        records = [r for r in run_dir.read_metrics(run_dir.metrics_path()) if r["epoch"] < progress["epoch"]]
    for line in batch_warnings(len(data.train), cfg.batch_size, len(tr.loader)):
        runtime.print(f"[{cfg.run_name}] {line}")
    val = f" / {len(data.val)} val" if data.val is not None else ""
    runtime.print(f"[{cfg.run_name}] {cfg.model}: {params:,} params | {len(data.train)} train{val} / {len(data.test)} test "
                  f"| {cfg.epochs} epochs x {len(tr.loader)} steps of {cfg.batch_size} | {tr.recipe.optimizer} lr "
                  f"{tr.recipe.lr:g} {tr.recipe.schedule} | {runtime.precision} ({runtime.precision_reason}) on "
                  f"{runtime.device} x{acc.num_processes}")
    runtime.print(f"[{cfg.run_name}] {cfg.augment.describe()} | data: {data.tier} tier"
                  + (f", stored at up to {data.store_size} px" if data.store_size else "")
                  + (f" | EMA {cfg.ema:g}" if cfg.ema else "") + (f" | TTA {cfg.tta}" if cfg.tta != "none" else ""))
    wall_start = time.perf_counter()

    def wall_at() -> float:
        return progress["wall_time_s"] + time.perf_counter() - wall_start

    evals, train_img_s = {}, 0.0
    with lost_processes(tr):
        for epoch, epoch_time in train_epochs(tr, progress, aug_seed_for_epoch, wall_at):
            record, evals = end_epoch(tr, data, epoch, epoch_time)
            train_img_s = record["img_per_s"]
            record["wall_time_s"] = round(wall_at(), 1)
            if acc.is_main_process:
                records.append(record)
                run_dir.write_metrics(records)
            if cfg.log_with != "none":  # the same numbers as the metrics line, at step = epochs done
                acc.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"},
                        step=epoch + 1)
        return finish(tr, data, evals, params, train_img_s, wall_at(), extra_meta)


@contextmanager
def lost_processes(tr: Training):
    """A collective that fails because a process or node of the job is lost or stuck becomes kdfast.cluster's
    JobLost: who was lost, the state saved last, how to resume (the launcher's own block follows it)."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, (KdfastError, cluster.JobLost)) or not cluster.is_collective_failure(e):
            raise
        raise cluster.lost_job(e, saved_state_line(tr.run_dir),
                               resume_advice(tr.cfg) + " Any number of processes can continue it.") from None


def saved_state_line(run_dir: RunDir) -> str:
    """Where the last whole state is, as this process sees the --out-dir (the main node's disk may be another)."""
    try:
        saved = run_dir.state.saved()
    except Exception:  # a state being written by the main process, or damaged: not this line's business
        saved = None
    if saved is None:
        return f"No whole state of {run_dir.name!r} is in {run_dir.state_dir} as this node sees it."
    return f"The last whole state of {run_dir.name!r} is {saved['dir']} ({describe_progress(saved['progress'])})."


def resume_advice(cfg: TrainConfig) -> str:
    """What continues an interrupted run: its own command again, with --resume unless it already resumes (the lab
    and sweeps start every run that way, so their advice is just their command again)."""
    if cfg.resume:
        return "Run the same command again to continue."
    if cfg.auto_resume:
        return ("A restart of this job (torchrun --max-restarts, a Slurm requeue) continues it by itself; by hand: "
                "the same command with --resume.")
    return "Resume with the same command and --resume."


FEW_STEPS = 10  # fewer optimizer steps per epoch than this: said at the start of the run


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


def train_epochs(tr: Training, progress: dict, aug_seed_for_epoch: Callable[[int], int], wall_at):
    """Train each epoch left (a resumed one from its saved step) and yield (epoch, its training time); once the
    caller has ended the epoch (metrics, evaluation), save the state and honour a stop asked meanwhile."""
    cfg, acc = tr.cfg, tr.acc
    with Preemption() as stop, tracking(tr):
        for epoch in range(progress["epoch"], cfg.epochs):
            resumed = epoch == progress["epoch"] and progress.get("step", 0) > 0
            tr.reset_sums(progress.get("sums") if resumed else None)
            epoch_time = run_epoch(tr, epoch, progress["step"] if resumed else 0, aug_seed_for_epoch(epoch), stop,
                                   progress.get("epoch_time_s", 0.0) if resumed else 0.0, wall_at)
            yield epoch, epoch_time
            save_progress(tr, epoch + 1, 0, 0.0, wall_at())
            signum = stop.requested(acc)
            if signum:  # asked during the evaluation: the epoch is whole and saved
                raise Interrupted(signum, f"[{cfg.run_name}] {signal.Signals(signum).name}: stopped after epoch "
                                          f"{epoch + 1}; the state is saved in {tr.run_dir.state_dir}. "
                                          + resume_advice(cfg))


def logging_dir(cfg: TrainConfig) -> str:
    """Where file-writing trackers (tensorboard, aim, mlflow's local store) put a run: OUT_DIR/logs/NAME."""
    return os.path.join(cfg.out_dir, "logs")


def tracker_config(cfg: TrainConfig) -> dict:
    """The resolved config as flat scalars (what every tracker accepts as hyperparameters)."""
    flat = {}
    for key, value in cfg.to_dict().items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, v in items:
            name = f"{key}.{sub}" if sub else key
            flat[name] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return flat


@contextmanager
def tracking(tr: Training):
    """Accelerate's trackers for the run (--log-with): opened with the resolved config, closed at the end."""
    cfg, acc = tr.cfg, tr.acc
    if cfg.log_with == "none":
        yield
        return
    acc.init_trackers(cfg.run_name, config={**tracker_config(cfg), **{f"recipe.{k}": v for k, v in
                                                                       tr.recipe.__dict__.items()}})
    try:
        yield
    finally:
        acc.end_training()


def end_epoch(tr: Training, data: Dataset, epoch: int, epoch_time: float) -> tuple[dict, dict]:
    """The epoch's metrics record (train sums, img/s, the validation or test set when due), printed; and the
    evaluations made."""
    cfg, acc = tr.cfg, tr.acc
    sums = tr.global_sums()  # over the whole epoch and every process, resumed parts included
    train_loss = sums["loss"] / len(tr.loader)  # the mean of the step losses
    train_acc = sums["correct"] / max(1, sums["seen"])
    img_s = sums["seen"] / max(epoch_time, 1e-9)
    record = {"epoch": epoch, "train_loss": round(train_loss, 5), "train_accuracy": round(train_acc, 5),
              "lr": tr.scheduler.get_last_lr()[0], "img_per_s": round(img_s, 1),
              "epoch_time_s": round(epoch_time, 2), "precision": tr.runtime.precision}
    fields, evals = evaluations(tr, tr.exported(), data, epoch)
    record.update(fields)
    shown = "".join(f" {k.split('_')[0]} {record[k]:.4f}" for k in ("val_accuracy", "test_accuracy") if k in record)
    tr.runtime.print(f"[{cfg.run_name}] epoch {epoch + 1}/{cfg.epochs} loss {train_loss:.4f} train {train_acc:.4f}"
                     + shown + f" | {img_s:,.0f} img/s | {epoch_time:.1f}s")
    return record, evals


def evaluations(tr: Training, model: nn.Module, data: Dataset, epoch: int | None = None) -> tuple[dict, dict]:
    """(metric fields, {"val": result, "test": result}) of what is evaluated after an epoch (None: at the end).

    With a validation split it is the per-epoch metric (every --eval-every epochs and the last) and the test set
    is evaluated at the last epoch only; without one the test set is evaluated as the validation split would be."""
    cfg = tr.cfg
    last = epoch is None or epoch + 1 == cfg.epochs
    due = last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)
    splits = ([("val", data.val)] if due and data.val is not None else []) + \
        ([("test", data.test)] if last or (due and data.val is None) else [])
    fields, evals = {}, {}
    for name, split in splits:
        evals[name] = evaluate_model(model, split, cfg.augment, tr.runtime, cfg.eval_batch_size,
                                     tr.loader.channels_last, cfg.data_workers, cfg.tta)
        fields.update(prefixed(name, evals[name]))
    return fields, evals


def prefixed(split: str, result: dict) -> dict:
    """A split's evaluation as metric fields: val_accuracy, val_loss (rounded), val_top5."""
    out = {f"{split}_accuracy": result["accuracy"], f"{split}_loss": round(result["loss"], 5)}
    return out | ({f"{split}_top5": result["top5"]} if "top5" in result else {})


def checkpoint_meta(cfg: TrainConfig, tr: Training, data: Dataset, evals: dict, params: int, train_img_s: float,
                    wall: float, extra_meta: dict | None) -> dict:
    """What a checkpoint's .json says of the run `cfg` (a student of a group passes its own config).

    The reported accuracy is the last epoch's, measured on the unwrapped model with the eval batches and
    precision recorded here: exactly what a reload with `kdfast evaluate` reproduces.
    """
    runtime, acc = tr.runtime, tr.acc
    described = data.describe()
    if data.tier == "stream":  # collective: every process computes the metadata
        count = torch.tensor([tr.loader.decoded], device=runtime.device)
        described["decoded_per_process"] = (acc.gather(count) if acc.num_processes > 1 else count).tolist()
    return {
        "model": cfg.model, "family": model_entry(cfg.model).family, "parameters": params, "classes": data.classes,
        "test_accuracy": evals["test"]["accuracy"], "test_samples": evals["test"]["samples"],
        **({"test_top5": evals["test"]["top5"]} if "top5" in evals["test"] else {}),
        **({"val_accuracy": evals["val"]["accuracy"], "val_samples": evals["val"]["samples"]} if "val" in evals else {}),
        "epochs": cfg.epochs, "seed": cfg.seed, "train_img_per_s": round(train_img_s, 1),
        "wall_time_s": round(wall, 1), "precision": runtime.precision, "precision_reason": runtime.precision_reason,
        "device": str(runtime.device), "num_processes": acc.num_processes,
        "distributed_type": acc.distributed_type.value,
        "eval_batch_size": cfg.eval_batch_size, "data": described, "recipe": tr.recipe.__dict__,
        "config": cfg.to_dict(), **(extra_meta or {}),
    }


def finish(tr: Training, data: Dataset, evals: dict, params: int, train_img_s: float, wall: float,
           extra_meta: dict | None) -> dict:
    """Evaluate if needed, write the checkpoint, remove the state; returns the checkpoint's metadata."""
    cfg, acc, runtime = tr.cfg, tr.acc, tr.runtime
    final_model = tr.exported()
    if "test" not in evals:  # nothing left to train after a resume
        evals = evaluations(tr, final_model, data)[1]
    meta = checkpoint_meta(cfg, tr, data, evals, params, train_img_s, wall, extra_meta)
    if acc.is_main_process:
        save_checkpoint(cfg.out_dir, cfg.run_name, final_model, meta, metrics=tr.run_dir.metrics_path())
        runtime.print(f"[{cfg.run_name}] " + (f"val accuracy {evals['val']['accuracy']:.4f} | " if "val" in evals else "")
                      + f"test accuracy {evals['test']['accuracy']:.4f} | wall {wall:.1f}s | "
                      f"saved {tr.run_dir.paths['pth']}")
        tr.run_dir.state.clear()
    acc.wait_for_everyone()
    acc.free_memory()
    return meta
