"""`kdfast cache build | info | verify`: build a cache, summarise one, recompute random entries with the teacher."""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import Annotated, Union

import torch
import tyro

from ..augment import AugmentSpec
from ..checkpoint import load_teacher, weights_sha256
from ..config import DEFAULT_TEACHER, BuildConfig, InfoConfig, VerifyConfig
from ..data import view_batches
from ..engine import accuracy_and_loss, load_data, make_runtime
from ..errors import user_errors_exit
from ..models import model_entry
from .builder import build
from .ensemble import disagreements, ensemble_test_logits
from .format import CacheError, slot_bytes
from .reader import LogitCache


def info(cfg: InfoConfig) -> dict:
    """Each cache's summary; of several, their agreement (agreement_lines). Returns the one summary, or a list."""
    files = (cfg.file,) if isinstance(cfg.file, str) else tuple(cfg.file)
    summaries = [summary_of(path) for path in files]
    for summary in summaries:
        if len(files) > 1:
            print()
        for key, value in summary.items():
            print(f"{key:>22}: {value}")
    if len(files) == 1:
        return summaries[0]
    print()
    agreement = agreement_of(files)
    for line in agreement["lines"]:
        print(line)
    return {"caches": summaries, "agreement": agreement}


def summary_of(path: str) -> dict:
    cache = LogitCache(path)
    a = cache.attrs
    test_logits, test_labels = cache.test_logits()
    teacher_acc = accuracy_and_loss(test_logits, test_labels)["accuracy"]
    summary = {"file": path, "size_mb": round(os.path.getsize(path) / 2**20, 2),
               "format_version": a["format_version"], "teacher_model": a["teacher_model"],
               "teacher_sha256": a["teacher_sha256"][:16], "teacher_test_accuracy": teacher_acc,
               "dataset_fingerprint": a["dataset_fingerprint"], "classes": len(a["classes"]),
               "train_size": a["train_size"], "test_size": a["test_size"], "slots": len(a["seeds"]),
               "seeds": a["seeds"],
               "topk": a.get("topk", 0), "shape": list(cache.file[cache.codec.names[0]].shape),
               "precision": a.get("precision"), "memory_per_process_mb": round(slot_bytes(a) / 2**20, 2),
               "store_size": a.get("store_size", 0), "augment": a["augment"], "kdfast_version": a.get("kdfast_version"),
               "created_at": a.get("created_at")}
    cache.close()
    return summary


def agreement_of(files: tuple[str, ...], tau: float = 4.0) -> dict:
    """Whether the caches can be one ensemble teacher (ensemble.disagreements), how often their teachers' test
    predictions agree, and the test accuracy of their ensemble (probabilities at tau averaged, and logits)."""
    caches = [LogitCache(path) for path in files]
    try:
        differ = disagreements(caches)
        weights = [1.0 / len(caches)] * len(caches)
        tests = {mode: ensemble_test_logits(caches, weights, tau, mode) for mode in ("probs", "logits")} \
            if not differ else {}
    finally:
        for cache in caches:
            cache.close()
    lines = ["ensemble: " + ("these caches agree on data, split, views and slots: usable together as --teacher-cache "
                             + " ".join(files) if not differ else "these caches cannot be one teacher:\n  "
                             + "\n  ".join(differ))]
    result = {"usable": not differ, "differences": differ, "lines": lines}
    if differ:
        return result
    accs = {mode: accuracy_and_loss(logits, labels)["accuracy"] for mode, (logits, labels, _) in tests.items()}
    preds = [logits.argmax(1) for logits in tests["probs"][2]]
    pairs = {(i, j): (preds[i] == preds[j]).float().mean().item()
             for i in range(len(preds)) for j in range(i + 1, len(preds))}
    result.update(test_prediction_agreement={f"{i}-{j}": v for (i, j), v in pairs.items()},
                  ensemble_test_accuracy=accs)
    lines += ["test predictions agree: "
              + ", ".join(f"{files[i]} and {files[j]} {v:.4f}" for (i, j), v in pairs.items()),
              f"ensemble test accuracy (equal weights): probabilities at tau {tau:g} averaged {accs['probs']:.4f}, "
              f"logits averaged {accs['logits']:.4f}"]
    return result


