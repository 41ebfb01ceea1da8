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
if set before torch starts; distjac cannot set it for a user's interpreter. So distjac
advises the allocations it owns: the results it assembles itself (a batch in blocks, a
reverse pass in chunks, the chain, the diagonal strategy's dense result) and the output
an Engine gathers its shards into. A single vectorized pass over the whole batch returns
vmap's own tensor, which is not advised (a copy into an advised one is a second pass over it).
``empty`` takes a tensor from torch's allocator as usual and advises the whole huge pages
inside it (2 MiB on x86-64; the size the kernel reports elsewhere). Nothing else changes:
it is an ordinary tensor, freed the ordinary way. Only CPU tensors of at least 32 MiB are
advised: glibc's mmap threshold starts at 128 KiB and rises, as mappings are freed, to at
most 32 MiB, so smaller ones are mostly reused heap memory, already faulted in. Where the
kernel defragments on fault (``defrag`` = madvise, a common default) a fault may stall
on compaction when memory is fragmented; on a machine without transparent huge pages, off
Linux, or where they are turned off (``enabled`` = never), the advice is a no-op or is
not given. ``DISTJAC_HUGE_PAGES=0`` turns it off (read once per process).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

__all__ = ["empty", "zeros"]

HUGE_PAGE = 2 << 20  # x86-64's; the kernel's own size is read where it says (arm64: 512 MiB at 64 KiB pages)
ADVISE_FROM = 32 << 20  # glibc's largest mmap threshold: below it, memory is often reused
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux, every architecture
_PMD_SIZE = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"


@functools.lru_cache(maxsize=1)
def _madvise():
    """(libc's madvise, the huge page size), or None where it cannot be used (off Linux,
    turned off). Read once per process, like DISTJAC_HUGE_PAGES."""
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
    try:
        with open(_PMD_SIZE) as f:
            page = int(f.read().strip())
    except (OSError, ValueError):
        page = HUGE_PAGE
    return fn, page


def huge_range(start: int, nbytes: int, page: int) -> tuple[int, int]:
    """The whole huge pages inside [start, start + nbytes): (first, last), empty when
    last <= first."""
    first = -(-start // page) * page
    last = (start + nbytes) // page * page
    return first, last


def advise(t: torch.Tensor) -> torch.Tensor:
    """Advise the untouched CPU tensor ``t``'s whole huge pages for huge pages; returns t.

    Advice only: a failure (EINVAL where the kernel has no transparent huge pages) leaves
    the memory as it was. Tensors without real storage of their own (inside torch.func
    transforms, fake or meta tensors) are left alone."""
    if t.device.type != "cpu" or t.numel() * t.element_size() < ADVISE_FROM:
        return t
    found = _madvise()
    if found is None:
        return t
    fn, page = found
    try:
        storage = t.untyped_storage()
        start, nbytes = storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        # No storage of its own to advise: a torch.func wrapper (NotImplementedError) or a
        # functionalized tensor (RuntimeError); tested in test_alloc.py.
        return t
    if start == 0:  # fake tensors: no memory behind them
        return t
    first, last = huge_range(start, nbytes, page)
    if last > first:
        fn(first, last - first, _MADV_HUGEPAGE)
    return t


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for a result: on a CPU, advised for huge pages when it is large."""
    return advise(torch.empty(shape, dtype=dtype, device=device))


def zeros(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.zeros`` for a result: on a CPU, advised for huge pages when it is large."""
    return advise(torch.empty(shape, dtype=dtype, device=device)).zero_()
