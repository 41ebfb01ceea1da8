"""Matrix-free per-example estimates of a Jacobian: norms, trace and sketches from JVPs
and VJPs only, never building J (docs/estimates.md).

``distjac.estimate``, ``distjac.sketch`` and ``distjac.Estimate`` are this module's; the
jobs' side (``check_estimates``, ``estimate_block``, ``estimate_columns``) is imported from
``distjac.estimates``. (The module is plural so that importing it never shadows the
function ``distjac.estimate``.)

Each example's Jacobian is read as an M x N matrix, M = prod(out), N = prod(in), both
flattened in C order, as :mod:`distjac.reduce` reads it, so an estimate estimates exactly
the reduction of the same name.

NOTE [probes and reproducibility]
The random vectors of example i depend only on (seed, the estimate, i's *global* row id,
the probe's index), never on the batch around it: ``row_offset`` (or ``rows``) gives the
ids, so a shard [start, stop) computed with ``row_offset=start`` draws exactly the probes
the whole batch would draw for those rows, and a shard recomputed after a failure draws
the same bits again. The generator is a counter-based hash (no state, no torch.Generator):
32-bit words from ``lowbias32`` (Chris Wellons' integer hash) of the seed, a stream number
per use, the row id and the element's counter, in int64 arithmetic that never overflows,
on the tensor's own device. Rademacher entries take one bit of a word; Gaussian ones come
from two words by Box-Muller (in float64, then cast).

NOTE [the sketch matrix]
A sketch uses one R for every example (so sketches of different examples are comparable):
``sketch_matrix(shape, k, seed)``, entries i.i.d. standard normal N(0, 1), not scaled
(divide the sketch by sqrt(k) for a Johnson-Lindenstrauss embedding: E[S S^T] = k J J^T).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import jvp, vjp, vmap

from .errors import ConfigError, OptionError, ShapeError
from .kernels import _captured_mutation_error, _check_output, _probe, _raw_memory_error
from .options import check_functional_call, check_int, check_positive_int, is_int

__all__ = [
    "DISTRIBUTIONS",
    "ESTIMATES",
    "Estimate",
    "check_estimates",
    "estimate",
    "estimate_block",
    "estimate_columns",
    "estimate_products",
    "probe_vectors",
    "sketch",
    "sketch_matrix",
]

ESTIMATES = ("frobenius", "spectral", "trace")
DISTRIBUTIONS = ("rademacher", "gaussian")
VARIANCE_REDUCTIONS = (None, "hutch++")
SIDES = ("right", "left")
DEFAULT_PROBES = 8
DEFAULT_ITERS = 20

# One stream number per use of random numbers, so two uses never share a probe.
_STREAMS = {"frobenius": 1, "trace": 2, "spectral": 3, "hutch++/S": 4, "hutch++/G": 5, "sketch": 6}


@dataclass(frozen=True, eq=False)
class Estimate:
    """A per-example estimate: ``value`` and its ``stderr``, tensors of shape (B,).

    Attributes:
        value: the estimate of each example's quantity (for "frobenius", the norm itself).
        stderr: its error bar; what it means depends on ``kind`` (docs/estimates.md):
            frobenius and trace, the standard error from the probes' spread (NaN with one
            probe); spectral, the error still left after the last power iteration,
            extrapolated from the last two changes of the estimate (the value itself is a
            lower bound of the true norm; NaN after one iteration).
        kind: "frobenius", "spectral" or "trace".
        products: Jacobian-vector products (JVPs plus VJPs) spent per example.
    """

    value: torch.Tensor
    stderr: torch.Tensor
    kind: str
    products: int

    def __repr__(self) -> str:
        return f"Estimate(kind={self.kind!r}, products={self.products}, value={self.value}, stderr={self.stderr})"


# --------------------------------------------------------------------------------------
# The counter-based generator (NOTE [probes and reproducibility])
# --------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2**32 for x in [0, 2**32) (an int or an int64 tensor) without overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """lowbias32: a bijection of [0, 2**32) with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _row_keys(seed: int, stream: int, rows: torch.Tensor) -> torch.Tensor:
    k = _mix32((seed & _M32) ^ _mix32(((seed >> 32) & _M32) ^ _mix32(stream * 0x9E3779B9 & _M32)))
    r = rows.to(torch.int64)
    return _mix32(_mix32(k ^ (r & _M32)) ^ ((r >> 32) & _M32))


