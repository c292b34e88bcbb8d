"""Progress bars: tqdm on a terminal; none where the output goes to a file or a pipe (a job's log, `| tee`), whose
readers get the one line per epoch the commands print, not a carriage-return redraw per step."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def on_terminal() -> bool:
    """Whether tqdm's stream (stderr) is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def bar(total: int, desc: str, show: bool, **kwargs) -> tqdm:
    """A bar when `show` (the --progress flag, main process) and stderr is a terminal; else a disabled one."""
    return tqdm(total=total, desc=desc, disable=not (show and on_terminal()), dynamic_ncols=True, **kwargs)
