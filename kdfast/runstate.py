"""A run's resumable state: out_dir/.state/NAME, loaded without executing any code.

    weights.safetensors     model (and trained helpers such as regressors), buffers included
    optimizer.safetensors   the optimizer's tensors (momentum, Adam moments, steps)
    state.json              progress (epoch, step, metric sums), optimizer groups, schedule, grad scaler, and the config
                            the run was started with; written last: its presence means the state is whole

The state is written under NAME.tmp, then swapped in with two renames, so a crash at any moment leaves a whole state
(NAME, or NAME.old between the renames).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from . import schemas
from .errors import KdfastError, io_errno, io_error_line
from .files import dump_json, ensure_dir, read_json

STATE_VERSION = 1


class StateError(KdfastError):
    """A resumable state that cannot be used as asked."""


class ResumableState:
    """The saved state of one run; `remove` deletes a path inside the run's --out-dir only (RunDir's confinement)."""

    def __init__(self, folder: str, remove):
        self.dir, self.remove = folder, remove
        self.metrics = folder + ".metrics.jsonl"  # the run's metrics while it replaces a finished run (RunDir)

    def clear(self) -> None:
        """Remove the state (and its .tmp / .old), state.json first; then .state if no other run uses it."""
        for suffix in ("", ".tmp", ".old"):
            folder = self.dir + suffix
            if os.path.isdir(folder) and not os.path.islink(folder):
                # invalidate first: a kill during the removal never leaves a half state that looks whole
                self.remove(os.path.join(folder, "state.json"))
            self.remove(folder)
        self.remove(self.metrics)
        try:
            os.rmdir(os.path.dirname(self.dir))  # .state, when no other run uses it
        except OSError:
            pass

    def _candidates(self) -> list[str]:
        # a crash between the two renames of a save leaves the last whole state in NAME.old
        return [d for d in (self.dir, self.dir + ".old") if os.path.exists(os.path.join(d, "state.json"))]

    def saved(self) -> dict | None:
        """The record (state.json) of the last whole saved state, or None; a damaged one is named."""
        found = self._candidates()
        if not found:
            return None
        path = os.path.join(found[0], "state.json")
        record = read_json(path, "resumable state", "Pass --fresh to discard it and start over.", schemas.STATE)
        if record["version"] != STATE_VERSION:
            raise StateError(f"{path}: not a resumable state this kdfast can read (version {record.get('version')!r}). "
                             "Pass --fresh to discard it and start over.")
        return {**record, "dir": found[0]}

    def save(self, modules: dict[str, nn.Module], optimizer, scheduler, scaler, progress: dict,
                   config: dict) -> None:
        """Write the whole resumable state under NAME.tmp, then swap it in (main process only)."""
        from safetensors.torch import save_file

        ensure_dir(os.path.dirname(self.dir), "--out-dir")
        tmp, old = self.dir + ".tmp", self.dir + ".old"
        self.remove(tmp)
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
            self.remove(tmp)
            try:
                os.rmdir(os.path.dirname(self.dir))  # .state, if this save made it
            except OSError:
                pass
            if isinstance(e, OSError) or io_errno(e):  # safetensors raises its own type for ENOSPC
                raise StateError(io_error_line(tmp, e, "saving the resumable state") + " The previous state is "
                                 "unchanged: once that is fixed, the run continues from it (kdfast train and distill: "
                                 "with --resume).") from None
            raise
        if os.path.exists(self.dir):
            self.remove(old)
            os.replace(self.dir, old)
        os.replace(tmp, self.dir)
        self.remove(old)

    def restore(self, saved: dict, modules: dict[str, nn.Module], optimizer, scheduler, scaler) -> dict:
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
        found = schemas.unlike(saved["optimizer"]["param_groups"], optimizer.state_dict()["param_groups"],
                               "optimizer.param_groups") + schemas.unlike(saved["scheduler"], scheduler.state_dict(),
                                                                          "scheduler")
        if found:
            raise StateError(f"{os.path.join(folder, 'state.json')}: damaged resumable state: {found[0]}. {fix}")
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
