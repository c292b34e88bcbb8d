"""K students of one architecture trained in one pass on the same batches: what `kdfast sweep --together` runs.

Each member is an ordinary distillation run config (a logit method with its own alpha, tau, ...) with the same
model, seed, data, epochs and teacher-logit cache, hence the same batches and views. (A student without KD
trains on its own seed's views, not the cache's, so it runs alone.) They are fused (kdfast.together: grouped convolutions for
CIFAR ResNets, vmap over stacked parameters otherwise) and trained as one run whose loss is the members' losses
side by side; each member ends with what its run alone writes: NAME.pth / .safetensors / .json (its own config,
so `kdfast evaluate` reloads it and a sweep keeps it as finished) and NAME.metrics.jsonl (its own train loss and
accuracy, test accuracy per epoch). The group's resumable state lives under its own name in OUT_DIR/.state.
"""
from __future__ import annotations

import copy
import json
import time
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn as nn
from accelerate.utils import set_seed

from .checkpoint import save_checkpoint
from .config import DistillConfig, TrainConfig
from .data import Dataset
from .distill import cached_teacher, method_meta
from .engine import (Runtime, checkpoint_meta, evaluations, logging_dir, make_runtime, on_main, open_run,
                     lost_processes, setup_training, train_epochs)
from .methods import method_entry
from .preflight import check_model_input, view_sizes
from .models import count_parameters, create_model, model_entry
from .models.resnet import CifarResNet
from .rundir import RunDir, comparable_config, describe_progress, finished_run
from .train import load_run_data
from .together import together

SHARED = ("model", "seed", "epochs", "batch_size", "data", "dataset", "train_per_class", "test_per_class", "augment",
          "store_size",
          "precision", "out_dir", "eval_every", "eval_batch_size", "recipe", "lr", "optimizer", "weight_decay",
          "momentum", "schedule", "warmup", "grad_clip", "label_smoothing", "aug_recipe", "ema", "tta",
          "grad_accum", "val_per_class", "val_seed")


@dataclass
class GroupConfig(DistillConfig):
    """The group's own run: the members' shared settings, plus every member's config (what a resume compares)."""

    members: tuple[str, ...] = ()


def group_config(name: str, members: list[DistillConfig]) -> GroupConfig:
    if not members or not all(isinstance(m, DistillConfig) and m.teacher_cache for m in members):
        raise ValueError("students trained together distil from one teacher-logit cache (--teacher-cache); a "
                         "student without KD trains on its own seed's views and runs alone")
    first = members[0]
    different = sorted({f for m in members[1:] for f in SHARED + ("cache_slots",) if getattr(m, f) != getattr(first, f)})
    if different:
        raise ValueError(f"students trained together must share {', '.join(different)}")
    if any(m.method == "deit" for m in members):
        raise ValueError("students trained together cannot use --method deit (two heads per student): train them "
                         "one at a time (--together off)")
    if any(method_entry(m.method).needs != "logits" for m in members):
        raise ValueError("students trained together use logit methods only (kd, dkd): FitNets needs the teacher online")
    caches = {m.teacher_cache for m in members}
    if len(caches) > 1:
        raise ValueError("students trained together read one teacher-logit cache (--teacher-cache)")
    shared = {f: getattr(first, f) for f in SHARED} | {"cache_dir": first.cache_dir, "resume": first.resume,
                                                      "fresh": first.fresh, "progress": first.progress,
                                                      "checkpoint_every": first.checkpoint_every,
                                                      "log_with": first.log_with, "data_tier": first.data_tier,
                                                      "data_budget_gb": first.data_budget_gb,
                                                      "data_workers": first.data_workers,
                                                      "dist_timeout": first.dist_timeout}
    return GroupConfig(name=name, teacher_cache=first.teacher_cache, cache_slots=first.cache_slots,
                       members=tuple(json.dumps(comparable_config(m.to_dict()), sort_keys=True) for m in members), **shared)


def member_losses(members: list[DistillConfig], label_smoothing: float):
    """loss(logits (K, B, C), teacher logits, labels, epoch) -> the (K,) losses, each as its run alone computes it."""
    fns = [method_entry(m.method).build(m, label_smoothing) for m in members]
    return lambda logits, target, labels, epoch: torch.stack(
        [fn(logits[i], target, labels, epoch) for i, fn in enumerate(fns)])


