"""Test helper: run a kdfast entry point with a fault injected before a given global step.

    python -m tests.stop_at STEP kdfast.train ARGS...     the main process sends itself SIGTERM (under torchrun too)
    python -m tests.stop_at -1 kdfast.train ARGS...       no fault (only the recording below)

Environment, for the cluster tests:
    KDFAST_TEST_FAULT=stuck:RANK   instead of SIGTERM, that rank hangs before STEP (it still dies of SIGTERM, as a
                                   process stuck in a collective does), on the job's first start only
    KDFAST_TEST_RECORD=PATH        every process appends "global_step rank index index ..." for each micro-batch
    KDFAST_TEST_SEQUENCE=1         ARGS is several entry points separated by "--then": MODULE ARGS --then MODULE ...
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
    elif rank == "0":
        os.kill(os.getpid(), signal.SIGTERM)


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


def main() -> None:
    step, args = int(sys.argv[1]), sys.argv[2:]
    original, record = engine.loop.train_step, os.environ.get("KDFAST_TEST_RECORD")

    def step_with_fault(tr, micro_batches, global_step):
        if global_step == step:
            _fault(step)
        if record:
            with open(record, "a") as f:
                for batch in micro_batches:
                    f.write(f"{global_step} {os.environ.get('RANK', '0')} "
                            + " ".join(map(str, batch.indices.tolist())) + "\n")
        return original(tr, micro_batches, global_step)

    engine.loop.train_step = step_with_fault
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
