"""Knowledge distillation: a student trained from a teacher with a registered method (kdfast/methods.py).

    python -m kdfast.distill --model resnet8 --teacher models_saved/cnn_teacher.pth --alpha 0.5 --tau 4
    python -m kdfast.distill --model resnet8 --teacher-cache cache/cnn_teacher.h5     # no teacher pass
    python -m kdfast.distill --model resnet8 --teacher-cache cache/cnn_teacher.h5 --method dkd --logit-std
    python -m kdfast.distill --model resnet8 --teacher models_saved/cnn_teacher.pth --method fitnets
    accelerate launch -m kdfast.distill ...
"""
from __future__ import annotations

import sys
from functools import partial

import torch

from .augment.recipes import RECIPES as AUG_RECIPES
from .cache import LogitCache, served_data
from .cache.ensemble import EnsembleTeacher, check_agreement, ensemble_test_logits, normalized_weights
from .checkpoint import load_teacher, weights_sha256
from .config import DataConfig, DistillConfig, names
from .engine import (Runtime, RunReporter, accuracy_and_loss, fit, make_trainer, open_run, process_state,
                     run_runtime, say)
from .errors import KdfastError, user_errors_exit
from .flags import command_line
from .hints import HintedStudent, FeatureHook, feature_shape, hint_layers, make_regressor
from .methods import method_entry
from .preflight import check_model_input, view_sizes
from .models import model_entry
from .train import build_student


def online_teacher(cfg: DistillConfig, data, runtime: Runtime):
    """(teacher_logits(batch), None: the default seed per epoch, kd metadata) with the teacher run on every batch."""
    teacher, meta = load_teacher(cfg.teacher, data.classes, runtime.device, cfg.teacher_weights, cfg.teacher_pretrained)
    check_model_input(teacher, cfg.teacher, "--teacher", view_sizes(cfg.augment, data), len(data.classes),
                      runtime.device)

    def teacher_logits(batch):
        with torch.no_grad(), runtime.accelerator.autocast():
            return teacher(batch.images)

    return teacher_logits, None, {"mode": "online", "teacher": cfg.teacher, "teacher_model": meta["model"],
                                  "teacher_accuracy": meta.get("test_accuracy")}


def cached_teacher(cfg: DistillConfig, data, runtime: Runtime):
    """(teacher_logits(batch), aug seed per epoch, kd metadata) served from a logit cache, or from several as their
    ensemble (cache.ensemble); no teacher is loaded."""
    caches = [LogitCache(path) for path in cfg.cache_paths]
    for cache in caches:
        cache.check_matches(data, cfg.augment)
    check_agreement(caches)
    if cfg.teacher:
        if len(caches) > 1:
            raise ValueError("--teacher with several --teacher-cache: drop --teacher (each cache records its teacher)")
        check_same_teacher(cfg, caches[0])
    held = len(caches[0].seeds)
    slots = held if cfg.cache_slots <= 0 else min(cfg.cache_slots, held)
    weights = normalized_weights(cfg.cache_weights, len(caches))
    served = EnsembleTeacher(caches, slots, runtime.device, weights, cfg.tau, cfg.ensemble)
    if cfg.epochs > slots:
        runtime.print(f"[{cfg.run_name}] {cfg.epochs} epochs on {slots} cached slots: epochs {slots + 1}..{cfg.epochs} "
                      f"repeat the views (and teacher logits) of earlier epochs")
    test_logits, test_labels, own = ensemble_test_logits(caches, weights, cfg.tau, cfg.ensemble)
    models = [c.attrs["teacher_model"] for c in caches]
    kd = {"mode": "cached", "teacher_cache": " ".join(cfg.cache_paths), "cache_slots": slots,
          "teacher_model": " + ".join(models), "teacher_sha256": " ".join(c.attrs["teacher_sha256"] for c in caches),
          "teacher_accuracy": accuracy_and_loss(test_logits, test_labels)["accuracy"]}
    if len(caches) > 1:
        kd["ensemble"] = {"mode": cfg.ensemble, "weights": weights, "teacher_accuracies": [
            accuracy_and_loss(logits, test_labels)["accuracy"] for logits in own]}
        runtime.print(f"[{cfg.run_name}] teacher: the ensemble of {' + '.join(models)} ({cfg.ensemble} averaged, "
                      f"weights {', '.join(f'{w:.3g}' for w in weights)}): test accuracy "
                      f"{kd['teacher_accuracy']:.4f}, alone " + ", ".join(
                          f"{a:.4f}" for a in kd["ensemble"]["teacher_accuracies"]))
    return served, served.aug_seed, kd


