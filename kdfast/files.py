"""Writing files safely: atomic replacement, JSON without NaN, and one writer per output (a lock).

Every file kdfast writes goes through `atomic_write` (a temporary name in the same folder, then
`os.replace`), so a crash or a full disk leaves the previous file whole and no temporary behind.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import socket
import time

from .errors import KdfastError, io_errno, io_error_line


class OutputError(KdfastError):
    """An output that cannot be written (disk full, a file where a folder should be, a lock held)."""


def finite_json(obj):
    """obj with every NaN / inf float replaced by None: metrics and records never hold bare NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_temp(path: str, write) -> str:
    """write(tmp) to a temporary name beside `path`, synced; the temporary is removed if anything fails."""
    tmp = temp_name(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would make it: some writers (safetensors) create files 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException as e:
        remove_quietly(tmp)
        cause = e if isinstance(e, (OSError, KeyboardInterrupt)) or io_errno(e) else writing_probe(tmp) or e
        if isinstance(cause, OSError) or io_errno(cause):
            raise OutputError(io_error_line(path, cause, "writing") + " The previous file, if any, is unchanged.") from None
        raise
    return tmp


def writing_probe(beside: str, size: int = 1 << 20) -> OSError | None:
    """The error that writing `size` bytes beside a file gives now, or None: why a writer that names no cause failed
    (torch.save on a full disk raises "unexpected pos 64 vs 0")."""
    probe = beside + ".probe"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(size))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e
    finally:
        remove_quietly(probe)
    return None


def atomic_write(path: str, write) -> None:
    """Replace `path` with what write(tmp) produces, or leave it as it was."""
    os.replace(write_temp(path, write), path)
    _fsync_dir(path)


def dump_json(obj, f) -> None:
    json.dump(finite_json(obj), f, indent=2, allow_nan=False)
    f.write("\n")


def write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            dump_json(obj, f)

    atomic_write(path, write)


def write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def read_json(path: str, what: str = "file", fix: str = "Delete it or restore it from a backup.", schema=None) -> dict:
    """A JSON object from a file kdfast wrote, or one line naming the file when it is damaged: not JSON, not an
    object, or (with a schemas.Schema) a field missing or of another type."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise KdfastError(f"{path}: damaged {what}, not valid JSON ({e}). {fix}") from None
    except IsADirectoryError:
        raise KdfastError(f"{path}: a folder, expected a {what}. {fix}") from None
    if not isinstance(obj, dict):
        raise KdfastError(f"{path}: damaged {what}, expected a JSON object. {fix}")
    if schema is not None:
        from .schemas import check

        check(obj, schema, path, what, fix)
    return obj


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def ensure_dir(path: str, flag: str) -> None:
    """Create a folder, or say in one line why it cannot be one."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{flag} {path}: a file is in the way, not a folder. Choose a folder, or move the file.")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{flag} " + io_error_line(path, e, "creating the folder")) from None


def check_file_target(path: str, flag: str) -> None:
    """An output file path whose place is usable: not a folder, its folder creatable."""
    if os.path.isdir(path):
        raise OutputError(f"{flag} {path}: a folder is in the way, expected a file name. Choose a file path.")
    ensure_dir(os.path.dirname(os.path.abspath(path)), flag)


class LockedError(OutputError):
    """Another process is writing the same output."""


_HELD: set = set()  # the FileLocks this process holds (strong references: a held lock is never collected)


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close its copies of the parent's lock descriptors. flock(2) belongs
    to the open file, which a fork shares: a worker that outlives a killed trainer by a few seconds would otherwise
    keep the trainer's lock, and the rerun right after a kill -9 would be refused. The parent's lock is unaffected."""
    for lock in list(_HELD):
        if lock.fd is not None:
            try:
                os.close(lock.fd)
            except OSError:
                pass
            lock.fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def _wait_for_unlock(path: str) -> None:
    """Block until the holder of the lock file `path` lets it go (or dies)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # released and removed meanwhile
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


class FileLock:
    """An exclusive lock on one output, held for a whole run: `path` (NAME.lock) with the holder's pid in it.

    flock(2) is released by the kernel when the holder dies, so a lock left by a killed process never
    blocks: the next run takes it over and says so. A second live writer is refused at once. Forked children
    (data workers) do not keep it (_drop_inherited_locks).
    """

    def __init__(self, path: str, what: str, fix: str = "choose another --name / --out-dir"):
        self.path, self.what, self.fd, self.fix = path, what, None, fix  # fix: the flag that names another output

    def acquire(self, say=print, wait: bool = False) -> "FileLock":
        """Take the lock; held by another live process: refused at once, or (wait) waited for, said once."""
        ensure_dir(os.path.dirname(os.path.abspath(self.path)), "lock folder")
        waited = False
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OutputError(io_error_line(self.path, e, f"creating the lock of {self.what}")) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"{self.path}: cannot lock ({e.strerror}); is the folder on a file system "
                                      "without locks? Use a local --out-dir.") from None
                if wait:
                    if not waited:
                        say(f"{self.path}: {self.what} is being written by another process ({holder}); waiting for it")
                    waited = True
                    _wait_for_unlock(self.path)
                    continue
                raise LockedError(f"{self.path}: {self.what} is being written by another process ({holder}). "
                                  f"Wait for it to finish, or {self.fix}.") from None
            try:  # the file may have been unlinked by its previous holder between our open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if previous and not waited:
            say(f"{self.path}: taking over the lock of {previous}, which is no longer running")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        except OSError as e:  # a full disk: no empty lock is left behind
            remove_quietly(self.path)
            os.close(fd)
            raise OutputError(io_error_line(self.path, e, f"writing the lock of {self.what}")) from None
        self.fd = fd
        _HELD.add(self)
        return self

    def release(self) -> None:
        _HELD.discard(self)
        if self.fd is None:
            return
        remove_quietly(self.path)  # while still held: nobody can lock the old file after this
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc):
        self.release()
