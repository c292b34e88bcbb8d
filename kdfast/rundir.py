"""A run's directory: its name, its lock, what may be resumed or replaced, its metrics and their cleanup.

    out_dir/NAME.pth .safetensors .json     the finished checkpoint (checkpoint.py)
    out_dir/NAME.metrics.jsonl              one line per epoch, rewritten atomically
    out_dir/.state/NAME.metrics.jsonl       the same, while the run replaces a finished run of its name (whose own
                                            metrics stay with its checkpoint until the new checkpoint replaces both)
    out_dir/NAME.lock                       held by the process writing NAME (flock; pid inside)
    out_dir/.state/NAME/                    the resumable state (runstate.py)

Every path is inside out_dir (names are checked, deletions confined).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil

from . import schemas
from .checkpoint import checkpoint_paths
from .config import DistillConfig
from .errors import KdfastError
from .files import FileLock, atomic_write, ensure_dir, finite_json, read_json, write_json
from .runstate import ResumableState, StateError, describe_progress

__all__ = ["RunDir", "StateError", "adopt_finished_run", "check_name", "comparable_config", "config_differences",
           "describe_progress", "finished_run", "same_computation"]

NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100 characters, no '..'"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


# as the config sections declare them: a setting() is not compared (where files are, how a run is watched; --out-dir
# and --cache-dir are the same folder however they are spelled), and a field an older config lacks reads as what a run
# that does not give it resolves to
NOT_COMPARED, OLDER_RUNS_HAD = DistillConfig.not_compared(), DistillConfig.as_older_runs_had()


def check_name(name: str, flag: str = "--name") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{flag} {name!r}: not a valid run name. Use {NAME_RULE} (it names files inside --out-dir).")
    return name


def comparable_config(config: dict) -> dict:
    """The fields of a run's config that change what it computes, as they read back from JSON."""
    config = {**OLDER_RUNS_HAD, **json.loads(json.dumps(finite_json(config)))}
    if isinstance(config.get("teacher_cache"), str):  # one cache, as a caller or an older run gave it
        config["teacher_cache"] = [config["teacher_cache"]]
    return {k: v for k, v in config.items() if k not in NOT_COMPARED}


def config_differences(saved: dict, current: dict) -> list[str]:
    a, b = comparable_config(saved), comparable_config(current)
    shown = {"members": _member_names}  # a group's members: their names, not their whole configs
    return [f"{k}: state has {shown.get(k, repr)(a.get(k))}, this run {shown.get(k, repr)(b.get(k))}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _member_names(members) -> str:
    try:
        return ", ".join(json.loads(m).get("name", "?") for m in members or ())
    except (ValueError, TypeError, AttributeError):
        return repr(members)


class RunDir:
    """The files of one named run in out_dir; only the main process writes through it."""

    def __init__(self, out_dir: str, name: str):
        self.out_dir, self.name = out_dir, check_name(name)
        self.paths = {**checkpoint_paths(out_dir, name), "lock": os.path.join(out_dir, name + ".lock")}
        self.state_dir = self.paths["state"]
        self.state = ResumableState(self.state_dir, self._remove_tree)
        self.lock = FileLock(self.paths["lock"], f"run {name!r}")
        self.resume_from: dict | None = None  # the saved state this run continues (set by engine.open_run)
        self.kept: dict | None = None  # a restarted job's finished run (--auto-resume): its metadata, nothing to train

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

    def check_resume(self, config: dict, resume: bool, fresh: bool, say) -> dict | None:
        """What to resume from: None to start afresh; refuses a state without --resume or under another config."""
        saved = self.state.saved()
        if saved is None:
            return None
        where = describe_progress(saved["progress"])
        if fresh:
            say(f"[{self.name}] --fresh: discarding the interrupted run's state in {saved['dir']} ({where})")
            self.state.clear()
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
        fix = "Delete it (and its checkpoint) to retrain, or pass --fresh."
        meta = read_json(self.paths["json"], "checkpoint description", fix, schemas.CHECKPOINT)
        return schemas.check_finished(meta, self.paths["json"], fix) if "test_accuracy" in meta else None

    # ------------------------------------------------------------ metrics

    def metrics_path(self) -> str:
        """Where a run in progress writes its epochs: NAME.metrics.jsonl, or beside its state while a finished run's
        NAME.json is still there (the finished run's files then stay as they were until the new checkpoint)."""
        pending = self.state.metrics
        return pending if os.path.exists(pending) or os.path.exists(self.paths["json"]) else self.paths["metrics"]

    def read_metrics(self, path: str | None = None) -> list[dict]:
        """The per-epoch records of the finished run (or those at `path`: metrics_path() for a run in progress)."""
        path = path or self.paths["metrics"]
        if not os.path.exists(path):
            return []
        lines = []
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    found = schemas.problems(record, schemas.METRICS_LINE)
                    if found:
                        raise ValueError("; ".join(found))
                except ValueError as e:
                    raise KdfastError(f"{path}: line {number} is damaged ({e}). Delete the file (the run rewrites "
                                      "it), or pass --fresh.") from None
                lines.append(record)
        return lines

    def write_metrics(self, records: list[dict]) -> None:
        """Rewrite the metrics of the run in progress (at metrics_path())."""
        def write(tmp):
            with open(tmp, "w") as f:
                f.writelines(json.dumps(finite_json(r), allow_nan=False) + "\n" for r in records)

        path = self.metrics_path()
        ensure_dir(os.path.dirname(path), "--out-dir")
        atomic_write(path, write)


def finished_run(run_cfg) -> dict | None:
    """The saved metadata (NAME.json) of a run already finished with this very config (a TrainConfig), else None."""
    meta = RunDir(run_cfg.out_dir, run_cfg.run_name).finished_meta()
    if meta is None:
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
        target.state.clear()  # an interrupted attempt at this run, now finished by the copy
    return meta


