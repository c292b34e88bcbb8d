"""The streamed tier's worker processes, made part of the run: what fails in a worker reaches the trainer as
kdfast's own error, a worker that dies is reported between two steps, and signals are the trainer's alone.

  * A worker's DataError (a damaged stored image, a vanished file) comes back as a value, WorkerFailure, and is
    raised in the trainer as the same one-line DataError: not torch's "Caught DataError in DataLoader worker
    process 0 ... Original Traceback".
  * torch's SIGCHLD handler would raise "DataLoader worker is killed by signal" in the trainer at any bytecode,
    in the middle of an optimizer step; without it the DataLoader finds a dead worker while it waits for the next
    batch (within torch's 5 s status check), so the trainer stops between two whole steps and can save them.
  * Workers ignore SIGINT, SIGTERM and SIGUSR1. A scheduler signals the whole process group (Slurm at preemption
    and at the time limit, Ctrl-C in a terminal); the trainer alone decides: the step finishes, the state is saved.
    The signals are blocked while the workers are forked, so none reaches a worker before it ignores them.
"""
from __future__ import annotations

import re
import signal
from contextlib import contextmanager

from .types import DataError, WorkerLost

TRAINER_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class WorkerFailure:
    """What a worker returns instead of a batch when it raised a user's error: the message."""

    def __init__(self, message: str):
        self.message = message


def ignore_trainer_signals(worker_id: int = 0) -> None:
    """worker_init_fn: the trainer's signals ignored, then unblocked (they were blocked across the fork)."""
    for s in TRAINER_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, TRAINER_SIGNALS)


@contextmanager
def signals_held():
    """The trainer's signals blocked while workers are forked (delivered to the trainer right after)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, TRAINER_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _no_sigchld_handler() -> None:
    from torch.utils.data._utils import signal_handling

    signal_handling._SIGCHLD_handler_set = True  # torch installs its handler only when this is False


_DIED = re.compile(r"DataLoader worker \(pids?\(?s?\)? ?([\d, ]+)\) (?:is killed by signal: ([^.]+)|exited unexpectedly)")


def lost(e: RuntimeError, workers=()) -> WorkerLost | None:
    """The WorkerLost of torch's error about a dead worker (its signal from the message, else from the exit code of
    the workers given), or None."""
    found = _DIED.search(str(e).strip().splitlines()[0] if str(e).strip() else "")
    if not found:
        return None
    pids, how = found.group(1).strip(), found.group(2)
    names = {signal.strsignal(s): s for s in signal.Signals}
    signum = int(names.get(how, 0)) if how else max([-w.exitcode for w in workers if w.exitcode is not None], default=0)
    cause = f"was killed by signal {signal.Signals(signum).name}" if signum else \
        (f"was killed by signal: {how}" if how else "exited unexpectedly")
    oom = " (SIGKILL is what the kernel's out-of-memory killer sends: lower --data-workers or --batch-size, or " \
          "give the job more memory)" if signum == signal.SIGKILL else ""
    return WorkerLost(f"a data worker (pid {pids}) {cause}{oom}", signum)


def batches(loader):
    """Iterate a DataLoader of the streamed tier: workers forked with the trainer's signals held, a worker's failure
    raised here as DataError, a dead worker as WorkerLost."""
    _no_sigchld_handler()
    with signals_held():
        it = iter(loader)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except RuntimeError as e:
            died = lost(e, getattr(it, "_workers", ()))
            if died is None:
                raise
            raise died from None
        if isinstance(item, WorkerFailure):
            raise DataError(item.message)
        yield item
