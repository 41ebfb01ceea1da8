"""Linux /proc fields in bytes: the one reader (the kernels' host memory, a worker's
peak resident memory, the benchmarks' machine facts). None off Linux; callers choose
their own fallback. Imports nothing heavy."""

from __future__ import annotations

__all__ = ["proc_bytes"]


def proc_bytes(path: str, key: str) -> int | None:
    """A ``key: N kB`` field of a /proc file (``/proc/meminfo``, ``/proc/self/status``) in
    bytes; None where the file or the field does not exist."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
