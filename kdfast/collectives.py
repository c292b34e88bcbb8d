"""kdfast's own collectives, each bounded by --dist-timeout, so that a lost or stuck peer ends the job with kdfast's
line (kdfast.cluster) under NCCL as under gloo.

gloo raises from a collective when a peer's sockets close, or after the process group's timeout. NCCL does not: a
collective whose peer is gone waits on the GPU until NCCL's watchdog aborts the process (SIGABRT: no Python runs) at
the process group's timeout. So kdfast starts its own collectives asynchronously and waits for each with a timeout
(``Work.wait(timeout)`` raises on both backends), and gives the process group a longer one (``group_timeout``), so
that kdfast's wait ends first. A collective queues behind the GPU work before it (DDP's gradient all-reduce): a peer
lost in a step is found at the next of kdfast's collectives, on a logging step.

Work the main process does alone while the others wait (the first decode of a large folder: hours) is not bounded:
``main_first`` makes the others wait in a gloo group of its own with no practical timeout; if the main process dies,
its launcher (torchrun) ends the others.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import USER_ERRORS, KdfastError, user_message

TIMEOUT_S = 600.0  # set from --dist-timeout by engine.runtime.process_state
LONG_WAIT = timedelta(days=7)  # main_first: as long as the main process's work takes
_long_group = None


def configure(timeout_s: float) -> None:
    global TIMEOUT_S
    TIMEOUT_S = float(timeout_s)


def group_timeout(timeout_s: float, nccl: bool) -> timedelta:
    """The process group's timeout for kdfast's bound timeout_s: under NCCL longer, so that its watchdog (which kills
    the process) fires only after kdfast's own wait has ended the job with its line; gloo raises: the same."""
    return timedelta(seconds=timeout_s + (max(60.0, 0.1 * timeout_s) if nccl else 0.0))


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _bounded(work) -> None:
    work.wait(timedelta(seconds=TIMEOUT_S))  # raises when the others do not answer in time


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """t summed (op "sum") or maxed ("max") over every process, in place; returned."""
    if world() > 1:
        _bounded(dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, async_op=True))
    return t


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Every process's t (the same shape on each), concatenated along dim 0 in rank order."""
    if world() == 1:
        return t
    out = t.new_empty((world() * t.shape[0], *t.shape[1:]))
    _bounded(dist.all_gather_into_tensor(out, t.contiguous(), async_op=True))
    return out


def barrier() -> None:
    if world() > 1:
        _bounded(dist.barrier(async_op=True))


def broadcast_object(obj, src: int = 0):
    """Process src's picklable obj, on every process (torch's broadcast_object_list, after a bounded barrier: every
    process has answered just before)."""
    if world() == 1:
        return obj
    barrier()
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_first(is_main: bool, fn):
    """fn() on the main process, then on the others (which read what it wrote), who wait for it as long as it takes.
    If it fails on the main process, the others raise its message instead of running fn."""
    global _long_group
    if world() == 1:
        return fn()
    if _long_group is None:  # every process reaches the first main_first together
        _long_group = dist.new_group(backend="gloo", timeout=LONG_WAIT)
    result, error, failed = None, None, [None]
    if is_main:
        try:
            result = fn()
        except Exception as e:
            error = e
            failed = [user_message(e) if isinstance(e, USER_ERRORS + (OSError,)) else
                      f"the main process failed ({type(e).__name__}: {e})"]
    dist.barrier(group=_long_group)
    dist.broadcast_object_list(failed, src=0, group=_long_group)
    if error is not None:
        raise error
    if failed[0] is not None:
        raise KdfastError(failed[0])
    return result if is_main else fn()
