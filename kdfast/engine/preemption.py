"""Stopping on request and losing processes: a signal saves the state and ends the run with the command that continues
it; a lost or stuck process ends the job naming it."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

import torch
from accelerate import Accelerator

from .. import cluster, collectives
from ..errors import Interrupted, KdfastError
from ..rundir import RunDir, describe_progress


class Preemption:
    """SIGINT / SIGTERM / SIGUSR1 while a command works.

    Training (the default): the current step finishes, the state is saved, the run exits. A second Ctrl-C (SIGINT)
    interrupts at once (the state saved last is kept); a second SIGTERM does not: launchers and schedulers deliver it
    to every process of the job, some twice (torchrun forwards the one a `timeout` or Slurm sent to the whole group),
    and it must not cancel the save it asked for. Under several processes the request is shared at check points, so
    every process stops at the same step.

    stop_now=MESSAGE (a cache build, whose finished slots are already safe on disk): the signal raises Interrupted at
    once, between two Python steps (never inside an HDF5 call), with the message.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # USR1: what clusters send before a time limit

    def __init__(self, stop_now: str | None = None, signals: tuple = SIGNALS):
        self.signum, self.previous, self.stop_now, self.signals = 0, {}, stop_now, signals

    def _handle(self, signum, frame):
        if self.stop_now is not None:
            raise Interrupted(signum, f"{signal.Signals(signum).name}: {self.stop_now}")
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def requested(self, acc: Accelerator) -> int:
        """The signal number asked for on any process (0: none); collective when there are several."""
        if acc.num_processes == 1:
            return self.signum
        return int(collectives.all_reduce(torch.full((), self.signum, device=acc.device), "max").item())


@contextmanager
def lost_processes(run_dir: RunDir, cfg):
    """A collective that fails because a process or node of the job is lost or stuck becomes kdfast.cluster's
    JobLost: who was lost, the state saved last, how to resume (the launcher's own block follows it)."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, (KdfastError, cluster.JobLost)) or not cluster.is_collective_failure(e):
            raise
        raise cluster.lost_job(e, saved_state_line(run_dir),
                               resume_advice(cfg) + " Any number of processes can continue it.") from None


def saved_state_line(run_dir: RunDir) -> str:
    """Where the last whole state is, as this process sees the --out-dir (the main node's disk may be another)."""
    try:
        saved = run_dir.state.saved()
    except Exception:  # a state being written by the main process, or damaged: not this line's business
        saved = None
    if saved is None:
        return f"No whole state of {run_dir.name!r} is in {run_dir.state_dir} as this node sees it."
    return f"The last whole state of {run_dir.name!r} is {saved['dir']} ({describe_progress(saved['progress'])})."


def resume_advice(cfg) -> str:
    """What continues an interrupted run: its own command again, with --resume unless it already resumes (the lab
    and sweeps start every run that way, so their advice is just their command again)."""
    if cfg.resume:
        return "Run the same command again to continue."
    if cfg.auto_resume:
        return ("A restart of this job (torchrun --max-restarts, a Slurm requeue) continues it by itself; by hand: "
                "the same command with --resume.")
    return "Resume with the same command and --resume."


def stopped(signum: int, name: str, where: str, state_dir: str, cfg) -> Interrupted:
    """The stop a signal asked for, once the state is saved: what was done, where the state is, what continues it."""
    return Interrupted(signum, f"[{name}] {signal.Signals(signum).name}: stopped after {where}; the state is saved in "
                               f"{state_dir}. {resume_advice(cfg)}")
