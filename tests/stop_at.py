"""Test helper: run a kdfast entry point with a fault injected before a given global step.

    python -m tests.stop_at STEP kdfast.train ARGS...     the main process sends itself SIGTERM (under torchrun too)
    python -m tests.stop_at -1 kdfast.train ARGS...       no fault (only the recording below)

Environment, for the cluster tests:
    KDFAST_TEST_FAULT=stuck:RANK   instead of SIGTERM, that rank hangs before STEP (it still dies of SIGTERM, as a
                                   process stuck in a collective does), on the job's first start only
    KDFAST_TEST_FAULT=group        SIGTERM to the whole process group (data workers included) instead
    KDFAST_TEST_FAULT=group-from-worker   the data worker making micro-batch STEP of the first epoch sends SIGTERM to
                                   the whole group (no fault in the trainer's steps)
    KDFAST_TEST_FAULT=worker       SIGKILL to this process's data workers (the OOM killer) instead
    KDFAST_TEST_RECORD=PATH        every process appends "global_step rank index index ..." for each micro-batch
    KDFAST_TEST_SEQUENCE=1         ARGS is several entry points separated by "--then": MODULE ARGS --then MODULE ...
    KDFAST_TEST_MEMORY=PATH        every process reads all its training images at step 2 and appends, at step 4, "rank
                                   mapping-file rss-kB pss-kB" of the memory holding them (/proc/self/smaps)
    KDFAST_TEST_COMPILE=BACKEND    --compile uses that torch.compile backend (aot_eager: no C compiler, quick)
    KDFAST_TEST_WRITES=PATH        every process appends "rank path" for each file it puts in place (os.replace, the
                                   way kdfast writes every file) or opens as HDF5 to write
"""
import importlib
import os
import signal
import sys
import time

from kdfast import engine


def _fault(step: int):
    fault = os.environ.get("KDFAST_TEST_FAULT", "")
    rank = os.environ.get("RANK", "0")
    if fault.startswith("stuck:"):
        if rank == fault.split(":")[1] and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(3600)
    elif fault == "group":  # what Slurm and a terminal do: the signal to every process of the group, workers too
        os.killpg(os.getpgrp(), signal.SIGTERM)
    elif fault == "worker":  # the OOM killer taking the data workers
        import multiprocessing

        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGKILL)
    elif rank == "0":
        os.kill(os.getpid(), signal.SIGTERM)


def _signal_from_worker(chunk: int) -> None:
    """The data worker preparing micro-batch `chunk` of the first epoch sends SIGTERM to the whole process group:
    the trainer gets it wherever it is (waiting for a batch, in a step), the workers at the same time."""
    from kdfast.data import loader

    item, sent = loader._StepViews.__getitem__, []

    def item_with_signal(self, k):
        if k == chunk and not sent and self.aug_seed is not None:
            sent.append(True)
            os.killpg(os.getpgrp(), signal.SIGTERM)
        return item(self, k)

    loader._StepViews.__getitem__ = item_with_signal


def _log_writes(path: str) -> None:
    import h5py

    rank, replace, h5_init = os.environ.get("RANK", "0"), os.replace, h5py.File.__init__

    def log(target):
        with open(path, "a") as f:
            f.write(f"{rank} {os.path.abspath(target)}\n")

    def logged_replace(src, dst, *args, **kwargs):
        log(dst)
        return replace(src, dst, *args, **kwargs)

    def logged_h5(self, name, mode="r", *args, **kwargs):
        if mode != "r":
            log(name)
        return h5_init(self, name, mode, *args, **kwargs)

    os.replace, h5py.File.__init__ = logged_replace, logged_h5


def _memory_of(t, path: str) -> None:
    """rank, the file mapped where t's data is (or "anonymous"), that mapping's Rss and Pss in kB."""
    address, found, sizes = t.data_ptr(), None, {}
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if found is not None:
                    break
                if lo <= address < hi:
                    found = fields[5] if len(fields) > 5 else "anonymous"
            elif found is not None and fields[0] in ("Rss:", "Pss:"):
                sizes[fields[0]] = fields[1]
    with open(path, "a") as f:
        f.write(f"{os.environ.get('RANK', '0')} {found} {sizes.get('Rss:')} {sizes.get('Pss:')}\n")


def main() -> None:
    step, args = int(sys.argv[1]), sys.argv[2:]
    original, record = engine.loop.train_step, os.environ.get("KDFAST_TEST_RECORD")

    def step_with_fault(tr, micro_batches, global_step):
        if global_step == step:
            _fault(step)
        memory = os.environ.get("KDFAST_TEST_MEMORY")
        if memory and global_step == 2:
            tr.loader.images.sum()  # every page of the training images read
        if memory and global_step == 4:  # every process has passed step 2 (DDP steps together)
            _memory_of(tr.loader.images, memory)
        if record:
            with open(record, "a") as f:
                for batch in micro_batches:
                    f.write(f"{global_step} {os.environ.get('RANK', '0')} "
                            + " ".join(map(str, batch.indices.tolist())) + "\n")
        return original(tr, micro_batches, global_step)

    engine.loop.train_step = step_with_fault
    if os.environ.get("KDFAST_TEST_FAULT") == "group-from-worker":
        _signal_from_worker(step)
    if os.environ.get("KDFAST_TEST_COMPILE"):
        import functools

        import torch

        torch.compile = functools.partial(torch.compile, backend=os.environ["KDFAST_TEST_COMPILE"])
    if os.environ.get("KDFAST_TEST_WRITES"):
        _log_writes(os.environ["KDFAST_TEST_WRITES"])
    commands = [args]
    if os.environ.get("KDFAST_TEST_SEQUENCE"):
        commands, current = [], []
        for a in args + ["--then"]:
            if a == "--then":
                commands.append(current)
                current = []
            else:
                current.append(a)
    for i, (module, *rest) in enumerate(commands):  # one process group for all: only the last one closes it
        entry = importlib.import_module(module).main
        (entry if i == len(commands) - 1 else entry.__wrapped__)(rest)


if __name__ == "__main__":
    main()
