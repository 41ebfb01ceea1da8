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
not given.

Where huge pages are slow: in a VM whose balloon device reports free pages to the host
(virtio-balloon free page reporting, feature bit 5 of the device's ``features`` under
/sys/bus/virtio/drivers/virtio_balloon; Firecracker and QEMU offer it), the guest hands
every free block of ``page_reporting_order`` (9 here: exactly a 2 MiB huge page) back to
the host about two seconds after it is freed (the kernel's PAGE_REPORTING_DELAY), and
the host drops its backing. A huge page is carved from such a block, so its first touch
faults on the host too. Measured on this project's Firecracker VM (1 GiB tensor, one
thread): advised fills ran 39-42 GB/s back to back (the pages the last result gave back,
not yet reported), 2.8-12.9 GB/s with 4 s between calls and 1.5-5.2 GB/s for a
process's first or after a plain result; plain 4 KiB pages, carved from smaller blocks
that are never reported, ran 3.4-7.7 GB/s either way. So where the host takes free pages
back, a result is advised only if large results at least its size were freed in the
last ``RECENT_S`` (1 s, inside the kernel's 2 s) and not yet taken by another result
(one free's pages back one new result): a loop of calls or a worker's shards run on
plain pages for one call, on slow huge pages for the next, then at the fast rate;
spaced calls and a process's first stay on plain pages. Freed means the storage's memory
was given back (a finalizer on the storage, which views keep alive).

``DISTJAC_HUGE_PAGES`` (read once per process): ``0`` never advises, ``1`` always does
(the rule above ignored), unset or ``auto`` follows it.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import os
import sys
import threading
import time
import weakref

import torch

__all__ = ["empty", "zeros"]

HUGE_PAGE = 2 << 20  # x86-64's; the kernel's own size is read where it says (arm64: 512 MiB at 64 KiB pages)
ADVISE_FROM = 32 << 20  # glibc's largest mmap threshold: below it, memory is often reused
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux, every architecture
_PMD_SIZE = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"
_BALLOON = "/sys/bus/virtio/drivers/virtio_balloon"  # its devices' "features": one 0/1 per bit
_F_REPORTING = 5  # VIRTIO_BALLOON_F_REPORTING, <linux/virtio_balloon.h>
RECENT_S = 1.0  # freed this recently, a result's pages are not yet reported (the kernel waits 2 s)


@functools.lru_cache(maxsize=1)
def _setting() -> str:
    """DISTJAC_HUGE_PAGES, read once per process: "never", "always" or "auto"."""
    value = os.environ.get("DISTJAC_HUGE_PAGES", "auto").strip().lower()
    if value in ("0", "false", "no", "off", "never"):
        return "never"
    if value in ("1", "true", "yes", "on", "always"):
        return "always"
    return "auto"


@functools.lru_cache(maxsize=1)
def _free_page_reporting() -> bool:
    """Whether a virtio balloon reports this guest's free pages to its host (NOTE [huge
    pages]); False where there is no such device or it cannot be read."""
    try:
        devices = os.listdir(_BALLOON)
    except OSError:
        return False
    for name in devices:
        try:
            with open(os.path.join(_BALLOON, name, "features")) as f:
                bits = f.read().strip()
        except OSError:
            continue
        if len(bits) > _F_REPORTING and bits[_F_REPORTING] == "1":
            return True
    return False


class _Freed:
    """Large results' memory given back lately: (monotonic time, bytes), oldest first."""

    def __init__(self):
        self._lock = threading.RLock()  # a finalizer may run inside take() (a GC pass)
        self._log: collections.deque = collections.deque()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self._log.append((time.monotonic(), nbytes))

    def take(self, nbytes: int) -> bool:
        """Whether ``nbytes`` were freed in the last RECENT_S seconds and not yet taken by
        another result; if so they are taken (the pages one free gave back serve one
        new result)."""
        with self._lock:
            cut = time.monotonic() - RECENT_S
            while self._log and self._log[0][0] < cut:
                self._log.popleft()
            entries = list(self._log)  # a snapshot: a finalizer may append during a GC pass here
            if sum(n for _, n in entries) < nbytes:
                return False
            need = nbytes
            while need > 0 and self._log:  # the most recent frees first
                when, n = self._log.pop()
                if n > need:
                    self._log.append((when, n - need))
                need -= n
            return True


_freed = _Freed()


@functools.lru_cache(maxsize=1)
def _madvise():
    """(libc's madvise, the huge page size), or None where it cannot be used (off Linux,
    turned off). Read once per process, like DISTJAC_HUGE_PAGES."""
    if not sys.platform.startswith("linux") or _setting() == "never":
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
    if _setting() == "auto" and _free_page_reporting():
        # NOTE [huge pages]: only where pages freed a moment ago can back these.
        hot = _freed.take(nbytes)
        weakref.finalize(storage, _freed.add, nbytes)
        if not hot:
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
