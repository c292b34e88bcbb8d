"""Building a logit cache: plan the slots, run the teacher over each slot's views, write each slot through its codec,
mark it complete; a killed build resumes where it stopped, and the file is renamed to its name only when whole.

Every process computes its share of a slot; the main process decides (resume, keep, refuse), writes and flushes."""
from __future__ import annotations

import gc
import os
import shutil
import sys
import time
import traceback
from dataclasses import replace
from datetime import datetime, timezone

import torch

from .. import collectives
from .. import __version__
from ..augment import epoch_seed
from ..checkpoint import load_teacher, read_meta, weights_sha256
from ..config import DEFAULT_TEACHER, BuildConfig, DataConfig, pick
from ..engine import Preemption, Runtime, load_data, make_runtime, on_main, predict
from ..config.view import stored_size
from ..data import check_view
from ..errors import KdfastError, io_errno, io_error_line
from ..files import FileLock, check_file_target, remove_quietly
from ..models import model_entry
from ..preflight import check_model_input, view_sizes
from ..progress import bar as progress_bar
from .format import (BUILD_ATTRS, CacheError, cache_bytes, codec_for, create, differences, expected_attrs, h5py,
                     read_attrs, recorded_source)

AUTO_TOPK = 10  # --topk -1 above AUTO_DENSE_CLASSES classes (TinyViT keeps 10 of ImageNet-1k's 1,000 per view)
AUTO_DENSE_CLASSES = 100
BUILD_CHUNK = 50_000  # samples per teacher pass of a slot: what a process holds of a slot while building it


def build(cfg: BuildConfig, runtime: Runtime | None = None) -> str:
    """Build (or resume, or keep) the cache; returns its path. Every process computes, the main one writes.

    The main process holds NAME.lock for the whole build: a second build of the same file refuses at once.
    """
    cfg.validate()
    cfg = replace(cfg, teacher=cfg.teacher or DEFAULT_TEACHER)  # the data not given: the teacher's (below)
    runtime = runtime or make_runtime(cfg.value("precision"), dist_timeout=cfg.dist_timeout,
                                      deterministic=cfg.deterministic)
    path = cfg.out or default_cache_path(cfg.teacher, cfg.cache_dir)
    held = []

    def claim():
        check_file_target(path, "--out")
        held.append(FileLock(path + ".lock", f"the logit cache {path}", "choose another --out").acquire(runtime.print))

    on_main(runtime.accelerator, claim)
    opened = []  # the HDF5 file being written (main process)
    stop = (f"the cache build stopped; the slots completed so far are kept in {path}.partial. Run the same command "
            "again to continue it.")
    try:
        with Preemption(stop_now=stop, signals=Preemption.SIGNALS[:2]):
            return _build_locked(cfg, runtime, path, opened)
    except Exception as e:
        if not io_errno(e) or isinstance(e, KdfastError):
            raise
        traceback.clear_frames(e.__traceback__)  # the build's frames hold HDF5 objects: closed below, quietly
        for f in opened:  # a write that failed part-way leaves HDF5 metadata that cannot be trusted
            _close_quietly(f)
            remove_quietly(path + ".partial")
        raise CacheError(io_error_line(path + ".partial", e, "writing the cache") + " The partial file is removed "
                         "(a failed HDF5 write can leave it inconsistent): the same command builds it again.") from None
    finally:
        for f in opened:
            _close_quietly(f)
        for lock in held:
            lock.release()


def with_teacher_data(cfg: BuildConfig, meta: dict, say) -> BuildConfig:
    """The data and view flags not given, taken from the teacher's .json (its run's config), said in the log; then
    the recipe's and the defaults. A flag given always wins."""
    config = meta.get("config", {})
    recorded = pick(config, DataConfig)
    recorded["data"] = recorded_source(recorded.get("data") or (meta.get("data") or {}).get("source"))
    if isinstance(config.get("augment"), dict):
        recorded["augment"] = config["augment"]
    plain, resolved = cfg.resolved(), cfg.resolved(recorded)
    taken = {k: getattr(resolved, k) for k in ("data", "dataset", "train_per_class", "test_per_class", "val_per_class",
                                               "val_seed", "store_size") if getattr(resolved, k) != getattr(plain, k)}
    views = {k: v for k, v in resolved.augment.values().items() if v != getattr(plain.augment, k)}
    taken.update({f"augment.{k}": " ".join(map(str, v)) if isinstance(v, tuple) else v for k, v in views.items()})
    if taken:
        say(f"[cache] as the teacher was trained ({cfg.teacher}): "
            + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in taken.items()))
    return resolved


