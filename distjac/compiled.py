"""Compiled strategies: the per-block Jacobian computation under ``torch.compile``.

Part of the kernels: :mod:`distjac.kernels` is the only caller (as the internal
strategies ``Strategy("rev", compiled=True)`` and ``Strategy("fwd", compiled=True)``,
candidates of ``mode="auto"``); nothing here is public.

NOTE [compiled blocks]
The whole Jacobian of one block of examples is one traced function: reverse mode as
``vmap`` of the pullback of ``torch.func.vjp`` over one-hot cotangents, forward mode as
``vmap`` of ``torch.func.jvp`` over one-hot tangents, compiled with
``torch.compile(fullgraph=True)`` (Inductor: C++ on a CPU, Triton on a GPU), with the
block's batch dimension marked dynamic so blocks of other sizes reuse the graph (blocks
of one row run eagerly: torch specializes size 1; forward mode is compiled for one
block size, see :func:`dynamic_batch`). torch.compile is applied outside the torch.func
transforms, the documented order that composes.

Rules a caller can rely on:

- the compiled function is run on the probe rows (a static graph: on the first block,
  whose eager result is the one returned) and compared with the eager result
  (``allclose`` at the dtype's tolerance) before its results are used for anything;
- a compiled graph that fails later (a recompile for a new shape that does not trace)
  is dropped and the block runs eagerly;
- any failure (an error while compiling, a graph break, which ``fullgraph=True`` turns
  into an error, or a mismatch) falls back to eager, with the reason kept where
  ``choose_strategy(...).record`` and :func:`distjac.kernels.compiled_status` show it; no
  exception from compiling ever escapes;
- compiled functions are cached in-process per (function, fingerprint, per-example
  shape, dtype, device, mode, chunk), and Inductor's on-disk caches go to
  ``$DISTJAC_CACHE_DIR/inductor`` (default ``~/.cache/distjac/inductor``) through the
  documented ``TORCHINDUCTOR_CACHE_DIR``, unless the user set that already, so another
  process (a Ray worker, the next run) compiling the same graph loads it from disk;
- a compiled result never carries autograd history: where the result must be
  differentiable (x requires grad, a tape records) the eager strategy runs instead.

``DISTJAC_COMPILE=0`` turns compiling off everywhere (auto never proposes it; an
explicit compiled strategy runs eagerly, saying so in its status).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import jvp, vjp, vmap

from ._compat import mark_batch_dynamic

__all__ = ["Compiled", "cache_root", "compile_block", "compile_enabled", "direct_inductor_cache",
           "predicted_compile_s"]

# What one compile is predicted to cost before any was measured in this process
# (seconds, per device type): the order of magnitude of Inductor compiling a small
# Jacobian graph from a cold cache on a loaded 2-core machine (tens of seconds); a warm
# on-disk cache makes it a few seconds. Auto proposes compiling only when the call's
# (or job's) work can pay this back (kernels.AUTO_COMPILE_PAYBACK).
COMPILE_COST_PRIOR_S = {"cpu": 30.0, "cuda": 60.0}
# The smallest block a compiled graph runs (torch specializes a dimension of size 1).
MIN_COMPILED_ROWS = 2


def cache_root() -> Path:
    """distjac's cache folder: ``$DISTJAC_CACHE_DIR``, else ``~/.cache/distjac``."""
    env = os.environ.get("DISTJAC_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "distjac"


def compile_enabled() -> bool:
    """False when ``DISTJAC_COMPILE`` is 0/false/no/off."""
    return os.environ.get("DISTJAC_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


def direct_inductor_cache() -> str:
    """Point Inductor's on-disk caches at ``cache_root()/inductor`` unless the user set
    ``TORCHINDUCTOR_CACHE_DIR`` already; returns the folder in effect."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current:
        return current
    path = cache_root() / "inductor"
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return str(path)


_times_lock = threading.Lock()
_COMPILE_TIMES: dict[str, list[float]] = {}


def predicted_compile_s(device_type: str) -> float:
    """What the next compile on this device type is predicted to cost: the median of
    those measured in this process, else :data:`COMPILE_COST_PRIOR_S`."""
    with _times_lock:
        seen = sorted(_COMPILE_TIMES.get(device_type, ()))
    if seen:
        return seen[len(seen) // 2]
    return COMPILE_COST_PRIOR_S.get(device_type, max(COMPILE_COST_PRIOR_S.values()))


def _note_compile_time(device_type: str, seconds: float) -> None:
    with _times_lock:
        _COMPILE_TIMES.setdefault(device_type, []).append(seconds)


def _one_hot(k: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(k, dtype=like.dtype, device=like.device)


def func_block(fn: Callable, xb: torch.Tensor, mode: str, chunk: int | None) -> torch.Tensor:
    """(Bb, M, N) Jacobian of one block with torch.func only (what is compiled)."""
    b, in_shape = xb.shape[0], tuple(xb.shape[1:])
    n = math.prod(in_shape)
    if mode == "rev":
        y, pull = vjp(fn, xb)
        out_shape = tuple(y.shape[1:])
        m = math.prod(out_shape)
        basis = _one_hot(m, y)
        rows = []
        step = chunk or m
        for j0 in range(0, m, step):
            j1 = min(m, j0 + step)
            cot = basis[j0:j1, None, :].expand(j1 - j0, b, m).reshape(j1 - j0, b, *out_shape)
            rows.append(vmap(pull)(cot)[0].reshape(j1 - j0, b, n))
        jac = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)  # (M, Bb, N)
        return jac.transpose(0, 1)
    basis = _one_hot(n, xb)
    cols = []
    step = chunk or n
    for k0 in range(0, n, step):
        k1 = min(n, k0 + step)
        tan = basis[k0:k1, None, :].expand(k1 - k0, b, n).reshape(k1 - k0, b, *in_shape)
        col = vmap(lambda t: jvp(fn, (xb,), (t,))[1])(tan)
        cols.append(col.reshape(k1 - k0, b, -1))
    jac = cols[0] if len(cols) == 1 else torch.cat(cols, dim=0)  # (N, Bb, M)
    return jac.permute(1, 2, 0)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol relative to max |J|) of the compiled-against-eager check."""
    if dtype == torch.float64:
        return 1e-9, 1e-11
    if dtype == torch.float32:
        return 1e-4, 1e-5
    return 2e-2, 1e-2  # float16, bfloat16: a fused kernel rounds at other points


@dataclass(frozen=True)
class Compiled:
    """A compiled block function, or why there is none.

    Attributes:
        fn: the compiled (Bb, *in) -> (Bb, M, N) function; None when it fell back.
        reason: why it fell back (None when ``fn`` is usable).
        compile_s: seconds the first (compiling) call took, probe rows included.
        max_abs_err: the check's largest difference from eager on the checked rows.
        rows: the one block size a static graph runs (None: any, the batch is dynamic).
    """

    fn: Callable | None
    reason: str | None
    compile_s: float = 0.0
    max_abs_err: float | None = None
    rows: int | None = None

    @property
    def status(self) -> str:
        if self.fn is None:
            return f"fell back to eager: {self.reason}"
        err = "" if self.max_abs_err is None else f", max abs diff from eager {self.max_abs_err:.2g}"
        what = "any block size" if self.rows is None else f"blocks of {self.rows} rows"
        return f"compiled in {self.compile_s:.1f} s for {what}, checked against eager{err}"


def dynamic_batch(mode: str) -> bool:
    """Whether mode's graph is compiled with a dynamic batch dimension. Reverse mode is;
    forward mode (vmap of jvp) is not: with torch 2.13 its dual tensors fail to trace
    with a symbolic batch size ("RuntimeError when making fake tensor call" in
    _make_dual), so it compiles for one block size, checked on a whole first block,
    and blocks of other sizes (a remainder) run eagerly."""
    return mode == "rev"


@contextlib.contextmanager
def _quiet_compiler():
    """torch.compile logs a failure's whole trace at ERROR level before raising it; the
    failure is distjac's to report (as a fallback reason), so those loggers are quiet
    while it compiles."""
    names = ("torch._dynamo", "torch._inductor", "torch._subclasses.fake_tensor", "torch.fx.experimental")
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for logger, _ in saved:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def compile_block(fn: Callable, mode: str, chunk: int | None, xp: torch.Tensor,
                  eager: torch.Tensor) -> Compiled:
    """Compile the block Jacobian of ``fn`` and check it on the rows ``xp`` (the probe
    rows, or for a static graph a whole block of the size it is compiled for) against
    the eager (Bp, M, N) Jacobian ``eager``. Never raises (NOTE [compiled blocks])."""
    if not compile_enabled():
        return Compiled(None, "compiling is disabled (DISTJAC_COMPILE=0)")
    if xp.shape[0] < MIN_COMPILED_ROWS:
        return Compiled(None, f"fewer than {MIN_COMPILED_ROWS} probe rows")
    direct_inductor_cache()

    def block(xb: torch.Tensor) -> torch.Tensor:
        return func_block(fn, xb, mode, chunk)

    dynamic = dynamic_batch(mode)
    t0 = time.perf_counter()
    try:
        compiled = torch.compile(block, fullgraph=True, dynamic=None if dynamic else False)
        xd = xp.detach().clone()
        if dynamic:
            mark_batch_dynamic(xd)
        with torch.no_grad(), _quiet_compiler():
            got = compiled(xd)
        if xp.device.type == "cuda":
            torch.cuda.synchronize(xp.device)
    except Exception as err:  # noqa: BLE001 - any compile failure or graph break: eager
        return Compiled(None, f"torch.compile failed ({type(err).__name__}: {_first_line(err)})",
                        time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    _note_compile_time(xp.device.type, seconds)
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(eager.shape):
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return Compiled(None, f"the compiled result has shape {shape}, eager {tuple(eager.shape)}", seconds)
    rtol, atol_scale = tolerance(eager.dtype)
    scale = eager.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).max().item() if eager.numel() else 0.0
    atol = atol_scale * max(scale, 1e-30)
    diff = (got.detach() - eager).abs().nan_to_num(nan=math.inf).max().item() if eager.numel() else 0.0
    if not torch.allclose(got.detach(), eager, rtol=rtol, atol=atol, equal_nan=True):
        return Compiled(None, f"the compiled result differs from eager on {xp.shape[0]} checked rows (max abs "
                        f"diff {diff:.3g}, rtol {rtol:g}, atol {atol:.3g})", seconds, diff)
    return Compiled(compiled, None, seconds, diff, None if dynamic else xp.shape[0])


def fits(c: Compiled, xb: torch.Tensor) -> bool:
    """Whether the compiled graph of ``c`` runs a block of ``xb``'s size."""
    rows = xb.shape[0]
    return c.fn is not None and rows >= MIN_COMPILED_ROWS and (c.rows is None or c.rows == rows)


def run_compiled(c: Compiled, xb: torch.Tensor) -> torch.Tensor:
    """The (Bb, M, N) Jacobian of one block by the compiled function (no history)."""
    xd = xb.detach()
    if c.rows is None:
        mark_batch_dynamic(xd)
    with torch.no_grad(), _quiet_compiler():
        return c.fn(xd)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else "")[:200]
