"""Per-example ("batch") Jacobians of a batch: the one kernel module behind every path.

The tape (:mod:`distjac.tape`), the functional API (:func:`batch_jacobian`) and every Ray
worker call into this module; nothing else in distjac differentiates.

NOTE [rows, columns and the batch]
Because row i of the output depends only on row i of the input, one reverse pass with the
cotangent "output element j of every example" yields row j of *every* example's Jacobian
at once; one forward pass with the tangent "input element k of every example" yields
column k of every example's Jacobian. A batch of B examples with per-example input size N
and output size M therefore costs M reverse passes or N forward passes, whatever B is:
the batch rides along inside each pass. ``parallel_iterations`` (TF's name) is how many
of those rows/columns are stacked into one vectorized (vmap) pass; ``experimental_use_pfor
=False`` runs one plain autograd pass per row instead.

NOTE [blocks]
For the functional API the batch may also be cut into blocks of examples, each a separate
call of ``fn``. On a CPU a block that fits the cache often runs faster than the whole
batch; on any device it bounds memory. ``mode="auto"`` chooses the mode, the vectorization
and the block size, measuring once per (function, shape) where sizes alone do not decide.

NOTE [the chain candidate]
Where ``fn`` is an ``nn.Sequential`` of layers with known Jacobians, auto also times the
internal strategy ``Strategy("chain")`` (distjac/chain.py, NOTE [chains]): the product of
per-layer Jacobians as batched GEMMs. It is exact, computes no autograd history (a result
that must be differentiable runs reverse mode instead) and is chosen only if it measures
fastest (or, for a problem too small to measure, where its multiply-adds at that batch
size are at most autograd's: NOTE [small chains]); ``choose_strategy(fn, x).record``
lists what was timed and why a chain did not apply. ``run_strategy(fn, x,
Strategy("chain", block=128))`` forces it (tests, benchmarks).

NOTE [small chains]
Below the measuring threshold (or for one example) a chain of known layers is taken
without timing where its plan's multiply-adds per example, with the shared starts of its
sides amortized over the call's rows (at most COST_BLOCK), are at most those of
autograd's cheaper mode (min(M, N) vectors through every layer), and the result need not
be differentiable (the chain records no history). It runs a few batched GEMMs where the
others run autograd passes, whose per-op overhead is most of a small call. (Amortized
over 128 rows, a conv's images of every input are cheap per example; for one example
they are not: Conv2d(32, 2, 3)-Tanh on one 32x16x16 example ran 7.6x slower as a chain
than reverse mode, and is left to autograd by this rule.) On the kernel suite at 8-256
rows (2 cores) it was 1.3-2.5x the sizes' choice (W1 rev/vmap, W2 fwd/vmap, W4 rev/vmap),
on every workload and size tried.

NOTE [auto's order of business]
``mode="auto"`` (:func:`_choose`) decides, in this order: (1) a fn that is provably
elementwise (structure.py, NOTE [elementwise functions]) gets ``Strategy("diag")``, one
forward pass, without measuring; (2) sizes decide when one side is AUTO_MODE_RATIO x the
other or the problem (its rows, or a job's, times M x N) is too small to measure (there a
chain of known layers, where one applies, is taken: NOTE [small chains]); (3)
otherwise a measured choice, cached in memory per (fn, fingerprint, shape, dtype, device,
modes, power-of-two bucket of the batch size, compiled flag, whether the result must be
differentiable, max_memory) and on disk (tuning.py, NOTE [the tuning cache]), which is
read before anything is measured. The
measuring itself is NOTE [measuring] (:class:`_Race`) and is bounded by AUTO_MEASURE_SHARE
of the work the choice serves; its last stage weighs compiling the winner (compiled.py,
NOTE [compiled blocks]) against that work.

NOTE [shipping a choice]
A :class:`Strategy` (and its :class:`Decision` record) is a picklable value. The choice
made once, by the driver or a first worker (``choose_strategy(fn, x)``, or
``tuning.tune_job`` for a job), is passed to other processes and used as given with
``batch_jacobian(fn, x, strategy=s)`` (or ``run_strategy(fn, x, s)``): nothing is
measured there; chunk and block are fitted to that process's memory budget.

NOTE [progress within a call]
A shard is one kernel call that may run for minutes. Inside ``with progress_to(cb):`` the
thread's top-level :func:`batch_jacobian` calls report ``cb(fraction)``, the fraction of
the call's passes done (0 to 1, never decreasing within a call), after each pass (a vmap
chunk or a loop row) of each block of examples; a compiled block reports when it ends.
The shard runner turns this into rows done of its shards in flight (distjac.shard), which
moves a progress bar within a shard. The calls fn itself makes (and the passes auto mode
times while it chooses) report nothing; nothing is reported outside ``progress_to``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import math
import os
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch.func import jvp, vmap
from torch.nn.parameter import is_lazy

from . import _alloc
from . import chain as _chain
from . import compiled as _compiled
from . import structure as _structure
from . import tuning as _tuning
from ._compat import in_functorch_transform as _in_transform  # inside an outer torch.func transform?
from ._proc import proc_bytes
from .errors import CoupledExamplesError, MemoryBudgetError, OptionError, VectorizationError
from .options import (
    UnconnectedGradients,
    check_batched,
    check_floating,
    check_functional_call,
    check_positive_int,
    check_same_batch,
    env_int,
)
from .plan import format_bytes

__all__ = [
    "Decision", "Strategy", "batch_jacobian", "chain_plan", "choose_strategy", "compiled_status",
    "graph_batch_jacobian", "graph_jacobian", "progress_to", "run_strategy",
]

# Fraction of the device's free memory used when no max_memory is given: leaves room for
# the allocator's fragmentation and for whatever else the process holds.
DEFAULT_MEMORY_FRACTION = 0.5
# Auto mode only measures when the Jacobian has at least this many elements (16 MiB of
# float32): below it a measurement costs more than any choice could save.
AUTO_MEASURE_MIN_ELEMENTS = 1 << 22
# Rows of the batch that auto mode measures block sizes on, per device type: on a CPU,
# blocks of a few thousand examples keep the working set in cache; a GPU wants large ones.
AUTO_SAMPLE_ROWS = {"cpu": 2048, "cuda": 16384}
# ...but no more rows than hold this many Jacobian elements (64 MiB of float32): a large
# per-example Jacobian is heavy work per row, and blocking it changes little.
AUTO_SAMPLE_ELEMENTS = 1 << 24
# Block sizes auto mode tries (those below the sample size), plus the sample itself.
AUTO_BLOCKS = (128, 512, 2048, 8192)
# Stage one of the measurement (which mode and vectorization) runs on this fraction of
# the sample; candidates slower than AUTO_KEEP x the best are not measured further.
AUTO_PILOT_FRACTION = 8
# ...but on at least this many rows (or the whole sample, if smaller): per-pass overheads
# are shared by the rows of a block, and a 16-row pilot misranked candidates by 1.7-1.9x
# either way (a conv-ReLU-linear chain: reverse mode's row loop cost 654 us per example
# on 16 rows and 383 on 64, the chain 286 and 544).
AUTO_PILOT_MIN_ROWS = 64
AUTO_KEEP = 1.5
# A vectorized finalist is chosen over a loop only when it is this much faster.
AUTO_VMAP_MARGIN = 1.25
# NOTE [measuring]: interleaved rounds per race at most; the prior's doubt factor.
AUTO_MAX_ROUNDS = 5
AUTO_PRIOR_DOUBT = 4.0
# NOTE [measuring]: a run is abandoned once it has taken this many times the fastest run
# of the race so far (it cannot win; a forward-mode row loop on an MLP ran 87x the
# leader, and its two runs were 95% of a first call's measuring).
AUTO_ABANDON = 4.0
# Stages after the pilot run only while the measuring so far is below this share of the
# work the choice serves (its rows at the pilot's best speed, which overstates a loop's
# time per row on a larger batch): what follows the pilot race costs about one call more,
# more only where the choice serves more rows than the call (choose_strategy(work_rows=
# ...), distjac tune for a job); the pilot race itself, and a process's one-off costs
# (NOTE [cold process]), come on top.
AUTO_MEASURE_SHARE = 1.0
# A row loop chosen from the pilot alone runs blocks whose saved activations fit this
# (see _loop_block).
AUTO_LOOP_BLOCK_BYTES = 8 << 20
# A compile is tried only when this share of the work the choice serves (what a compiled
# graph could save at best, a guess on the safe side) exceeds its predicted cost; the
# compiled candidate is chosen only when it races this much faster than eager.
AUTO_COMPILE_GAIN = 0.5
AUTO_COMPILED_MARGIN = 1.1
# Per-example sizes decide the mode outright when one side is this many times the other.
AUTO_MODE_RATIO = 4.0
# Examples per probe call (the probe learns output shape, connectivity and activation bytes).
# The Engine's probe on a worker uses the same rows (distjac.worker imports it); a job's
# driver-side probe is jobs.JOB_PROBE_ROWS, smaller on purpose.
PROBE_ROWS = 8
# Every mode a Strategy may have: the public two, and the internal structured ones.
STRATEGY_MODES = ("rev", "fwd", "chain", "diag")


@dataclass(frozen=True)
class Strategy:
    """How a batch Jacobian is computed; a pure value, printable and cacheable.

    Attributes:
        mode: "rev" (one pass per output element) or "fwd" (one per input element).
        vectorize: True stacks ``chunk`` passes into one vmap pass; False runs one
            plain autograd pass per row (TF's ``experimental_use_pfor=False``).
        chunk: passes per vectorized pass (TF's ``parallel_iterations``); None for all.
        block: examples per call of ``fn``; None for the whole batch.
        compiled: run each block's Jacobian as one ``torch.compile``'d graph (rev and
            fwd, vectorized; NOTE [compiled blocks] in compiled.py), checked against
            eager on the probe rows first and falling back to eager if anything fails.

    Besides "rev" and "fwd", ``mode`` may be "chain" (distjac/chain.py) or "diag" (one
    forward pass for a provably elementwise fn, NOTE [elementwise functions] in
    structure.py); both are internal. A Strategy pickles (its record too), so a choice
    made on the driver or a first worker can be shipped to other workers and passed
    back as ``batch_jacobian(fn, x, strategy=s)`` or ``run_strategy(fn, x, s)``.
    """

    mode: str = "rev"
    vectorize: bool = True
    chunk: int | None = None
    block: int | None = None
    compiled: bool = False
    # How it was chosen (choose_strategy fills it in); not part of the value: two equal
    # strategies chosen differently compare equal.
    record: Decision | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        if self.mode in ("chain", "diag"):
            return f"{self.mode}/block={self.block or 'all'}"
        how = f"vmap x{self.chunk or 'all'}" if self.vectorize else "loop"
        return f"{self.mode}/{how}/block={self.block or 'all'}" + ("/compiled" if self.compiled else "")

    def to_dict(self) -> dict:
        """The value as plain JSON types (the tuning cache stores it)."""
        return {"mode": self.mode, "vectorize": self.vectorize, "chunk": self.chunk, "block": self.block,
                "compiled": self.compiled}

    @classmethod
    def from_dict(cls, d: dict) -> Strategy:
        """The inverse of :meth:`to_dict`; ValueError for a value that is not a strategy."""
        mode = d.get("mode")
        if mode not in STRATEGY_MODES:
            raise ValueError(f"not a strategy mode: {mode!r}")
        chunk, block = d.get("chunk"), d.get("block")
        for v in (chunk, block):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"not a chunk or block size: {v!r}")
        return cls(mode, bool(d.get("vectorize", True)), chunk, block, bool(d.get("compiled", False)))


@dataclass(frozen=True)
class Decision:
    """Why :func:`choose_strategy` chose what it chose; a pure value that prints.

    Attributes:
        strategy: the chosen strategy, as text (after fitting the memory budget).
        how: "explicit" (the mode was given), "sizes" (auto decided from the per-example
            sizes without measuring), "structure" (fn is provably elementwise: the
            diagonal strategy, nothing to measure), "measured" (auto timed candidates
            now), "cached" (a measurement made earlier in this process for the same key)
            or "tuning cache" (a measurement read from the on-disk tuning cache, NOTE
            [the tuning cache] in tuning.py).
        key: what the cached choice is keyed on besides fn (per-example shape, dtype,
            device, fn's fingerprint, the modes considered, the power-of-two bucket of
            the batch size, the compiled flag asked for and max_memory); None when
            nothing is cached.
        times: (candidate, seconds per example) for every candidate timed, in order.
        notes: candidates left out and why (e.g. "chain: not applicable: ...").
        provisional: for a measurement that stopped early, (rows served when it was made,
            seconds the full measurement is predicted to take, seconds per example of the
            best candidate); None otherwise (NOTE [provisional choices]).
    """

    strategy: str
    how: str
    key: tuple | None = None
    times: tuple[tuple[str, float], ...] = ()
    notes: tuple[str, ...] = ()
    provisional: tuple | None = None

    def __str__(self) -> str:
        lines = [f"{self.strategy} ({self.how})"]
        lines += [f"  {name}: {sec * 1e6:.2f} us/example" for name, sec in self.times]
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Who will differentiate what we compute (NOTE [nesting] in tape.py)
# --------------------------------------------------------------------------------------

_state = threading.local()


def recording_stack() -> list:
    """This thread's stack of active differentiators: recording tapes, and the functional
    API while it runs ``fn`` in reverse mode. A gradient computed while the stack is not
    empty must itself be differentiable (``create_graph=True``)."""
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


def result_is_differentiable(x: torch.Tensor) -> bool:
    """Whether the functional API's result must itself be differentiable (NOTE [graphs] in
    tape.py): grad mode is on and either ``x`` requires grad (PyTorch's rule) or a
    differentiator is active on this thread (TF's rule: a recording tape, or an outer
    reverse-mode batch_jacobian running ``fn``). One rule for every mode: otherwise the
    result carries no autograd history, whatever requires grad inside ``fn``."""
    return torch.is_grad_enabled() and (x.requires_grad or bool(recording_stack()))


class _Differentiating:
    """Marks the functional API as an active differentiator while ``fn`` runs."""

    def __enter__(self):
        recording_stack().append(self)

    def __exit__(self, *exc):
        recording_stack().remove(self)


# --------------------------------------------------------------------------------------
# Reverse mode on a recorded graph (the tape, and the functional "rev" path)
# --------------------------------------------------------------------------------------


# NOTE [progress within a call]: the callback of the innermost ``progress_to`` block.
_PROGRESS_TO: contextvars.ContextVar[Callable[[float], None] | None] = contextvars.ContextVar(
    "distjac_progress_to", default=None)


@contextlib.contextmanager
def progress_to(callback: Callable[[float], None]):
    """Within the block, this thread's batch_jacobian calls report the fraction of their
    passes done to ``callback(fraction)`` (NOTE [progress within a call])."""
    token = _PROGRESS_TO.set(callback)
    try:
        yield
    finally:
        _PROGRESS_TO.reset(token)


class _Meter:
    """One call's progress: the fraction done of the current block of examples maps into
    the block's span [lo, hi) of the whole call."""

    __slots__ = ("callback", "lo", "hi", "last")

    def __init__(self, callback: Callable[[float], None]):
        self.callback, self.lo, self.hi, self.last = callback, 0.0, 1.0, 0.0

    def span(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def __call__(self, fraction: float) -> None:
        done = min(1.0, self.lo + (self.hi - self.lo) * fraction)
        if done > self.last:
            self.last = done
            self.callback(done)


def _one_hot_rows(n: int, start: int, stop: int, like: torch.Tensor) -> torch.Tensor:
    """Rows start..stop-1 of the n x n identity, shape (stop - start, n)."""
    rows = torch.zeros(stop - start, n, dtype=like.dtype, device=like.device)
    idx = torch.arange(stop - start, device=like.device)
    rows[idx, idx + start] = 1
    return rows


def _vectorize_failed(err: Exception, call: str) -> VectorizationError:
    if "randomness" in str(err):
        return VectorizationError(
            f"{call}: fn draws random numbers (Dropout in training mode, torch.rand...), which the "
            f"vectorized pass refuses ({type(err).__name__}: {str(err).splitlines()[0]}). Use mode='rev' "
            "or mode='auto' (one draw per call: the Jacobian of the function with that draw), or put the "
            "model in eval mode. (experimental_use_pfor=False runs, but forward mode's passes would each "
            "draw their own numbers, so each column of the Jacobian would come from another draw.)"
        )
    return VectorizationError(
        f"{call}: the vectorized pass failed ({type(err).__name__}: {err}). An operation in "
        "the function has no vmap rule (or, where the result must be differentiable, no batched "
        "double backward: GroupNorm's). Vectorization can be disabled by setting "
        "experimental_use_pfor=False, which computes one row per autograd pass; mode='auto' does "
        "that by itself."
    )


def _pull_rows(
    y: torch.Tensor,
    xs: Sequence[torch.Tensor],
    rows: int,
    cotangents: Callable[[int, int], torch.Tensor],
    emit: Callable[[int, int, tuple], None],
    *,
    chunk: int | None,
    vectorize: bool,
    create_graph: bool,
    call: str,
    tick: Callable[[float], None] | None = None,
) -> list[bool]:
    """Pull cotangent rows back through the graph ``y <- xs``, ``chunk`` rows at a time.

    ``cotangents(j0, j1)`` gives the cotangents of rows j0..j1-1, shape (j1 - j0, *y.shape);
    ``emit(j0, j1, grads)`` receives one gradient per x, shape (j1 - j0, *x.shape), or None
    for an x that y does not reach. Returns, per x, whether y reaches it.
    """
    connected = [True] * len(xs)
    step = (chunk or rows) if vectorize else 1
    j0 = 0
    while j0 < rows:
        j1 = min(rows, j0 + max(1, step))
        v = cotangents(j0, j1)
        if vectorize:
            try:
                grads = torch.autograd.grad(
                    y, xs, v, retain_graph=True, create_graph=create_graph,
                    allow_unused=True, is_grads_batched=True,
                )
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:
                raise _vectorize_failed(err, call) from err
        else:
            grads = torch.autograd.grad(
                y, xs, v[0], retain_graph=True, create_graph=create_graph, allow_unused=True
            )
            grads = tuple(None if g is None else g.unsqueeze(0) for g in grads)
        connected = [c and g is not None for c, g in zip(connected, grads)]
        emit(j0, j1, grads)
        j0 = j1
        if tick is not None:
            tick(j1 / rows)
    return connected


def graph_batch_jacobian(
    target: torch.Tensor,
    source: torch.Tensor,
    *,
    chunk: int | None,
    vectorize: bool,
    create_graph: bool,
    call: str = "batch_jacobian(target, source)",
    out: torch.Tensor | None = None,
    tick: Callable[[float], None] | None = None,
) -> torch.Tensor | None:
    """Batch Jacobian of a recorded ``target`` w.r.t. ``source`` by reverse mode.

    Returns (B, *target.shape[1:], *source.shape[1:]), or None when target does not
    depend on source. ``out``, if given, is a (B, M, N) tensor to write into.
    """
    b = target.shape[0]
    out_shape, in_shape = tuple(target.shape[1:]), tuple(source.shape[1:])
    m, n = math.prod(out_shape), math.prod(in_shape)
    full_shape = (b, *out_shape, *in_shape)
    if not target.requires_grad:
        return None
    if m == 0 or n == 0 or b == 0:
        # Nothing to differentiate; zeros have the full (empty) shape.
        return torch.zeros(full_shape, dtype=source.dtype, device=source.device)

    def cotangents(j0: int, j1: int) -> torch.Tensor:
        basis = _one_hot_rows(m, j0, j1, target)  # (C, M)
        return basis[:, None, :].expand(j1 - j0, b, m).view(j1 - j0, b, *out_shape)

    whole = chunk is None or chunk >= m
    pieces: list[torch.Tensor] = []
    if out is None and not create_graph and not (vectorize and whole):
        out = _alloc.empty((b, m, n), dtype=source.dtype, device=source.device)

    def emit(j0: int, j1: int, grads: tuple) -> None:
        g = grads[0]
        if g is None:
            return
        g = g.reshape(j1 - j0, b, n).transpose(0, 1)  # (B, C, N), a view
        if out is not None:
            out[:, j0:j1].copy_(g)
        else:
            pieces.append(g)

    connected = _pull_rows(
        target, (source,), m, cotangents, emit,
        chunk=chunk, vectorize=vectorize, create_graph=create_graph, call=call, tick=tick,
    )
    if not connected[0]:
        return None
    if out is not None:
        return out.view(full_shape)
    # One vectorized pass: its (M, B, N) result is returned as a (B, M, N) view rather
    # than copied (the copy costs a third of the time when the Jacobian is large).
    jac = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
    return jac.unflatten(2, in_shape).unflatten(1, out_shape) if jac.dim() == 3 else jac


def graph_jacobian(
    target: torch.Tensor,
    sources: Sequence[torch.Tensor],
    *,
    chunk: int | None,
    vectorize: bool,
    create_graph: bool,
    call: str = "jacobian(target, sources)",
) -> list[torch.Tensor | None]:
    """Full Jacobians (target.shape + source.shape) of a recorded target, one per source."""
    rows = target.numel()
    results: list[list[torch.Tensor]] = [[] for _ in sources]
    if not target.requires_grad:
        return [None for _ in sources]
    if rows == 0:
        return [torch.zeros((*target.shape, *s.shape), dtype=s.dtype, device=s.device) for s in sources]

    def cotangents(j0: int, j1: int) -> torch.Tensor:
        return _one_hot_rows(rows, j0, j1, target).view(j1 - j0, *target.shape)

    def emit(j0: int, j1: int, grads: tuple) -> None:
        for acc, g in zip(results, grads):
            if g is not None:
                acc.append(g)

    connected = _pull_rows(
        target, tuple(sources), rows, cotangents, emit,
        chunk=chunk, vectorize=vectorize, create_graph=create_graph, call=call,
    )
    return [
        torch.cat(acc, dim=0).reshape((*target.shape, *s.shape)) if ok else None
        for acc, ok, s in zip(results, connected, sources)
    ]


# --------------------------------------------------------------------------------------
# Forward mode (functional API only: it re-runs fn with tangents)
# --------------------------------------------------------------------------------------


def _forward_block(
    fn: Callable, xb: torch.Tensor, m: int, out_shape: tuple, *, chunk: int | None,
    vectorize: bool, call: str, tick: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """(Bb, M, N) Jacobian of one block by forward mode, chunk columns per vmap pass."""
    b = xb.shape[0]
    in_shape = tuple(xb.shape[1:])
    n = math.prod(in_shape)
    if n == 0 or m == 0:
        return torch.zeros((b, m, n), dtype=xb.dtype, device=xb.device)
    try:
        return _forward_columns(fn, xb, m, n, in_shape, chunk=chunk, vectorize=vectorize, call=call, tick=tick)
    except RuntimeError as err:
        if "mkldnn" not in str(err).lower() or isinstance(err, torch.OutOfMemoryError):
            raise
    # Some oneDNN (mkldnn) CPU kernels, e.g. torch's fused LSTM, have no forward-mode
    # derivative; their native fallbacks do.
    with warnings.catch_warnings(), torch.backends.mkldnn.flags(enabled=False):
        warnings.simplefilter("ignore", UserWarning)  # oneDNN's TF32 notice when flags change
        return _forward_columns(fn, xb, m, n, in_shape, chunk=chunk, vectorize=vectorize, call=call, tick=tick)


def _forward_columns(
    fn: Callable, xb: torch.Tensor, m: int, n: int, in_shape: tuple, *, chunk: int | None,
    vectorize: bool, call: str, tick: Callable[[float], None] | None = None,
) -> torch.Tensor:
    b = xb.shape[0]
    cols: list[torch.Tensor] = []

    def push(t: torch.Tensor) -> torch.Tensor:
        y_dot = jvp(fn, (xb,), (t,))[1]
        return y_dot

    step = (chunk or n) if vectorize else 1
    k0 = 0
    while k0 < n:
        k1 = min(n, k0 + step)
        basis = _one_hot_rows(n, k0, k1, xb)  # (C, N)
        tangents = basis[:, None, :].expand(k1 - k0, b, n).view(k1 - k0, b, *in_shape)
        if vectorize:
            try:
                col = vmap(push)(tangents)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:
                raise _forward_failed(err, call, vectorized=True) from err
        else:
            try:
                col = push(tangents[0]).unsqueeze(0)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:
                raise _forward_failed(err, call, vectorized=False) from err
        cols.append(col.reshape(k1 - k0, b, m))
        k0 = k1
        if tick is not None:
            tick(k1 / n)
    jac = cols[0] if len(cols) == 1 else torch.cat(cols, dim=0)  # (N, Bb, M)
    return jac.permute(1, 2, 0)  # (Bb, M, N), a view


def _reverse_block_func(
    fn: Callable, xb: torch.Tensor, *, chunk: int | None, vectorize: bool, call: str,
    tick: Callable[[float], None] | None = None,
) -> tuple[torch.Tensor, tuple]:
    """(Bb, M, N) Jacobian of one block by torch.func.vjp, for use inside a transform.

    Inside an outer torch.func transform (an outer forward-mode batch_jacobian, say)
    autograd.grad and requires_grad_ are not allowed; torch.func.vjp composes instead.
    """
    y, pull = torch.func.vjp(fn, xb)
    y = _check_output(y, xb, call)
    b, out_shape = y.shape[0], tuple(y.shape[1:])
    m, n = math.prod(out_shape), math.prod(xb.shape[1:])
    rows: list[torch.Tensor] = []
    step = (chunk or m) if vectorize else 1
    for j0 in range(0, m, max(1, step)):
        j1 = min(m, j0 + step)
        basis = _one_hot_rows(m, j0, j1, y)
        cot = basis[:, None, :].expand(j1 - j0, b, m).view(j1 - j0, b, *out_shape)
        if vectorize:
            g = vmap(pull)(cot)[0]
        else:
            g = pull(cot[0])[0].unsqueeze(0)
        rows.append(g.reshape(j1 - j0, b, n))
        if tick is not None:
            tick(j1 / m)
    if not rows:
        return torch.zeros((b, m, n), dtype=xb.dtype, device=xb.device), out_shape
    jac = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return jac.transpose(0, 1), out_shape


def _raw_memory_error(err: BaseException, call: str, what: str, instead: str = "") -> RuntimeError | None:
    """A clear error for fn reading its input's memory under a torch.func transform (or
    None when ``err`` is something else).

    NOTE [fn reading raw memory]
    Forward mode, the diagonal strategy, estimates and sketches run fn under torch.func
    (jvp, vjp, vmap), whose tensors are wrappers with no memory of their own: a fn that
    looks at its batch through ``x.detach().numpy()``, ``data_ptr()`` or a C extension
    fails there with PyTorch's "Cannot access data pointer of Tensor that doesn't have
    storage". Reverse mode runs fn on plain tensors and computes. Auto takes reverse
    mode when forward mode fails so (and remembers), the diagonal strategy (auto's or
    ``structure="diagonal"``) computes by one reverse pass with ones instead; explicit
    forward mode, estimates and sketches raise this error, which says what to do."""
    text = str(err)
    if not any(s in text for s in ("doesn't have storage", "Cannot access storage", "Cannot access data pointer")):
        return None
    return RuntimeError(
        f"{call}: fn reads its input's memory directly (.numpy(), .data_ptr() or a C extension; "
        f"{type(err).__name__}: {text.splitlines()[0] if text else ''}), and {what} runs fn under torch.func "
        "transforms, whose tensors have no memory of their own. Look at the batch's values with torch "
        f"operations instead (x.isnan().any()){instead}."
    )


def _captured_mutation_error(err: BaseException, call: str, what: str, instead: str = "") -> RuntimeError | None:
    """A clear error for fn updating a tensor it holds, in place, under a torch.func
    transform (None when ``err`` is something else): BatchNorm's running statistics in
    training mode, a counter buffer. torch.func cannot transform such a function; reverse
    mode runs fn on plain tensors and can."""
    text = str(err)
    if "mutate a captured Tensor" not in text:
        return None
    return RuntimeError(
        f"{call}: fn updates a tensor it holds in place while it runs (BatchNorm's running statistics in "
        f"training mode, a counter buffer; {type(err).__name__}: {text.splitlines()[0] if text else ''}), and "
        f"{what} runs fn under torch.func transforms, which cannot do that. Put the model in eval mode "
        f"(model.eval()){instead}."
    )


def _forward_failed(err: Exception, call: str, *, vectorized: bool) -> Exception:
    text = str(err)
    raw = (_raw_memory_error(err, call, "forward mode", "; or use mode='rev' (mode='auto' falls back to it)")
           or _captured_mutation_error(err, call, "forward mode", ", or use mode='rev' (mode='auto' falls back to "
                                       "it); in training mode BatchNorm also couples the examples of the batch"))
    if raw is not None:
        return raw
    if "requires_grad_()" in text or "autograd.grad" in text or "torch.autograd.functional" in text:
        return RuntimeError(
            f"{call}: forward mode runs fn under torch.func.jvp, and fn uses autograd inside fn "
            "(a GradientTape, requires_grad_ or autograd.grad), which torch.func does not allow "
            f"there ({type(err).__name__}: {err}). Use mode='rev' or mode='auto'."
        )
    if vectorized and "vmap" in text.lower():
        return _vectorize_failed(err, call)
    return RuntimeError(
        f"{call}: forward mode failed ({type(err).__name__}: {err}). Some operations have no "
        "forward-mode derivative; use mode='rev'."
    )


# --------------------------------------------------------------------------------------
# Probing fn, memory budgets and the auto choice
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Probe:
    out_shape: tuple
    out_dtype: torch.dtype
    connected: bool
    act_bytes: int  # bytes autograd saves per example in the forward pass
    # The _shape_key it was probed under: the call's key for every other cache (NOTE [one
    # key per call]).
    key: tuple = ()


class _FnCache:
    """Per-(function, input shape) facts, keyed weakly on the function object."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict = {}

    @staticmethod
    def _fn_ref(fn: Callable):
        if isinstance(fn, torch.nn.Module):
            # A module is its own target; asking it for __self__ and __func__ (absent)
            # goes through Module.__getattr__'s raised AttributeError, twice per lookup.
            owner = func = None
        else:
            owner = getattr(fn, "__self__", None)
            func = getattr(fn, "__func__", None)
        target = owner if (owner is not None and func is not None) else fn
        try:
            ref = weakref.ref(target)
        except TypeError:
            return None, None
        return (id(target), id(func) if func is not None else None), ref

    def get(self, fn: Callable, key: tuple):
        ident, ref = self._fn_ref(fn)
        if ref is None:
            return None
        with self._lock:
            hit = self._data.get((ident, key))
        if hit is None or hit[0]() is None or hit[0]() is not ref():
            return None
        return hit[1]

    def put(self, fn: Callable, key: tuple, value) -> None:
        ident, ref = self._fn_ref(fn)
        if ref is None:
            return
        with self._lock:
            if len(self._data) > 4096:  # functions made per call (lambdas) never hit; bound it
                self._data.clear()
            self._data[(ident, key)] = (ref, value)

    def pop(self, fn: Callable, key: tuple) -> None:
        ident, ref = self._fn_ref(fn)
        if ref is None:
            return
        with self._lock:
            self._data.pop((ident, key), None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_PROBES = _FnCache()
_CHAINS = _FnCache()  # ChainPlan, or why fn is not a chain of known layers
_CHOICES = _FnCache()
_FWD_FAILED = _FnCache()  # functions forward mode could not run (auto then uses rev)
# NOTE [differentiable results]: "agree" or why forward mode's result may not be differentiated
_FWD_SECOND = _FnCache()
_VMAP_FAILED = _FnCache()  # (fn, key, differentiable) whose vectorized reverse pass failed: NOTE [vmap fallback]
_ELEMENTWISE = _FnCache()  # ("yes",) or ("no", why): NOTE [elementwise functions]
_COMPILED = _FnCache()  # compiled.Compiled per (fn, shape, mode, chunk)
_SEEN = _FnCache()  # rows asked for by calls too small to measure: NOTE [repeated small calls]
_PROVISIONAL = _FnCache()  # [rows served, seconds to measure fully, s/row]: NOTE [provisional choices]


def clear_caches() -> None:
    """Forget every probed shape, measured auto choice, structure proof and compiled
    function of this process (the on-disk tuning cache: distjac.tuning.clear())."""
    _PROBES.clear()
    _CHAINS.clear()
    _CHOICES.clear()
    _FWD_FAILED.clear()
    _VMAP_FAILED.clear()
    _FWD_SECOND.clear()
    _ELEMENTWISE.clear()
    _COMPILED.clear()
    _SEEN.clear()
    _PROVISIONAL.clear()


def _shape_key(fn: Callable, x: torch.Tensor) -> tuple:
    """What a cached fact about ``fn`` on ``x`` depends on, besides fn's identity (which
    :class:`_FnCache` holds by weak reference, so a new object at a dead one's address
    never hits): the per-example shape, dtype and device of x, and fn's fingerprint.

    NOTE [one key per call]
    A call computes this key once, in its probe (``_Probe.key``), and looks up every
    other fact (the chain plan, the elementwise proof, the choice, a compiled graph)
    under it: fn as it was when the call began. A call made inside fn (a nested
    batch_jacobian on a module fn has just changed) computes its own. Nothing keeps a
    key beyond its call: a memo across calls once took a module's train-mode Dropout
    for its eval-mode one. A lazy module's first call probes it "uninitialized" and so
    keeps its facts under that key; the next call, with real shapes, finds none and
    works them out again."""
    return (tuple(x.shape[1:]), x.dtype, str(x.device), _fingerprint(fn))


def _fingerprint(fn: Callable) -> tuple:
    """What decides what ``fn`` computes besides its tensors' values: a module's
    (:func:`_module_fingerprint`), or for any other callable what its code can see
    (:func:`_callable_fingerprint`)."""
    module = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
    if isinstance(module, torch.nn.Module):
        return _module_fingerprint(module)
    return _callable_fingerprint(fn)


def _module_fingerprint(module: torch.nn.Module) -> tuple:
    """For an nn.Module (or a bound method of one), what decides what it computes besides
    its tensors' values: per submodule its class, its plain settings (every bool, number,
    string, dtype, device or tuple of them in its ``__dict__``: the training flag,
    a conv's padding, Dropout's p, LayerNorm's eps, a user's own flags), its hooks, and
    the callables set on the instance (a replaced ``forward``); then the names, shapes,
    dtypes and devices of its parameters and buffers (a one-element bool or integer buffer,
    a switch as often as not, by value too); layers kept in a plain list or tuple walked as
    submodules; and the global module hooks. So
    a module whose layers were swapped, resized, reconfigured, hooked, moved or switched
    to eval mode is probed and measured afresh.

    Computed on every call (it is what makes the caches safe for modules that change
    between calls), so it walks the module tree once, by its own dicts, rather than
    through named_parameters, named_buffers and modules (three walks, 4x the time on a
    three-layer MLP)."""
    mm = torch.nn.modules.module
    parts: list = [(tuple(mm._global_forward_hooks), tuple(mm._global_forward_pre_hooks),
                    tuple(mm._global_backward_hooks), tuple(getattr(mm, "_global_backward_pre_hooks", ())))]
    seen: set[int] = set()
    stack: list[tuple[str, torch.nn.Module]] = [("", module)]
    while stack:
        name, m = stack.pop()
        if id(m) in seen:  # a submodule shared by two parents: once, as modules() does
            parts.append((name, "shared"))
            continue
        seen.add(id(m))
        # The class by name and token: the key travels in a shipped strategy's record, and
        # a user's class need not unpickle elsewhere; the token tells a redefined class apart.
        cls = type(m)
        parts.append((name, f"{cls.__module__}.{cls.__qualname__}", _token(cls), *_settings(m)))
        for kind in (m._parameters, m._buffers):
            for key, t in kind.items():
                if t is not None:
                    # A lazy module's parameters have no shape until its first forward pass.
                    parts.append((key, "uninitialized" if is_lazy(t) else t.shape, t.dtype, t.device))
                    if (kind is m._buffers and not t.is_floating_point() and not is_lazy(t) and t.numel() == 1
                            and key != "num_batches_tracked"):
                        # A one-element bool or integer buffer is a switch as often as not
                        # (`if self.flip:`): by value. BatchNorm's step counter, which torch
                        # advances itself in training mode, is not one.
                        parts.append((key, "value", _buffer_value(t)))
        stack.extend((f"{name}.{key}", c) for key, c in reversed(m._modules.items()) if c is not None)
        # Layers kept in a plain list or tuple (not a ModuleList) are walked as submodules.
        for key, v in m.__dict__.items():
            if (type(v) in (list, tuple) and 0 < len(v) <= _SEEN_MAX_ITEMS
                    and all(isinstance(e, torch.nn.Module) for e in v)):
                stack.extend((f"{name}.{key}[{i}]", e) for i, e in reversed(list(enumerate(v))))
    return tuple(parts)


def _buffer_value(t: torch.Tensor):
    """A one-element buffer's value for a key, or "opaque" where it cannot be read (a
    tensor wrapped by torch.func, a fake or meta tensor): a key never makes a call fail."""
    try:
        return t.item()
    except Exception:  # noqa: BLE001 - NOTE [what a function sees]: whatever raises is opaque
        return ("opaque", id(type(t)))


_PLAIN = frozenset((bool, int, float, str, type(None), torch.dtype, torch.device))
# NOTE [what a function sees]: how far a plain function's fingerprint looks.
_SEEN_MAX_ITEMS = 32  # a container with more items is described by its length
_SEEN_MAX_DEPTH = 4  # hops (into a value, a helper, an attribute) deeper: by type only
# Functions of these packages are not looked into: what they compute is decided by their
# arguments (and their globals are the libraries' own).
_LIBRARY_ROOTS = frozenset(("torch", "numpy", "distjac", "builtins", "math", "functools", "operator", "scipy",
                            "einops", "typing", "collections"))


def _callable_fingerprint(fn: Callable) -> tuple:
    """What a callable that is not a module can see, for :func:`_fingerprint`.

    NOTE [what a function sees]
    A cached fact about a plain function (its probed output shape, its elementwise
    proof) is only as good as the function: ``lambda t: model(t)`` computes something
    else once a layer of ``model`` is swapped, and so does a closure over a config dict
    whose flag flips. The caches hold functions by identity, so the key also holds what
    the function's code can see, looked at the way a module's settings are: its closure
    cells, the globals its code names (nested code included) and its defaults; for a
    partial, its function and arguments; for a bound method or a callable object, the
    object's attributes. Each value is described as a module's fingerprint (an
    nn.Module), a tensor's shape, dtype and device (not its values, as for parameters),
    a plain value itself, a container item by item, an object attribute by attribute,
    and a user's helper function the same way, to a depth of _SEEN_MAX_DEPTH; functions
    of torch, numpy and the like are not looked into, and Python modules are named.
    What cannot be seen this way (state behind a C extension, a value deeper than the
    depth, a dict or tuple longer than _SEEN_MAX_ITEMS items, an object with more
    attributes than that, a list (described by its type alone: a list a function appends
    to, a log, would change the key on every call), a class's own attributes, a
    ``__slots__`` object's fields) is the caller's to announce with clear_caches(). A
    value that changes on every call (a global step counter the function reads, a dict
    of counts) makes every call probe afresh: right, and slower. Long strings are
    described by their length and ends (the key travels in a shipped strategy's record)."""
    parts: list = []
    try:
        _fn_parts(fn, parts, 0, set())
    except Exception:  # noqa: BLE001 - a key never makes a call fail (see _seen_value)
        return ("opaque", id(fn))
    return tuple(parts)


def _fn_parts(f, out: list, depth: int, seen: set) -> None:
    """Append what callable ``f`` sees to ``out`` (NOTE [what a function sees]). Each hop
    (into a value, a helper function, an object's attributes) is one level deeper; only
    modules are described once per call (``seen``: their description does not depend on
    the depth), so a value met twice is described alike both times."""
    if depth > _SEEN_MAX_DEPTH:
        out.append(("deep", _token(type(f))))
        return
    if isinstance(f, functools.partial):
        out.append("partial")
        _fn_parts(f.func, out, depth + 1, seen)
        out.append(("args", *(_seen_value(a, depth + 1, seen) for a in f.args)))
        out.append(("keywords", *((k, _seen_value(v, depth + 1, seen)) for k, v in f.keywords.items())))
        return
    if isinstance(f, types.MethodType):
        owner = f.__self__
        if isinstance(owner, torch.nn.Module):
            out.append(("method of", _value_key_module(owner, seen), f.__func__.__name__))
            return
        out.append(("method", _seen_value(owner, depth + 1, seen)))
        f = f.__func__
    if isinstance(f, types.FunctionType):
        root = (f.__module__ or "").split(".")[0]
        if root in _LIBRARY_ROOTS:
            out.append(("library", f.__module__, f.__qualname__))
            return
        code = f.__code__
        out.append(("code", _token(code)))
        for cell in f.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned later)
                out.append("<empty>")
                continue
            out.append(_seen_value(value, depth + 1, seen))
        glob = f.__globals__
        for name in dict.fromkeys(_code_names(code)):
            if name in glob:
                out.append((name, _seen_value(glob[name], depth + 1, seen)))
        if f.__defaults__ or f.__kwdefaults__:
            out.append(("defaults", _seen_value((f.__defaults__, f.__kwdefaults__), depth + 1, seen)))
        return
    call = getattr(type(f), "__call__", None)  # noqa: B004 (the class's own __call__, a function or not)
    if isinstance(call, types.FunctionType) and not isinstance(f, type):  # a callable object
        out.append(("object", _seen_value(f, depth + 1, seen)))
        _fn_parts(call, out, depth + 1, seen)
        return
    out.append(("callable", _token(f)))  # a builtin, a C extension's function


def _code_names(code: types.CodeType) -> list[str]:
    """The global (and attribute) names a code object and the code nested in it use."""
    names = list(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names += _code_names(c)
    return names


def _value_key_module(m: torch.nn.Module, seen: set):
    if id(m) in seen:
        return ("seen module", _token(m))
    seen.add(id(m))
    return ("module", _module_fingerprint(m))


# A string or bytes value longer than this is described by its length and ends: the key
# travels in a shipped strategy's record, and a global holding a vocabulary would ride along.
_SEEN_MAX_CHARS = 256


def _seen_value(v, depth: int, seen: set):
    """A value a function can see, described for NOTE [what a function sees]; whatever
    describing it raises (a dead weakref proxy, a lazy object whose attributes raise),
    it is described by its type's token instead: a key never makes a call fail."""
    try:
        return _describe(v, depth, seen)
    except Exception:  # noqa: BLE001 - a user's object may raise anything from getattr
        return ("opaque", id(type(v)))


def _describe(v, depth: int, seen: set):
    t = type(v)  # never v.__class__: a proxy may lie or raise there
    if t in _PLAIN:
        if t in (str, bytes) and len(v) > _SEEN_MAX_CHARS:
            return (t.__name__, len(v), v[:32], v[-32:])
        return v
    if t is bytes:
        return v if len(v) <= _SEEN_MAX_CHARS else ("bytes", len(v), v[:32], v[-32:])
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype, v.device)
    if isinstance(v, torch.nn.Module):
        return _value_key_module(v, seen)
    if isinstance(v, types.ModuleType):
        return ("python module", v.__name__)
    if isinstance(v, type):
        return ("class", _token(v))
    if t.__module__ == "numpy" and hasattr(v, "item") and getattr(v, "ndim", None) == 0:
        return ("numpy scalar", v.item())  # np.bool_, np.float32 flags
    if depth > _SEEN_MAX_DEPTH:
        return ("deep", _token(t))
    if isinstance(v, tuple):
        if len(v) > _SEEN_MAX_ITEMS:
            return (t.__name__, "long")
        return (t.__name__, *(_seen_value(e, depth + 1, seen) for e in v))
    if isinstance(v, list):
        # By type only, as a module's lists (_settings): a list a function appends to (a log)
        # would otherwise change the key, and the choice, on every call.
        return ("list",)
    if isinstance(v, dict):
        if len(v) > _SEEN_MAX_ITEMS:
            return ("dict", "long")
        return ("dict", *((k if type(k) in _PLAIN else _token(type(k)), _seen_value(e, depth + 1, seen))
                          for k, e in v.items()))
    if isinstance(v, (types.FunctionType, types.MethodType, functools.partial)):
        parts: list = []
        _fn_parts(v, parts, depth + 1, seen)
        return ("function", *parts)
    attrs = getattr(v, "__dict__", None)
    if isinstance(attrs, dict):  # a user's object: a config, a wrapper
        if len(attrs) > _SEEN_MAX_ITEMS:
            return ("object", _token(t), "many attributes")
        return ("object", _token(t), *((k, _seen_value(e, depth + 1, seen)) for k, e in list(attrs.items())))
    if callable(v):  # a builtin or C function (torch.tanh): itself, not its type
        return ("callable", _token(v))
    return ("value", _token(t))


# nn.Module's own bookkeeping (hook dicts, the parameter and submodule dicts...): read
# through the attributes below, not as settings.
_MODULE_INTERNALS = frozenset(torch.nn.Module().__dict__) - {"training"}


def _settings(m: torch.nn.Module) -> tuple:
    """A module's plain settings, hooks and instance callables, for :func:`_fingerprint`
    (callables by :func:`_token`: a key must not keep the module alive through a bound
    method).
    Lists are left out: a module's list is as often a log it appends to (and it would
    change the key on every call) as a setting; a dict of plain values (options kept as
    ``{"mix": True}``) is in; a list or tuple of modules (layers kept in a plain list) is
    walked as submodules by :func:`_module_fingerprint`. A plain attribute that changes on every
    call (a step counter) does change the key, as torch.compile's guards do: such a
    module is probed, and its choice made, afresh on each call."""
    out: list = []
    hooks = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
    if any(hooks):
        out.append(("hooks", *(tuple(h) for h in hooks)))
    for key, v in m.__dict__.items():
        if key in _MODULE_INTERNALS:
            continue
        t = type(v)
        if t in _PLAIN:
            out.append((key, v))
        elif isinstance(v, tuple) and all(type(e) in _PLAIN for e in v):  # torch.Size too
            out.append((key, tuple(v)))
        elif (t is dict and len(v) <= _SEEN_MAX_ITEMS
              and all(type(k) in _PLAIN and type(e) in _PLAIN for k, e in v.items())):
            out.append((key, "dict", tuple(v.items())))  # options kept in a dict: {"mix": True}
        elif callable(v) and not isinstance(v, (torch.nn.Module, torch.Tensor)):
            out.append((key, "callable", _token(v)))
    return tuple(out)


_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NEXT_TOKEN = itertools.count()
_TOKENS_LOCK = threading.Lock()  # a worker computes fingerprints on several threads


def _token(obj) -> int:
    """A number for ``obj`` that no other object gets while this process lives (an id is
    reused once its object is freed: a new lambda set as ``forward`` took an old one's
    id and its cached proof). Objects that cannot be weakly referenced (builtins, which
    are never freed) keep their id, negated."""
    try:
        with _TOKENS_LOCK:
            tok = _TOKENS.get(obj)
            if tok is None:
                tok = _TOKENS[obj] = next(_NEXT_TOKEN)
        return tok
    except TypeError:
        return -1 - id(obj)


def _check_output(y, x: torch.Tensor, call: str) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{call}: fn must return a torch.Tensor, got {type(y).__name__}.")
    check_batched(y, "fn(x) (the target)", call)
    check_same_batch(y, x, call)
    check_floating(y, "fn(x) (the target)", call)
    return y


def _probe(fn: Callable, x: torch.Tensor, call: str) -> _Probe:
    key = _shape_key(fn, x)
    cached = _PROBES.get(fn, key)
    if cached is not None:
        return cached
    k = min(x.shape[0], PROBE_ROWS)
    if _in_transform():
        # Inside an outer transform autograd cannot be used; torch.func.vjp cannot tell an
        # unconnected output from a zero one, so the output counts as connected.
        y = _check_output(fn(x[:k]), x[:k], call)
        return _Probe(tuple(y.shape[1:]), y.dtype, True, 0, key)
    xd = x[:k].detach().requires_grad_(True)
    saved = [0]

    def pack(t: torch.Tensor):
        if t.dim() >= 1 and t.shape[0] == k:
            saved[0] += t.numel() * t.element_size()
        return t

    try:
        with torch.enable_grad(), _Differentiating(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fn(xd)
    except RuntimeError as err:
        if "hook" not in str(err).lower():
            raise
        # torch.func transforms inside fn refuse saved-tensor hooks: probe without them.
        saved[0] = 0
        with torch.enable_grad(), _Differentiating():
            y = fn(xd)
    y = _check_output(y, xd, call)
    connected = False
    if y.requires_grad and y.numel() > 0:
        (g,) = torch.autograd.grad(y, xd, torch.ones_like(y), allow_unused=True)
        connected = g is not None
    elif y.requires_grad:
        connected = True
    probe = _Probe(tuple(y.shape[1:]), y.dtype, connected, saved[0] // max(k, 1), key)
    _PROBES.put(fn, key, probe)
    return probe


# NOTE [connected somewhere]
# Whether fn(x) depends on x is a fact about this call's rows, not about fn: a function
# whose control flow looks at the batch's values (`if x.sum() > 0: ...`) may return a
# constant for the probe's 8 rows, or for an earlier call's batch, and depend on x for
# the rest. So the probe's "unconnected" (fresh or cached) is only a hint: before a call
# returns None or zeros for it, the whole batch is run forward in blocks of
# CONNECTED_CHECK_ROWS (the cost of one forward pass, paid only where the answer is
# None; nothing is saved for a backward), and the first block whose output depends on
# its rows sends the call down the usual path. There, reverse mode gives a block that
# does not depend on its rows zeros, and the call is unconnected (None) only where no
# block was connected. Forward mode cannot tell a row that does not reach the output
# from one whose derivative is zero: where a cached probe said "connected" and no row of
# this batch reaches the output, it gives zeros, not None.
CONNECTED_CHECK_ROWS = 1024


def _unconnected_everywhere(fn: Callable, x: torch.Tensor, call: str) -> bool:
    """Whether no block of x's rows reaches fn's output (NOTE [connected somewhere]).

    Each block's graph is walked from the output back to the input's node, not run
    backward, so the forward pass saves nothing for a backward (its saved tensors are
    dropped as they are made): the check costs the forward passes, not their memory."""
    if _in_transform():
        return False  # the probe counts as connected there; never reached
    for b0 in range(0, x.shape[0], CONNECTED_CHECK_ROWS):
        xd = x[b0:b0 + CONNECTED_CHECK_ROWS].detach().requires_grad_(True)
        try:
            with torch.enable_grad(), _Differentiating(), \
                    torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda _: None):
                y = fn(xd)
        except Exception:  # noqa: BLE001 - run again as fn runs anywhere else
            # torch.func transforms inside fn refuse saved-tensor hooks, and a fn that
            # differentiates inside its own forward pass (forces from an energy) needs
            # what it saved: without the hooks (an error of fn's own is raised from there).
            with torch.enable_grad(), _Differentiating():
                y = fn(xd)
        y = _check_output(y, xd, call)
        if y.requires_grad and _reaches(y.grad_fn, xd):
            return False
    return True


def graph_nodes(node):
    """Every autograd node reachable from ``node`` (itself included), each once."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        yield n
        stack.extend(nxt for nxt, _ in n.next_functions)


def _reaches(node, leaf: torch.Tensor) -> bool:
    """Whether the autograd graph from ``node`` reaches the leaf tensor ``leaf``."""
    return any(getattr(n, "variable", None) is leaf for n in graph_nodes(node))


def chain_plan(fn: Callable, x: torch.Tensor, out_shape: tuple, key: tuple | None = None) -> _chain.ChainPlan | str:
    """The chain strategy's plan for fn on x (NOTE [chains] in chain.py), or why it does
    not apply; cached like the probe (``key``: the call's, NOTE [one key per call])."""
    if _in_transform():
        return "inside a torch.func transform"
    key = (key or _shape_key(fn, x)) + (tuple(out_shape),)
    cached = _CHAINS.get(fn, key)
    if cached is None:
        cached = _chain.plan_chain(fn, x, out_shape)
        _CHAINS.put(fn, key, cached)
    return cached


def _chain_cap(plan, x: torch.Tensor) -> int | None:
    """The chain's largest block on x's device: NOTE [allocator ceiling] in chain.py (a
    CPU only; None where there is no cap)."""
    if isinstance(plan, str) or x.device.type != "cpu":
        return None
    return plan.cpu_block(x.element_size())


def _act_bytes(fn: Callable, x: torch.Tensor, probe: _Probe, s: Strategy) -> int:
    """Per-example working bytes for fit_to_budget: the probe's saved activations, or the
    chain's working set."""
    if s.mode == "chain":
        plan = chain_plan(fn, x, probe.out_shape, probe.key)
        if not isinstance(plan, str):
            return plan.work_bytes(x.element_size())
    if s.mode == "diag":  # one forward pass: its activations, the tangents and the diagonal
        return probe.act_bytes + 3 * math.prod(x.shape[1:]) * x.element_size()
    return probe.act_bytes


def default_memory_budget(device: torch.device) -> int:
    """Bytes a batch Jacobian may use on ``device`` when no max_memory is given.

    ``DISTJAC_MAX_MEMORY`` (bytes) overrides; otherwise a fraction of the free memory.
    """
    env = env_int("DISTJAC_MAX_MEMORY")
    if env is not None:
        return env
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * DEFAULT_MEMORY_FRACTION)
    return int(_host_available_bytes() * DEFAULT_MEMORY_FRACTION)


def _host_available_bytes() -> int:
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def fit_to_budget(
    s: Strategy, *, b: int, m: int, n: int, act_bytes: int, itemsize: int, budget: int, call: str
) -> Strategy:
    """Shrink a strategy's chunk (then block) so its vectorized pass fits ``budget`` bytes.

    Model: the output (B*M*N) is resident; a block's forward keeps ``act_bytes`` per
    example (for the chain strategy: its whole working set per example, and only the
    block is shrunk); a vectorized pass of C rows over Bb examples holds about C*Bb*(act + (M+N)
    * itemsize) bytes of cotangents, intermediate gradients and results.
    """
    out_bytes = b * m * n * itemsize
    if out_bytes > budget:
        raise MemoryBudgetError(
            f"{call}: the Jacobian alone needs {format_bytes(out_bytes)} ({b} x {m} x {n} "
            f"elements) but the memory budget is {format_bytes(budget)}. Pass a larger "
            "max_memory, split the batch, or use distjac.Engine to stream results to disk."
        )
    if s.mode in ("chain", "diag"):  # act_bytes: the whole working set per example
        fit = (budget - out_bytes) // max(1, act_bytes)
        if fit < 1:
            raise MemoryBudgetError(
                f"{call}: the {s.mode} strategy needs about {format_bytes(act_bytes)} per example beyond "
                f"the {format_bytes(out_bytes)} result, which exceeds the memory budget of "
                f"{format_bytes(budget)}. Pass a larger max_memory."
            )
        return s if fit >= min(b, s.block or b) else replace(s, block=int(fit))
    rows = m if s.mode == "rev" else n
    per_pass = act_bytes + (m + n) * itemsize  # per (row, example) of one vectorized pass
    block = min(b, s.block or b)
    room = budget - out_bytes - block * act_bytes
    if not s.vectorize:
        need = block * per_pass
    else:
        fit = room // max(1, block * per_pass)
        chunk = min(rows, s.chunk or rows)
        if fit >= 1:
            return replace(s, chunk=min(chunk, int(fit)))
        need = block * per_pass
        s = replace(s, chunk=1)
    if room >= need:
        return s
    # Even one row over the block does not fit: shrink the block.
    new_block = (budget - out_bytes) // max(1, act_bytes + per_pass)
    if new_block < 1:
        raise MemoryBudgetError(
            f"{call}: one pass over a single example needs about "
            f"{format_bytes(act_bytes + per_pass)} beyond the {format_bytes(out_bytes)} result, "
            f"which exceeds the memory budget of {format_bytes(budget)}. Pass a larger max_memory."
        )
    return replace(s, block=int(new_block))


def _hows(modes: Sequence[str], rows_of: dict) -> list[Strategy]:
    """Stage one's candidates: per mode, the row loop, one vmap pass, and chunked vmap."""
    out = []
    for mode in modes:
        rows = rows_of[mode]
        out.append(Strategy(mode, vectorize=False))
        out.append(Strategy(mode, vectorize=True, chunk=None))
        if rows >= 32:
            out.append(Strategy(mode, vectorize=True, chunk=max(8, rows // 8)))
    return out


class _AbandonedError(Exception):
    """A timed run stopped early: it had already taken ``elapsed`` seconds, past its limit."""

    def __init__(self, elapsed: float):
        super().__init__(f"abandoned after {elapsed:.3g} s")
        self.elapsed = elapsed


def _time_once(fn: Callable, xs: torch.Tensor, s: Strategy, out_shape: tuple, call: str,
               limit_s: float | None = None) -> float:
    """Seconds per example of one run of strategy ``s`` on the sample ``xs``; with
    ``limit_s``, raises :class:`_AbandonedError` at the first pass that ends past it (a loop
    checks after every row's pass, a vmap pass after each chunk)."""
    _sync(xs.device)
    t0 = time.perf_counter()
    meter = None
    if limit_s is not None:
        def check(_fraction: float) -> None:
            elapsed = time.perf_counter() - t0
            if elapsed > limit_s:
                raise _AbandonedError(elapsed)

        meter = _Meter(check)
    _run(fn, xs, s, create_graph=False, call=call, out_shape=out_shape, meter=meter)
    _sync(xs.device)
    return (time.perf_counter() - t0) / xs.shape[0]


def _time_strategy(
    fn: Callable, xs: torch.Tensor, s: Strategy, out_shape: tuple, call: str, *, bar: float = math.inf,
    runs: int = 2,
) -> float:
    """Seconds per example of strategy ``s`` on the sample ``xs``: the best of ``runs``
    runs; later ones are skipped when one is already ``AUTO_KEEP`` times slower than
    ``bar`` (the best so far), since it cannot win."""
    best = math.inf
    for _ in range(runs):
        best = min(best, _time_once(fn, xs, s, out_shape, call))
        if best > AUTO_KEEP * bar:
            break
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prior_passes(s: Strategy, m: int, n: int) -> int | None:
    """The cost model's prior for a candidate: autograd passes over the block (rev: one
    per output element, fwd: one per input element, whether looped or stacked in vmap);
    None where it says nothing (the chain, whose cost is GEMMs, not passes)."""
    return {"rev": m, "fwd": n}.get(s.mode)


def _median(values: Sequence[float]) -> float:
    v = sorted(values)
    k = len(v)
    return v[k // 2] if k % 2 else 0.5 * (v[k // 2 - 1] + v[k // 2])


class _Race:
    """NOTE [measuring]: candidates timed in interleaved rounds (each round starts one
    candidate later, so drift from other load hits all alike), compared by the median of
    their samples, until the leader separates from the rest (its slowest sample faster
    than every other's fastest), at most AUTO_MAX_ROUNDS rounds. From the minimum of
    rounds on, a candidate whose fastest sample is AUTO_KEEP x the leader's median is
    dropped (it cannot win), and a run that has taken AUTO_ABANDON x the fastest run of
    another candidate is stopped at its next pass and its candidate dropped (a hopeless
    row loop costs a few leader's runs, not its own full time; the runs of the candidate
    holding the fastest sample, and compiled runs, are never stopped, so the race always
    keeps one candidate; a candidate stopped on its first run, which pays its one-off
    costs and took the chain out of a race on a loaded machine, gets one more). The
    cost model is the prior: while the leader is a candidate that the prior puts
    AUTO_PRIOR_DOUBT x slower than another one still in the race, the rounds go on to
    the maximum, so one noisy sample cannot crown a strategy the sizes say is far
    slower. The clock of every run is kept (``spent``) for the measuring budget."""

    def __init__(self, fn, out_shape, call, m: int, n: int, log: list, notes: list):
        self.fn, self.out_shape, self.call, self.m, self.n = fn, out_shape, call, m, n
        self.log, self.notes = log, notes
        self.spent = 0.0

    def run(self, cands: Sequence[Strategy], rows: torch.Tensor, *, min_rounds: int = 2,
            max_rounds: int | None = None, deadline: float = math.inf) -> dict[Strategy, float]:
        max_rounds = max_rounds or AUTO_MAX_ROUNDS
        samples: dict[Strategy, list[float]] = {c: [] for c in cands}
        struck: set[Strategy] = set()  # stopped once, on a first run (a cold one)
        alive = list(cands)
        t_start = time.perf_counter()
        for r in range(max_rounds):
            k = r % max(1, len(alive))
            for c in alive[k:] + alive[:k]:
                best = {d: min(v) for d, v in samples.items() if v}
                fastest = min((t for d, t in best.items() if d is not c), default=None)
                # The leader (the fastest sample of all) is never stopped: one run of its
                # slowed by other load once dropped it, and with it every candidate.
                leads = c in best and (fastest is None or best[c] <= fastest)
                limit = None if fastest is None or c.compiled or leads else AUTO_ABANDON * fastest * rows.shape[0]
                try:
                    samples[c].append(_time_once(self.fn, rows, c, self.out_shape, self.call, limit))
                except _AbandonedError as err:
                    again = c not in struck and not samples[c]
                    self.notes.append(f"{c}: stopped after {err.elapsed:.2g} s on {rows.shape[0]} rows, "
                                      f"{AUTO_ABANDON:g}x another candidate's fastest run"
                                      + ("; its first run: one more try" if again else ""))
                    if again:
                        struck.add(c)
                    else:
                        samples.pop(c)
                except (VectorizationError, RuntimeError) as err:
                    self.notes.append(f"{c}: failed ({type(err).__name__})")
                    samples.pop(c)
            alive = [c for c in alive if c in samples]
            timed = [c for c in alive if samples[c]]
            if not timed:
                if alive and r + 1 < max_rounds:
                    continue
                break
            med = {c: _median(samples[c]) for c in timed}
            lead = min(timed, key=med.get)
            if r + 1 >= min_rounds:  # never on one sample each: a lucky leader must not drop the rest
                alive = [c for c in alive if c is lead or not samples[c] or min(samples[c]) <= AUTO_KEEP * med[lead]]
            others = [c for c in alive if c is not lead]
            separated = not others or (all(samples[c] for c in others)
                                       and max(samples[lead]) < min(min(samples[c]) for c in others))
            prior = _prior_passes(lead, self.m, self.n)
            doubt = prior is not None and any(
                (p := _prior_passes(c, self.m, self.n)) is not None and prior > AUTO_PRIOR_DOUBT * p for c in others)
            if r + 1 >= min_rounds and separated and not doubt:
                break
            if time.perf_counter() > deadline and r + 1 >= min_rounds:
                break
        self.spent += time.perf_counter() - t_start
        out = {c: _median(v) for c, v in samples.items() if v}
        for c, t in out.items():
            self.log.append((f"{c} on {rows.shape[0]} rows, median of {len(samples[c])}", t))
        return out


_WARM_DEVICES: set[str] = set()


def _warm_autodiff(device: torch.device) -> float:
    """Seconds spent paying torch's one-off autodiff costs on ``device`` (0 once paid).

    NOTE [cold process]
    The first reverse pass in a process imports sympy (torch's symbolic shapes, ~0.5 s
    on 2 cores), the first forward-mode pass ~0.2 s more. Whichever candidate of auto's
    race ran first paid them inside its timed run: W1's row loop measured 1,140
    us/example on its pilot, 30x its steady 37, and the measuring budget counted the
    imports as measuring. They are paid here, once per process and device type, on a
    2 x 2 tensor, before anything is timed (a worker pays them as it starts)."""
    if device.type in _WARM_DEVICES:
        return 0.0
    t0 = time.perf_counter()
    with torch.enable_grad():
        t = torch.ones(2, 2, device=device, requires_grad=True)
        torch.autograd.grad((t * t).sum(), t)
        jvp(torch.sin, (t.detach(),), (t.detach(),))
    _WARM_DEVICES.add(device.type)
    return time.perf_counter() - t0


def _rows_bucket(b: int) -> int:
    """The power-of-two bucket of a batch size (a choice measured for 3,000 rows serves
    2,049-4,096; another bucket measures afresh)."""
    return max(1, b).bit_length()


def choose_strategy(
    fn: Callable,
    x: torch.Tensor,
    *,
    mode: str = "auto",
    parallel_iterations: int | None = None,
    experimental_use_pfor: bool = True,
    max_memory: int | None = None,
    compiled: bool | None = None,
    work_rows: int | None = None,
    call: str = "choose_strategy(fn, x)",
) -> Strategy:
    """The strategy :func:`batch_jacobian` would use for ``fn`` on ``x`` (probes fn).

    Its ``record`` (a :class:`Decision`) says how it was chosen: the candidates timed,
    those left out and why, and the key a measured choice is cached under. The result
    pickles: pass it to ``batch_jacobian(fn, x, strategy=s)`` (or ``run_strategy``) in
    another process to reuse the choice.

    Args:
        compiled: True asks for the compiled variant of the chosen rev/fwd strategy
            (compiled and checked now; a fallback to eager is said in the record);
            None lets auto decide (NOTE [compiled blocks]); False never compiles.
        work_rows: rows the choice will serve (a job's whole source, say); auto weighs
            its measuring and compiling against that much work (default: x's rows).
    """
    x, mode, _ = check_functional_call(fn, x, mode, "none", call)
    with _autograd_usable(x) as x:
        probe = _probe(fn, x, call)
        s = _choose(fn, x, probe, mode, parallel_iterations, experimental_use_pfor, max_memory, call,
                    compiled=compiled, work_rows=work_rows)
        if compiled and not s.compiled and s.mode in ("rev", "fwd"):
            c = replace(s, vectorize=True, compiled=True, record=None)
            status = _compiled_for(fn, x, c, probe.out_shape, call)[0]
            note = f"compiled: {status.status}"
            if status.fn is not None:
                s = replace(c, record=replace(s.record, strategy=str(c), notes=s.record.notes + (note,)))
            else:
                s = replace(s, record=replace(s.record, notes=s.record.notes + (note,)))
    return s


def _choose(fn, x, probe, mode, parallel_iterations, use_pfor, max_memory, call, *, compiled=None,
            work_rows=None, count: bool = False) -> Strategy:
    """The strategy for this call (NOTE [auto's order of business]); ``count``: a call that
    will run, whose rows count towards measuring (NOTE [repeated small calls]; a
    choose_strategy query does not count)."""
    b = x.shape[0]
    n, m = math.prod(x.shape[1:]), math.prod(probe.out_shape)
    user_fixed = parallel_iterations is not None or not use_pfor
    record = Decision("", "explicit")
    pre_notes: tuple = ()
    if mode == "auto":
        structure = None if user_fixed else _elementwise(fn, x, probe.out_shape, probe.key)
        fwd_failed = _FWD_FAILED.get(fn, probe.key)
        diagonal = not user_fixed and structure is None and not fwd_failed
        fwd_checked = None
        if (not diagonal and not fwd_failed and n < AUTO_MODE_RATIO * m and result_is_differentiable(x)
                and not _in_transform()):
            fwd_checked = _fwd_second_order(fn, x, probe, call)
        if fwd_failed or _in_transform() or fwd_checked not in (None, "agree"):
            # NOTE [differentiable results]
            modes = ["rev"]
            if fwd_checked is not None:
                pre_notes = (f"forward mode not taken: the result must be differentiable and {fwd_checked} "
                             "(NOTE [differentiable results])",)
        elif n >= AUTO_MODE_RATIO * m:
            modes = ["rev"]
        elif m >= AUTO_MODE_RATIO * n:
            modes = ["fwd"]
        else:
            modes = ["rev", "fwd"]
        if diagonal:
            # One forward pass instead of N, whatever the sizes: nothing to measure.
            s = Strategy("diag")
            record = Decision("", "structure", notes=(
                "fn is provably elementwise (every operation on x pointwise, from its traced graph): its "
                "Jacobian is diagonal, and one forward pass with ones gives it",))
        elif user_fixed or b < 2 or not (seen := _work_seen(fn, probe, x, modes, compiled, max_memory,
                                                             max(b, work_rows or b), m * n, count)):
            s = Strategy("rev" if m <= n or modes == ["rev"] else "fwd")
            why = ("parallel_iterations or experimental_use_pfor given" if user_fixed else
                   f"{b:,} x {m:,} x {n:,} Jacobian elements, under the {AUTO_MEASURE_MIN_ELEMENTS:,} worth "
                   f"measuring (calls like this one are counted, and measured once they add up)"
                   if b >= 2 else "one example")
            notes = (f"not measured: {why}",)
            plan = None if user_fixed else chain_plan(fn, x, probe.out_shape, probe.key)
            if plan is not None and not isinstance(plan, str):
                # NOTE [small chains]
                cost, autograd = plan.cost_at(min(b, _chain.COST_BLOCK)), plan.autograd_cost()
                if result_is_differentiable(x):
                    notes += ("chain: not taken: the result must be differentiable (the chain records "
                              "no autograd history)",)
                elif cost <= autograd:
                    s = Strategy("chain", vectorize=False, block=_chain_cap(plan, x))
                    notes += (f"chain: {plan}: ~{cost:,} multiply-adds per example over {b} rows, "
                              f"autograd's cheaper mode ~{autograd:,}",)
                else:
                    notes += (f"chain: not taken: ~{cost:,} multiply-adds per example over {b} rows "
                              f"(its shared starts amortized over too few rows), autograd ~{autograd:,}",)
            elif isinstance(plan, str):
                notes += (f"chain: not applicable: {plan}",)
            notes += (f"diag: not applicable: {structure}",) if structure else ()
            record = Decision("", "sizes", notes=notes)
        else:
            why = None
            if seen > max(b, work_rows or b):
                why = (f"measured once calls like this one had asked for {seen:,} rows in all (NOTE [repeated "
                       f"small calls])")
            s = _measured_choice(fn, x, probe, modes, m, n, call, max_memory, compiled=compiled, work_rows=seen,
                                 why=why, count=count)
            record = s.record
            if structure:
                record = replace(record, notes=record.notes + (f"diag: not applicable: {structure}",))
    else:
        s = Strategy(mode)
    if user_fixed:
        s = replace(s, vectorize=use_pfor, chunk=parallel_iterations, block=None)
    if mode == "auto" and s.mode == "rev" and s.vectorize and _VMAP_FAILED.get(fn, _vmap_key(probe, x)):
        s = replace(s, vectorize=False, chunk=None, compiled=False)
        record = replace(record, notes=record.notes + (
            "a vectorized reverse pass failed on this function before (NOTE [vmap fallback]): a row loop",))
    if parallel_iterations is None:
        # (the user's chunk is the user's choice: TF runs exactly that many rows)
        budget = max_memory if max_memory is not None else default_memory_budget(x.device)
        s = fit_to_budget(
            s, b=b, m=m, n=n, act_bytes=_act_bytes(fn, x, probe, s), itemsize=x.element_size(),
            budget=budget, call=call,
        )
    return replace(s, record=replace(record, strategy=str(s), notes=pre_notes + record.notes))


def _loop_block(probe: _Probe, x: torch.Tensor, pilot: int) -> int | None:
    """A row loop's block when measuring stopped at the pilot (None: the whole batch).

    Each pass of a loop costs a fixed overhead plus its rows' work, so larger blocks
    amortize the overhead, until the activations a pass saves outgrow the caches. So on a
    CPU: the most rows whose saved activations fit AUTO_LOOP_BLOCK_BYTES, never fewer than
    the pilot (which was timed). Measured, 2 threads: softmax over 64 features (256 bytes
    saved per example) took 27 ms per 4,096 rows whole and 379 ms in blocks of 128; W4's
    conv-ReLU-linear (46 KB per example) 304 ms per 2,048 rows in blocks of 256, 373 at
    512, 505 at 1,024 and 992 whole. A GPU runs the whole batch."""
    b = x.shape[0]
    if x.device.type != "cpu" or probe.act_bytes <= 0:
        return None
    rows = max(pilot, AUTO_LOOP_BLOCK_BYTES // probe.act_bytes)
    return None if rows >= b else rows


def _vmap_key(probe: _Probe, x: torch.Tensor) -> tuple:
    """The _VMAP_FAILED key (NOTE [vmap fallback]), with whether the result must be
    differentiable: a batched double backward can fail where the plain one runs
    (GroupNorm's)."""
    return probe.key + (result_is_differentiable(x),)


def _fwd_second_order(fn: Callable, x: torch.Tensor, probe: _Probe, call: str) -> str:
    """Whether forward mode's result may be differentiated (NOTE [differentiable results]):
    "agree", or why not. Cached per call key.

    NOTE [differentiable results]
    A differentiable result from forward mode is a reverse pass through forward-mode
    formulas, and PyTorch's are not all right there: LayerNorm's and instance norm's second
    derivatives came out wrong (against reverse mode and finite differences; torch.func's
    jacfwd gives the same numbers), GLU's jvp has no derivative at all, while tanh MLPs,
    GroupNorm, RMSNorm, softmax and the other activations tried agree to rounding. A list
    of bad operators would go stale, so auto checks the function itself, once: on two
    rows, one random second directional derivative u^T (d/dx J) w computed through
    forward mode (a jvp, then a backward pass) against reverse mode (a vjp with
    create_graph, then a backward pass). Forward mode is a candidate only where they
    agree; otherwise (or where forward mode raises) the result comes from reverse mode.
    Inside an outer torch.func transform (a batch_jacobian of a batch_jacobian) auto
    takes reverse mode without the check."""
    key = probe.key + (tuple(probe.out_shape),)
    cached = _FWD_SECOND.get(fn, key)
    if cached is not None:
        return cached
    xs = x[:min(2, x.shape[0])].detach()
    gen = torch.Generator(device=xs.device).manual_seed(0)
    u = torch.randn((xs.shape[0], *probe.out_shape), generator=gen, dtype=xs.dtype, device=xs.device)
    w = torch.randn(xs.shape, generator=gen, dtype=xs.dtype, device=xs.device)

    def second(forward: bool) -> torch.Tensor:
        xd = xs.clone().requires_grad_(True)
        with torch.enable_grad(), _Differentiating():
            if forward:
                first = (jvp(fn, (xd,), (w,))[1] * u).sum()
            else:
                (a,) = torch.autograd.grad(fn(xd), xd, u, create_graph=True)
                first = (a * w).sum()
            (g,) = torch.autograd.grad(first, xd, allow_unused=True) if first.requires_grad else (None,)
        return torch.zeros_like(xs) if g is None else g.detach()

    # A check of auto's own: whatever it raises only decides the mode (reverse mode then).
    try:
        want = second(False)
    except Exception as err:  # noqa: BLE001 - reverse mode cannot differentiate it twice either
        verdict = f"reverse mode's second derivative failed too ({type(err).__name__})"
    else:
        try:
            got = second(True)
        except Exception as err:  # noqa: BLE001 - e.g. a custom autograd.Function without jvp
            verdict = f"forward mode's result cannot be differentiated ({type(err).__name__}: {str(err)[:80]})"
        else:
            tol = {torch.float64: 1e-7, torch.float32: 1e-3}.get(xs.dtype, 5e-2)
            scale = max(float(want.abs().max()), float(got.abs().max()), 1e-30)
            err = float((want - got).abs().max())
            verdict = ("agree" if err <= tol * scale else
                       f"forward mode's second derivatives disagree with reverse mode's (max {err:.3g} on "
                       f"{float(want.abs().max()):.3g}, checked on {xs.shape[0]} rows)")
    _FWD_SECOND.put(fn, key, verdict)
    return verdict


def _work_seen(fn, probe: _Probe, x: torch.Tensor, modes, compiled, max_memory, rows: int, per_row: int,
               count: bool) -> int:
    """Rows auto's measured choice serves, or 0 where it does not pay to measure yet.

    NOTE [repeated small calls]
    A call whose Jacobian (its rows, or a job's, times M x N) is below
    AUTO_MEASURE_MIN_ELEMENTS is not measured: measuring would cost more than the call.
    But a loop of such calls (a training step's, a benchmark's) serves more than one call,
    and a choice by sizes alone can be well off the best (a conv chain at 64 rows ran
    0.76x reverse mode on one machine and 1.0x on another). So the rows asked for are
    counted per choice key (fn's fingerprint, shape, dtype, device, modes, batch bucket,
    compiled, whether the result must be differentiable, max_memory; calls that run, not
    choose_strategy's queries), and the call that brings them to the threshold measures
    as for a call of all those rows: its measuring is bounded by AUTO_MEASURE_SHARE of
    the work done so far, and from then on the measured choice (kept in memory and in
    the tuning cache) serves every call.
    Counts live with the other caches (clear_caches)."""
    if rows * per_row >= AUTO_MEASURE_MIN_ELEMENTS:
        return rows
    key = probe.key + (tuple(modes), _rows_bucket(x.shape[0]), compiled, result_is_differentiable(x),
                       max_memory)
    seen = (_SEEN.get(fn, key) or 0) + (rows if count else 0)
    if count:
        _SEEN.put(fn, key, seen)
    return seen if seen * per_row >= AUTO_MEASURE_MIN_ELEMENTS else 0


def _from_tuning_cache(fn, x, key) -> tuple[Strategy | None, tuple | None]:
    """The choice stored on disk for this key (NOTE [the tuning cache]), and the disk key."""
    if not _tuning.enabled():
        return None, None
    made = _tuning.make_key(fn, x, key[4:])  # (shape, dtype, device: in the disk key already)
    if made is None:
        return None, None
    disk_key, _ = made
    entry = _tuning.lookup(disk_key)
    if entry is None:
        return None, disk_key
    try:
        s = Strategy.from_dict(entry["strategy"])
    except (ValueError, TypeError, AttributeError):
        return None, disk_key
    times = tuple((str(a), float(t)) for a, t in entry.get("times", ()) if isinstance(t, (int, float)))
    notes = (f"from the tuning cache {_tuning.cache_path()} (measured {time.ctime(entry.get('stored', 0))})",)
    notes += tuple(str(n) for n in entry.get("notes", ()))
    provisional = None
    stored = entry.get("provisional")
    if (isinstance(stored, list) and len(stored) == 3 and all(isinstance(v, (int, float)) for v in stored)
            and stored[1] > 0 and stored[2] > 0):
        provisional = (int(stored[0]), float(stored[1]), float(stored[2]))
    return replace(s, record=Decision(str(s), "tuning cache", key, times, notes, provisional)), disk_key


def _provisional_due(fn, key, rows: int, count: bool) -> str | None:
    """Count ``rows`` towards a provisional choice; why to measure it again, once it is due.

    NOTE [provisional choices]
    Measuring is bounded by AUTO_MEASURE_SHARE of the work a choice serves, so on one call
    it may stop after the pilot race (stage one) or before the whole-batch pass (stage
    three), and what it then picks was never timed at the call's size: a row loop's
    speed per row, for one, grows with its block in a way a 256-row pilot cannot show (a
    LayerNorm MLP at 4,096 rows: the chain won the pilot, the whole-batch loop the call).
    Such a choice is provisional: the calls it serves are counted (calls that run, not
    choose_strategy's queries), and once they have done work enough to pay for the
    measuring that was left out (its cost, predicted from the pilot, within
    AUTO_MEASURE_SHARE of that work), the next call measures afresh, budgeted by all the
    rows served, and its choice replaces the old one, in memory and in the tuning cache.
    That measurement is final: were its budget still short of a stage, its choice is not
    provisional again. A single call pays no more than before; a loop of calls (a
    training step's, a benchmark's) gets the full measurement once, after a bounded
    number of calls."""
    entry = _PROVISIONAL.get(fn, key)
    if entry is None:
        return None
    served, needed_s, per_row_s = entry
    if count:
        served += rows
        _PROVISIONAL.put(fn, key, (served, needed_s, per_row_s))
    if AUTO_MEASURE_SHARE * per_row_s * served < needed_s:
        return None
    return (f"measured again once calls like this one had served {served:,} rows: the first measuring stopped "
            "early (NOTE [provisional choices])")


def _measured_choice(fn, x, probe, modes, m, n, call, max_memory: int | None = None, *, compiled=None,
                     work_rows: int | None = None, why: str | None = None, count: bool = False) -> Strategy:
    """Measure, once per (function, shape, batch bucket, max_memory), how to compute
    this batch Jacobian fastest; the result's ``record`` lists what was timed.

    Stage one races each way of computing (mode x loop/vmap/chunked vmap; on a CPU,
    reverse mode only as a loop; the chain where it applies) on a small pilot block
    (NOTE [measuring]); stage two races the ways within AUTO_KEEP of the best over a few
    block sizes on a larger sample; stage three (when the batch is larger than the
    sample) times the chosen block size against one pass over the whole batch; stage four
    weighs compiling the winner (NOTE [compiled blocks]). After stage one, every further
    stage runs only while the measuring so far is below AUTO_MEASURE_SHARE of the work the
    choice will serve (``work_rows`` examples at the best pilot speed), so a first call
    costs a bounded share of the work. Candidates that fail (no vmap rule, no forward
    derivative) are simply not chosen. The choice is kept in memory and in the on-disk
    tuning cache (NOTE [the tuning cache]), which is read first.
    """
    b = x.shape[0]
    # max_memory is part of the key: stage three's whole-batch pass is sized by it; so is
    # whether the result must be differentiable (the chain is no candidate then).
    differentiable = result_is_differentiable(x)
    key = probe.key + (tuple(modes), _rows_bucket(b), compiled, differentiable, max_memory)
    cached = _CHOICES.get(fn, key)
    if cached is None:
        cached, disk_key = _from_tuning_cache(fn, x, key)
        if cached is not None:
            _CHOICES.put(fn, key, cached)
            if cached.record.provisional is not None and _PROVISIONAL.get(fn, key) is None:
                _PROVISIONAL.put(fn, key, cached.record.provisional)
            if count:
                _provisional_due(fn, key, b, count)  # this call's rows count
            return cached
    else:
        disk_key = None
    again = None
    if cached is not None:
        again = _provisional_due(fn, key, b, count)
        if again is None:
            return replace(cached, record=replace(cached.record, how="cached"))
        served = _PROVISIONAL.get(fn, key)[0]
        _PROVISIONAL.pop(fn, key)
        _CHOICES.pop(fn, key)
        why = again if why is None else f"{why}; {again}"
        work_rows = max(work_rows or b, served)
        if disk_key is None:
            disk_key = _from_tuning_cache(fn, x, key)[1]
    work_rows = max(b, work_rows or b)
    per_row = max(1, m * n)
    rows_cap = min(b, AUTO_SAMPLE_ROWS.get(x.device.type, 2048))
    sample = min(rows_cap, max(16, AUTO_SAMPLE_ELEMENTS // per_row))
    # Heavy rows (the sample was cut by Jacobian size): blocks would multiply the number of
    # passes for little gain, so no block sizes are tried; on a CPU only unblocked loops
    # are (see below), while a GPU wants the large kernels of a vectorized pass.
    heavy = sample < rows_cap
    pilot = min(sample, max(AUTO_PILOT_MIN_ROWS, sample // AUTO_PILOT_FRACTION))
    xs = x[:sample].detach()
    log: list[tuple[str, float]] = []
    notes: list[str] = [] if why is None else [why]
    warm_s = _warm_autodiff(x.device)
    if warm_s >= 0.05:
        notes.append(f"torch's first autograd and forward-mode passes in this process took {warm_s:.2g} s "
                     "before the timing (NOTE [cold process])")
    race = _Race(fn, probe.out_shape, call, m, n, log, notes)

    hows = _hows(modes, {"rev": m, "fwd": n})
    # Where the pilot is the whole call, what is timed is what will run: the two rules
    # below (against measurements on a sample that flatter vmap) do not apply. (At 64
    # rows, vmap(jacrev) ran 1.7-2.1x the row loop and forward mode on softmax, a
    # LayerNorm residual block and MultiheadAttention.)
    whole_call = b <= pilot
    if x.device.type == "cpu" and not whole_call:
        # On a CPU, reverse mode vectorized over output rows never beat the row loop in our
        # measurements (2 cores, docs/benchmarks.md: the loop was 1.5-1.8x vmap(jacrev) on
        # W1, 5-10x on W3, level on W4): the same FLOPs with a working set C times larger, and
        # its pass-count saving matters only where the whole call takes milliseconds. A
        # small sample, whose working set still fits the caches, flatters it.
        hows = [h for h in hows if h.mode == "fwd" or not h.vectorize]
    if heavy and x.device.type == "cpu" and not whole_call:
        # Each pass is big enough to amortize its overhead, and a small sample flatters
        # vmap (its working set outgrows the caches as the batch grows): only loops are
        # candidates. (Measured on an H200, the same rule cost W2 and W3 9x and 25x: a GPU
        # keeps vectorized candidates.)
        hows = [h for h in hows if not h.vectorize]
    # The chain of known layers (chain.py) is one more candidate, timed like the others,
    # wherever it applies (it is exact, so the choice cannot change the result).
    # On a CPU its blocks are capped (NOTE [allocator ceiling] in chain.py).
    plan = chain_plan(fn, x, probe.out_shape, probe.key)
    cap = _chain_cap(plan, x)
    if isinstance(plan, str):
        notes.append(f"chain: not applicable: {plan}")
    elif differentiable:
        notes.append("chain: not a candidate: the result must be differentiable (the chain records no "
                     "autograd history)")
    else:
        notes.append(f"chain: {plan}" + (f"; blocks of at most {cap} rows" if cap is not None else ""))
        hows.append(Strategy("chain", vectorize=False, block=cap))
    stage1 = race.run(hows, xs[:pilot])
    best_t = min(stage1.values()) if stage1 else math.inf
    provisional = None  # NOTE [provisional choices]: (rows served, seconds to measure fully, s/row)
    if not stage1:
        best = Strategy(modes[0], vectorize=False)
    else:
        # The measuring budget: a share of the work this choice serves.
        budget = AUTO_MEASURE_SHARE * best_t * work_rows
        keep = sorted((t, str(h), h) for h, t in stage1.items() if t <= AUTO_KEEP * stage1[min(stage1, key=stage1.get)])
        keep = keep[:2]
        blocks = [sample] if heavy else sorted({blk for blk in AUTO_BLOCKS if blk < sample} | {sample})
        cands = [replace(h, block=blk) for _, _, h in keep for blk in _blocks_for(h, blocks, cap)]
        predicted = sum(stage1[h] for _, _, h in keep) * len(blocks) * sample * 2
        if sample <= pilot:
            # The pilot was the whole sample: stage two would time the same candidates on
            # the same rows again, and a load spike there could overturn what stage one
            # measured (W1 at 64 rows: the chain ran 47 us/example in stage one and 117 in
            # a re-timing, and lost to a 92). Stage one's times decide, as they are: what
            # was timed is what will run, so stage two's margin against vectorized passes
            # (a sample flatters them) has nothing to correct (W4 at 64 rows: it kept the
            # chain at 164 us/example over vmap at 155).
            notes.append("stage two not needed: the pilot was the whole sample")
            best_t, _, lead = keep[0]
            best = replace(lead, block=None)
        elif race.spent + predicted > budget and sample > pilot:
            notes.append(f"measuring stopped after stage one: stage two (~{predicted:.2g} s) would pass "
                         f"{AUTO_MEASURE_SHARE:.0%} of the work it serves (~{best_t * work_rows:.2g} s)")
            provisional = (work_rows, race.spent + predicted + 2 * best_t * b, best_t)
            lead = keep[0][2]
            if lead.vectorize:  # the size it was timed at
                best = replace(lead, block=None if heavy else min(blocks, key=lambda k: abs(k - pilot)))
            else:
                best = replace(lead, block=_loop_block(probe, x, pilot))
            if best.mode == "chain":
                # Its largest blocks (the cap, below), as a chain too small to measure runs
                # (NOTE [small chains]): a chain's shared starts cost less per example the
                # more rows a block has (W1/W2 at 64 rows: 16-row blocks ran 1.2-1.5x slower).
                best = replace(best, block=None)
        else:
            stage2 = race.run(cands, xs, min_rounds=3, deadline=time.perf_counter() + max(0.0, budget - race.spent))
            if stage2:
                # A vectorized pass must win clearly to be chosen over the loop: it holds more
                # memory, and a gain inside the measurement's noise is not a gain.
                best = min(stage2, key=lambda c: stage2[c] * (1.0 if c.vectorize else 1.0 / AUTO_VMAP_MARGIN))
                best_t = stage2[best]
            else:
                best = replace(keep[0][2], block=sample)
        if best.mode == "chain" and cap is not None:
            # NOTE [allocator ceiling]: never a whole pass, even of heavy rows, and the cap
            # kept where a block covers this batch (the choice is cached for a bucket of
            # batch sizes, and a larger batch of it must not run whole).
            whole = best.block is None or best.block >= b
            best = replace(best, block=cap if whole else min(cap, best.block))
        elif heavy or (best.block is not None and best.block >= b):
            best = replace(best, block=None)
        elif best.block is not None:
            if race.spent + 2 * best_t * b <= budget:
                t0 = time.perf_counter()
                best = _blocked_or_whole(fn, x, probe, best, m, n, call, max_memory, log)
                race.spent += time.perf_counter() - t0
            else:
                notes.append("whole-batch pass not timed: it would pass the measuring budget")
                provisional = provisional or (work_rows, race.spent + 2 * best_t * b, best_t)
        if compiled is not False:
            best = _maybe_compiled(fn, xs, probe, best, best_t, work_rows, race, notes)
    notes.append(f"measuring took {race.spent:.2g} s")
    if provisional is not None and again is not None:
        # Measured again once already: never provisional twice (the pilot's and the
        # sample's speeds differ, and a due check by one could fall due on every call).
        notes.append("not provisional again: this was the measurement in full it was waiting for")
        provisional = None
    if provisional is not None:
        due = provisional[1] / (AUTO_MEASURE_SHARE * provisional[2])
        notes.append(f"provisional: measured in full once calls like this one have served ~{due:,.0f} rows "
                     "(NOTE [provisional choices])")
        _PROVISIONAL.put(fn, key, provisional)
    best = replace(best, record=Decision(str(best), "measured", key, tuple(log), tuple(notes), provisional))
    _CHOICES.put(fn, key, best)
    if disk_key is not None:
        entry = {"strategy": best.to_dict(), "times": [list(t) for t in log], "notes": notes,
                 "describe": f"{getattr(fn, '__qualname__', type(fn).__qualname__)} on "
                             f"{tuple(x.shape[1:])} {x.dtype} {x.device.type}"}
        if provisional is not None:
            entry["provisional"] = list(provisional)
        _tuning.store(disk_key, entry)
    return best


def _blocks_for(h: Strategy, blocks: list[int], cap: int | None) -> list[int]:
    """Stage two's block sizes for candidate h: the chain's are cut at its cap."""
    if h.mode != "chain" or cap is None:
        return blocks
    return sorted({blk for blk in blocks if blk < cap} | {min(cap, max(blocks))})


def _maybe_compiled(fn, xs, probe, best: Strategy, best_t: float, work_rows: int, race: _Race,
                    notes: list) -> Strategy:
    """Stage four: compile ``best`` (rev/fwd) where it can pay: the compile's predicted
    cost (measured earlier in this process, else compiled.COMPILE_COST_PRIOR_S) against
    AUTO_COMPILE_GAIN of the work the choice serves; then compiled and eager raced."""
    if best.mode not in ("rev", "fwd"):
        notes.append(f"compiled: not considered: {best.mode} won (only rev and fwd compile)")
        return best
    if not _compiled.compile_enabled():
        notes.append("compiled: off (DISTJAC_COMPILE=0)")
        return best
    predicted = _compiled.predicted_compile_s(xs.device.type)
    gain = AUTO_COMPILE_GAIN * best_t * work_rows
    if gain < predicted:
        notes.append(f"compiled: not tried: a compile (~{predicted:.2g} s predicted) cannot pay back on "
                     f"{work_rows} rows (at most ~{gain:.2g} s to gain)")
        return best
    # A static graph (forward mode) serves one block size: blocks of the sample's size.
    block = best.block if _compiled.dynamic_batch(best.mode) else (best.block or xs.shape[0])
    cand = replace(best, vectorize=True, compiled=True, block=block)
    status = _compiled_for(fn, xs, cand, probe.out_shape, "auto's compiled candidate")[0]
    notes.append(f"compiled: {status.status}")
    if status.fn is None:
        return best
    times = race.run([best, cand], xs, min_rounds=3)
    if cand in times and best in times and times[cand] * AUTO_COMPILED_MARGIN < times[best]:
        return cand
    return best


def _blocked_or_whole(fn, x, probe, best: Strategy, m: int, n: int, call: str, max_memory: int | None,
                      log: list) -> Strategy:
    """Stage four, when the batch is larger than the sample: the chosen block size against
    one pass over the whole batch (as large as ``max_memory``, or the default budget,
    allows), timed once each on the batch itself: two extra calls, once per (fn, shape).
    A sample cannot show how a pass scales past its own size: on W2 (2 cores) blocks of
    2,048 measured best on the sample but ran at half the speed of one pass over the
    8,192 examples."""
    try:
        whole = fit_to_budget(
            replace(best, block=None), b=x.shape[0], m=m, n=n, act_bytes=_act_bytes(fn, x, probe, best),
            itemsize=x.element_size(),
            budget=max_memory if max_memory is not None else default_memory_budget(x.device), call=call,
        )
    except MemoryBudgetError:
        return best  # the call itself will say what does not fit
    if whole.block is not None and whole.block <= best.block:
        return best  # the budget allows no larger pass
    xs = x.detach()
    times = {}
    for c in (best, whole):
        try:
            times[c] = _time_strategy(fn, xs, c, probe.out_shape, call, runs=1)
        except (VectorizationError, RuntimeError):
            continue
        log.append((f"{c} on the whole batch of {xs.shape[0]}", times[c]))
    return min(times, key=times.get) if times else best


# --------------------------------------------------------------------------------------
# The functional API
# --------------------------------------------------------------------------------------


def _elementwise(fn: Callable, x: torch.Tensor, out_shape: tuple, key: tuple | None = None) -> str | None:
    """None when fn is provably elementwise on batches like x (NOTE [elementwise
    functions] in structure.py), else why not; cached like the probe (``key``: the
    call's, NOTE [one key per call])."""
    if tuple(out_shape) != tuple(x.shape[1:]):
        return f"its per-example output shape {tuple(out_shape)} is not its input shape {tuple(x.shape[1:])}"
    if _in_transform():
        return "inside a torch.func transform (it is not traced there)"
    key = key or _shape_key(fn, x)
    cached = _ELEMENTWISE.get(fn, key)
    if cached is None:
        reason = _structure.elementwise_reason(fn, x)
        cached = ("yes",) if reason is None else ("no", reason)
        _ELEMENTWISE.put(fn, key, cached)
    return None if cached[0] == "yes" else cached[1]


def _diagonal(fn: Callable, x: torch.Tensor, block: int | None, *, create_graph: bool, call: str,
              meter: _Meter | None = None) -> torch.Tensor:
    """(B, *in) diagonals of an elementwise fn's per-example Jacobians, block by block:
    one forward pass with ones (or, where the result must be differentiable, one reverse
    pass with ones, J^T 1, which is the same diagonal and records history)."""
    b = x.shape[0]
    step = b if block is None else max(1, min(block, b))
    pieces = []

    def reverse(xb: torch.Tensor) -> torch.Tensor:
        xd = xb if (create_graph and xb.requires_grad) else xb.detach().requires_grad_(True)
        with torch.enable_grad(), _Differentiating():
            y = _check_output(fn(xd), xd, call)
            (d,) = torch.autograd.grad(y, xd, torch.ones_like(y), create_graph=create_graph, allow_unused=True)
        return torch.zeros_like(xb) if d is None else d

    for b0 in range(0, b, step):
        xb = x[b0:b0 + step]
        if create_graph and not _in_transform():
            pieces.append(reverse(xb))
        else:
            try:
                with torch.set_grad_enabled(create_graph):
                    pieces.append(_structure.diagonal_block(fn, xb))
            except RuntimeError as err:
                if _in_transform() or isinstance(err, torch.OutOfMemoryError):
                    raise
                # fn cannot run under forward mode (NOTE [fn reading raw memory], an op
                # without a forward derivative): one reverse pass with ones, J^T 1, is the
                # same diagonal.
                pieces.append(reverse(xb))
        if meter is not None:
            meter(min(b, b0 + step) / b)
    d = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return d.to(x.dtype)  # x's dtype, as reverse mode's (fn may compute in another)


def _compiled_for(fn: Callable, x: torch.Tensor, s: Strategy, out_shape: tuple, call: str,
                  rows: int | None = None, key: tuple | None = None) -> tuple[_compiled.Compiled, torch.Tensor | None]:
    """The compiled block function of strategy ``s`` (NOTE [compiled blocks]), compiled
    and checked on first use, cached per (fn, fingerprint, shape, dtype, device, mode,
    chunk, and a static graph's block size ``rows``); a fallback's reason is cached too
    (no second try). Also returns the eager (rows, M, N) Jacobian of ``x[:rows]`` when
    the check computed it (a static graph's first block), else None."""
    dynamic = _compiled.dynamic_batch(s.mode)
    if rows is None:
        rows = min(s.block or x.shape[0], x.shape[0])
    key = (key or _shape_key(fn, x)) + (s.mode, s.chunk, None if dynamic else rows)
    hit = _COMPILED.get(fn, key)
    if hit is not None:
        return hit, None
    xp = x[:min(x.shape[0], PROBE_ROWS if dynamic else rows)].detach()
    if xp.shape[0] < _compiled.MIN_COMPILED_ROWS:
        return _compiled.Compiled(None, f"a block of {xp.shape[0]} row(s) runs eagerly"), None
    try:
        eager = _run(fn, xp, replace(s, compiled=False, block=None, vectorize=True), create_graph=False,
                     call=call, out_shape=out_shape)
    except (VectorizationError, RuntimeError) as err:
        c, eager = _compiled.Compiled(None, f"the eager check failed ({type(err).__name__})"), None
    else:
        eager = eager.reshape(xp.shape[0], math.prod(out_shape), math.prod(xp.shape[1:]))
        c = _compiled.compile_block(fn, s.mode, s.chunk, xp, eager)
    _COMPILED.put(fn, key, c)
    return c, (None if dynamic else eager)


def _compiled_broke(fn: Callable, x: torch.Tensor, s: Strategy, comp: _compiled.Compiled, rows: int,
                    err: Exception) -> None:
    """Forget a compiled graph that failed on a block (it runs eagerly from now on)."""
    key = _shape_key(fn, x) + (s.mode, s.chunk, comp.rows)
    _COMPILED.put(fn, key, _compiled.Compiled(
        None, f"the compiled graph failed on a block of {rows} rows ({type(err).__name__}: "
        f"{str(err).strip().splitlines()[0][:160] if str(err).strip() else ''})", comp.compile_s))


def compiled_status(fn: Callable, x: torch.Tensor, strategy: Strategy) -> str:
    """Internal: what happened to ``strategy``'s compiled graph for fn on batches like x
    ("compiled in ... s, checked ..." or "fell back to eager: <reason>"); compiles now
    if nothing was tried yet."""
    if not strategy.compiled:
        return "not a compiled strategy"
    probe = _probe(fn, x, "compiled_status(fn, x, strategy)")
    return _compiled_for(fn, x, strategy, probe.out_shape, "compiled_status(fn, x, strategy)")[0].status


def _given(fn: Callable, x: torch.Tensor, probe: _Probe, strategy: Strategy, max_memory: int | None,
           call: str) -> Strategy:
    """A strategy handed in (run_strategy, or batch_jacobian(strategy=...)): checked, and
    its chunk and block fitted to this process's memory budget as auto's choices are."""
    if not isinstance(strategy, Strategy):
        raise TypeError(f"{call}: strategy must be a distjac.kernels.Strategy, got {type(strategy).__name__}.")
    if strategy.mode not in STRATEGY_MODES:
        raise ValueError(f"{call}: strategy mode {strategy.mode!r} is not valid; use one of {STRATEGY_MODES}.")
    if strategy.mode == "chain":
        plan = chain_plan(fn, x, probe.out_shape, probe.key)
        if isinstance(plan, str):
            raise ValueError(f"{call}: the chain strategy does not apply: {plan}.")
        cap = _chain_cap(plan, x)
        if cap is not None and (strategy.block is None or strategy.block > cap):
            # NOTE [allocator ceiling] in chain.py (also for a choice made on a GPU)
            strategy = replace(strategy, block=cap)
    if strategy.mode == "diag":
        reason = _elementwise(fn, x, probe.out_shape, probe.key)
        if reason is not None:
            raise ValueError(f"{call}: the diag strategy needs a provably elementwise fn: {reason}.")
    budget = max_memory if max_memory is not None else default_memory_budget(x.device)
    b, n, m = x.shape[0], math.prod(x.shape[1:]), math.prod(probe.out_shape)
    if strategy.chunk is not None:
        return strategy
    fitted = fit_to_budget(
        strategy, b=b, m=m, n=n, act_bytes=_act_bytes(fn, x, probe, strategy), itemsize=x.element_size(),
        budget=budget, call=call,
    )
    return replace(fitted, record=strategy.record)


def run_strategy(
    fn: Callable, x: torch.Tensor, strategy: Strategy, *, max_memory: int | None = None,
    call: str = "run_strategy(fn, x, strategy)",
) -> torch.Tensor | None:
    """Internal (tests, benchmarks, workers): batch_jacobian(fn, x) computed by
    ``strategy``, e.g. ``Strategy("chain", block=128)`` or ``Strategy("rev",
    compiled=True)``, with its chunk and block fitted to the memory budget as auto's
    choices are. Same result as every mode. Equal to ``batch_jacobian(fn, x,
    strategy=strategy, max_memory=max_memory)``.

    Raises:
        ValueError: a chain strategy for a function that is not a chain of known layers
            (the message says which layer), a diag strategy for a function that is not
            provably elementwise, or an unknown strategy mode.
    """
    x, _, _ = check_functional_call(fn, x, "rev", "none", call)
    if x.shape[0] == 0:
        return batch_jacobian(fn, x, mode="rev")
    with _autograd_usable(x) as x:
        probe = _probe(fn, x, call)
        if not probe.connected:
            if _unconnected_everywhere(fn, x, call):
                return None
            probe = replace(probe, connected=True)
        s = _given(fn, x, probe, strategy, max_memory, call)
        return _run(fn, x, s, create_graph=result_is_differentiable(x), call=call, out_shape=probe.out_shape,
                    key=probe.key)


def _run(
    fn: Callable, x: torch.Tensor, s: Strategy, *, create_graph: bool, call: str,
    out_shape: tuple | None = None, meter: _Meter | None = None, key: tuple | None = None,
) -> torch.Tensor | None:
    """Run strategy ``s`` over the batch; (B, *out, *in), or None when unconnected.
    ``meter`` receives its progress (NOTE [progress within a call]); ``key``: the call's
    (NOTE [one key per call])."""
    b = x.shape[0]
    in_shape = tuple(x.shape[1:])
    n = math.prod(in_shape)
    block = b if s.block is None else max(1, min(s.block, b))
    out: torch.Tensor | None = None
    pieces: list[torch.Tensor] = []
    plan = None
    if s.mode == "diag":
        # Provably elementwise (checked by whoever chose it): the dense result is the
        # diagonal scattered into zeros.
        return _structure.dense_from_diagonal(_diagonal(fn, x, s.block, create_graph=create_graph, call=call,
                                                        meter=meter))
    comp = first = None
    unconnected_blocks, blocks = 0, -(-b // block)
    if s.compiled and s.mode in ("rev", "fwd") and not create_graph and not _in_transform():
        if out_shape is None:
            out_shape = _probe(fn, x, call).out_shape
        comp, first = _compiled_for(fn, x, s, out_shape, call, rows=block, key=key)
        comp = comp if comp.fn is not None else None
    if s.mode == "chain":
        assert out_shape is not None, "the chain strategy needs the probed output shape"
        plan = chain_plan(fn, x, out_shape, key)
        if isinstance(plan, str) or create_graph:
            # The chain computes no autograd history, and applies only to chains of known
            # layers: reverse mode gives the same result (a loop: the least memory).
            return _run(fn, x, Strategy("rev", vectorize=False, block=s.block), create_graph=create_graph,
                        call=call, out_shape=out_shape, meter=meter)
    for b0 in range(0, b, block):
        xb = x[b0:b0 + block]
        if meter is not None:
            meter.span(b0 / b, min(b, b0 + block) / b)
        jac_c = first if b0 == 0 else None  # a static graph's check computed block 0 eagerly
        if jac_c is None and comp is not None and _compiled.fits(comp, xb):
            try:
                jac_c = _compiled.run_compiled(comp, xb)
            except Exception as err:  # noqa: BLE001 - NOTE [compiled blocks]: eager from now on
                _compiled_broke(fn, x, s, comp, xb.shape[0], err)
                comp = None
        if jac_c is not None:
            jac = jac_c
            y_shape = tuple(out_shape)
            m = math.prod(y_shape)
            if out is None and block < b:
                out = _alloc.empty((b, m, n), dtype=x.dtype, device=x.device)
            if out is not None:
                out[b0:b0 + block].copy_(jac)
        elif plan is not None:
            y_shape = tuple(out_shape)
            m = math.prod(y_shape)
            if out is None and block < b:
                out = _alloc.empty((b, m, n), dtype=x.dtype, device=x.device)
            # Written straight into the result's rows (no copy of each block's result).
            jac = _chain.chain_jacobian(fn, plan, xb, out=None if out is None else out[b0:b0 + block])
        elif s.mode == "rev" and _in_transform():
            jac, y_shape = _reverse_block_func(fn, xb, chunk=s.chunk, vectorize=s.vectorize, call=call, tick=meter)
            m = math.prod(y_shape)
            if out is not None:
                out[b0:b0 + block].copy_(jac)
        elif s.mode == "rev":
            # With create_graph the graph must reach x itself when x requires grad; when it
            # does not (a tape records parameters only), a fresh leaf is as good.
            xd = xb if create_graph and xb.requires_grad else xb.detach().requires_grad_(True)
            with torch.enable_grad(), _Differentiating():
                y = _check_output(fn(xd), xd, call)
            y_shape = tuple(y.shape[1:])
            m = math.prod(y_shape)
            if out is None and not create_graph and block < b:
                out = _alloc.empty((b, m, n), dtype=x.dtype, device=x.device)
            jac = graph_batch_jacobian(
                y, xd, chunk=s.chunk, vectorize=s.vectorize, create_graph=create_graph,
                call=call, out=None if out is None else out[b0:b0 + block], tick=meter,
            )
            if jac is None:  # NOTE [connected somewhere]: this block's rows are zeros
                unconnected_blocks += 1
                if out is not None:
                    out[b0:b0 + block].zero_()
            else:
                jac = jac.flatten(1 + len(y_shape)).flatten(1, len(y_shape))  # (Bb, M, N), a view
        else:
            assert out_shape is not None, "forward mode needs the probed output shape"
            y_shape = out_shape
            m = math.prod(y_shape)
            # Forward mode records autograd history through whatever requires grad in fn
            # (a Module's parameters): not wanted unless the result must be differentiable.
            with torch.set_grad_enabled(create_graph):
                jac = _forward_block(fn, xb, m, y_shape, chunk=s.chunk, vectorize=s.vectorize, call=call,
                                     tick=meter)
            if out is None and not create_graph and block < b:
                out = _alloc.empty((b, m, n), dtype=x.dtype, device=x.device)
            if out is not None:
                out[b0:b0 + block].copy_(jac)
        if out is None:  # an unconnected block's zeros are made only if another block is connected
            pieces.append(xb.shape[0] if jac is None else jac)
        if meter is not None:
            meter(1.0)
    if unconnected_blocks == blocks:
        return None
    if out is not None:
        return out.view(b, *y_shape, *in_shape)
    pieces = [torch.zeros((p, m, n), dtype=x.dtype, device=x.device) if isinstance(p, int) else p for p in pieces]
    jac = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
    # x's dtype in every mode: reverse mode's gradients have it; forward mode's tangents
    # and a compiled graph's results have fn's output dtype (the blocked paths write
    # into a result of x's dtype).
    return jac.to(x.dtype).unflatten(2, in_shape).unflatten(1, y_shape)


def batch_jacobian(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    mode: str = "auto",
    parallel_iterations: int | None = None,
    experimental_use_pfor: bool = True,
    unconnected_gradients: str | UnconnectedGradients = "none",
    max_memory: int | None = None,
    check_independence: bool = False,
    structure: str | None = None,
    strategy: Strategy | None = None,
) -> torch.Tensor | None:
    """Per-example Jacobians of ``fn`` over the batch ``x``.

    ``fn`` maps a batch (B, x1..xm) to (B, y1..yn), and row i of its output must depend
    only on row i of its input (as TensorFlow's batch_jacobian assumes). ``fn`` is always
    called on batches (the whole batch or blocks of rows), never on one example, so
    Python control flow on the batch's values works in every mode. Every argument after
    ``x`` is keyword-only (as in :meth:`distjac.Engine.batch_jacobian`).

    Args:
        fn: the function; a torch.nn.Module works too.
        x: the batch, a floating tensor of rank >= 2 on any device.
        mode: "rev" (one pass per output element), "fwd" (one per input element) or
            "auto" (chosen from the per-example sizes, measured once per function and
            shape when they are close; equal to either explicit mode's result).
        parallel_iterations: rows (rev) or columns (fwd) per vectorized pass; None picks
            the most that fit the memory budget.
        experimental_use_pfor: True vectorizes with vmap; False runs one autograd pass per
            row (for functions vmap cannot handle).
        unconnected_gradients: "none" returns None when fn(x) does not depend on x;
            "zero" returns zeros of the full shape.
        max_memory: bytes the computation may use (default: half the device's free
            memory, or ``DISTJAC_MAX_MEMORY``); sets parallel_iterations and the block.
        check_independence: compare a few examples' Jacobians computed alone against the
            batched ones and check that no example's output depends on another example;
            raises CoupledExamplesError if so (BatchNorm in train mode, batch means...).
        structure: None (default) returns the dense Jacobians. "diagonal" returns only
            their diagonals, shape (B, x1..xm), for a fn that is provably elementwise
            (every operation on x pointwise, checked on a traced graph: NOTE
            [elementwise functions] in distjac/structure.py), in one forward pass;
            1/N of the dense bytes. A fn that is not provably elementwise, or whose
            output shape is not its input shape, raises OptionError saying why.
            (mode="auto" uses the same proof internally for the dense result.)
        strategy: internal: a :class:`Strategy` chosen earlier (by
            :func:`choose_strategy`, on the driver or another worker) to run instead
            of choosing one; mode, parallel_iterations and experimental_use_pfor are
            then not consulted, and its chunk and block are fitted to max_memory.

    Returns:
        A tensor of shape (B, y1..yn, x1..xm) and x's dtype, or None (see
        unconnected_gradients). It may be a non-contiguous view; differentiable when
        ``x.requires_grad`` (so batch_jacobian composes with itself for higher orders)
        or a GradientTape is recording, in every mode; otherwise it has no autograd
        history, even when fn's parameters require grad.

    Raises:
        ShapeError, DtypeError, OptionError: bad input, before any work is done.
        VectorizationError: vmap cannot handle fn; pass experimental_use_pfor=False
            (mode="auto" takes the row loop by itself: NOTE [vmap fallback]).
        MemoryBudgetError: the result does not fit max_memory.
        CoupledExamplesError: with check_independence=True, examples are coupled.

    Example:
        >>> x = torch.tensor([[4.0, 2.0], [1.0, 3.0]])
        >>> batch_jacobian(lambda x: x * x * x, x)
        tensor([[[48.,  0.],
                 [ 0., 12.]],
        <BLANKLINE>
                [[ 3.,  0.],
                 [ 0., 27.]]])

    Note:
        Memory grows with parallel_iterations: a vectorized pass holds that many copies
        of the per-row intermediate values. Lower it (or max_memory) if a pass runs out
        of memory; the result itself needs B*M*N elements.
    """
    with _autograd_usable(x) as x:
        args = (fn, x, mode, parallel_iterations, experimental_use_pfor, unconnected_gradients, max_memory,
                check_independence, structure, strategy)
        callback = _PROGRESS_TO.get()
        if callback is None:
            return _batch_jacobian(*args, None)
        token = _PROGRESS_TO.set(None)  # the calls fn itself makes report nothing
        try:
            return _batch_jacobian(*args, _Meter(callback))
        finally:
            _PROGRESS_TO.reset(token)


@contextlib.contextmanager
def _autograd_usable(x):
    """NOTE [inference mode]: autograd records nothing in ``torch.inference_mode()``, so
    every output would look unconnected (None, or zeros) and the probe would cache that
    for later calls. The public entry points (batch_jacobian, choose_strategy,
    run_strategy) run with inference mode off and grad mode as it was (off, under
    inference mode: the result is not differentiable), on a normal copy of an inference
    tensor x. Yields the x to use."""
    if not isinstance(x, torch.Tensor) or not (torch.is_inference_mode_enabled() or x.is_inference()):
        yield x
        return
    grad = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        yield x.clone() if x.is_inference() else x


def _batch_jacobian(fn, x, mode, parallel_iterations, experimental_use_pfor, unconnected_gradients, max_memory,
                    check_independence, structure, strategy, meter: _Meter | None):
    call = "batch_jacobian(fn, x)"
    x, mode, unconnected = check_functional_call(fn, x, mode, unconnected_gradients, call)
    check_positive_int(parallel_iterations, "parallel_iterations", call)
    if max_memory is not None:
        check_positive_int(max_memory, "max_memory", call, allow_none=False)
    create_graph = result_is_differentiable(x)
    if structure not in _structure.STRUCTURES:
        raise OptionError(f"{call}: structure={structure!r} is not valid; use None (dense) or 'diagonal'.")
    if structure == "diagonal":
        return _diagonal_result(fn, x, unconnected, create_graph, call, meter)

    if x.shape[0] == 0:
        with torch.enable_grad():
            y = _check_output(fn(x), x, call)
        return torch.zeros((0, *y.shape[1:], *x.shape[1:]), dtype=x.dtype, device=x.device)

    explicit_rev = strategy is None and mode == "rev" and (parallel_iterations is not None or not experimental_use_pfor)
    if explicit_rev and not check_independence and unconnected is UnconnectedGradients.NONE:
        # Nothing to learn about fn beforehand: run straight on the graph.
        s = Strategy("rev", vectorize=experimental_use_pfor, chunk=parallel_iterations)
        return _run(fn, x, s, create_graph=create_graph, call=call, meter=meter)

    probe = _probe(fn, x, call)
    def unconnected_result():  # allocated only when asked for: it is as large as the result
        if unconnected is UnconnectedGradients.NONE:
            return None
        return torch.zeros((x.shape[0], *probe.out_shape, *x.shape[1:]), dtype=x.dtype, device=x.device)

    if not probe.connected:
        if _unconnected_everywhere(fn, x, call):
            return unconnected_result()
        probe = replace(probe, connected=True)  # NOTE [connected somewhere]: for this call only
    if strategy is not None:
        s = _given(fn, x, probe, strategy, max_memory, call)
        jac = _run(fn, x, s, create_graph=create_graph, call=call, out_shape=probe.out_shape, meter=meter,
                   key=probe.key)
        return unconnected_result() if jac is None else jac
    s = _choose(fn, x, probe, mode, parallel_iterations, experimental_use_pfor, max_memory, call, count=True)
    for attempt in range(3):  # auto: forward mode, then a vectorized reverse pass, may fail
        try:
            jac = _run(fn, x, s, create_graph=create_graph, call=call, out_shape=probe.out_shape, meter=meter,
                       key=probe.key)
            break
        except RuntimeError as err:
            if mode != "auto" or isinstance(err, torch.OutOfMemoryError) or attempt == 2:
                raise
            if s.mode in ("fwd", "diag"):
                # fn cannot run under forward mode (in-place updates of buffers, a tape
                # inside fn, kernels without forward derivatives, NOTE [fn reading raw
                # memory]): reverse mode gives the same result. Remembered, so the next
                # call goes straight there (no diagonal either: it is forward mode).
                _FWD_FAILED.put(fn, probe.key, True)
            elif s.mode == "rev" and s.vectorize and isinstance(err, VectorizationError):
                # NOTE [vmap fallback]: the batched backward failed (an op without a vmap
                # rule, or one whose batched double backward PyTorch cannot do: GroupNorm
                # when the result must be differentiable); a row loop gives the same result.
                _VMAP_FAILED.put(fn, _vmap_key(probe, x), True)
            else:
                raise
            s = _choose(fn, x, probe, mode, parallel_iterations, experimental_use_pfor, max_memory, call)
    if jac is None:
        return unconnected_result()
    if check_independence:
        _check_independence(fn, x, jac, s, call)
    return jac


def _diagonal_result(fn: Callable, x: torch.Tensor, unconnected, create_graph: bool, call: str,
                     meter: _Meter | None = None):
    """batch_jacobian(..., structure="diagonal"): (B, *in) diagonals, or why not."""
    call = f"{call} with structure='diagonal'"
    if x.shape[0] == 0:
        with torch.enable_grad():
            y = _check_output(fn(x), x, call)
        if tuple(y.shape[1:]) != tuple(x.shape[1:]):
            raise OptionError(f"{call}: fn's per-example output shape {tuple(y.shape[1:])} is not its input shape "
                              f"{tuple(x.shape[1:])}, so its Jacobian is not square; leave structure=None.")
        return torch.zeros_like(x)
    probe = _probe(fn, x, call)
    if (not probe.connected and tuple(probe.out_shape) == tuple(x.shape[1:])
            and _unconnected_everywhere(fn, x, call)):
        return None if unconnected is UnconnectedGradients.NONE else torch.zeros_like(x)
    reason = _elementwise(fn, x, probe.out_shape)
    if reason is not None:
        raise OptionError(
            f"{call}: fn is not provably elementwise ({reason}), so its Jacobian is not known to be "
            "diagonal. Leave structure=None for the dense Jacobian."
        )
    return _diagonal(fn, x, None, create_graph=create_graph, call=call, meter=meter)


_COUPLED_ADVICE = (
    " fn couples the examples of the batch (BatchNorm in train mode, a mean or softmax over "
    "the batch axis, ...), so per-example Jacobians are not defined; TensorFlow silently sums "
    "the cross-example terms (TF issue #38428). Put the model in eval mode (model.eval()) or "
    "remove operations across the batch axis."
)


def _check_independence(fn: Callable, x: torch.Tensor, jac: torch.Tensor, s: Strategy, call: str) -> None:
    """Raise CoupledExamplesError if examples of the batch influence each other.

    Two checks on up to three examples (first, middle, last): (1) the example's Jacobian
    computed alone (a batch of one) equals its row of the batched result; (2) a reverse
    pass with a random cotangent on that example alone reaches no other example's input.
    """
    b = x.shape[0]
    if b < 2:
        return
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(x.dtype, 3e-2)
    with torch.no_grad():
        scale = jac.abs().nan_to_num(nan=0.0, posinf=0.0).max().item() if jac.numel() else 0.0
    atol = tol * max(1.0, scale)
    for i in sorted({0, b // 2, b - 1}):
        # (2) first: a cotangent on example i alone must not reach any other example.
        xd = x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = fn(xd)
        if y.requires_grad:
            v = torch.zeros_like(y)
            v[i] = torch.randn_like(y[i])
            (g,) = torch.autograd.grad(y, xd, v, allow_unused=True)
            others = torch.cat([g[:i], g[i + 1:]]).abs().max().item() if g is not None else 0.0
            if others > atol:
                raise CoupledExamplesError(
                    f"{call} with check_independence=True: the output of example {i} depends on "
                    f"other examples' inputs (gradient magnitude {others:.3g} outside row {i})."
                    + _COUPLED_ADVICE
                )
        # (1) the example alone gives the same Jacobian as its row of the batch.
        try:
            alone = _run(fn, x[i:i + 1].detach(), replace(s, block=None), create_graph=False,
                         call=call, out_shape=tuple(jac.shape[1:1 + jac.dim() - x.dim()]))
        except Exception:  # noqa: BLE001 - fn may legitimately need more than one example
            continue
        batched = jac[i:i + 1].detach()
        alone = torch.zeros_like(batched) if alone is None else alone
        same = torch.isclose(alone, batched, rtol=0.0, atol=atol, equal_nan=True)
        if not bool(same.all()):
            diff = (alone - batched).abs().nan_to_num(nan=float("inf")).max().item()
            raise CoupledExamplesError(
                f"{call} with check_independence=True: example {i}'s Jacobian computed alone "
                f"differs from its row of the batched result (max abs difference {diff:.3g})."
                + _COUPLED_ADVICE
            )
