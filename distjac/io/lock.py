"""The output directory's lock: one run at a time (see NOTE [the output lock] in
:mod:`distjac.io.sink`)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Any

from ..errors import OutputLockedError

__all__ = ["LOCK_NAME", "OutputLock", "acquire"]

LOCK_NAME = ".distjac.lock"
# errno values of a directory distjac may read but not write.
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


class OutputLock:
    """The exclusive lock of an output directory, held by one run; see :func:`lock_output`.

    ``read_only`` is true when the directory cannot be written (nothing was locked, and
    nothing can be written there by anyone who cannot write it either).
    """

    def __init__(self, path: str, fd: int | None, *, read_only: bool = False):
        self.path = path
        self._fd = fd
        self.read_only = read_only

    def release(self) -> None:
        """Remove the lock file and drop the lock. Removing it while locked is safe: a run
        that opened the old file finds, once it holds the lock, that the path names
        another file (or none) and tries again (see :func:`lock_output`)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> tuple[str, dict[str, Any]]:
    try:
        d = json.loads(os.pread(fd, 4096, 0) or b"{}")
        d = d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        d = {}
    if not d.get("pid"):
        return "holder unknown", d
    return f"host {d.get('host')}, pid {d.get('pid')}, started {d.get('started')}", d


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_flock(out_dir: str, path: str, fd: int) -> None:
    """flock ``fd`` exclusively, or raise OutputLockedError naming the holder (closing ``fd``)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who, d = _holder(fd)
        os.close(fd)
        raise OutputLockedError(
            f"output.path {out_dir!r} is in use by another run ({who}); wait for it to finish or stop it, "
            f"or choose another output.path.", who) from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
        # No locks on this file system: honour a recorded holder that is alive on this host.
        who, d = _holder(fd)
        same_host = d.get("host") == socket.gethostname()
        if d.get("pid") and (not same_host or _pid_alive(int(d["pid"]))):
            os.close(fd)
            raise OutputLockedError(
                f"output.path {out_dir!r} is in use by another run ({who}; the file system has no locks, so "
                f"distjac cannot tell whether it is alive{'' if same_host else ' on another host'}); wait "
                f"for it, or delete {path} if no run is using the output.", who) from None


def acquire(out_dir: str) -> OutputLock:
    """Take ``out_dir``'s exclusive lock (creating the directory); a read-only lock when
    the directory cannot be written.

    Raises:
        OutputLockedError: another run holds it; the message names its host and pid.
    """
    path = os.path.join(out_dir, LOCK_NAME)
    for _ in range(100):
        try:
            os.makedirs(out_dir, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno in READ_ONLY_ERRNOS:
                return OutputLock(path, None, read_only=True)
            raise
        _try_flock(out_dir, path, fd)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            from .. import __version__

            holder = {"distjac": __version__, "host": socket.gethostname(), "pid": os.getpid(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            return OutputLock(path, fd)
        os.close(fd)  # the holder released (and removed) the file between our open and flock
    raise OutputLockedError(f"output.path {out_dir!r}: could not take the lock {path} (it kept changing).")
