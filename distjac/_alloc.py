"""Results' memory: large CPU results on transparent huge pages.

NOTE [huge pages]
A Jacobian result is usually the largest thing a call allocates, and on a CPU most of
its cost can be the first touch of its pages, not the arithmetic that fills it. glibc
serves allocations above its mmap threshold (at most 32 MiB) with a fresh mapping and
unmaps it on free, so each call's result is faulted in again, 4 KiB at a time: filling a
new 1 GB tensor took 210-218 ms on the 2-core machine (docs/benchmarks.md, "Fresh
memory"), and the result of W3 is almost nothing else. Advising the mapping for 2 MiB
transparent huge pages (``madvise(MADV_HUGEPAGE)``) before it is touched cuts the faults
512-fold: 87-96 ms for the same tensor, 2.4-2.9x on results of 64 MB to 1 GB.

PyTorch has this switch (``THP_MEM_ALLOC_ENABLE=1``), but for the whole process and only
if set before torch starts; distjac cannot set it for a user's interpreter. So the
kernels advise the one allocation they own, the result: ``empty`` takes a tensor from
torch's allocator as usual and advises the 2 MiB-aligned pages inside it. Nothing else
changes: it is an ordinary tensor, freed the ordinary way. Only CPU tensors of at least
32 MiB are advised (smaller ones come from glibc's heap, whose pages are reused and
already faulted in); on a machine without transparent huge pages, off Linux, or where
they are turned off (``/sys/kernel/mm/transparent_hugepage/enabled`` = never), the advice
is a no-op or is not given. ``DISTJAC_HUGE_PAGES=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys

import torch

__all__ = ["empty", "zeros"]

HUGE_PAGE = 2 << 20
ADVISE_FROM = 32 << 20  # glibc's largest mmap threshold: below it, memory is reused
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux, every architecture


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc's madvise, or None where it cannot be used (off Linux, turned off)."""
    if not sys.platform.startswith("linux"):
        return None
    if os.environ.get("DISTJAC_HUGE_PAGES", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def advise(t: torch.Tensor) -> torch.Tensor:
    """Advise the untouched CPU tensor ``t``'s whole 2 MiB pages for huge pages; returns t.

    Advice only: a failure (EINVAL where the kernel has no transparent huge pages) leaves
    the memory as it was."""
    nbytes = t.untyped_storage().nbytes()
    if t.device.type != "cpu" or nbytes < ADVISE_FROM:
        return t
    fn = _madvise()
    if fn is None:
        return t
    start = t.untyped_storage().data_ptr()
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    last = (start + nbytes) // HUGE_PAGE * HUGE_PAGE
    if last > first:
        fn(first, last - first, _MADV_HUGEPAGE)
    return t


def advisable(shape, *, dtype: torch.dtype, device) -> bool:
    """Whether ``empty`` would advise a tensor of this shape, dtype and device."""
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.device(device).type == "cpu" and nbytes >= ADVISE_FROM and _madvise() is not None


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for a result: on a CPU, advised for huge pages when it is large."""
    return advise(torch.empty(shape, dtype=dtype, device=device))


def zeros(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.zeros`` for a result: on a CPU, advised for huge pages when it is large."""
    return advise(torch.empty(shape, dtype=dtype, device=device)).zero_()