def saved_pass(name: str, candidates: list[DistillConfig]) -> list[DistillConfig] | None:
    """The members the group `name` (in the candidates' --out-dir) was saved with when interrupted, in its order, if
    every one of them is among the candidates (compared as configs); else None."""
    first = candidates[0]
    saved = RunDir(first.out_dir, name).state.saved()
    if saved is None:
        return None
    by_config = {json.dumps(comparable_config(m.to_dict()), sort_keys=True): m for m in candidates}
    keys = saved["config"].get("members")
    picked = [by_config.get(key) for key in keys] if isinstance(keys, list) else []
    return picked if picked and all(picked) else None


def finished_members(members: list[DistillConfig]) -> set[str]:
    """The members already finished with their very config (a pass stopped while it saved them one by one)."""
    return {m.run_name for m in members if not m.fresh and finished_run(m) is not None}


def run(members: list[TrainConfig], name: str, runtime: Runtime | None = None) -> list[dict]:
    """Train the members together; returns each member's checkpoint metadata, in order.

    Members already finished (a pass stopped while saving them) keep their files: the pass resumes for the others."""
    for m in members:
        m.validate()
    cfg = group_config(name, members)
    done = finished_members(members)
    runtime = runtime or make_runtime(cfg.precision, log_with=cfg.log_with, logging_dir=logging_dir(cfg),
                                      accumulate=cfg.grad_accum, dist_timeout=cfg.dist_timeout)
    with ExitStack() as stack:
        run_dir = stack.enter_context(open_run(cfg, runtime))
        if runtime.accelerator.is_main_process:  # one writer per member's files too
            for m in members:
                lock = RunDir(m.out_dir, m.run_name).lock
                lock.acquire(runtime.print)
                stack.callback(lock.release)
        on_main(runtime.accelerator, lambda: [RunDir(m.out_dir, m.run_name).check_overwrite(
            m.to_dict(), m.fresh, runtime.print) for m in members if m.run_name not in done])
        return _train(members, cfg, runtime, run_dir, done)


def _train(members: list[TrainConfig], cfg: GroupConfig, runtime: Runtime, run_dir: RunDir, done: set[str]) -> list[dict]:
    data = load_run_data(cfg, runtime)
    set_seed(cfg.seed)  # every member starts where its run alone would: the same seed, the same weights
    plain = create_model(cfg.model, num_classes=len(data.classes))
    check_model_input(plain, cfg.model, "--model", view_sizes(cfg.augment, data), len(data.classes), "cpu")
    if not isinstance(plain, CifarResNet) and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules()):
        raise ValueError(f"{cfg.model}: students with BatchNorm are trained together only in the CIFAR ResNet family "
                         "(fused); train them one at a time (--together off)")
    model = together([copy.deepcopy(plain) for _ in members])
    family = model_entry(cfg.model).family
    teacher_logits, aug_seed_for_epoch, kd = cached_teacher(cfg, data, runtime)
    losses = member_losses(members, cfg.resolved_recipe(family).label_smoothing)

    def loss_step(model, batch):
        target = teacher_logits(batch)
        logits = model(batch.images)
        return losses(logits, target, batch.targets, batch.epoch), logits

    tr = setup_training(model, loss_step, data, cfg, runtime, run_dir, lambda m: m)
    tr.students = len(members)
    return _loop(tr, members, data, plain, aug_seed_for_epoch, kd, done)


def _loop(tr, members, data: Dataset, plain, aug_seed_for_epoch, kd: dict, done: set[str]) -> list[dict]:
    cfg, acc, run_dir, runtime = tr.cfg, tr.acc, tr.run_dir, tr.runtime
    progress = {"epoch": 0, "step": 0, "wall_time_s": 0.0}
    if run_dir.resume_from:
        progress = run_dir.state.restore(run_dir.resume_from, tr.modules(), tr.optimizer, tr.scheduler, acc.scaler)
        runtime.print(f"[{cfg.run_name}] resuming {describe_progress(progress)} from {run_dir.state_dir}")
    dirs = [RunDir(m.out_dir, m.run_name) for m in members]
    records = [[r for r in d.read_metrics(d.metrics_path()) if r["epoch"] < progress["epoch"]] for d in dirs] \
        if acc.is_main_process and progress["epoch"] else [[] for _ in dirs]
    runtime.print(f"[{cfg.run_name}] {len(members)} x {cfg.model} trained together ({type(tr.exported()).__name__}) "
                  f"| {len(data.train)} train / {len(data.test)} test | {cfg.epochs} epochs x {len(tr.loader)} steps of "
                  f"{cfg.batch_size} | {runtime.precision} on {runtime.device}: " + ", ".join(m.run_name for m in members))
    wall_start = time.perf_counter()

    def wall_at() -> float:
        return progress["wall_time_s"] + time.perf_counter() - wall_start

    tests, img_s = None, 0.0
    with lost_processes(tr):
        for epoch, epoch_time in train_epochs(tr, progress, aug_seed_for_epoch, wall_at):
            tests, img_s = _end_epoch(tr, members, dirs, records, data, plain, epoch, epoch_time, wall_at())
        return _finish(tr, members, data, plain, tests, img_s, kd, wall_at(), done)


