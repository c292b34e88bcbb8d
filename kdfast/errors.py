"""Errors a user can fix, and how entry points show them: one sentence, no traceback."""
from __future__ import annotations

import functools
import os
import sys


class KdfastError(RuntimeError):
    """Input that cannot be used (data, checkpoint, cache), with a message naming the file and the fix."""


USER_ERRORS = (KdfastError, ValueError, FileNotFoundError)


def user_errors_exit(main):
    """Wrap an entry point: user errors print `kdfast: error: ...` and exit 2 (KDFAST_DEBUG=1 shows the traceback)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as e:
            if os.environ.get("KDFAST_DEBUG"):
                raise
            print(f"kdfast: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
