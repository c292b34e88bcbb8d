"""A run's directory: its name, its lock, its resumable state, its metrics and their cleanup.

    out_dir/NAME.pth .safetensors .json     the finished checkpoint (checkpoint.py)
    out_dir/NAME.metrics.jsonl              one line per epoch, rewritten atomically
    out_dir/NAME.lock                       held by the process writing NAME (flock; pid inside)
    out_dir/.state/NAME/                    resumable state, loaded without executing any code:
        weights.safetensors                 model (and trained helpers such as regressors), buffers included
        optimizer.safetensors               the optimizer's tensors (momentum, Adam moments, steps)
        state.json                          progress (epoch, step, metric sums), optimizer groups, schedule,
                                            grad scaler, and the config the run was started with

Every path is inside out_dir (names are checked, deletions confined). The state is written under
`.state/NAME.tmp`, then swapped in with two renames, so a crash at any moment leaves a whole state.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil

import torch
import torch.nn as nn

from .checkpoint import checkpoint_paths
from .errors import KdfastError
from .files import FileLock, atomic_write, dump_json, ensure_dir, finite_json, read_json, write_json

STATE_VERSION = 1
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100 characters, no '..'"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# config fields that do not change what a run computes: a resume may differ in these
NOT_COMPARED = ("resume", "fresh", "progress", "checkpoint_every", "log_every", "log_with", "data_tier", "data_budget_gb",
                "data_workers")
# fields added since a state or checkpoint may have been written, with the value that older runs had
ADDED_FIELDS = {"dataset": "cifar10", "store_size": 0, "aug_recipe": "none", "ema": 0.0, "tta": "none",
                "grad_accum": 1, "val_per_class": 0, "val_seed": 0}


class StateError(KdfastError):
    """A resumable state that cannot be used as asked."""


def check_name(name: str, flag: str = "--name") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{flag} {name!r}: not a valid run name. Use {NAME_RULE} (it names files inside --out-dir).")
    return name


def comparable_config(config: dict) -> dict:
    """The fields of a run's config that change what it computes, as they read back from JSON."""
    config = {**ADDED_FIELDS, **json.loads(json.dumps(finite_json(config)))}
    return {k: v for k, v in config.items() if k not in NOT_COMPARED}


