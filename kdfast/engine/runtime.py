"""The processes and the precision: this process's place in the job, an Accelerator per run, main-process-only work."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (DistributedDataParallelKwargs, GradientAccumulationPlugin, InitProcessGroupKwargs,
                              parse_flag_from_env)

from .. import cluster, collectives
from ..config import DIST_TIMEOUT_S
from ..errors import USER_ERRORS, KdfastError, user_message
from ..machine import accelerate_mixed_precision, decide_precision, keep_freed_memory


@dataclass
class Runtime:
    accelerator: Accelerator
    precision: str
    precision_reason: str

    @property
    def device(self):
        return self.accelerator.device

    def print(self, *args):
        say(self.accelerator, *args)


def say(state: Accelerator | PartialState, *args) -> None:
    """print on the main process of the whole job only (Accelerate's print is per node: once on every node)."""
    if state.is_main_process:
        print(*args, flush=True)


def _use_cpu() -> bool:
    # without cpu=True, torchrun on a machine with no GPU gives N independent single-process jobs
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def process_state(dist_timeout: float | None = None) -> PartialState:
    """This process's place in the (possibly distributed) job; set up once per process: the first call's
    dist_timeout (seconds kdfast's collectives wait for the others; default --dist-timeout's) bounds them, and the
    process group's timeout follows from it (collectives.group_timeout)."""
    if PartialState._shared_state:  # set up already
        return PartialState()
    dist_timeout = DIST_TIMEOUT_S if dist_timeout is None else dist_timeout
    collectives.configure(dist_timeout)  # kdfast's own waits; the group's timeout is longer (NCCL's watchdog)
    timeout = collectives.group_timeout(dist_timeout, nccl=not _use_cpu())
    return PartialState(cpu=_use_cpu(), timeout=timeout, **cluster.process_group_store(timeout))


def make_runtime(precision: str = "auto", find_unused_parameters: bool = False, log_with: str = "none",
                 logging_dir: str | None = None, accumulate: int = 1,
                 dist_timeout: float = DIST_TIMEOUT_S, deterministic: bool = False) -> Runtime:
    """An Accelerator with the precision that is really fast here (see decide_precision).

    find_unused_parameters: for losses that leave some parameters without a gradient in some steps
    (FitNets' stages), which DDP must then be told about. log_with: Accelerate's experiment trackers
    ("none", "tensorboard", "wandb", "mlflow", "aim", "all"), writing under logging_dir where they write files.
    accumulate: micro-batches per optimizer step (Accelerate's gradient accumulation). dist_timeout: seconds a
    collective waits for the other processes (Accelerate's InitProcessGroupKwargs), then the job stops (kdfast.cluster).
    deterministic: deterministic kernels only (set_determinism).
    """
    device_type = process_state(dist_timeout).device.type
    used, reason = decide_precision(precision, device_type)
    set_determinism(deterministic, device_type)
    if device_type == "cpu":
        keep_freed_memory()
    AcceleratorState._reset_state()  # lets one process run several runs (the lab, tests) in turn
    GradientState._reset_state()
    handlers = [InitProcessGroupKwargs(timeout=collectives.group_timeout(dist_timeout, nccl=not _use_cpu()))]
    handlers += [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    trackers = {} if log_with == "none" else {"log_with": log_with, "project_dir": logging_dir}
    accelerator = Accelerator(cpu=_use_cpu(), mixed_precision=accelerate_mixed_precision(used),
                              gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accumulate),
                              kwargs_handlers=handlers, **trackers)
    return Runtime(accelerator, used, reason)


def set_determinism(deterministic: bool, device_type: str) -> None:
    """--deterministic: deterministic algorithms, cuDNN without autotuning and TF32 off, and cuBLAS's fixed workspace
    (read when cuBLAS starts: set here, before the first matmul). Otherwise, on a GPU, cuDNN picks the fastest kernels
    for the fixed input shapes (per process: results then differ in the last bits between runs)."""
    torch.use_deterministic_algorithms(deterministic)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if device_type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not deterministic


def run_runtime(cfg, find_unused_parameters: bool = False) -> Runtime:
    """The Runtime of a training run's config (its precision, trackers, accumulation, timeout and determinism)."""
    return make_runtime(cfg.precision, find_unused_parameters, cfg.log_with, logging_dir(cfg), cfg.grad_accum,
                        cfg.dist_timeout, cfg.deterministic)


def logging_dir(cfg) -> str:
    """Where file-writing trackers (tensorboard, aim, mlflow's local store) put a run: OUT_DIR/logs/NAME."""
    return os.path.join(cfg.out_dir, "logs")


def on_main(acc: Accelerator | PartialState, fn):
    """fn() on the main process only; its (picklable) result, or the user error it raised, reaches every
    process, so that a refusal on the main process never leaves the others waiting in a collective."""
    result, error = None, None
    if acc.is_main_process:
        try:
            result = fn()
        except USER_ERRORS + (OSError,) as e:
            if acc.num_processes == 1:
                raise
            error = user_message(e)
    if acc.num_processes > 1:
        result, error = collectives.broadcast_object((result, error))
    if error:
        raise KdfastError(error)
    return result
