"""Errors a user can fix, and how entry points show them: one sentence, no traceback."""
from __future__ import annotations

import functools
import os
import sys


class KdfastError(RuntimeError):
    """Input that cannot be used (data, checkpoint, cache), with a message naming the file and the fix."""


USER_ERRORS = (KdfastError, ValueError, FileNotFoundError)


class Interrupted(Exception):
    """A run stopped by SIGINT / SIGTERM after saving its state; exits with 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _close_process_group() -> None:
    """Leave the distributed job cleanly once the command is done: every process meets, then the group is destroyed
    (a gloo process exiting with the group alive can abort in its threads: "terminate called without an active
    exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def user_errors_exit(main):
    """Wrap an entry point: user errors print `kdfast: error: ...` and exit 2 (KDFAST_DEBUG=1 shows the traceback);
    a run stopped by a signal after saving its state exits 128 + signal, Ctrl-C elsewhere 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            result = main(*args, **kwargs)
            _close_process_group()
            return result
        except USER_ERRORS as e:
            if os.environ.get("KDFAST_DEBUG"):
                raise
            print(f"kdfast: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except Interrupted as e:
            if _is_main_process():
                print(f"kdfast: {e}", file=sys.stderr)
            raise SystemExit(128 + e.signum) from None
        except KeyboardInterrupt:
            if os.environ.get("KDFAST_DEBUG"):
                raise
            if _is_main_process():
                print("kdfast: interrupted (Ctrl-C); files being written were left as they were before", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