def _words(seed: int, stream: int, rows: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """32-bit words (int64 tensor (B, count)) number start..start+count-1 of each row."""
    c = torch.arange(start, start + count, dtype=torch.int64, device=rows.device)
    ctr = _mix32(_mix32(c & _M32) ^ ((c >> 32) & _M32))
    return _mix32(_mix32(_row_keys(seed, stream, rows)[:, None] ^ ctr[None, :]))


def _draw(distribution: str, seed: int, stream: int, rows: torch.Tensor, start: int, count: int,
          dtype: torch.dtype) -> torch.Tensor:
    w = _words(seed, stream, rows, start, count)
    if distribution == "rademacher":
        return ((w >> 31) * 2 - 1).to(dtype)
    w2 = _mix32(w ^ 0x5851F42D)
    u1 = ((w >> 8).to(torch.float64) + 0.5) * 2.0 ** -24  # in (0, 1)
    u2 = (w2 >> 8).to(torch.float64) * 2.0 ** -24
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype)


def probe_vectors(n: int, probes: int | range, *, rows: torch.Tensor, seed: int = 0, use: str = "frobenius",
                  distribution: str = "rademacher", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The random probes an estimate draws: (len(probes), B, n), probe p of row ``rows[b]``.

    ``use`` is the estimate ("frobenius", "trace", "spectral", "hutch++/S", "hutch++/G");
    ``probes`` a count or a range of probe indices. Exposed so tests and users can check
    what was drawn; every estimate goes through it.
    """
    idx = range(probes) if is_int(probes) else probes
    out = [_draw(distribution, seed, _STREAMS[use], rows, p * n, n, dtype) for p in idx]
    if not out:
        return torch.zeros((0, rows.shape[0], n), dtype=dtype, device=rows.device)
    return torch.stack(out)


def sketch_matrix(shape: Sequence[int], k: int, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The R of :func:`sketch`: shape (*shape, k), entries i.i.d. N(0, 1), the same for
    every example; ``shape`` is the per-example input shape (side="right") or output shape
    (side="left"). Entry [e..., j] is word (flat index of e) * k + j of the seed's sketch
    stream (NOTE [probes and reproducibility]).
    """
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    rows = torch.zeros(1, dtype=torch.int64, device=device)
    return _draw("gaussian", _check_seed(seed, "sketch_matrix"), _STREAMS["sketch"], rows, 0, n * k,
                 dtype).reshape(*shape, k)


# --------------------------------------------------------------------------------------
# Products with J, vectorized over probes where vmap can, looped where it cannot
# --------------------------------------------------------------------------------------


class _Products:
    """J v and J^T u for one block of examples: tangents (C, B, *in) -> (C, B, *out), and
    cotangents (C, B, *out) -> (C, B, *in); ``chunk`` of them per vmap pass."""

    def __init__(self, fn: Callable, x: torch.Tensor, chunk: int | None, vectorize: bool, call: str):
        self.fn, self.x, self.chunk, self.vectorize, self.call = fn, x, chunk, vectorize, call
        self._pull = None
        self.y: torch.Tensor | None = None

    def _apply(self, f: Callable, v: torch.Tensor) -> torch.Tensor:
        c = v.shape[0]
        step = self.chunk or c
        parts = []
        for i in range(0, c, step):
            vi = v[i:i + step]
            if self.vectorize:
                try:
                    parts.append(vmap(f)(vi))
                    continue
                except torch.OutOfMemoryError:
                    raise
                except RuntimeError:
                    # vmap cannot run fn (data-dependent control flow, an op without a batching
                    # rule): one product per pass from now on, the same numbers.
                    self.vectorize = False
            parts.append(torch.stack([f(t) for t in vi]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def forward(self, tangents: torch.Tensor) -> torch.Tensor:
        def push(t: torch.Tensor) -> torch.Tensor:
            y, y_dot = jvp(self.fn, (self.x,), (t,))
            return y_dot

        # The probe (kernels._probe) has checked fn's output rank and dtype on a few rows;
        # the batch size is checked here, on the products themselves (no extra forward pass).
        out = self._apply(push, tangents)
        if out.dim() < 2 or out.shape[1] != self.x.shape[0]:
            raise ShapeError(f"{self.call}: fn returned a batch of {out.shape[1] if out.dim() > 1 else '?'} rows for "
                             f"{self.x.shape[0]} input rows; row i of fn's output must depend only on row i of x.")
        return out

    def reverse(self, cotangents: torch.Tensor) -> torch.Tensor:
        return self._apply(lambda u: self.pullback(u), cotangents)

    def pullback(self, u: torch.Tensor) -> torch.Tensor:
        if self._pull is None:
            self.linearize()
        return self._pull(u)[0]

    def linearize(self) -> torch.Tensor:
        if self._pull is None:
            y, self._pull = vjp(self.fn, self.x)
            self.y = _check_output(y, self.x, self.call)
        return self.y


def _sq_norms(t: torch.Tensor, dims: int) -> torch.Tensor:
    """Squared norms over the last ``dims`` dimensions, accumulated in float32 at least."""
    t = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    return t.reshape(*t.shape[: t.dim() - dims], -1).square().sum(-1)


def _dots(a: torch.Tensor, b: torch.Tensor, dims: int) -> torch.Tensor:
    a = a.float() if a.dtype in (torch.float16, torch.bfloat16) else a
    b = b.float() if b.dtype in (torch.float16, torch.bfloat16) else b
    return (a.reshape(*a.shape[: a.dim() - dims], -1) * b.reshape(*b.shape[: b.dim() - dims], -1)).sum(-1)


def _mean_and_stderr(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """samples (P, B) -> mean (B,) and the standard error of the mean (NaN for P == 1)."""
    p = samples.shape[0]
    # Each row's probes contiguous: a reduction over the contiguous last dimension treats
    # every row alike, whatever the batch (over dim 0 the order depends on B's vector tail).
    per_row = samples.t().contiguous()
    mean = per_row.mean(1)
    if p < 2:
        return mean, torch.full_like(mean, math.nan)
    return mean, per_row.std(1, correction=1) / math.sqrt(p)


@contextlib.contextmanager
def _plain_tensors_needed(call: str, what: str):
    """NOTE [fn reading raw memory] in distjac.kernels, and fn updating a tensor it holds:
    their clear errors, for estimates and sketches (their products run fn under torch.func
    in every mode)."""
    try:
        yield
    except RuntimeError as err:
        clear = _raw_memory_error(err, call, what) or _captured_mutation_error(err, call, what)
        if clear is None:
            raise
        raise clear from err


def _fwd_failed(err: Exception) -> bool:
    return isinstance(err, (RuntimeError, NotImplementedError)) and not isinstance(err, torch.OutOfMemoryError)


# --------------------------------------------------------------------------------------
# The estimates, on one block of examples
# --------------------------------------------------------------------------------------


def _frobenius(ops: _Products, rows, n, m, in_nd, out_nd, *, probes, seed, distribution, mode):
    x = ops.x
    use_fwd = mode == "fwd" or (mode == "auto" and n <= m)
    if use_fwd:
        v = probe_vectors(n, probes, rows=rows, seed=seed, distribution=distribution, dtype=x.dtype)
        try:
            jv = ops.forward(v.reshape(probes, x.shape[0], *x.shape[1:]))
            samples = _sq_norms(jv, out_nd)
        except Exception as err:
            if mode == "fwd" or not _fwd_failed(err):
                raise
            use_fwd = False  # auto: an op without forward-mode derivative; reverse products instead
    if not use_fwd:
        y = ops.linearize()
        u = probe_vectors(m, probes, rows=rows, seed=seed, distribution=distribution, dtype=y.dtype)
        jtu = ops.reverse(u.reshape(probes, *y.shape))
        samples = _sq_norms(jtu, in_nd)
    mean, se = _mean_and_stderr(samples)
    value = mean.clamp_min(0).sqrt()
    # delta method: d sqrt(m) = dm / (2 sqrt(m)); all probes 0 means J v = 0 for every v drawn
    stderr = torch.where(value > 0, se / (2 * value), torch.zeros_like(se))
    return value, stderr, probes + (0 if use_fwd else 1)


def _matvec(ops: _Products, v: torch.Tensor, use_fwd: bool) -> torch.Tensor:
    """A v for per-row vectors v (C, B, N) of a square J: J v (fwd) or (v^T J)^T (rev)."""
    x = ops.x
    c, b = v.shape[0], v.shape[1]
    if use_fwd:
        return ops.forward(v.reshape(c, b, *x.shape[1:])).reshape(c, b, -1)
    y = ops.linearize()
    return ops.reverse(v.reshape(c, *y.shape)).reshape(c, b, -1)


def _trace(ops: _Products, rows, n, m, in_nd, out_nd, *, probes, seed, distribution, mode, variance_reduction):
    x = ops.x
    use_fwd = mode in ("fwd", "auto")
    try:
        return _trace_with(ops, rows, n, x, probes, seed, distribution, use_fwd, variance_reduction)
    except Exception as err:
        if mode != "auto" or not _fwd_failed(err):
            raise
    return _trace_with(ops, rows, n, x, probes, seed, distribution, False, variance_reduction)


def _trace_with(ops, rows, n, x, probes, seed, distribution, use_fwd, variance_reduction):
    extra = 0 if use_fwd else 1
    if variance_reduction is None:
        v = probe_vectors(n, probes, rows=rows, seed=seed, use="trace", distribution=distribution, dtype=x.dtype)
        samples = _dots(v, _matvec(ops, v, use_fwd), 1)
        value, stderr = _mean_and_stderr(samples)
        return value, stderr, probes + extra
    # Hutch++ (Meyer, Musco, Musco & Woodruff 2021): tr(A) = tr(Q^T A Q) + tr((I-QQ^T) A (I-QQ^T)),
    # Q an orthonormal basis of A S; the second term by Hutchinson on G - Q Q^T G. Unbiased for
    # any square A given Q, so its standard error is the residual probes' alone.
    k1 = probes // 3
    k2 = probes - 2 * k1
    s = probe_vectors(n, k1, rows=rows, seed=seed, use="hutch++/S", distribution=distribution, dtype=x.dtype)
    a_s = _matvec(ops, s, use_fwd)  # (k1, B, N)
    q = torch.linalg.qr(a_s.permute(1, 2, 0)).Q  # (B, N, k1)
    qt = q.permute(2, 0, 1)  # (k1, B, N)
    a_q = _matvec(ops, qt.contiguous(), use_fwd)
    top = _dots(qt, a_q, 1).t().contiguous().sum(1)  # tr(Q^T A Q), (B,); rows contiguous as above
    g = probe_vectors(n, k2, rows=rows, seed=seed, use="hutch++/G", distribution=distribution, dtype=x.dtype)
    g = g - torch.einsum("bnk,cbk->cbn", q, torch.einsum("bnk,cbn->cbk", q, g))  # (I - QQ^T) G
    samples = _dots(g, _matvec(ops, g, use_fwd), 1)
    rest, stderr = _mean_and_stderr(samples)
    return top + rest, stderr, 2 * k1 + k2 + extra


def _spectral(ops: _Products, rows, n, m, in_nd, out_nd, *, iters, tol, seed):
    """Power iteration on J^T J: sigma_k = sqrt(||J^T J v_k||) for unit v_k, nondecreasing and
    at most the top singular value. stderr: the remaining error extrapolated from each row's
    last two changes (geometric convergence, Aitken): d_k * r / (1 - r), r = d_k / d_(k-1)
    (capped at 0.999); after two iterations the last change d_2; NaN after one."""
    x = ops.x
    b = x.shape[0]
    y = ops.linearize()
    acc = _acc(x.dtype)
    v = probe_vectors(n, 1, rows=rows, seed=seed, use="spectral", distribution="gaussian", dtype=x.dtype)[0]
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    nan = torch.full((b,), math.nan, dtype=acc, device=x.device)
    sigma = torch.zeros(b, dtype=acc, device=x.device)
    last, err = nan.clone(), nan.clone()  # the last change, the error bar
    active = torch.ones(b, dtype=torch.bool, device=x.device)
    done = 0
    for it in range(iters):
        jv = ops.forward(v.reshape(1, *x.shape))[0]
        w = ops.pullback(jv.reshape(y.shape)).reshape(b, n)
        wn = torch.linalg.vector_norm(w.to(acc), dim=1)
        new = wn.sqrt()
        step = (new - sigma).abs() if it > 0 else nan
        if it >= 2:
            r = torch.where(last > 0, step / last, torch.zeros_like(step)).clamp(0, 0.999)
            bar = step * r / (1 - r)
        else:
            bar = step
        sigma = torch.where(active, new, sigma)
        last = torch.where(active, step, last)
        err = torch.where(active, bar, err)
        unit = w / wn.clamp_min(torch.finfo(acc).tiny).to(w.dtype)[:, None]
        v = torch.where(active[:, None] & (wn[:, None] > 0), unit, v)
        done = it + 1
        if tol is not None and it >= 2:
            active = active & ~(bar <= tol * new)
            if not bool(active.any()):
                break
    return sigma, err, 2 * done + 1


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def _check_seed(seed: Any, call: str) -> int:
    if not is_int(seed) or not 0 <= seed < 2**64:
        raise OptionError(f"{call}: seed={seed!r} is not valid; use an integer in [0, 2**64).")
    return seed


def _row_ids(rows: Any, row_offset: Any, b: int, device: torch.device, call: str) -> torch.Tensor:
    if rows is None:
        check_int(row_offset, "row_offset", call, minimum=0, allow_none=False)
        return torch.arange(row_offset, row_offset + b, dtype=torch.int64, device=device)
    if row_offset != 0:
        raise OptionError(f"{call}: give rows= or row_offset=, not both.")
    ids = torch.as_tensor(rows)
    if ids.dim() != 1 or ids.shape[0] != b or ids.is_floating_point() or ids.dtype == torch.bool:
        raise OptionError(f"{call}: rows must be {b} integer row ids (one per example of x), "
                          f"got {tuple(ids.shape)} of {ids.dtype}.")
    if ids.numel() and int(ids.min()) < 0:
        raise OptionError(f"{call}: rows must be >= 0 (global row ids), got {int(ids.min())}.")
    return ids.to(device=device, dtype=torch.int64)


def _check_choice(value: Any, name: str, choices: Sequence, call: str) -> Any:
    if value not in choices:
        raise OptionError(f"{call}: {name}={value!r} is not valid; use one of "
                          f"{', '.join(repr(c) for c in choices)}.")
    return value


def _check_tol(tol: Any, call: str) -> float | None:
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (tol > 0 and math.isfinite(tol)):
        raise OptionError(f"{call}: tol={tol!r} is not valid; use None (run all iters) or a number > 0, "
                          f"e.g. 1e-4 (relative change of the estimate between two iterations).")
    return float(tol)


def _not_square(n: int, m: int, out_shape, in_shape, call: str, exc=ShapeError):
    return exc(f"{call}: 'trace' needs a square per-example Jacobian, but it is {m} x {n} (output "
               f"{tuple(out_shape)}, input {tuple(in_shape)}). Use 'frobenius' or 'spectral', or a model "
               f"whose output has as many elements as its input.")


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def estimate(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    kind: str,
    *,
    probes: int = DEFAULT_PROBES,
    iters: int = DEFAULT_ITERS,
    tol: float | None = None,
    seed: int = 0,
    row_offset: int = 0,
    rows: Sequence[int] | torch.Tensor | None = None,
    distribution: str = "rademacher",
    variance_reduction: str | None = None,
    mode: str = "auto",
    parallel_iterations: int | None = None,
    experimental_use_pfor: bool = True,
    block: int | None = None,
) -> Estimate:
    """A matrix-free estimate of one quantity of each example's Jacobian, from JVPs and
    VJPs only (J is never built).

    Args:
        fn: maps a batch (B, *in) to (B, *out); row i of the output depends only on row i
            of the input. Always called on batches. An nn.Module works too.
        x: the batch, a floating tensor of rank >= 2 on any device.
        kind: "frobenius" (the norm ||J||_F, by Hutchinson: E||J v||^2 = ||J||_F^2 over
            ``probes`` random v, forward products when N <= M, else reverse ones
            ||J^T u||^2), "spectral" (the largest singular value, by ``iters`` steps of
            power iteration on J^T J), or "trace" (of a square J, M == N, by Hutchinson
            E[v^T J v]).
        probes: random vectors per example (frobenius, trace).
        iters: power iterations (spectral); with ``tol``, the most.
        tol: spectral only: a row stops once its error bar (stderr) is <= tol * estimate.
        seed: the random probes' seed (NOTE [probes and reproducibility]).
        row_offset: the global row id of x[0]; the probes of x[i] depend only on (seed,
            row_offset + i), so a shard [start, stop) with ``row_offset=start`` gets the
            whole batch's bits for its rows.
        rows: instead of row_offset, one global row id per example.
        distribution: "rademacher" (+-1, the lower-variance default) or "gaussian".
        variance_reduction: trace only: None or "hutch++" (a third of the probes sketch
            J's range, which is then deflated exactly; needs probes >= 3).
        mode: "auto", "fwd" or "rev": the products frobenius and trace use ("auto" picks
            by shape for frobenius, forward for trace, and falls back to reverse where fn
            has no forward-mode derivative).
        parallel_iterations: probes per vectorized (vmap) pass; None: all at once.
        experimental_use_pfor: False runs one product per pass (also the automatic
            fallback where vmap cannot run fn).
        block: examples per call of fn (None: the whole batch); bounds memory.

    Returns:
        An :class:`Estimate` with ``value`` and ``stderr`` of shape (B,) on x's device,
        x's dtype (float32 for half precision), without autograd history.

    Raises:
        ShapeError, DtypeError, OptionError: bad input, before any work is done;
        ShapeError also for "trace" of a non-square Jacobian.

    Example:
        >>> x = torch.tensor([[4.0, 2.0], [1.0, 3.0]])
        >>> est = estimate(lambda t: t * t * t, x, "trace", probes=4)
        >>> est.value, est.stderr  # diagonal J with Rademacher probes: exact
        (tensor([60., 30.]), tensor([0., 0.]))
    """
    call = f"distjac.estimate(fn, x, {kind!r})"
    x, mode, _ = check_functional_call(fn, x, mode, "none", call)
    _check_choice(kind, "kind", ESTIMATES, call)
    check_positive_int(probes, "probes", call, allow_none=False)
    check_positive_int(iters, "iters", call, allow_none=False)
    check_positive_int(parallel_iterations, "parallel_iterations", call)
    check_positive_int(block, "block", call)
    tol = _check_tol(tol, call)
    _check_seed(seed, call)
    _check_choice(distribution, "distribution", DISTRIBUTIONS, call)
    _check_choice(variance_reduction, "variance_reduction", VARIANCE_REDUCTIONS, call)
    if not isinstance(experimental_use_pfor, bool):
        raise OptionError(f"{call}: experimental_use_pfor={experimental_use_pfor!r} is not valid; use True or False.")
    wrong = []
    if kind == "spectral":
        wrong += ["probes"] * (probes != DEFAULT_PROBES) + ["distribution"] * (distribution != "rademacher")
        wrong += ["mode"] * (mode != "auto")
    else:
        wrong += ["iters"] * (iters != DEFAULT_ITERS) + ["tol"] * (tol is not None)
    if kind != "trace" and variance_reduction is not None:
        wrong.append("variance_reduction")
    if wrong:
        raise OptionError(f"{call}: {', '.join(wrong)} do(es) not apply to {kind!r}; {kind!r} takes "
                          f"{', '.join(_OPTIONS[kind])}.")
    if variance_reduction == "hutch++" and probes < 3:
        raise OptionError(f"{call}: variance_reduction='hutch++' needs probes >= 3 (a third sketch J's range, "
                          f"a third deflate it, the rest estimate what is left); got probes={probes}.")
    ids = _row_ids(rows, row_offset, x.shape[0], x.device, call)
    in_shape = tuple(x.shape[1:])
    n = math.prod(in_shape)
    b = x.shape[0]
    acc = _acc(x.dtype)
    if b == 0:
        empty = torch.zeros(0, dtype=acc, device=x.device)
        return Estimate(empty, empty.clone(), kind, 0)
    out_shape = _probe(fn, x, call).out_shape
    m = math.prod(out_shape)
    if kind == "trace" and m != n:
        raise _not_square(n, m, out_shape, in_shape, call)
    values, errs, products = [], [], 0
    step = block or b
    with _plain_tensors_needed(call, "each Jacobian-vector product"), torch.no_grad():
        for s0 in range(0, b, step):
            xb = x[s0:s0 + step].detach()
            ops = _Products(fn, xb, parallel_iterations, experimental_use_pfor, call)
            rb = ids[s0:s0 + step]
            if kind == "frobenius":
                v, e, products = _frobenius(ops, rb, n, m, len(in_shape), len(out_shape), probes=probes, seed=seed,
                                            distribution=distribution, mode=mode)
            elif kind == "trace":
                v, e, products = _trace(ops, rb, n, m, len(in_shape), len(out_shape), probes=probes, seed=seed,
                                        distribution=distribution, mode=mode,
                                        variance_reduction=variance_reduction)
            else:
                v, e, products = _spectral(ops, rb, n, m, len(in_shape), len(out_shape), iters=iters, tol=tol,
                                           seed=seed)
            values.append(v.detach().to(acc))
            errs.append(e.detach().to(acc))
    value = values[0] if len(values) == 1 else torch.cat(values)
    stderr = errs[0] if len(errs) == 1 else torch.cat(errs)
    return Estimate(value, stderr, kind, products)


def sketch(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    k: int,
    *,
    side: str = "right",
    seed: int = 0,
    parallel_iterations: int | None = None,
    experimental_use_pfor: bool = True,
    block: int | None = None,
) -> torch.Tensor:
    """A random sketch of each example's Jacobian, from k products (J is never built).

    ``side="right"``: J @ R for R = ``sketch_matrix(in_shape, k, seed)`` of shape
    (*in, k), by k JVPs; returns (B, *out, k). ``side="left"``: R^T @ J for R =
    ``sketch_matrix(out_shape, k, seed)`` of shape (*out, k), by one forward pass and k
    VJPs; returns (B, k, *in). One R serves every example (entries i.i.d. N(0, 1), not
    scaled: divide by sqrt(k) for a Johnson-Lindenstrauss embedding).

    ``parallel_iterations``: columns per vmap pass (None: all); ``experimental_use_pfor
    =False`` loops; ``block``: examples per call of fn. The result is in x's dtype, on its
    device, without autograd history.

    Example:
        >>> x = torch.tensor([[4.0, 2.0], [1.0, 3.0]])
        >>> s = sketch(lambda t: t * t * t, x, 3)
        >>> import distjac
        >>> r = sketch_matrix((2,), 3, seed=0)
        >>> torch.allclose(s, distjac.batch_jacobian(lambda t: t * t * t, x) @ r)
        True
    """
    call = "distjac.sketch(fn, x, k)"
    x, _, _ = check_functional_call(fn, x, "auto", "none", call)
    check_positive_int(k, "k", call, allow_none=False)
    _check_choice(side, "side", SIDES, call)
    _check_seed(seed, call)
    check_positive_int(parallel_iterations, "parallel_iterations", call)
    check_positive_int(block, "block", call)
    b, in_shape = x.shape[0], tuple(x.shape[1:])
    out_shape = _probe(fn, x, call).out_shape if b else tuple(_check_output(fn(x), x, call).shape[1:])
    if side == "right":
        r = sketch_matrix(in_shape, k, seed, dtype=x.dtype, device=x.device)
        if b == 0:
            return torch.zeros((0, *out_shape, k), dtype=x.dtype, device=x.device)
    else:
        r = sketch_matrix(out_shape, k, seed, dtype=x.dtype, device=x.device)
        if b == 0:
            return torch.zeros((0, k, *in_shape), dtype=x.dtype, device=x.device)
    cols = r.movedim(-1, 0)  # (k, *shape)
    parts = []
    step = block or b
    with _plain_tensors_needed(call, "each Jacobian-vector product"), torch.no_grad():
        for s0 in range(0, b, step):
            xb = x[s0:s0 + step].detach()
            ops = _Products(fn, xb, parallel_iterations, experimental_use_pfor, call)
            bb = xb.shape[0]
            if side == "right":
                jr = ops.forward(cols[:, None].expand(k, bb, *in_shape))  # (k, Bb, *out)
                parts.append(jr.movedim(0, -1))
            else:
                ops.linearize()
                parts.append(ops.reverse(cols[:, None].expand(k, bb, *out_shape)).transpose(0, 1))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.detach()


# --------------------------------------------------------------------------------------
# For jobs: a mapping of estimates (jacobian.estimate in a config)
# --------------------------------------------------------------------------------------

# name -> options and their defaults, as a job's `jacobian.estimate` takes them
_OPTIONS: dict[str, dict[str, Any]] = {
    "frobenius": {"probes": DEFAULT_PROBES, "seed": 0, "distribution": "rademacher", "mode": "auto",
                  "parallel_iterations": None},
    "spectral": {"iters": DEFAULT_ITERS, "tol": None, "seed": 0},
    "trace": {"probes": DEFAULT_PROBES, "seed": 0, "distribution": "rademacher", "variance_reduction": None,
              "mode": "auto", "parallel_iterations": None},
}


def check_estimates(mapping: Any, out_shape: Sequence[int] | None = None, in_shape: Sequence[int] | None = None,
                    call: str = "jacobian.estimate") -> dict[str, dict[str, Any]]:
    """Validate a job's ``jacobian.estimate`` mapping, e.g. ``{frobenius: {probes: 8},
    spectral: {iters: 20}}`` (an option-less entry may be null or {}), and fill in every
    default. With per-example shapes, also check that trace's Jacobian is square.

    Returns:
        {name: {option: value}} in the mapping's order, with every option present.

    Raises:
        ConfigError (a ValueError): not a mapping, an unknown estimate (the message lists
        the valid ones), an unknown option or a bad value, trace of a non-square Jacobian.
    """
    if not isinstance(mapping, Mapping) or not mapping:
        raise ConfigError(f"{call}: use a mapping of estimates to their options, e.g. "
                          f"{{frobenius: {{probes: 8}}}}; got {mapping!r}.")
    out: dict[str, dict[str, Any]] = {}
    for name, opts in mapping.items():
        if name not in _OPTIONS:
            raise ConfigError(f"{call}: unknown estimate {name!r}; use one of {', '.join(ESTIMATES)}.")
        opts = {} if opts is None else opts
        if not isinstance(opts, Mapping):
            raise ConfigError(f"{call}.{name}: use a mapping of options (or null for the defaults), got {opts!r}.")
        if bad := [k for k in opts if k not in _OPTIONS[name]]:
            raise ConfigError(f"{call}.{name}: unknown option(s) {', '.join(map(repr, bad))}; {name!r} takes "
                              f"{', '.join(_OPTIONS[name])}.")
        full = {**_OPTIONS[name], **opts}
        try:  # the API's own checks, with the config's path in the message
            c = f"{call}.{name}"
            for key in ("probes", "iters"):
                if key in full:
                    check_positive_int(full[key], key, c, allow_none=False)
            if "parallel_iterations" in full:
                check_positive_int(full["parallel_iterations"], "parallel_iterations", c)
            if "tol" in full:
                full["tol"] = _check_tol(full["tol"], c)
            _check_seed(full["seed"], c)
            if "distribution" in full:
                _check_choice(full["distribution"], "distribution", DISTRIBUTIONS, c)
            if "mode" in full:
                _check_choice(full["mode"], "mode", ("auto", "fwd", "rev"), c)
            if "variance_reduction" in full:
                _check_choice(full["variance_reduction"], "variance_reduction", VARIANCE_REDUCTIONS, c)
                if full["variance_reduction"] == "hutch++" and full["probes"] < 3:
                    raise OptionError(f"{c}: variance_reduction 'hutch++' needs probes >= 3, got {full['probes']}.")
        except OptionError as err:
            raise ConfigError(str(err).replace("=", ": ", 1)) from None
        out[name] = full
    if "trace" in out and out_shape is not None and in_shape is not None:
        n, m = math.prod(in_shape), math.prod(out_shape)
        if n != m:
            raise _not_square(n, m, out_shape, in_shape, call, ConfigError)
    return out


def estimate_columns(mapping: Mapping[str, Any]) -> list[str]:
    """The output columns of an estimate mapping, in order: ``name`` and ``name_stderr`` each."""
    return [c for name in mapping for c in (name, f"{name}_stderr")]


def estimate_products(mapping: Mapping[str, Any], out_shape: Sequence[int], in_shape: Sequence[int]) -> dict[str, int]:
    """Jacobian-vector products (JVPs + VJPs, counting a VJP's shared forward pass as one)
    each estimate of a mapping costs per example, at most (spectral with ``tol`` may stop
    earlier); the exact Jacobian costs min(M, N) products. For ``distjac plan``."""
    checked = check_estimates(mapping, out_shape, in_shape)
    n, m = math.prod(in_shape), math.prod(out_shape)
    out = {}
    for name, o in checked.items():
        if name == "spectral":
            out[name] = 2 * o["iters"] + 1
        else:
            fwd = o["mode"] == "fwd" or (o["mode"] == "auto" and (name == "trace" or n <= m))
            out[name] = o["probes"] + (0 if fwd else 1)
    return out


def estimate_block(fn: Callable, x: torch.Tensor, mapping: Mapping[str, Any], *, row_offset: int = 0,
                   rows: Sequence[int] | torch.Tensor | None = None, block: int | None = None,
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every estimate of a (checked or raw) ``jacobian.estimate`` mapping on one shard.

    Args:
        fn, x: as :func:`estimate`; x holds rows [row_offset, row_offset + len(x)) of the job.
        mapping: {name: options}, as :func:`check_estimates` takes it (checked again here).
        row_offset: the global row id of x[0] (the shard's start), so a recomputed shard
            draws the same probes (same bits).
        rows: instead of row_offset, the rows' ids.
        block: examples per call of fn (None: the whole shard).

    Returns:
        {name: (value, stderr)}, tensors of shape (B,) on x's device; the columns are
        ``name`` and ``name_stderr`` (:func:`estimate_columns`).
    """
    checked = check_estimates(mapping)
    out = {}
    for name, opts in checked.items():
        est = estimate(fn, x, name, row_offset=row_offset, rows=rows, block=block, **opts)
        out[name] = (est.value, est.stderr)
    return out