def _build_locked(cfg: BuildConfig, runtime: Runtime, path: str, opened: list) -> str:
    by_name = bool(cfg.teacher_weights or cfg.teacher_pretrained)
    cfg = with_teacher_data(cfg, {} if by_name else read_meta(cfg.teacher), runtime.print)
    data = load_data(cfg, runtime)
    check_view(data.train, cfg.augment)  # what train and distill refuse, refused before the teacher pass
    teacher, meta = load_teacher(cfg.teacher, data.classes, runtime.device, cfg.teacher_weights, cfg.teacher_pretrained)
    check_model_input(teacher, cfg.teacher, "--teacher", view_sizes(cfg.augment, data), len(data.classes),
                      runtime.device)
    if cfg.topk >= len(data.classes):
        raise ValueError(f"--topk must be 0 (dense) or between 1 and {len(data.classes) - 1}, got {cfg.topk}")
    attrs = planned_attrs(cfg, data, teacher, meta, resolve_topk(cfg.topk, len(data.classes), runtime.print),
                          runtime.precision)

    def decide():  # the main process opens the file and decides; every process follows, refusals included
        check_free_space(path + ".partial", cache_bytes(attrs))
        f = _open_for_build(cfg, path, attrs, runtime.print)
        opened.extend([f] if f is not None else [])
        return None if f is None else {"test": not bool(f["test/complete"][()]),
                                       "slots": [k for k, done in enumerate(f["train/complete"][:]) if not done]}

    todo = on_main(runtime.accelerator, decide)
    if todo is None:
        return path
    channels_last = model_entry(meta["model"]).family == "cnn"
    teacher_pass = TeacherPass(teacher, data, cfg, runtime, channels_last, opened[0] if opened else None, attrs)
    return teacher_pass.run(todo, path)


