"""Linux /proc fields in bytes: the one reader (the kernels' host memory, a worker's
peak resident memory, the benchmarks' machine facts). None off Linux; callers choose
their own fallback. Imports nothing heavy."""

from __future__ import annotations

import os

__all__ = ["proc_bytes"]


def proc_bytes(path: str, key: str) -> int | None:
    """A ``key: N kB`` field of a /proc file (``/proc/meminfo``, ``/proc/self/status``) in
    bytes; None where the file or the field does not exist.

    One unbuffered read of the whole file (these files are a few kB and made afresh by
    the kernel on each read): half the time of a text-mode line loop, and the kernels
    read MemAvailable on every call that sizes itself to the memory budget."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(fd)
        data = b"\n" + b"".join(chunks)
        start = data.find(b"\n" + key.encode() + b":")
        if start < 0:
            return None
        start += len(key) + 2
        end = data.find(b"\n", start)
        return int(data[start:end if end >= 0 else None].split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