def student(tr, plain, i: int):
    """Member i as a plain model (the architecture its run alone trains), for evaluation and saving."""
    model = copy.deepcopy(plain).to(tr.runtime.device)
    model.load_state_dict(tr.exported().student_state(i))
    return model.to(memory_format=torch.channels_last) if tr.loader.channels_last else model


def _end_epoch(tr, members, dirs, records, data, plain, epoch, epoch_time, wall) -> tuple[list[dict], float]:
    cfg = tr.cfg
    sums = tr.global_sums()
    steps = len(tr.loader)
    evaluated = [evaluations(tr, student(tr, plain, i), data, epoch) for i in range(len(members))]
    img_s = sums["seen"] / max(epoch_time, 1e-9)  # per student: what each run's metrics and .json say
    for i, m in enumerate(members):
        record = {"epoch": epoch, "train_loss": round(sums["loss"][i] / steps, 5),
                  "train_accuracy": round(sums["correct"][i] / max(1, sums["seen"]), 5),
                  "lr": tr.scheduler.get_last_lr()[0], "img_per_s": round(img_s, 1),
                  "epoch_time_s": round(epoch_time, 2), "precision": tr.runtime.precision,
                  "wall_time_s": round(wall, 1), "trained_with": cfg.run_name}
        record.update(evaluated[i][0])
        if tr.acc.is_main_process:
            records[i].append(record)
            dirs[i].write_metrics(records[i])
    shown = "".join(f" | {split} " + " ".join(f"{e[1][split]['accuracy']:.4f}" for e in evaluated)
                    for split in ("val", "test") if split in evaluated[0][1])
    tr.runtime.print(f"[{cfg.run_name}] epoch {epoch + 1}/{cfg.epochs} | {img_s * len(members):,.0f} img/s over "
                     f"{len(members)} students | {epoch_time:.1f}s" + shown)
    return [e[1] for e in evaluated], img_s


def _finish(tr, members, data, plain, tests, img_s: float, kd: dict, wall: float, done: set[str]) -> list[dict]:
    """Save each member's checkpoint (one already finished keeps its own: a pass stopped while saving them)."""
    cfg, acc, runtime = tr.cfg, tr.acc, tr.runtime
    metas = []
    for i, m in enumerate(members):
        if m.run_name in done:
            if acc.is_main_process:
                RunDir(m.out_dir, m.run_name).state.clear()  # metrics this pass kept for it, if any
            metas.append(finished_run(m))
            continue
        model = student(tr, plain, i)
        evals = tests[i] if tests and "test" in tests[i] else evaluations(tr, model, data)[1]
        meta = checkpoint_meta(m, tr, data, evals, count_parameters(model), img_s, wall, {
            "trained_with": {"group": cfg.run_name, "students": len(members)}, "kd": {**kd, **method_meta(m)}})
        if acc.is_main_process:
            member_dir = RunDir(m.out_dir, m.run_name)
            save_checkpoint(m.out_dir, m.run_name, model, meta, metrics=member_dir.metrics_path())
            member_dir.state.clear()  # a state left by an interrupted run alone is done with
        metas.append(meta)
    if acc.is_main_process:
        runtime.print(f"[{cfg.run_name}] saved {len(members)} students: "
                      + ", ".join(f"{m.run_name} {meta['test_accuracy']:.4f}" for m, meta in zip(members, metas)))
        tr.run_dir.state.clear()
    acc.wait_for_everyone()
    return metas
