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

__all__ = ["LOCK_NAME", "ObjectStoreLock", "OutputLock", "acquire", "acquire_object_store"]

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


# -----------------------------------------------------------------------------------------
# object stores (NOTE [object stores] in distjac.io.fs)
# -----------------------------------------------------------------------------------------

# How long acquire_object_store waits after writing its lock object before reading it back:
# a second run that wrote its own lock in between is seen, and one of them backs off.
OBJECT_LOCK_SETTLE_S = 0.2


class ObjectStoreLock(OutputLock):
    """The lock object of an output on an object store; see :func:`acquire_object_store`."""

    def __init__(self, path: str, token: str):
        super().__init__(path, None)
        self._token: str | None = token

    def release(self) -> None:
        token, self._token = self._token, None
        if token is None:
            return
        from . import fs

        try:
            held = json.loads(fs.read_bytes(self.path) or b"{}")
        except (OSError, ValueError):
            return
        if isinstance(held, dict) and held.get("token") == token:
            fs.unlink(self.path)


def acquire_object_store(out_dir: str) -> ObjectStoreLock:
    """Take an object store output's lock, best-effort: object stores have no ``flock``.

    The lock is an object ``<out_dir>/.distjac.lock`` holding its owner (host, pid, start
    time, a random token). A lock object that exists is honoured unless its owner is a
    process of this host that is no longer alive (then it is taken over); a run on another
    host, or one killed there, leaves a lock that only deleting the object clears (the
    message says how). Two runs that start within the same fraction of a second can both
    write a lock object; each reads it back after :data:`OBJECT_LOCK_SETTLE_S` and the one
    whose token was overwritten backs off, but a store slower than that to show a write
    can let both run. This is a guard against mistakes, not a mutex: run one job per
    output.

    Raises:
        OutputLockedError: another run's lock object is there (named in the message).
    """
    from .. import __version__
    from . import fs

    path = out_dir.rstrip("/") + "/" + LOCK_NAME

    def holder() -> dict[str, Any] | None:
        try:
            d = json.loads(fs.read_bytes(path) or b"{}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return d if isinstance(d, dict) else {}

    def refuse(d: dict[str, Any]) -> OutputLockedError:
        who = (f"host {d.get('host')}, pid {d.get('pid')}, started {d.get('started')}" if d.get("pid")
               else "holder unknown")
        return OutputLockedError(
            f"output.path {out_dir!r} is in use by another run ({who}; an object store has no locks, so distjac "
            f"cannot tell whether it is alive); wait for it, or delete {path} if no run is using the output.", who)

    d = holder()
    if d is not None:
        same_host = d.get("host") == socket.gethostname()
        if not (same_host and d.get("pid") and not _pid_alive(int(d["pid"]))):
            raise refuse(d)
    token = os.urandom(8).hex()
    mine = {"distjac": __version__, "host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": token}
    fs.write_atomic(path, json.dumps(mine).encode())
    time.sleep(OBJECT_LOCK_SETTLE_S)
    d = holder()
    if d is None or d.get("token") != token:
        raise refuse(d or {})
    return ObjectStoreLock(path, token)