def check_same_teacher(cfg: DistillConfig, cache: LogitCache) -> None:
    """--teacher beside --teacher-cache must be the teacher the cache was built from (same weights)."""
    teacher = cfg.teacher
    model, meta = load_teacher(teacher, cache.attrs["classes"], "cpu", cfg.teacher_weights, cfg.teacher_pretrained)
    if weights_sha256(model) != cache.attrs["teacher_sha256"]:
        raise KdfastError(f"--teacher {teacher} ({meta['model']}) is not the teacher --teacher-cache {cache.path} was "
                          f"built from ({cache.attrs['teacher_model']}, weights {cache.attrs['teacher_sha256'][:16]}). "
                          "Drop --teacher to use the cache, or build a cache from this teacher.")


def logit_method_run(cfg: DistillConfig, runtime: Runtime, run_dir, loss_fn) -> dict:
    """A method on teacher logits: served from the cache, or the teacher run online on every batch."""
    data, model = build_student(cfg, runtime)
    if cfg.method == "deit":
        distillation_token(model, cfg.model)
    source = cached_teacher if cfg.teacher_cache else online_teacher
    teacher_logits, aug_seed_for_epoch, kd = source(cfg, data, runtime)

    def loss_step(model, batch):
        target = teacher_logits(batch)
        logits = model(batch.images)
        loss = loss_fn(logits, target, batch.targets, batch.epoch)
        return loss, (logits[0] + logits[1]) / 2 if isinstance(logits, tuple) else logits  # deit: heads averaged

    trainer = make_trainer(model, loss_step, data, cfg, runtime, run_dir)
    return fit(trainer, data, RunReporter({"kd": {**kd, **method_meta(cfg)}}), aug_seed_for_epoch)


def distillation_token(model, name: str) -> None:
    """--method deit: the student's forward returns (class head, distillation head) while training; at evaluation
    (and in its checkpoint) the mean of the two, as DeiT's."""
    if not hasattr(model, "set_distilled_training"):
        raise ValueError(f"--method deit needs a student with a distillation token; {name} has none: use --model "
                         "vit_student_distilled (or a timm DeiT: timm:deit_tiny_distilled_patch16_224)")
    model.set_distilled_training(True)


def feature_method_run(cfg: DistillConfig, runtime: Runtime, run_dir, loss_fn) -> dict:
    """FitNets: the teacher online (eval, inference) with a hook on its hint layer; the student with its regressor."""
    if cfg.teacher_cache:
        raise ValueError(f"--method {cfg.method} needs the teacher's features, which a logit cache does not hold: "
                         "pass --teacher CKPT without --teacher-cache")
    data, student = build_student(cfg, runtime)
    teacher, meta = load_teacher(cfg.teacher, data.classes, runtime.device, cfg.teacher_weights, cfg.teacher_pretrained)
    check_model_input(teacher, cfg.teacher, "--teacher", view_sizes(cfg.augment, data), len(data.classes),
                      runtime.device)
    layers = hint_layers(cfg.hint, meta["model"], cfg.model)
    image_shape = (3, cfg.augment.crop_size, cfg.augment.crop_size)  # a training view
    shapes = (feature_shape(student, layers[1], "student", image_shape, "cpu"),
              feature_shape(teacher, layers[0], "teacher", image_shape, runtime.device))
    hinted = HintedStudent(student, layers[1], make_regressor(shapes[0], shapes[1], layers))
    teacher_hook = FeatureHook(teacher, layers[0], "teacher")
    runtime.print(f"[{cfg.run_name}] FitNets hint: teacher {layers[0]} {shapes[1][1:]} <- regressor <- student "
                  f"{layers[1]} {shapes[0][1:]}, {cfg.fitnets_schedule} schedule")

    def loss_step(model, batch):
        with torch.no_grad(), runtime.accelerator.autocast():
            target, teacher_feature = teacher_hook.capture(lambda: teacher(batch.images))
        logits, hint = model(batch.images)
        return loss_fn(logits, target, batch.targets, batch.epoch, (hint, teacher_feature)), logits

    kd = {"mode": "online", "teacher": cfg.teacher, "teacher_model": meta["model"],
          "teacher_accuracy": meta.get("test_accuracy"), "hint": f"{layers[0]}:{layers[1]}"}
    try:
        trainer = make_trainer(hinted, loss_step, data, cfg, runtime, run_dir, export=lambda m: m.student)
        return fit(trainer, data, RunReporter({"kd": {**kd, **method_meta(cfg)}}))
    finally:
        teacher_hook.remove()
        hinted.remove_hooks()