def config_differences(saved: dict, current: dict) -> list[str]:
    a, b = comparable_config(saved), comparable_config(current)
    return [f"{k}: state has {a.get(k)!r}, this run {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class RunDir:
    """The files of one named run in out_dir; only the main process writes through it."""

    def __init__(self, out_dir: str, name: str):
        self.out_dir, self.name = out_dir, check_name(name)
        self.paths = {**checkpoint_paths(out_dir, name), "lock": os.path.join(out_dir, name + ".lock")}
        self.state_dir = self.paths["state"]
        self.lock = FileLock(self.paths["lock"], f"run {name!r}")
        self.resume_from: dict | None = None  # the saved state this run continues (set by engine.open_run)

    # ------------------------------------------------------------ confinement and cleanup

    def _inside(self, path: str) -> str:
        root = os.path.realpath(self.out_dir)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root or real == root:
            raise StateError(f"{path}: resolves to {real}, outside --out-dir {self.out_dir}; kdfast only writes and "
                             "deletes inside it. Remove the link, or choose another --out-dir.")
        return path

    def _remove_tree(self, path: str) -> None:
        if os.path.lexists(path):
            self._inside(path)
            if os.path.islink(path) or not os.path.isdir(path):
                os.remove(path)
            else:
                shutil.rmtree(path)

    def prepare(self) -> None:
        ensure_dir(self.out_dir, "--out-dir")
        self._inside(self.paths["json"])

    def remove_stale_temporaries(self, say) -> None:
        """Temporary files of this run left by a killed process (call with the lock held: none is being written)."""
        for key in ("pth", "safetensors", "json", "metrics"):
            for tmp in glob.glob(glob.escape(self.paths[key]) + ".tmp*"):
                if tmp[len(self.paths[key]) + 4:].isdigit():
                    self._remove_tree(tmp)
                    say(f"[{self.name}] removed {tmp}, left by a process that was killed while writing it")

    def clear_state(self) -> None:
        for suffix in ("", ".tmp", ".old"):
            folder = self.state_dir + suffix
            if os.path.isdir(folder) and not os.path.islink(folder):
                # invalidate first: a kill during the removal never leaves a half state that looks whole
                self._remove_tree(os.path.join(folder, "state.json"))
            self._remove_tree(folder)
        try:
            os.rmdir(os.path.dirname(self.state_dir))  # .state, when no other run uses it
        except OSError:
            pass

    # ------------------------------------------------------------ resumable state

    def _state_candidates(self) -> list[str]:
        # a crash between the two renames of a save leaves the last whole state in NAME.old
        return [d for d in (self.state_dir, self.state_dir + ".old") if os.path.exists(os.path.join(d, "state.json"))]

    def saved_state(self) -> dict | None:
        """The record (state.json) of the last whole saved state, or None; a damaged one is named."""
        found = self._state_candidates()
        if not found:
            return None
        path = os.path.join(found[0], "state.json")
        record = read_json(path, "resumable state", "Pass --fresh to discard it and start over.")
        if record.get("version") != STATE_VERSION or "progress" not in record or "config" not in record:
            raise StateError(f"{path}: not a resumable state this kdfast can read (version {record.get('version')!r}). "
                             "Pass --fresh to discard it and start over.")
        return {**record, "dir": found[0]}

    def check_resume(self, config: dict, resume: bool, fresh: bool, say) -> dict | None:
        """What to resume from: None to start afresh; refuses a state without --resume or under another config."""
        saved = self.saved_state()
        if saved is None:
            return None
        where = describe_progress(saved["progress"])
        if fresh:
            say(f"[{self.name}] --fresh: discarding the interrupted run's state in {saved['dir']} ({where})")
            self.clear_state()
            return None
        if not resume:
            raise StateError(f"{saved['dir']}: an interrupted run of {self.name!r} is saved here ({where}). Pass "
                             "--resume to continue it, or --fresh to discard it and start over.")
        diff = config_differences(saved["config"], config)
        if diff:
            raise StateError(f"{saved['dir']}: the saved state of {self.name!r} was started with another config:\n  "
                             + "\n  ".join(diff) + "\nResume with the same flags, or pass --fresh to start over.")
        return saved

    def check_overwrite(self, config: dict, fresh: bool, say) -> None:
        """A finished run of this name (its NAME.json) is replaced only when asked: refused under another config
        without --fresh; under the same config, or with --fresh, the log says it is replaced."""
        meta = self.finished_meta()
        if meta is None:
            return
        diff = config_differences(meta.get("config", {}), config)
        if diff and not fresh:
            raise StateError(f"{self.paths['json']}: a finished run of {self.name!r} (test accuracy "
                             f"{meta['test_accuracy']:.4f}) was trained with another config:\n  "
                             + "\n  ".join(d.replace("state has", "it has") for d in diff)
                             + "\nPass --fresh to replace it, or choose another --name or --out-dir.")
        why = "--fresh" if diff else "the same config"
        say(f"[{self.name}] replacing the finished run in {self.paths['json']} ({why}; it had test accuracy "
            f"{meta['test_accuracy']:.4f})")

    def finished_meta(self) -> dict | None:
        """The finished run's NAME.json, or None (absent, or not a finished run's)."""
        if not os.path.exists(self.paths["json"]):
            return None
        meta = read_json(self.paths["json"], "checkpoint description",
                         "Delete it (and its checkpoint) to retrain, or pass --fresh.")
        return meta if isinstance(meta.get("test_accuracy"), (int, float)) else None

    def save_state(self, modules: dict[str, nn.Module], optimizer, scheduler, scaler, progress: dict,
                   config: dict) -> None:
        """Write the whole resumable state under NAME.tmp, then swap it in (main process only)."""
        from safetensors.torch import save_file

        ensure_dir(os.path.dirname(self.state_dir), "--out-dir")
        tmp, old = self.state_dir + ".tmp", self.state_dir + ".old"
        self._remove_tree(tmp)
        try:
            os.makedirs(tmp)
            weights = {f"{name}.{k}": v for name, m in modules.items() for k, v in _plain(m.state_dict()).items()}
            save_file(weights, os.path.join(tmp, "weights.safetensors"))
            opt_tensors, opt_record = _split_optimizer_state(optimizer.state_dict())
            save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
            record = {"version": STATE_VERSION, "progress": progress, "config": config, "optimizer": opt_record,
                      "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                      "modules": sorted(modules)}
            with open(os.path.join(tmp, "state.json"), "w") as f:  # written last: its presence means whole
                dump_json(record, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:
            self._remove_tree(tmp)
            if isinstance(e, OSError):
                raise StateError(f"{tmp}: could not save the resumable state ({e.strerror or e}); the previous "
                                 "state is unchanged. Free disk space, then run again with --resume.") from None
            raise
        if os.path.exists(self.state_dir):
            self._remove_tree(old)
            os.replace(self.state_dir, old)
        os.replace(tmp, self.state_dir)
        self._remove_tree(old)

    def restore_state(self, saved: dict, modules: dict[str, nn.Module], optimizer, scheduler, scaler) -> dict:
        """Load what save_state wrote into the live objects; returns the progress record."""
        from safetensors.torch import load_file

        folder = saved["dir"]
        fix = "Pass --fresh to discard it and start over."
        tensors = {}
        for part in ("weights", "optimizer"):
            path = os.path.join(folder, part + ".safetensors")
            try:
                tensors[part] = load_file(path)
            except Exception as e:  # safetensors raises its own error types for damaged headers and data
                raise StateError(f"{path}: damaged resumable state ({type(e).__name__}: {_first_line(e)}). "
                                 f"{fix}") from None
        weights, opt_tensors = tensors["weights"], tensors["optimizer"]
        try:
            for name, module in modules.items():
                prefix = name + "."
                module.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
            optimizer.load_state_dict(_join_optimizer_state(opt_tensors, saved["optimizer"], optimizer))
            scheduler.load_state_dict(saved["scheduler"])
            if scaler is not None and saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise StateError(f"{folder}: the saved state does not fit this run ({type(e).__name__}: "
                             f"{_first_line(e)}). {fix}") from None
        return saved["progress"]

    # ------------------------------------------------------------ metrics

    def read_metrics(self) -> list[dict]:
        path = self.paths["metrics"]
        if not os.path.exists(path):
            return []
        lines = []
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    record["epoch"]
                except (ValueError, KeyError, TypeError) as e:
                    raise KdfastError(f"{path}: line {number} is damaged ({e}). Delete the file (the run rewrites "
                                      "it), or pass --fresh.") from None
                lines.append(record)
        return lines

    def write_metrics(self, records: list[dict]) -> None:
        def write(tmp):
            with open(tmp, "w") as f:
                f.writelines(json.dumps(finite_json(r), allow_nan=False) + "\n" for r in records)

        atomic_write(self.paths["metrics"], write)


def finished_run(run_cfg) -> dict | None:
    """The saved metadata (NAME.json) of a run already finished with this very config (a TrainConfig), else None."""
    path = checkpoint_paths(run_cfg.out_dir, run_cfg.run_name)["json"]
    if not os.path.exists(path):
        return None
    meta = read_json(path, "checkpoint description", "Delete it (and its checkpoint) to retrain, or pass --fresh.")
    if "test_accuracy" not in meta:
        return None
    return meta if comparable_config(meta.get("config", {})) == comparable_config(run_cfg.to_dict()) else None


def same_computation(meta: dict, run_cfg) -> bool:
    """Whether a finished run (its NAME.json) computed what run_cfg would, under another name or --out-dir.

    The data source is compared as resolved; --teacher beside one --teacher-cache only checks that cache."""
    saved, wanted = comparable_config(meta.get("config", {})), comparable_config(run_cfg.to_dict())
    for fields in (saved, wanted):
        for key in ("name", "out_dir") + (("teacher",) if fields.get("teacher_cache") else ()):
            fields.pop(key, None)
    if wanted.get("data") is not None and saved.get("data") is None:
        saved["data"] = (meta.get("data") or {}).get("source")
    return saved == wanted


def adopt_finished_run(donor_cfg, run_cfg, say) -> dict | None:
    """Copy a finished run that computed exactly what run_cfg would (same_computation) to run_cfg's name.

    The copy is an ordinary finished run (checkpoint, metrics, NAME.json with run_cfg's config); returns its
    metadata, or None when the donor is unfinished or computed something else. Interrupted state of run_cfg's
    name is removed (the copy finishes it)."""
    meta = finished_run(donor_cfg)
    if meta is None or not same_computation(meta, run_cfg):
        return None
    target = RunDir(run_cfg.out_dir, run_cfg.run_name)
    target.prepare()
    source = checkpoint_paths(donor_cfg.out_dir, donor_cfg.run_name)
    meta = {**meta, "config": run_cfg.to_dict(), "copied_from": source["json"]}
    with target.lock.acquire(say):
        for key in ("pth", "safetensors", "metrics"):  # the .json last: it says the files beside it are whole
            atomic_write(target.paths[key], lambda tmp, src=source[key]: shutil.copyfile(src, tmp))
        write_json(target.paths["json"], meta)
        target.clear_state()  # an interrupted attempt at this run, now finished by the copy
    return meta


def describe_progress(progress: dict) -> str:
    step = progress.get("step", 0)
    return f"after epoch {progress['epoch']}" + (f", step {step} of epoch {progress['epoch'] + 1}" if step else "")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _plain(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as (tensors for safetensors, the rest as JSON)."""
    tensors, scalars = {}, {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups, "tensor_params": sorted({k.split(".")[0] for k in tensors})}


def _join_optimizer_state(tensors: dict, record: dict, optimizer) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, entry in record["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    live = optimizer.state_dict()["param_groups"]
    if len(live) != len(record["param_groups"]):
        raise ValueError(f"{len(record['param_groups'])} parameter groups saved, {len(live)} in this run")
    groups = [{k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in saved.items()}
              for saved, now in zip(record["param_groups"], live)]
    return {"state": state, "param_groups": groups}