def built_with(attrs: dict) -> dict:
    """What a cache recorded of its data and precision, as a config's fields (the flags not given take them)."""
    return {"data": attrs.get("data_source"), "dataset": attrs.get("dataset", "cifar10"),
            **{k: attrs.get(k, 0) for k in ("train_per_class", "test_per_class", "val_per_class", "val_seed",
                                            "store_size")}, "precision": attrs.get("precision", "auto")}


def verify(cfg: VerifyConfig) -> dict:
    cfg.validate()
    cache = LogitCache(cfg.file)
    a = cache.attrs
    cfg = replace(cfg, teacher=cfg.teacher or DEFAULT_TEACHER).resolved(built_with(a))
    runtime = make_runtime(cfg.precision, dist_timeout=cfg.dist_timeout, deterministic=cfg.deterministic)
    teacher, meta = load_teacher(cfg.teacher, a["classes"], runtime.device, cfg.teacher_weights, cfg.teacher_pretrained)
    if weights_sha256(teacher) != a["teacher_sha256"]:
        raise CacheError(f"{cfg.teacher}: not the teacher this cache was built from "
                         f"({a['teacher_model']}, weights {a['teacher_sha256'][:16]}).")
    data = load_data(cfg, runtime)
    spec = AugmentSpec.from_dict(a["augment"])
    cache.check_matches(data, spec)
    largest, agree = recompute(cfg, cache, teacher, data, spec, runtime, model_entry(meta["model"]).family == "cnn")
    cache.close()
    result = {"samples": cfg.samples, "max_abs_diff": largest, "argmax_agreement": agree / cfg.samples,
              "precision": runtime.precision}
    print(f"{cfg.file}: {cfg.samples} random entries recomputed online ({runtime.precision}): largest |difference| "
          f"{largest:.4g}, argmax agreement {agree}/{cfg.samples}")
    return result


def recompute(cfg: VerifyConfig, cache: LogitCache, teacher, data, spec, runtime, channels_last: bool):
    """(largest |online - cached|, argmax agreements) over --samples random (slot, sample) entries."""
    g = torch.Generator().manual_seed(cfg.seed)
    slots = torch.randint(0, len(cache.seeds), (cfg.samples,), generator=g)
    indices = torch.randint(0, len(data.train), (cfg.samples,), generator=g)
    largest, agree = 0.0, 0
    for slot in slots.unique().tolist():
        idx = indices[slots == slot]
        views, _, _, _ = next(view_batches(data.train, [idx], spec, cache.seeds[slot], runtime.device, channels_last, 0))
        with torch.no_grad(), runtime.accelerator.autocast():
            online = teacher(views).float().cpu()
        cached = cache.slot_logits(slot)[idx]
        largest = max(largest, (online - cached).abs().max().item())
        agree += (online.argmax(1) == cached.argmax(1)).sum().item()
    return largest, agree


def parse(argv: list[str]):
    """build / info / verify and its flags, as a BuildConfig, InfoConfig or VerifyConfig."""
    commands = Union[tuple(Annotated[cls, tyro.conf.subcommand(name, description=cls.__doc__)]
                           for name, cls in (("build", BuildConfig), ("info", InfoConfig), ("verify", VerifyConfig)))]
    return tyro.cli(commands, args=argv, prog="kdfast cache")


@user_errors_exit
def main(argv: list[str] | None = None):
    cfg = parse(sys.argv[1:] if argv is None else argv)
    if isinstance(cfg, BuildConfig):
        return build(cfg)
    if isinstance(cfg, VerifyConfig):
        return verify(cfg)
    return info(cfg)
