"""How a command runs and keeps its runs: precision, processes, progress; where runs are written, resumed and logged.
None of these but the precision changes what a run computes."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal, Optional

from ..flags import explained, setting, unset
from .checks import check, check_float, check_int
from .section import Section

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Tracker = Literal["none", "tensorboard", "wandb", "mlflow", "aim", "all"]
DIST_TIMEOUT_S = 600.0  # a lost GPU peer idles the others this long; the longest wait kdfast bounds is a state save
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                    "aim": ("aim",)}


@explained
@dataclass
class RuntimeConfig(Section):
    """The precision, the processes' patience and the progress bars of any command that runs a model."""

    precision: Optional[Precision] = unset("auto")
    """auto = bf16 on GPUs that have it (fp16 on older ones); on CPUs bf16 only with AMX/AVX512-BF16, else fp32.
    Default: as recorded by what the command reads (kdfast evaluate: the checkpoint's; cache verify: the cache's),
    else auto."""
    dist_timeout: float = setting(DIST_TIMEOUT_S)
    """Several processes: seconds one waits in kdfast's collectives for the others (under gloo and NCCL alike) before
    the job stops, naming the rank lost. Keep it above the longest step and the longest state save; the first
    decode of a folder is waited for as long as it takes."""
    progress: bool = setting(True)
    """Show progress bars (main process only)."""
    deterministic: bool = setting(False)
    """GPUs: deterministic kernels only (torch.use_deterministic_algorithms; no cuDNN autotuning, no TF32), so that a
    run and its resume repeat bit for bit on one GPU model; slower, and an op with no deterministic kernel stops the
    run. Without it a GPU run repeats within rounding only. CPUs are deterministic either way."""

    def check(self) -> None:
        check_float(self, "dist_timeout", 1.0)


@explained
@dataclass
class OutputConfig(Section):
    """Where a run (or a checkpoint) is written, and its name."""

    out_dir: Optional[str] = unset("models_saved", compared=False)
    """Where the run's checkpoint, metrics and resumable state are written (a lab's: its six checkpoints; a sweep's:
    every run and sweep.json, .csv, .md). Default: models_saved (kdfast sweep: runs/sweep)."""
    name: Optional[str] = None
    """Checkpoint name in out_dir (NAME.pth, .safetensors, .json, .metrics.jsonl). Default: the model name (kdfast
    import: the weights file's name, else the model's)."""


@explained
@dataclass
class RunConfig(Section):
    """How a run is resumed, saved along the way and logged."""

    resume: bool = setting(False)
    """Continue an interrupted run from its saved state (out_dir/.state/NAME); refused if its config differs."""
    fresh: bool = setting(False)
    """Start over: discard an interrupted run's saved state, and replace a finished run of the same name trained with
    another config (without it, both are refused). A lab or a sweep retrains every run."""
    auto_resume: bool = setting(False)
    """Resume by itself when the job is a restart (torchrun --max-restarts, a requeued Slurm job) and a saved state
    exists; a restart of a finished run keeps it. A first start behaves as without it (a saved state is refused)."""
    checkpoint_every: int = setting(0)
    """Also save the resumable state every N optimizer steps (0: after every epoch only)."""
    log_with: Tracker = setting("none")
    """Also log each epoch's metrics and the resolved config to experiment trackers through Accelerate
    (tensorboard writes to OUT_DIR/logs/NAME; wandb, mlflow, aim need their package and login)."""

    def check(self) -> None:
        check_int(self, "checkpoint_every", 0)
        check_tracker(self.log_with)
        if self.fresh and (self.resume or self.auto_resume):
            flag = "--resume" if self.resume else "--auto-resume"
            raise ValueError(f"{flag} and --fresh exclude each other: {flag} continues a saved state, "
                             "--fresh discards it")


def check_tracker(log_with: str) -> None:
    """--log-with a tracker whose package is missing stops at start-up (Accelerate would only warn and train on)."""
    packages = TRACKER_PACKAGES.get(log_with, ())
    if packages and not any(importlib.util.find_spec(p) for p in packages):
        raise ValueError(f"--log-with {log_with}: the {packages[0]} package is not installed. pip install "
                         f"{packages[0]} (and log in, where it needs it), or drop --log-with.")


__all__ = ["DIST_TIMEOUT_S", "OutputConfig", "Precision", "RunConfig", "RuntimeConfig", "Tracker", "check",
           "check_tracker"]
