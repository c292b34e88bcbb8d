"""Evaluate a checkpoint on the test set, the way its training run did.

    python -m kdfast.evaluate --checkpoint models_saved/cnn_teacher.pth
"""
from __future__ import annotations

import sys

import torch

from .checkpoint import load_checkpoint, read_meta
from .config import EvaluateConfig, resolved_store_size
from .engine import evaluate_model, load_data, make_runtime
from .errors import user_errors_exit
from .flags import command_line


def recorded_run(meta: dict) -> dict:
    """What the checkpoint's run (or its import) recorded that an evaluation takes when not given: its data source,
    dataset, views, test subset, precision and TTA (the stored size follows the views, once they are resolved)."""
    config = meta.get("config", {})
    return {"data": (meta.get("data") or {}).get("source") or config.get("data"),
            "dataset": config.get("dataset", "cifar10"), "augment": config.get("augment"),
            "test_per_class": config.get("test_per_class", 0),
            "precision": meta.get("precision", "auto"), "tta": config.get("tta", "none")}


def run(cfg: EvaluateConfig) -> dict:
    cfg.validate()
    meta = read_meta(cfg.checkpoint)
    recorded = recorded_run(meta)
    if not cfg.data and not recorded["data"] and meta.get("imported"):
        raise ValueError(f"--data: {cfg.checkpoint} was imported without --data, so it records no test data; give "
                         "--data (the data its classes come from)")
    views = cfg.resolved({k: recorded[k] for k in ("augment", "dataset")}).augment  # given flags over recorded
    recorded["store_size"] = resolved_store_size(views, meta.get("config", {}).get("store_size", 0))
    cfg = cfg.resolved(recorded)
    spec = cfg.augment
    runtime = make_runtime(cfg.precision, dist_timeout=cfg.dist_timeout, deterministic=cfg.deterministic)
    model, meta = load_checkpoint(cfg.checkpoint, runtime.device)
    data = load_data(cfg, runtime)
    if data.classes != meta["classes"]:
        raise ValueError(f"{cfg.checkpoint}: trained on classes {meta['classes']}, but {data.source} has "
                         f"{data.classes}")
    channels_last = meta.get("family") == "cnn"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch_size = cfg.batch_size or meta.get("eval_batch_size", 500)
    result = evaluate_model(model, data.test, spec, runtime, batch_size, channels_last, cfg.data_workers, cfg.tta)
    result.update(checkpoint=cfg.checkpoint, model=meta["model"], precision=runtime.precision, tta=cfg.tta,
                  test_accuracy=result["accuracy"],  # the name distill and train return it under
                  recorded_accuracy=meta.get("test_accuracy"))
    runtime.print(f"{cfg.checkpoint}: {meta['model']} test accuracy {result['accuracy']:.4f} on {result['samples']} "
                  f"samples ({runtime.precision}{', TTA ' + cfg.tta if cfg.tta != 'none' else ''}); "
                  + comparison(result, meta, cfg.test_per_class != recorded["test_per_class"]))
    return result


def comparison(result: dict, meta: dict, other_subset: bool) -> str:
    """How the accuracy compares with the one recorded at training time, on the same test set or another one."""
    recorded = meta.get("test_accuracy")
    if recorded is None:
        return "no accuracy was recorded with it (an imported checkpoint)"
    if other_subset or result["samples"] != meta.get("test_samples", result["samples"]):
        return (f"recorded at training time: {recorded:.4f} on {meta.get('test_samples')} samples, another test subset "
                "(not comparable)")
    same = "matches" if result["accuracy"] == recorded else "differs from"
    return f"{same} the recorded {recorded:.4f}"


def parse(argv: list[str]) -> EvaluateConfig:
    """The command's flags as its config (what the README test checks every shown command with)."""
    return command_line(EvaluateConfig, argv, "kdfast evaluate")


@user_errors_exit
def main(argv: list[str] | None = None) -> dict:
    return run(parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
