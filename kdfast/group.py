"""K students of one architecture trained in one pass on the same batches: what `kdfast sweep --together` runs.

Each member is an ordinary distillation run config (a logit method with its own alpha, tau, ...) that shares every other
field with the others: model, seed, data, views, epochs, teacher-logit cache, hence the same batches. (A student without
KD trains on its own seed's views, not the cache's, so it runs alone.) They are fused (kdfast.together: grouped
convolutions for CIFAR ResNets, vmap over stacked parameters otherwise) and trained by the one loop (engine.fit) as
one run whose loss is the members' losses side by side; the group's reporter ends each member with what its run alone
writes: NAME.pth / .safetensors / .json (its own config, so `kdfast evaluate` reloads it and a sweep keeps it as
finished) and NAME.metrics.jsonl (its own train loss and accuracy, test accuracy per epoch). The group's resumable state
lives under its own name in OUT_DIR/.state.
"""
from __future__ import annotations

import copy
import json
from contextlib import ExitStack
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from accelerate.utils import set_seed

from . import collectives
from .checkpoint import save_checkpoint
from .config import DistillConfig, KDConfig, names
from .data import Dataset
from .distill import cached_teacher, method_meta
from .engine import (Runtime, Trainer, checkpoint_meta, epoch_record, evaluations, final_evaluations, fit,
                     make_trainer, on_main, open_run, run_runtime)
from .flags import explained
from .methods import method_entry
from .preflight import check_model_input, view_sizes
from .models import count_parameters, create_model, model_entry
from .models.resnet import CifarResNet
from .rundir import RunDir, comparable_config, finished_run
from .train import load_run_data
from .together import clip_students, together

# what each member has of its own: its name and its method's fields; it shares every other field with the others
OWN = ("name",) + names(KDConfig)


@explained
@dataclass
class GroupConfig(DistillConfig):
    """The group's own run: the members' shared settings, plus every member's config (what a resume compares)."""

    members: tuple[str, ...] = ()
    """Each member's comparable config, as JSON."""


def group_config(name: str, members: list[DistillConfig]) -> GroupConfig:
    if not members or not all(isinstance(m, DistillConfig) and m.teacher_cache for m in members):
        raise ValueError("students trained together distil from one teacher-logit cache (--teacher-cache); a "
                         "student without KD trains on its own seed's views and runs alone")
    first = members[0]
    shared = [f.name for f in fields(DistillConfig) if f.name not in OWN]
    different = sorted({f for m in members[1:] for f in shared if getattr(m, f) != getattr(first, f)})
    if different:
        raise ValueError(f"students trained together must share {', '.join(different)}")
    if any(m.method == "deit" for m in members):
        raise ValueError("students trained together cannot use --method deit (two heads per student): train them "
                         "one at a time (--together off)")
    if any(method_entry(m.method).needs != "logits" for m in members):
        raise ValueError("students trained together use logit methods only (kd, dkd): FitNets needs the teacher online")
    return GroupConfig(**{f: getattr(first, f) for f in shared}, name=name,
                       members=tuple(json.dumps(comparable_config(m.to_dict()), sort_keys=True) for m in members))


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


def run(members: list[DistillConfig], name: str, runtime: Runtime | None = None) -> list[dict]:
    """Train the members together; returns each member's checkpoint metadata, in order.

    Members already finished (a pass stopped while saving them) keep their files: the pass resumes for the others."""
    for m in members:
        m.validate()
    members = [m.resolved() for m in members]
    cfg = group_config(name, members)
    done = finished_members(members)
    runtime = runtime or run_runtime(cfg)
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


def _train(members: list[DistillConfig], cfg: GroupConfig, runtime: Runtime, run_dir: RunDir,
           done: set[str]) -> list[dict]:
    data = load_run_data(cfg, runtime)
    set_seed(cfg.seed)  # every member starts where its run alone would: the same seed, the same weights
    plain = create_model(cfg.model, num_classes=len(data.classes))
    check_model_input(plain, cfg.model, "--model", view_sizes(cfg.augment, data), len(data.classes), "cpu")
    if not isinstance(plain, CifarResNet) and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                  for m in plain.modules()):
        raise ValueError(f"{cfg.model}: students with BatchNorm are trained together only in the CIFAR ResNet family "
                         "(fused); train them one at a time (--together off)")
    model = together([copy.deepcopy(plain) for _ in members])
    teacher_logits, aug_seed_for_epoch, kd = cached_teacher(cfg, data, runtime)
    losses = member_losses(members, cfg.resolved_recipe(model_entry(cfg.model).family).label_smoothing)

    def loss_step(model, batch):  # the (K,) losses: the step's gradient is that of their sum
        target = teacher_logits(batch)
        logits = model(batch.images)
        return losses(logits, target, batch.targets, batch.epoch), logits

    trainer = make_trainer(model, loss_step, data, cfg, runtime, run_dir, clip=clip_students,
                           loss_shape=(len(members),))
    return fit(trainer, data, GroupReporter(members, plain, kd, done), aug_seed_for_epoch)


