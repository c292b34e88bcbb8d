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
from .format import CacheError, slot_bytes
from .reader import LogitCache


def info(cfg: InfoConfig) -> dict:
    cache = LogitCache(cfg.file)
    a = cache.attrs
    test_logits, test_labels = cache.test_logits()
    teacher_acc = accuracy_and_loss(test_logits, test_labels)["accuracy"]
    summary = {"file": cfg.file, "size_mb": round(os.path.getsize(cfg.file) / 2**20, 2),
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
    for key, value in summary.items():
        print(f"{key:>22}: {value}")
    return summary


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
