"""Knowledge distillation: a student trained on L = α·CE + (1−α)·τ²·KL from a teacher checkpoint.

    python -m kdfast.distill --model resnet8 --teacher models_saved/cnn_teacher.pth --alpha 0.5 --tau 4
    accelerate launch -m kdfast.distill ...
"""
from __future__ import annotations

import sys

import torch
import tyro

from .checkpoint import load_checkpoint
from .config import DistillConfig
from .engine import Runtime, fit, make_runtime
from .losses import check_kd_params, kd_loss
from .models import model_entry
from .train import build_student


def load_teacher(path: str, classes: list[str], runtime: Runtime):
    teacher, meta = load_checkpoint(path, runtime.device)
    if meta["classes"] != classes:
        raise ValueError(f"{path}: the teacher was trained on classes {meta['classes']}, but this data has {classes}. "
                         "Distil on the teacher's dataset, or train a teacher on this one.")
    if model_entry(meta["model"]).family == "cnn":
        teacher = teacher.to(memory_format=torch.channels_last)
    teacher.eval().requires_grad_(False)
    return teacher, meta


def run(cfg: DistillConfig, runtime: Runtime | None = None) -> dict:
    check_kd_params(cfg.alpha, cfg.tau)  # refuse bad α, τ before any work
    runtime = runtime or make_runtime(cfg.precision)
    data, model = build_student(cfg, runtime)
    teacher, teacher_meta = load_teacher(cfg.teacher, data.classes, runtime)
    label_smoothing = cfg.resolved_recipe(model_entry(cfg.model).family).label_smoothing

    def loss_step(model, batch):
        with torch.no_grad(), runtime.accelerator.autocast():
            teacher_logits = teacher(batch.images)
        logits = model(batch.images)
        return kd_loss(logits, teacher_logits, batch.labels, cfg.alpha, cfg.tau, label_smoothing), logits

    kd = {"mode": "online", "alpha": cfg.alpha, "tau": cfg.tau, "teacher": cfg.teacher,
          "teacher_model": teacher_meta["model"], "teacher_accuracy": teacher_meta.get("test_accuracy")}
    return fit(model, loss_step, data, cfg, runtime, {"kd": kd})


def main(argv: list[str] | None = None) -> dict:
    cfg = tyro.cli(DistillConfig, args=sys.argv[1:] if argv is None else argv, prog="kdfast distill")
    return run(cfg)


if __name__ == "__main__":
    main()
