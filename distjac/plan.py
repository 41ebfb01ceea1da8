"""The shard plan: how a batch is cut into shards, from shapes and budgets alone.

A plan is a pure, printable value (no tensors, no Ray): the row range [start, stop) of
every shard, the bytes each shard moves (its input rows and its Jacobian), and the
estimated peak memory of the driver and of a worker. The engine runs a plan; the job
runner (``distjac plan CONFIG``) prints one without running it.

    >>> p = make_plan(rows=10, in_shape=(4,), out_shape=(3,), shard_size=4)
    >>> [p.bounds(i) for i in range(len(p))]
    [(0, 4), (4, 8), (8, 10)]

NOTE [shard size from a memory budget]
The right shard is measured in bytes of output, not in rows: a row of a 64 -> 32 MLP's
Jacobian is 8 KiB, a row of a 784 -> 10 convnet's 31 KiB. Measured with Ray 2.60 on two
cores (issue 3): shards of 8-64 MiB of output ran fastest; 2 MiB shards halved throughput
(per-shard overhead ~1 ms plus scheduling gaps); beyond 64 MiB the driver's gather and
the workers' peaks only grow. So the default shard holds ``DEFAULT_SHARD_BYTES`` of
output, is split further (down to ``MIN_SHARD_BYTES``) so that every worker gets about
``SHARDS_PER_WORKER`` shards of a small batch, and never exceeds the batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .errors import ShapeError
from .options import check_int

__all__ = [
    "DEFAULT_DRIVER_OVERHEAD_BYTES",
    "DEFAULT_PARALLEL_ITERATIONS",
    "DEFAULT_SHARD_BYTES",
    "DEFAULT_WORKER_OVERHEAD_BYTES",
    "MIN_SHARD_BYTES",
    "SHARDS_PER_WORKER",
    "ShardPlan",
    "default_shard_size",
    "format_bytes",
    "make_plan",
]

# 32 MiB of Jacobian per shard: the middle of the 8-64 MiB range that ran fastest here
# (see NOTE [shard size from a memory budget]); 8 shards in flight then hold 256 MiB.
DEFAULT_SHARD_BYTES = 32 << 20
# CPUs an Engine's worker reserves by default; it runs torch with that many threads.
DEFAULT_CPUS_PER_WORKER = 1
# Splitting a small batch for parallelism stops at 4 MiB of output per shard: 2 MiB shards
# halved throughput, and one shard fewer per worker costs less than that.
MIN_SHARD_BYTES = 4 << 20
# ~2 shards in flight per worker kept every worker busy while the driver gathered.
SHARDS_PER_WORKER = 2
# 8 shards in flight: with shards of 8-64 MiB of output this is ~2 per worker on a
# 4-worker machine, what issue 3 measured as the best gather throughput. The one default
# of the Engine's, the job spec's and the plan's parallel_iterations.
DEFAULT_PARALLEL_ITERATIONS = 8
# Shards a worker (or the in-process path) holds at once, each in a different stage:
# one being read, one computing, one copied, converted and written (NOTE [overlapped
# stages] in distjac.shard, which imports it from here).
PIPELINE_DEPTH = 3
# Resident memory of a driver that imported torch, Ray and pyarrow and holds a Ray
# connection, before any data: ~430 MiB measured here (torch 2.13 CPU, Ray 2.60); rounded up.
DEFAULT_DRIVER_OVERHEAD_BYTES = 512 << 20
# The same for a worker process (torch + Ray core worker, warmed up), before its model
# and data: ~460 MiB measured here.
DEFAULT_WORKER_OVERHEAD_BYTES = 512 << 20
# Bytes of the int64 row id stored next to each example's Jacobian.
ROW_ID_BYTES = 8


def format_bytes(n: float) -> str:
    """Human-readable bytes in binary units: ``format_bytes(3 << 20) == '3.0 MiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def _check_count(value, name: str, *, minimum: int = 1) -> int:
    return check_int(value, name, "make_plan", minimum=minimum, allow_none=False)


def _check_shape(shape: Sequence[int], name: str) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError:
        raise ShapeError(f"make_plan: {name}={shape!r} must be a sequence of sizes, e.g. (64,).") from None
    if any(s < 0 for s in out):
        raise ShapeError(f"make_plan: {name}={out} has a negative size.")
    return out


