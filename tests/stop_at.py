"""Test helper: run a kdfast entry point whose main process sends itself SIGTERM before a given global step.

    python -m tests.stop_at STEP kdfast.train ARGS...     (under torchrun too: only rank 0 is signalled)
"""
import importlib
import os
import signal
import sys

from kdfast import engine


def main() -> None:
    step, module, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    original = engine.train_step

    def step_then_signal(tr, micro_batches, global_step):
        if global_step == step and os.environ.get("RANK", "0") == "0":
            os.kill(os.getpid(), signal.SIGTERM)
        return original(tr, micro_batches, global_step)

    engine.train_step = step_then_signal
    importlib.import_module(module).main(args)


if __name__ == "__main__":
    main()