class GroupReporter:
    """K students: K metrics files each epoch, K checkpoints at the end (a member already finished keeps its own)."""

    def __init__(self, members: list[DistillConfig], plain: nn.Module, kd: dict, done: set[str]):
        self.members, self.plain, self.kd, self.done = members, plain, kd, done
        self.dirs = [RunDir(m.out_dir, m.run_name) for m in members]
        self.records, self.evals, self.img_s = [[] for _ in members], None, 0.0

    def student(self, tr: Trainer, i: int) -> nn.Module:
        """Member i as a plain model (the architecture its run alone trains), for evaluation and saving."""
        model = copy.deepcopy(self.plain).to(tr.runtime.device)
        model.load_state_dict(tr.exported().student_state(i))
        return model.to(memory_format=torch.channels_last) if tr.loader.channels_last else model

    def stop_early(self) -> bool:
        return False

    def start(self, tr: Trainer, data: Dataset, progress: dict) -> None:
        cfg = tr.cfg
        if any(m.early_stop or m.save_best for m in self.members):
            raise ValueError("--early-stop and --save-best are for a run trained alone: students trained together "
                             "stop together. Use --together off")
        if tr.acc.is_main_process and progress["epoch"]:
            self.records = [[r for r in d.read_metrics(d.metrics_path()) if r["epoch"] < progress["epoch"]]
                            for d in self.dirs]
        tr.runtime.print(f"[{cfg.run_name}] {len(self.members)} x {cfg.model} trained together "
                         f"({type(tr.exported()).__name__}) | {len(data.train)} train / {len(data.test)} test | "
                         f"{cfg.epochs} epochs x {len(tr.loader)} steps of {cfg.batch_size} | "
                         f"{tr.runtime.precision} on {tr.runtime.device}: "
                         + ", ".join(m.run_name for m in self.members))

    def end_epoch(self, tr: Trainer, data: Dataset, epoch: int, epoch_time: float, wall: float) -> None:
        cfg = tr.cfg
        sums = tr.global_sums()
        evaluated = [evaluations(cfg, tr.runtime, self.student(tr, i), data, tr.loader.channels_last, epoch)
                     for i in range(len(self.members))]
        for i in range(len(self.members)):  # per student: what each run's metrics and .json say
            record = epoch_record(tr, sums["loss"][i], sums["correct"][i], sums["seen"], epoch, epoch_time, wall)
            record.update({"trained_with": cfg.run_name, **evaluated[i][0]})
            self.img_s = record["img_per_s"]
            if tr.acc.is_main_process:
                self.records[i].append(record)
                self.dirs[i].write_metrics(self.records[i])
        self.evals = [e[1] for e in evaluated]
        shown = "".join(f" | {split} " + " ".join(f"{e[1][split]['accuracy']:.4f}" for e in evaluated)
                        for split in ("val", "test") if split in evaluated[0][1])
        tr.runtime.print(f"[{cfg.run_name}] epoch {epoch + 1}/{cfg.epochs} | {self.img_s * len(self.members):,.0f} "
                         f"img/s over {len(self.members)} students | {epoch_time:.1f}s" + shown)

    def finish(self, tr: Trainer, data: Dataset, wall: float) -> list[dict]:
        """Save each member's checkpoint (one already finished keeps its own: a pass stopped while saving them)."""
        acc = tr.acc
        metas = [self.save_member(tr, data, i, wall) for i in range(len(self.members))]
        if acc.is_main_process:
            tr.runtime.print(f"[{tr.cfg.run_name}] saved {len(self.members)} students: " + ", ".join(
                f"{m.run_name} {meta['test_accuracy']:.4f}" for m, meta in zip(self.members, metas)))
            tr.run_dir.state.clear()
        collectives.barrier()
        return metas

    def save_member(self, tr: Trainer, data: Dataset, i: int, wall: float) -> dict:
        m, acc = self.members[i], tr.acc
        if m.run_name in self.done:
            if acc.is_main_process:
                self.dirs[i].state.clear()  # metrics this pass kept for it, if any
            return finished_run(m)
        model = self.student(tr, i)
        evals = self.evals[i] if self.evals and "test" in self.evals[i] else final_evaluations(tr, model, data)
        meta = checkpoint_meta(m, tr, data, evals, count_parameters(model), self.img_s, wall, {
            "trained_with": {"group": tr.cfg.run_name, "students": len(self.members)},
            "kd": {**self.kd, **method_meta(m)}})
        if acc.is_main_process:
            save_checkpoint(m.out_dir, m.run_name, model, meta, metrics=self.dirs[i].metrics_path())
            self.dirs[i].state.clear()  # a state left by an interrupted run alone is done with
        return meta
