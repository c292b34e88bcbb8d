"""Knowledge distillation: a student trained on L = α·CE + (1−α)·τ²·KL from a teacher.

    python -m kdfast.distill --model resnet8 --teacher models_saved/cnn_teacher.pth --alpha 0.5 --tau 4
    python -m kdfast.distill --model resnet8 --teacher-cache cache/cnn_teacher.h5     # no teacher pass
    accelerate launch -m kdfast.distill ...
"""
from __future__ import annotations

import sys

import torch
import tyro

from .cache import CachedTeacher, LogitCache
from .checkpoint import load_checkpoint, load_teacher, weights_sha256
from .config import DistillConfig
from .engine import Runtime, accuracy_and_loss, fit, make_runtime, open_run
from .errors import KdfastError, user_errors_exit
from .losses import kd_loss
from .models import model_entry
from .train import build_student


def online_teacher(cfg: DistillConfig, data, runtime: Runtime):
    """(teacher_logits(batch), None: the default seed per epoch, kd metadata) with the teacher run on every batch."""
    teacher, meta = load_teacher(cfg.teacher, data.classes, runtime.device)

    def teacher_logits(batch):
        with torch.no_grad(), runtime.accelerator.autocast():
            return teacher(batch.images)

    return teacher_logits, None, {"mode": "online", "teacher": cfg.teacher, "teacher_model": meta["model"],
                                  "teacher_accuracy": meta.get("test_accuracy")}


def cached_teacher(cfg: DistillConfig, data, runtime: Runtime):
    """(teacher_logits(batch), aug seed per epoch, kd metadata) served from a logit cache; no teacher is loaded."""
    cache = LogitCache(cfg.teacher_cache)
    cache.check_matches(data, cfg.augment)
    if cfg.teacher:
        check_same_teacher(cfg.teacher, cache)
    slots = len(cache.seeds) if cfg.cache_slots <= 0 else min(cfg.cache_slots, len(cache.seeds))
    served = CachedTeacher(cache, slots, runtime.device)
    if cfg.epochs > slots:
        runtime.print(f"[{cfg.run_name}] {cfg.epochs} epochs on {slots} cached slots: epochs {slots + 1}..{cfg.epochs} "
                      f"repeat the views (and teacher logits) of earlier epochs")
    test_logits, test_labels = cache.test_logits()
    return served, served.aug_seed, {
        "mode": "cached", "teacher_cache": cfg.teacher_cache, "cache_slots": slots,
        "teacher_model": cache.attrs["teacher_model"], "teacher_sha256": cache.attrs["teacher_sha256"],
        "teacher_accuracy": accuracy_and_loss(test_logits, test_labels)["accuracy"]}


def check_same_teacher(teacher: str, cache: LogitCache) -> None:
    """--teacher beside --teacher-cache must be the teacher the cache was built from (same weights)."""
    model, meta = load_checkpoint(teacher)
    if weights_sha256(model) != cache.attrs["teacher_sha256"]:
        raise KdfastError(f"--teacher {teacher} ({meta['model']}) is not the teacher --teacher-cache {cache.path} was "
                          f"built from ({cache.attrs['teacher_model']}, weights {cache.attrs['teacher_sha256'][:16]}). "
                          "Drop --teacher to use the cache, or build a cache from this teacher.")


def run(cfg: DistillConfig, runtime: Runtime | None = None) -> dict:
    cfg.validate()  # refuse bad α, τ and every other number before any work
    runtime = runtime or make_runtime(cfg.precision)
    with open_run(cfg, runtime) as run_dir:
        data, model = build_student(cfg, runtime)
        source = cached_teacher if cfg.teacher_cache else online_teacher
        teacher_logits, aug_seed_for_epoch, kd = source(cfg, data, runtime)
        label_smoothing = cfg.resolved_recipe(model_entry(cfg.model).family).label_smoothing

        def loss_step(model, batch):
            target = teacher_logits(batch)
            logits = model(batch.images)
            return kd_loss(logits, target, batch.labels, cfg.alpha, cfg.tau, label_smoothing), logits

        return fit(model, loss_step, data, cfg, runtime, run_dir,
                   {"kd": {**kd, "alpha": cfg.alpha, "tau": cfg.tau}}, aug_seed_for_epoch)


@user_errors_exit
def main(argv: list[str] | None = None) -> dict:
    cfg = tyro.cli(DistillConfig, args=sys.argv[1:] if argv is None else argv, prog="kdfast distill")
    return run(cfg)


if __name__ == "__main__":
    main()
