"""Supervised training (teachers and students without KD).

    python -m kdfast.train --model resnet18 --name cnn_teacher --epochs 30
    accelerate launch -m kdfast.train --model vit_tiny --name vit_teacher
"""
from __future__ import annotations

import sys

from accelerate.utils import set_seed

from .config import TrainConfig
from .data import Dataset
from .preflight import check_model_input, view_sizes
from .engine import Runtime, RunReporter, fit, load_data, make_trainer, open_run, run_runtime
from .errors import user_errors_exit
from .flags import command_line
from .losses import cross_entropy
from .models import create_model, model_entry


def load_run_data(cfg: TrainConfig, runtime: Runtime) -> Dataset:
    """The run's dataset; the main process decodes and caches it first, the others then read the cache."""
    return load_data(cfg, runtime, cfg.batch_size)


def build_student(cfg: TrainConfig, runtime: Runtime):
    """Runtime, data and a freshly initialised model (same on every process) for a run."""
    model_entry(cfg.model)  # an unknown name fails before any data work
    data = load_run_data(cfg, runtime)
    set_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=len(data.classes), pretrained=cfg.pretrained or None)
    check_model_input(model, cfg.model, "--model", view_sizes(cfg.augment, data), len(data.classes), "cpu")
    return data, model


def run(cfg: TrainConfig, runtime: Runtime | None = None) -> dict:
    """Train cfg.model with cross-entropy; returns the checkpoint's metadata (test accuracy included)."""
    cfg.validate()
    cfg = cfg.resolved()
    runtime = runtime or run_runtime(cfg)
    with open_run(cfg, runtime) as run_dir:
        if run_dir.kept:
            return run_dir.kept
        data, model = build_student(cfg, runtime)
        label_smoothing = cfg.resolved_recipe(model_entry(cfg.model).family).label_smoothing

        def loss_step(model, batch):
            logits = model(batch.images)
            return cross_entropy(logits, batch.targets, label_smoothing), logits

        trainer = make_trainer(model, loss_step, data, cfg, runtime, run_dir)
        return fit(trainer, data, RunReporter({"kd": None}))


def parse(argv: list[str]) -> TrainConfig:
    """The command's flags as its config (what the README test checks every shown command with)."""
    return command_line(TrainConfig, argv, "kdfast train")


@user_errors_exit
def main(argv: list[str] | None = None) -> dict:
    return run(parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