def method_meta(cfg: DistillConfig) -> dict:
    """What the checkpoint's .json and the report record of the method and its parameters."""
    meta = {"method": cfg.method, "alpha": cfg.alpha, "tau": cfg.tau, "logit_std": cfg.logit_std}
    if cfg.method == "dkd":  # its CE weight is 1; alpha and beta weigh its two KD terms
        meta.update(alpha=None, dkd_alpha=cfg.dkd_alpha, dkd_beta=cfg.dkd_beta, dkd_warmup=cfg.dkd_warmup)
    if cfg.method == "deit":  # alpha weighs the class head's CE; no temperature
        meta.update(tau=None, logit_std=None)
    if cfg.method == "fitnets":
        meta.update(hint_weight=cfg.hint_weight, fitnets_schedule=cfg.fitnets_schedule, hint_epochs=cfg.hint_epochs)
    return meta


def resolved(cfg: DistillConfig, say=print) -> DistillConfig:
    """The run's config with what was not given taken from --teacher-cache (the data, subset, split and views it was
    built on: a cache serves only those), said in the log, then the defaults."""
    if not cfg.teacher_cache:
        return cfg.resolved()
    cache = LogitCache(cfg.cache_paths[0])  # the others must agree with it (checked when the run opens them)
    served, recipe = served_data(cache.attrs), AUG_RECIPES.get(cache.attrs.get("aug_recipe", "none"))
    cache.close()
    plain, run_cfg = cfg.resolved(), cfg.resolved(served)
    if cfg.label_smoothing is None and recipe is not None and recipe.label_smoothing is not None:
        run_cfg.label_smoothing = recipe.label_smoothing  # the recipe's other half: its views came with the cache
        say(f"[{cfg.run_name}] {cache.path} was built with --aug-recipe {recipe.name}: its views, and its label "
            f"smoothing {recipe.label_smoothing:g} (--label-smoothing to set another)")
    taken = [k for k in names(DataConfig) + ("augment",) if getattr(run_cfg, k) != getattr(plain, k)]
    if taken:
        shown = [f"--{k.replace('_', '-')} {getattr(run_cfg, k)}" for k in taken if k != "augment"]
        say(f"[{cfg.run_name}] as {cache.path} was built: " + " ".join(
            shown + ([run_cfg.augment.describe()] if "augment" in taken else [])))
    return run_cfg


def run(cfg: DistillConfig, runtime: Runtime | None = None) -> dict:
    cfg.validate()  # refuse bad α, τ and every other number before any work
    cfg = resolved(cfg, partial(say, process_state(cfg.dist_timeout)))
    method = method_entry(cfg.method)
    runtime = runtime or run_runtime(cfg, find_unused_parameters=method.needs == "features")
    with open_run(cfg, runtime) as run_dir:
        if run_dir.kept:
            return run_dir.kept
        label_smoothing = cfg.resolved_recipe(model_entry(cfg.model).family).label_smoothing
        loss_fn = method.build(cfg, label_smoothing)
        runner = feature_method_run if method.needs == "features" else logit_method_run
        return runner(cfg, runtime, run_dir, loss_fn)


def parse(argv: list[str]) -> DistillConfig:
    """The command's flags as its config (what the README test checks every shown command with)."""
    return command_line(DistillConfig, argv, "kdfast distill")


@user_errors_exit
def main(argv: list[str] | None = None) -> dict:
    return run(parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