def default_shard_size(
    rows: int,
    bytes_per_row: int,
    *,
    num_workers: int = 1,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    min_shard_bytes: int = MIN_SHARD_BYTES,
) -> int:
    """Rows per shard for ``rows`` examples of ``bytes_per_row`` output each.

    ``shard_bytes`` of output per shard, split further (not below ``min_shard_bytes``) so a
    small batch still gives each of ``num_workers`` about SHARDS_PER_WORKER shards.

        >>> default_shard_size(65536, 8192, num_workers=2)   # W1: 32 MiB shards
        4096
        >>> default_shard_size(100, 8192, num_workers=2)     # all of it fits one shard
        100
    """
    if rows <= 0:
        return 1
    per_row = max(1, bytes_per_row)
    by_budget = max(1, shard_bytes // per_row)
    spread = math.ceil(rows / (SHARDS_PER_WORKER * max(1, num_workers)))
    floor = max(1, min_shard_bytes // per_row)
    return max(1, min(rows, by_budget, max(spread, floor)))


@dataclass(frozen=True)
class ShardPlan:
    """How ``rows`` examples are cut into shards; a pure value (see :func:`make_plan`).

    Shard ``i`` covers rows ``[i * shard_size, min(rows, (i + 1) * shard_size))``: every
    row is in exactly one shard and only the last shard may be shorter.

    Attributes:
        rows: examples in the batch.
        in_shape: per-example input shape.
        out_shape: per-example output shape of fn; the Jacobian is out_shape + in_shape.
        shard_size: rows per shard (the last one may hold fewer).
        in_itemsize: bytes per input element.
        out_itemsize: bytes per Jacobian element.
        parallel_iterations: shards in flight at once across the cluster.
        num_workers: workers the plan was sized for.
        gather: True when the driver stacks every shard into one output in memory; False
            when workers write their shards to disk (the driver then holds no output).
        driver_overhead: constant part of the driver's estimated peak.
        worker_overhead: constant part of a worker's estimated peak.
    """

    rows: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    shard_size: int
    in_itemsize: int = 4
    out_itemsize: int = 4
    parallel_iterations: int = DEFAULT_PARALLEL_ITERATIONS
    num_workers: int = 1
    gather: bool = True
    driver_overhead: int = DEFAULT_DRIVER_OVERHEAD_BYTES
    worker_overhead: int = DEFAULT_WORKER_OVERHEAD_BYTES
    _n: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_n", math.ceil(self.rows / self.shard_size) if self.rows else 0)

    # -- the shards ------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of shards."""
        return self._n

    def bounds(self, i: int) -> tuple[int, int]:
        """Row range [start, stop) of shard ``i``."""
        if not 0 <= i < self._n:
            raise IndexError(f"ShardPlan.bounds({i}): the plan has {self._n} shards (0..{self._n - 1}).")
        start = i * self.shard_size
        return start, min(self.rows, start + self.shard_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """The (start, stop) of every shard, in order."""
        return (self.bounds(i) for i in range(self._n))

    def shard_of(self, row: int) -> int:
        """Index of the shard holding ``row``."""
        if not 0 <= row < self.rows:
            raise IndexError(f"ShardPlan.shard_of({row}): rows are 0..{self.rows - 1}.")
        return row // self.shard_size

    # -- bytes -------------------------------------------------------------------------

    @property
    def in_row_bytes(self) -> int:
        """Bytes of one example's input."""
        return math.prod(self.in_shape) * self.in_itemsize

    @property
    def out_row_bytes(self) -> int:
        """Bytes of one example's Jacobian (out_shape + in_shape), without its row id."""
        return math.prod(self.out_shape) * math.prod(self.in_shape) * self.out_itemsize

    @property
    def jacobian_shape(self) -> tuple[int, ...]:
        """Shape of the whole result: (rows, *out_shape, *in_shape)."""
        return (self.rows, *self.out_shape, *self.in_shape)

    def shard_in_bytes(self, i: int = 0) -> int:
        """Input bytes of shard ``i`` (the first, the largest, by default)."""
        start, stop = self.bounds(i)
        return (stop - start) * self.in_row_bytes

    def shard_out_bytes(self, i: int = 0) -> int:
        """Output bytes of shard ``i``: its Jacobian plus int64 row ids."""
        start, stop = self.bounds(i)
        return (stop - start) * (self.out_row_bytes + ROW_ID_BYTES)

    @property
    def total_out_bytes(self) -> int:
        """Bytes of the whole Jacobian."""
        return self.rows * self.out_row_bytes

    @property
    def in_flight(self) -> int:
        """Shards that can be in flight at once (at most the number of shards)."""
        return min(self.parallel_iterations, self._n)

    @property
    def driver_peak_bytes(self) -> int:
        """Estimated driver peak: when gathering, the output + the in-flight shards + a
        constant; when streaming to parts (a job), the constant alone.

        A gathered shard in flight holds its input rows (shipped by the driver) and, once
        done, its result mapped from the object store until it is copied into place. A
        job's workers read their own rows and write their own parts: the driver holds
        receipts only (an in-memory tensor source is the caller's, not counted here).
        """
        if not self._n or not self.gather:
            return self.driver_overhead
        shard = self.shard_in_bytes(0) + self.shard_out_bytes(0)
        return self.total_out_bytes + self.in_flight * shard + self.driver_overhead

    @property
    def worker_peak_bytes(self) -> int:
        """Estimated worker peak with its stages overlapped (:data:`PIPELINE_DEPTH`
        shards): a constant + two shards' inputs (one being read, one computing) + three
        Jacobians (the one computing, and the one being written twice: its host values
        and the serialized part or the copy handed to the object store). The kernel's own
        working memory comes on top, bounded by its ``max_memory``."""
        if not self._n:
            return self.worker_overhead
        return self.worker_overhead + 2 * self.shard_in_bytes(0) + 3 * self.shard_out_bytes(0)

    # -- printing ----------------------------------------------------------------------

    def summary(self) -> dict:
        """The plan's figures as a JSON-ready dict (the table of ``str(plan)``)."""
        return {
            "rows": self.rows,
            "in_shape": list(self.in_shape),
            "out_shape": list(self.out_shape),
            "jacobian_shape": list(self.jacobian_shape),
            "shards": len(self),
            "shard_size": self.shard_size,
            "last_shard_rows": (self.bounds(len(self) - 1)[1] - self.bounds(len(self) - 1)[0]) if len(self) else 0,
            "shard_in_bytes": self.shard_in_bytes(0) if len(self) else 0,
            "shard_out_bytes": self.shard_out_bytes(0) if len(self) else 0,
            "total_out_bytes": self.total_out_bytes,
            "parallel_iterations": self.parallel_iterations,
            "num_workers": self.num_workers,
            "gather": self.gather,
            "driver_peak_bytes": self.driver_peak_bytes,
            "worker_peak_bytes": self.worker_peak_bytes,
        }

    def __str__(self) -> str:
        s = self.summary()
        b = format_bytes
        lines = [
            ("rows", f"{s['rows']:,}"),
            ("per-example", f"in {self.in_shape} -> out {self.out_shape}; jacobian {self.out_shape + self.in_shape}"),
            ("shards", f"{_count(s['shards'], 'shard')} x {s['shard_size']:,} rows (last {s['last_shard_rows']:,})"),
            ("bytes per shard", f"in {b(s['shard_in_bytes'])}, out {b(s['shard_out_bytes'])}"),
            ("jacobian total", b(s["total_out_bytes"])),
            ("in flight", f"{_count(self.in_flight, 'shard')} over {_count(self.num_workers, 'worker')}"
             f" ({PIPELINE_DEPTH} at once on each worker, their stages overlapped)"),
            ("driver peak", f"~{b(s['driver_peak_bytes'])}"
             + (" (output + in-flight shards + overhead)" if self.gather else " (overhead only: workers read and "
                "write their own shards)")),
            ("worker peak", f"~{b(s['worker_peak_bytes'])} + kernel working memory"),
        ]
        width = max(len(k) for k, _ in lines)
        body = "\n".join(f"  {k:<{width}}  {v}" for k, v in lines)
        return f"ShardPlan\n{body}"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def make_plan(
    rows: int,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    *,
    in_itemsize: int = 4,
    out_itemsize: int | None = None,
    shard_size: int | None = None,
    parallel_iterations: int = DEFAULT_PARALLEL_ITERATIONS,
    num_workers: int = 1,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    gather: bool = True,
    driver_overhead: int = DEFAULT_DRIVER_OVERHEAD_BYTES,
    worker_overhead: int = DEFAULT_WORKER_OVERHEAD_BYTES,
) -> ShardPlan:
    """A shard plan for ``rows`` examples of ``in_shape`` mapped to ``out_shape``.

    Args:
        rows: examples in the batch (>= 0).
        in_shape: per-example input shape, e.g. (64,).
        out_shape: per-example output shape of fn, e.g. (32,).
        in_itemsize: bytes per input element (4 for float32).
        out_itemsize: bytes per Jacobian element; defaults to ``in_itemsize``.
        shard_size: rows per shard; None sizes shards from ``shard_bytes`` (see
            NOTE [shard size from a memory budget]).
        parallel_iterations: shards in flight at once.
        num_workers: workers sharing the plan (for the default shard size).
        shard_bytes: output bytes per shard when ``shard_size`` is None.
        gather: whether the driver holds the whole output (False: written to disk).

    Returns:
        A :class:`ShardPlan`; ``str(plan)`` prints its table.

    Raises:
        OptionError: a count below 1 (or rows below 0).
        ShapeError: a shape with negative sizes.

    Example:
        >>> p = make_plan(65536, (64,), (32,), num_workers=2)
        >>> len(p), p.shard_size, format_bytes(p.shard_out_bytes())
        (16, 4096, '32.0 MiB')
    """
    rows = _check_count(rows, "rows", minimum=0)
    in_shape = _check_shape(in_shape, "in_shape")
    out_shape = _check_shape(out_shape, "out_shape")
    _check_count(in_itemsize, "in_itemsize")
    out_itemsize = in_itemsize if out_itemsize is None else _check_count(out_itemsize, "out_itemsize")
    _check_count(parallel_iterations, "parallel_iterations")
    _check_count(num_workers, "num_workers")
    _check_count(shard_bytes, "shard_bytes")
    if shard_size is None:
        per_row = math.prod(out_shape) * math.prod(in_shape) * out_itemsize
        shard_size = default_shard_size(rows, per_row, num_workers=num_workers, shard_bytes=shard_bytes)
    else:
        _check_count(shard_size, "shard_size")
    return ShardPlan(
        rows=rows, in_shape=in_shape, out_shape=out_shape, shard_size=shard_size,
        in_itemsize=in_itemsize, out_itemsize=out_itemsize,
        parallel_iterations=parallel_iterations, num_workers=num_workers, gather=gather,
        driver_overhead=driver_overhead, worker_overhead=worker_overhead,
    )