def planned_attrs(cfg: BuildConfig, data, teacher, meta: dict, topk: int, precision: str) -> dict:
    """What the cache's attributes pin: its data, views, seeds (slot k: epoch k's of a run with --seed), teacher."""
    checkpoint = (meta.get("weights_from") and f"{cfg.teacher} ({meta['weights_from']})"
                  or os.path.abspath(cfg.teacher))
    return {**expected_attrs(data, cfg.augment), "data_source": data.source, "dataset": cfg.dataset,
            "train_per_class": cfg.train_per_class, "store_size": stored_size(cfg),
            "test_per_class": cfg.test_per_class, "val_per_class": cfg.val_per_class, "val_seed": cfg.val_seed,
            "seeds": [epoch_seed(cfg.seed, k) for k in range(cfg.slots)], "topk": topk,
            "teacher_model": meta["model"], "teacher_sha256": weights_sha256(teacher),
            "teacher_checkpoint": checkpoint, "precision": precision, "aug_recipe": cfg.aug_recipe,
            "kdfast_version": __version__,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


class TeacherPass:
    """The teacher over the test set and each slot's training views, in chunks; the main process writes each chunk
    through the cache's codec, flushes, and marks the slot complete."""

    def __init__(self, teacher, data, cfg: BuildConfig, runtime: Runtime, channels_last: bool, f, attrs: dict):
        self.teacher, self.data, self.cfg, self.runtime, self.f = teacher, data, cfg, runtime, f
        self.channels_last, self.attrs, self.codec = channels_last, attrs, codec_for(attrs)

    def logits(self, split, aug_seed=None, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        return predict(self.teacher, split, self.cfg.augment, self.runtime, self.cfg.batch_size, self.channels_last,
                       aug_seed, self.cfg.data_workers, lo, hi).cpu()

    def run(self, todo: dict, path: str) -> str:
        acc, data, seeds = self.runtime.accelerator, self.data, self.attrs["seeds"]
        t0 = time.perf_counter()
        if todo["test"]:
            self.write_test(self.logits(data.test))
        bar = progress_bar(len(todo["slots"]) * len(data.train), f"cache {os.path.basename(path)}",
                           self.cfg.progress and acc.is_main_process, unit="img")
        n = len(data.train)
        for slot in todo["slots"]:
            for start in range(0, n, BUILD_CHUNK):  # a slot in chunks: memory stays bounded whatever N
                end = min(n, start + BUILD_CHUNK)
                logits = self.logits(data.train, seeds[slot], start, end)
                if acc.is_main_process:
                    check_logits(logits, f"slot {slot}")
                    write_rows(self.f, slot, start, logits, self.codec)
                bar.update(end - start)
            if acc.is_main_process:
                mark_complete(self.f, slot)
            self.runtime.print(f"[cache] slot {slot + 1}/{self.cfg.slots} complete (seed {seeds[slot]})")
            collectives.barrier()
        bar.close()
        self.finish(todo, path, time.perf_counter() - t0)
        return path

    def write_test(self, logits: torch.Tensor) -> None:
        if self.runtime.accelerator.is_main_process:
            check_logits(logits, "the test set")
            self.f["test/logits"][:] = logits.numpy().astype("float16")
            self.f["test/labels"][:] = self.data.test.labels.numpy()
            self.f.flush()
            self.f["test/complete"][()] = True
            self.f.flush()

    def finish(self, todo: dict, path: str, elapsed: float) -> None:
        acc, data = self.runtime.accelerator, self.data
        if acc.is_main_process:
            self.f.close()
            os.replace(path + ".partial", path)
            images = len(todo["slots"]) * len(data.train) + (len(data.test) if todo["test"] else 0)
            self.runtime.print(f"[cache] wrote {path}: {len(self.attrs['seeds'])} slots x {len(data.train)} samples "
                               f"({images / max(elapsed, 1e-9):,.0f} img/s teacher inference, "
                               f"{self.runtime.precision}, {elapsed:.1f}s)")
        collectives.barrier()


def write_rows(f, slot: int, start: int, logits: torch.Tensor, codec) -> None:
    """Samples start.. of a slot (a chunk of it), encoded by the cache's codec."""
    for name, rows in codec.encode(logits).items():
        f[name][slot, start:start + len(logits)] = rows


def mark_complete(f, slot: int) -> None:
    f.flush()  # the slot's data is on disk before it is marked complete
    f["train/complete"][slot] = True
    f.flush()


def check_logits(logits: torch.Tensor, what: str) -> None:
    if not torch.isfinite(logits).all():
        raise CacheError(f"the teacher produced NaN or inf logits for {what}; nothing of it was written. "
                         "Check the teacher checkpoint, or build with --precision fp32.")
    if logits.abs().max() > 60000:
        raise CacheError(f"the teacher's logits for {what} exceed float16's range (|x| > 60000); nothing of it was "
                         "written.")


def resolve_topk(topk: int, classes: int, say) -> int:
    """--topk -1 (auto): dense up to AUTO_DENSE_CLASSES classes, top-AUTO_TOPK above, said in the log."""
    if topk >= 0:
        return topk
    if classes <= AUTO_DENSE_CLASSES:
        return 0
    say(f"[cache] {classes} classes: storing the top {AUTO_TOPK} logits per view and one for the rest (--topk -1, "
        f"auto, above {AUTO_DENSE_CLASSES} classes; --topk 0 keeps them all)")
    return AUTO_TOPK


def _open_for_build(cfg: BuildConfig, path: str, attrs: dict, say):
    """The partial file to continue (resume) or a new one; None when `path` is already this very cache."""
    partial = path + ".partial"
    build_keys = [k for k in BUILD_ATTRS if k in attrs]
    if os.path.exists(path):
        try:
            with h5py().File(path, "r") as f:
                diff = differences(read_attrs(f), attrs, build_keys)
        except OSError:
            diff = ["the file is unreadable"]
        if not diff:
            say(f"{path}: already complete with this teacher, data and seeds; kept")
            return None
        if not cfg.overwrite:
            raise CacheError(f"{path} exists and was built differently:\n  " + "\n  ".join(diff)
                             + "\nPass --overwrite to replace it, or choose another --out.")
    if os.path.exists(partial):
        try:
            f = h5py().File(partial, "r+")
            diff = differences(read_attrs(f), attrs, build_keys)
        except OSError:
            f, diff = None, ["the file is unreadable"]
        if not diff:
            done = int(f["train/complete"][:].sum())
            say(f"{partial}: resuming an interrupted build ({done}/{len(attrs['seeds'])} slots complete)")
            return f
        if f is not None:
            f.close()
        if not cfg.overwrite:
            raise CacheError(f"{partial}: an interrupted build with other settings is in the way:\n  "
                             + "\n  ".join(diff) + "\nPass --overwrite to discard it, or delete it.")
        os.remove(partial)
    return create(partial, attrs)


def default_cache_path(teacher: str, cache_dir: str) -> str:
    return os.path.join(cache_dir, os.path.splitext(os.path.basename(teacher))[0] + ".h5")


def check_free_space(path: str, needed: int) -> None:
    """Refuse a build the disk cannot hold, before any teacher pass (HDF5 reports a full disk only from its
    destructors, when some chunks are already lost)."""
    folder = os.path.dirname(os.path.abspath(path))
    have = shutil.disk_usage(folder).free + (os.path.getsize(path) if os.path.exists(path) else 0)
    margin = needed // 20 + (1 << 16)  # HDF5's own metadata and chunk index
    if have < needed + margin:
        raise CacheError(f"{path}: the cache needs about {_size(needed + margin)} and {folder} has {_size(have)} "
                         "free. Free space, choose another --out, or build fewer --slots "
                         "(or --topk K for many classes).")


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MB" if n >= 2**20 else f"{n / 1024:,.0f} KB"


def _close_quietly(f) -> None:
    """Close an HDF5 file a failed write left open. Its close, and the release of its objects, can fail the same way
    (the disk is full): HDF5 then reports from its destructors, which is not shown."""
    hooks = sys.unraisablehook, sys.excepthook  # Cython destructors print through both
    sys.unraisablehook, sys.excepthook = (lambda unraisable: None), (lambda *exc: None)
    try:
        if f.id.valid:
            f.close()
    except Exception:
        pass
    finally:
        gc.collect()
        sys.unraisablehook, sys.excepthook = hooks
