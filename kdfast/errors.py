"""Errors a user can fix, and how entry points show them: one sentence, no traceback."""
from __future__ import annotations

import errno
import functools
import os
import re
import sys


class KdfastError(RuntimeError):
    """Input that cannot be used (data, checkpoint, cache), with a message naming the file and the fix."""


USER_ERRORS = (KdfastError, ValueError, FileNotFoundError)

# what to do about an operating-system error, by errno
_FIXES = {
    errno.EROFS: "The file system is read-only: choose a writable place (--out-dir, --cache-dir, --out, --report).",
    errno.ENOSPC: "The disk is full: free space, or choose a place on another disk.",
    errno.EDQUOT: "The disk quota is exceeded: free space, or choose a place on another disk.",
    errno.EACCES: "Permission denied: fix the permissions, or choose a place you can write.",
    errno.EPERM: "Permission denied: fix the permissions, or choose a place you can write.",
    errno.EISDIR: "A folder is in the way where a file should be: move it, or choose another path.",
    errno.ENOTDIR: "A file is in the way where a folder should be: move it, or choose another path.",
    errno.ENOENT: "Check the path.",
    errno.ENAMETOOLONG: "The name is too long: choose a shorter path.",
    errno.EMFILE: "Too many open files: raise the limit (ulimit -n) or lower --data-workers.",
    errno.ENFILE: "Too many open files: raise the limit (ulimit -n) or lower --data-workers.",
    errno.EIO: "An I/O error of the device: check the disk, or choose a place on another one.",
}
# libraries that wrap the errno in their own error's text: safetensors "(os error 28)", HDF5 "errno = 28"
_ERRNO_IN_TEXT = re.compile(r"(?:Os \{ code: |os error |errno = |\[Errno )(\d+)")


def user_message(e: BaseException) -> str:
    """The one line shown for a user error; an operating system's error (errno set) as io_error_line says it."""
    return io_error_line(e.filename, e) if isinstance(e, OSError) and e.errno else str(e)


def io_errno(e: BaseException) -> int | None:
    """The errno of an OSError, or of a library error (safetensors, h5py) that names one in its text; else None."""
    if isinstance(e, OSError) and e.errno:
        return e.errno
    found = _ERRNO_IN_TEXT.search(str(e))
    return int(found.group(1)) if found else None


def io_error_line(path: str | None, e: BaseException, doing: str = "") -> str:
    """One sentence for a file error: the path, what failed, why, and the fix."""
    code = io_errno(e)
    reason = os.strerror(code) if code else (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    path = path or getattr(e, "filename", None) or "a file"
    fix = _FIXES.get(code, "Fix the path or free space, then run again.")
    return f"{path}: {doing + ' ' if doing else ''}failed ({reason}). {fix}"


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
    """Wrap an entry point: user errors and file errors print `kdfast: error: ...` and exit 2 (KDFAST_DEBUG=1 shows
    the traceback);
    a run stopped by a signal after saving its state exits 128 + signal, Ctrl-C elsewhere 130; a job that lost a process
    or node says which (kdfast.cluster) and exits 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            result = main(*args, **kwargs)
            _close_process_group()
            return result
        except USER_ERRORS + (OSError,) as e:  # an OSError not turned into a KdfastError where it happened too
            if os.environ.get("KDFAST_DEBUG"):
                raise
            print(f"kdfast: error: {user_message(e)}", file=sys.stderr)
            raise SystemExit(2) from None
        except RuntimeError as e:  # another process of the job was lost or is stuck (a failed collective)
            from .cluster import JobLost, exit_lost, is_collective_failure, lost_job

            if isinstance(e, JobLost):
                exit_lost(e)
            if not is_collective_failure(e) or os.environ.get("KDFAST_DEBUG"):
                raise
            exit_lost(lost_job(e))
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
