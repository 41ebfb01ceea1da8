"""The ``kernels`` suite: distjac's per-example Jacobian kernels against what a PyTorch user
would write, with TensorFlow and JAX as optional peers.

Side by side in one process, on the four workloads of issue 2 (item 7):

    W1  MLP tanh 64-256-256-32                           B = 8192
    W2  MLP 16-128-256 (wide output)                     B = 8192
    W3  y = x**3, x of shape (B, 512)                    B = 1024
    W4  conv 1x28x28 -> conv(8, 3x3) -> relu -> linear 10   B = 2048

Methods: distjac ``auto``, ``rev``, ``fwd``, ``rev`` with ``experimental_use_pfor=False``
and the compiled strategy (``torch.compile``; its first call, the compile, is its
``first_call_s``), with auto's first call (measuring included) as a row of its own,
against the baselines torch.func ``vmap(jacrev)``, ``vmap(jacfwd)``, ``jacrev`` of the
batch sum, ``autograd.grad(is_grads_batched=True)`` and a plain loop of ``autograd.grad``
over output rows. Peers (``tf.function`` batch_jacobian with pfor on and off, JAX
``jit(vmap(jacrev))`` and ``jit(vmap(jacfwd))``) run in a second interpreter
(``peer_python``; default this one) by :mod:`distjac.bench.peers`, on the same weights and
inputs, checked against distjac's result, with the same repeats and threads.

Procedure, per workload:

1. distjac ``rev`` runs first; its result is the reference every method is checked against
   (``allclose`` with a relative tolerance) before anything is timed. A mismatch is marked
   in the table and the JSON and the method is not counted as a baseline.
2. Every method first runs on pilot slices of the batch, growing 4x from 16 rows up to
   1/8 of it; each slice's time and peak-RSS growth are extrapolated to the full batch,
   and a method that would take more than ``max_call_s`` seconds or more memory than is
   available is skipped with the reason, before a larger slice runs (not at ``tiny``
   size, whose batches are small).
3. Every method then runs once on the full batch (the check, which is also the warm-up;
   for distjac auto this first call measures and caches its choice, reported separately
   as ``first_call_s``), then ``repeats`` timed calls, interleaved across methods (round
   robin, each round starting one method later) so that drift from other load on the
   machine hits every method alike and no method always runs after the same one.
4. The median time gives examples/s; the ratio is to the best torch baseline that ran and
   matched on the same workload, in the same run.

    distjac bench kernels                                  # full size, 5 repeats, 2 threads
    distjac bench kernels --size tiny --repeats 1          # a smoke run in seconds
    distjac bench kernels --peer-python /path/to/tf-env/bin/python
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import jacfwd, jacrev, vmap

import distjac
from distjac import models
from distjac.kernels import choose_strategy, clear_caches

from .common import check_device, machine_line, meminfo, new_result, proc_bytes, write_outputs
from .common import log as _log

SUITE = "kernels"
PEERS_SCRIPT = Path(__file__).with_name("peers.py")
# The peers are checked against this many leading rows of distjac's reference.
PEER_CHECK_ROWS = 64
# How long the peers' subprocess may take in all, per workload and timed call.
PEER_TIMEOUT_FLOOR_S = 600.0
DEFAULT_MAX_CALL_S = 60.0
# A timed sample repeats a call until this long has passed (a call of about a
# millisecond, timed alone, moved 2-5x between runs of the 64-row suite).
DEFAULT_MIN_SAMPLE_S = 0.05
MAX_CALLS_PER_SAMPLE = 10_000
# Before the timed rounds each method is called until this long has passed since its
# first call began (no more calls where the first took that long): caches, allocator
# pools and auto's choice for repeated small calls (NOTE [repeated small calls] in
# kernels.py) settle there, not in a timed sample. The peers warm up the same way.
DEFAULT_WARMUP_S = 0.5
# Auto's warm-up goes on until a provisional choice was measured in full (NOTE [provisional
# choices] in distjac.kernels), for at most this long.
AUTO_SETTLE_S = 120.0
# Fraction of MemAvailable one call may grow the peak RSS by (estimated from the pilot):
# the reference result and the other developers' processes need the rest.
MEMORY_FRACTION = 0.6
# Pilot runs use this fraction of the batch (at least PILOT_MIN_ROWS rows).
PILOT_FRACTION = 8
PILOT_MIN_ROWS = 16
# Relative tolerance of the check against distjac rev; the absolute tolerance is
# ATOL_SCALE * max |J| (float32 sums in a different order differ by ~1e-6 relative).
DEFAULT_RTOL = 1e-4
ATOL_SCALE = 1e-5


# --------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A benchmark workload; ``kind`` and ``activation`` tell the peers how to rebuild
    the model from its exported weights (see :mod:`distjac.bench.peers`)."""

    name: str
    description: str
    build: Callable[[], torch.nn.Module]
    in_shape: tuple[int, ...]
    batch: int
    quick_batch: int
    kind: str
    activation: str | None = None


def _mlp_sizes(w: Workload) -> list[int]:
    """An MLP workload's layer widths, read from its model."""
    linears = [m for m in w.build().modules() if isinstance(m, torch.nn.Linear)]
    return [linears[0].in_features] + [m.out_features for m in linears]


WORKLOADS = {
    "W1": Workload("W1", "MLP tanh 64-256-256-32", lambda: models.mlp([64, 256, 256, 32]), (64,), 8192, 128,
                   "mlp", "tanh"),
    "W2": Workload("W2", "MLP tanh 16-128-256 (wide output)", lambda: models.mlp([16, 128, 256]), (16,), 8192, 128,
                   "mlp", "tanh"),
    # quick W3: 16 x 512 x 512 = 2**22 Jacobian elements, just enough for auto to measure.
    "W3": Workload("W3", "y = x**3, x (B, 512)", models.cube, (512,), 1024, 16, "cube"),
    "W4": Workload("W4", "conv 1x28x28 -> conv(8, 3x3) -> relu -> linear 10", models.convnet, (1, 28, 28), 2048, 16,
                   "convnet"),
}


# --------------------------------------------------------------------------------------
# Methods: each maps (f, x) to the (B, *out, *in) Jacobian
# --------------------------------------------------------------------------------------


def _single(f: Callable) -> Callable:
    """f on one example: adds and removes the batch axis (what torch.func's vmap needs)."""
    return lambda xi: f(xi.unsqueeze(0)).squeeze(0)


def m_distjac(mode: str, use_pfor: bool = True) -> Callable:
    def run(f, x):
        return distjac.batch_jacobian(f, x, mode=mode, experimental_use_pfor=use_pfor)

    return run


def m_vmap_jacrev(f, x):
    return vmap(jacrev(_single(f)))(x)


def m_vmap_jacfwd(f, x):
    return vmap(jacfwd(_single(f)))(x)


def m_jacrev_batch_sum(f, x):
    # Row i of f(x) depends only on x[i], so d(sum_i f(x)[i]) / dx holds every example's
    # Jacobian: shape (*out, B, *in); move the batch axis to the front.
    jac = jacrev(lambda x: f(x).sum(0))(x)
    return jac.movedim(jac.dim() - x.dim(), 0)


def m_autograd_batched(f, x):
    xd = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = f(xd)
    b, out_shape = y.shape[0], y.shape[1:]
    m = math.prod(out_shape)
    eye = torch.eye(m, dtype=y.dtype, device=y.device)
    cot = eye[:, None, :].expand(m, b, m).reshape(m, b, *out_shape)
    (g,) = torch.autograd.grad(y, xd, cot, is_grads_batched=True)  # (M, B, *in)
    return g.movedim(0, 1).unflatten(1, out_shape)


def m_row_loop(f, x):
    xd = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = f(xd)
    b, out_shape = y.shape[0], y.shape[1:]
    m, n = math.prod(out_shape), math.prod(x.shape[1:])
    out = torch.empty((b, m, n), dtype=x.dtype, device=x.device)
    yf = y.reshape(b, m)
    v = torch.zeros_like(yf)
    for j in range(m):
        v.zero_()
        v[:, j] = 1
        (g,) = torch.autograd.grad(yf, xd, v, retain_graph=True)
        out[:, j] = g.reshape(b, n)
    return out.view(b, *out_shape, *x.shape[1:])


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "distjac" or "baseline"
    run: Callable
    # Its first call compiles (a torch.compile'd strategy): the pilot runs it once untimed,
    # so the compile is not extrapolated to the full batch as if it were work.
    compiles: bool = False


# Blocks of the compiled strategy: forward mode compiles one graph per block size
# (NOTE [compiled blocks] in distjac/compiled.py), so a fixed block keeps it to one
# compile per workload; reverse mode's graph takes any block size.
COMPILED_BENCH_BLOCK = 512


def m_distjac_compiled(f, x):
    """distjac's compiled strategy, in the mode the sizes suggest (rev when outputs <= inputs)."""
    from distjac.kernels import Strategy, run_strategy

    with torch.no_grad():
        m = math.prod(f(x[:1]).shape[1:])
    mode = "rev" if m <= math.prod(x.shape[1:]) else "fwd"
    return run_strategy(f, x, Strategy(mode, compiled=True, block=None if mode == "rev" else COMPILED_BENCH_BLOCK))


METHODS = [
    Method("distjac auto", "distjac", m_distjac("auto")),
    Method("distjac rev", "distjac", m_distjac("rev")),
    Method("distjac fwd", "distjac", m_distjac("fwd")),
    Method("distjac rev loop", "distjac", m_distjac("rev", use_pfor=False)),
    Method("distjac compiled", "distjac", m_distjac_compiled, compiles=True),
    Method("vmap(jacrev)", "baseline", m_vmap_jacrev),
    Method("vmap(jacfwd)", "baseline", m_vmap_jacfwd),
    Method("jacrev(batch sum)", "baseline", m_jacrev_batch_sum),
    Method("grad(is_grads_batched)", "baseline", m_autograd_batched),
    Method("row loop of grad", "baseline", m_row_loop),
]
# Opt-in methods, run only when named in --methods: the chain strategy forced (blocks of
# 128 examples, the measurement), beside "distjac auto", which may choose it. It
# applies to W1, W2 and W4 (nn.Sequential chains) and reports an error on W3 (a function).
CHAIN_BENCH_BLOCK = 128


def m_distjac_chain(f, x):
    from distjac.kernels import Strategy, run_strategy

    return run_strategy(f, x, Strategy("chain", block=CHAIN_BENCH_BLOCK))


OPT_IN_METHODS = [Method("distjac chain", "distjac", m_distjac_chain)]
ALL_METHODS = METHODS + OPT_IN_METHODS
REFERENCE = "distjac rev"


# --------------------------------------------------------------------------------------
# Clock and memory
# --------------------------------------------------------------------------------------


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0: write 5 to clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(key: str) -> int | None:
    return proc_bytes("/proc/self/status", key)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable, device: torch.device):
    _sync(device)
    t0 = time.perf_counter()
    res = fn()
    _sync(device)
    return res, time.perf_counter() - t0


def _timed_sample(fn: Callable, device: torch.device, min_s: float,
                  calls: int | None = None) -> tuple[float, int, float]:
    """One sample: ``calls`` calls of ``fn`` (each synchronised and its result released
    before the next), or with ``calls=None`` as many as fill ``min_s`` seconds (at least
    one); the mean time of a call, the number of calls and the fastest call. The peers
    sample the same way (peers.py)."""
    total, n, fastest = 0.0, 0, math.inf
    while True:
        res, t = _timed(fn, device)
        del res
        total, n, fastest = total + t, n + 1, min(fastest, t)
        if (n >= calls) if calls is not None else (total >= min_s):
            return total / n, n, fastest


def calls_per_sample(fastest_s: float, min_sample_s: float) -> int:
    """Calls in each timed sample of a method whose fastest call so far took
    ``fastest_s``: enough to fill ``min_sample_s``, the same in every sample (a sample
    cut short by one slow call would count that call alone, and a median of such
    samples follows the slow calls; on this VM a 64-row call right after another
    method's freed its result took 10x its usual time now and then)."""
    if fastest_s <= 0 or not math.isfinite(fastest_s):
        return 1
    return max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(min_sample_s / fastest_s)))


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return "out of memory" in text or "not enough memory" in text or "can't allocate memory" in text


# --------------------------------------------------------------------------------------
# One workload
# --------------------------------------------------------------------------------------


def _pilot(method: Method, f, x, device, max_call_s: float) -> str | None:
    """Run on growing slices of the batch, up to 1/8 of it; return a skip reason as soon
    as the full call looks too slow or too big.

    The slices start at PILOT_MIN_ROWS rows and grow 4x a step. Each smaller slice's time
    and peak memory, extrapolated to the next slice, must fit before the next one runs, so
    a method whose 1/8 pilot alone would not fit in memory (forward mode on W4 at B=8192:
    784 tangents of every activation) is skipped from a small slice instead of taking the
    whole run down with it. Only the last slice is extrapolated to the full batch: a small
    slice's fixed costs (a first call's set-up), multiplied by the whole batch, would
    skip methods that are fine."""
    b = x.shape[0]
    last = max(PILOT_MIN_ROWS, b // PILOT_FRACTION)
    if last >= b:
        return None
    rows = min(last, PILOT_MIN_ROWS)
    if method.compiles:
        # One slice only: a compile may be specialized to its batch size, and a new size
        # would be timed as a recompile. (distjac's compiled strategy sizes its own blocks
        # to the memory budget.)
        rows = last
        try:
            method.run(f, x[:rows])  # the compile (and its check), not timed as work
        except Exception as err:
            if _is_oom(err):
                return f"out of memory already on a pilot of {rows} rows"
            raise
    while True:
        nxt = min(last, 4 * rows)
        reason = _pilot_step(method, f, x[:rows], b if rows >= last else nxt, device, max_call_s)
        if reason is not None or rows >= last:
            return reason
        rows = nxt


def _pilot_step(method: Method, f, xs, b: int, device, max_call_s: float) -> str | None:
    """One pilot slice, extrapolated to ``b`` rows (the next slice, or the full batch)."""
    rows = xs.shape[0]
    gc.collect()
    rss0 = _status_bytes("VmRSS")
    can_peak = _reset_peak_rss() and rss0 is not None
    try:
        res, t = _timed(lambda: method.run(f, xs), device)
    except Exception as err:  # any failure is reported, not raised
        if _is_oom(err):
            return f"out of memory already on a pilot of {rows} rows"
        raise
    del res
    est_t = t * b / rows
    if est_t > max_call_s:
        return (f"too slow: pilot of {rows} rows took {t:.2f} s, about {est_t:.0f} s for {b} rows > "
                f"{max_call_s:.0f} s")
    if can_peak and device.type == "cpu":
        grew = max(0, (_status_bytes("VmHWM") or 0) - rss0)
        est_mem = grew * b / rows
        avail = meminfo("MemAvailable") or 0
        if avail and est_mem > MEMORY_FRACTION * avail:
            return (f"would run out of memory: about {est_mem / 2**30:.1f} GiB for {b} rows (pilot of {rows} "
                    f"rows), {avail / 2**30:.1f} GiB available")
    return None


def _compare(got: torch.Tensor, ref: torch.Tensor, *, rtol: float, atol: float) -> tuple[float, bool]:
    """Max abs difference and allclose, over slices of the batch: a whole-batch
    difference (and allclose's own temporaries) would hold several more copies of a
    Jacobian that may already be a sixth of the machine's memory (W3 at B=4096: 4.3 GB)."""
    worst, close = 0.0, True
    step = max(1, (64 << 20) // max(1, ref[:1].numel() * ref.element_size()))  # ~64 MiB a slice
    for i in range(0, ref.shape[0], step):
        g, e = got[i:i + step], ref[i:i + step]
        if e.numel():
            worst = max(worst, (g - e).abs().max().item())
            close = close and torch.allclose(g, e, rtol=rtol, atol=atol)
    return worst, close


def _check_result(r: dict, res: torch.Tensor, ref: torch.Tensor, *, scale: float, rtol: float, atol: float) -> None:
    """Compare a method's result with the reference; the worst error so far and, where
    it is not close, status "mismatch" go into the method's record ``r``."""
    if tuple(res.shape) != tuple(ref.shape):
        r.update(status="mismatch", reason=f"shape {tuple(res.shape)} != reference {tuple(ref.shape)}")
        return
    err, close = _compare(res.detach(), ref, rtol=rtol, atol=atol)
    r["max_abs_err"] = max(err, r.get("max_abs_err", 0.0))
    r["max_rel_err"] = r["max_abs_err"] / max(scale, 1e-30)
    if not close:
        r.update(status="mismatch", reason=f"not allclose to {REFERENCE}: max abs err "
                 f"{err:.3g} (rtol {rtol:g}, atol {atol:.3g})")


def bench_workload(w: Workload, methods: Sequence[Method], *, quick: bool, repeats: int, rtol: float,
                   max_call_s: float, device: torch.device, log: Callable[[str], None],
                   export: Path | None = None, min_sample_s: float = 0.0, warmup_s: float = 0.0) -> dict:
    """Check, warm up and time ``methods`` on one workload, side by side.

    ``export``: also write the model's weights, the input and the first rows of the
    reference Jacobian to this npz, for the peers to check against and time."""
    b = w.quick_batch if quick else w.batch
    model = w.build().to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # differentiate w.r.t. the inputs only
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((b, *w.in_shape), generator=gen).to(device)
    with torch.no_grad():
        out_shape = tuple(model(x[:1]).shape[1:])
    m, n = math.prod(out_shape), math.prod(w.in_shape)
    rec: dict = {
        "description": w.description, "batch": b, "in_shape": list(w.in_shape),
        "out_shape": list(out_shape), "jacobian_bytes": b * m * n * x.element_size(),
        "reference": REFERENCE, "methods": {},
    }
    log(f"\n== {w.name}: {w.description}, B={b}, per example {n} in -> {m} out")

    clear_caches()
    ref_method = next(mt for mt in METHODS if mt.name == REFERENCE)
    ref, t_ref = _timed(lambda: ref_method.run(model, x), device)
    ref = ref.detach()
    scale = ref.abs().max().item()
    atol = ATOL_SCALE * max(scale, 1e-30)
    log(f"   reference {REFERENCE}: {t_ref:.3f} s, max |J| = {scale:.3g}")
    if export is not None:
        export_workload(export, w, model, x, ref[:PEER_CHECK_ROWS])

    # Pilots, checks and warm-up ------------------------------------------------------
    live: list[Method] = []
    n_calls: dict[str, int] = {}  # calls per timed sample, from the fastest call so far
    for mt in methods:
        r: dict = {"kind": mt.kind, "status": "ok", "reason": None, "times_s": []}
        rec["methods"][mt.name] = r
        try:
            reason = None if quick else _pilot(mt, model, x, device, max_call_s)
            if reason is not None:
                r.update(status="skipped", reason=reason)
                log(f"   {mt.name:<24} skipped: {reason}")
                continue
            if mt.name == "distjac auto":
                clear_caches()  # the pilot measured on a slice; auto must measure on x
            res, t_first = _timed(lambda mt=mt: mt.run(model, x), device)
        except Exception as err:
            gc.collect()
            if _is_oom(err):
                r.update(status="skipped", reason=f"out of memory: {type(err).__name__}: {str(err)[:200]}")
            else:
                r.update(status="error", reason=f"{type(err).__name__}: {str(err)[:300]}")
            log(f"   {mt.name:<24} {r['status']}: {r['reason']}")
            continue
        r["first_call_s"] = t_first
        _check_result(r, res, ref, scale=scale, rtol=rtol, atol=atol)
        del res
        if mt.name == "distjac auto":
            r["auto_strategy"] = str(choose_strategy(model, x, mode="auto"))
            rec["auto_strategy"] = r["auto_strategy"]
        t_call = t_first
        if mt.name == "distjac auto" and t_first > max_call_s:
            # The first call measured candidates (warm-up); judge auto by a call that reuses the choice.
            res, t_call = _timed(lambda mt=mt: mt.run(model, x), device)
            del res
            r["second_call_s"] = t_call
        if t_call > max_call_s:
            r.update(status="skipped", reason=f"too slow: one full call took {t_call:.1f} s > {max_call_s:.0f} s")
        fastest = t_call
        if r["status"] in ("ok", "mismatch") and t_call <= max_call_s and t_first < warmup_s:
            _, r["warmup_calls"], fastest = _timed_sample(lambda mt=mt: mt.run(model, x), device,
                                                          warmup_s - t_first)
        if mt.name == "distjac auto" and r["status"] in ("ok", "mismatch") and t_call <= max_call_s:
            # A choice whose first measuring stopped early is measured in full once the
            # calls it serves pay for it (NOTE [provisional choices]): the steady state is
            # after that, as in a loop of calls; warmed up until then, within a bound.
            settle_end, settled = time.perf_counter() + AUTO_SETTLE_S, 0
            while (choose_strategy(model, x, mode="auto").record.provisional is not None
                   and time.perf_counter() < settle_end):
                _, t_settle = _timed(lambda mt=mt: mt.run(model, x), device)
                fastest = min(fastest, t_settle)
                settled += 1
            r["settle_calls"] = settled
        if r["status"] in ("ok", "mismatch") and t_call <= max_call_s:
            steady = str(choose_strategy(model, x, mode="auto")) if mt.name == "distjac auto" else None
            if steady is not None and steady != r["auto_strategy"]:
                # Repeated calls measured a new choice (NOTE [repeated small calls]): it is
                # what is timed, so it is checked too.
                r["first_call_strategy"], r["auto_strategy"] = r["auto_strategy"], steady
                rec["auto_strategy"] = steady
                res = mt.run(model, x)
                _check_result(r, res, ref, scale=scale, rtol=rtol, atol=atol)
                del res
        if mt.name == "distjac auto":  # what was chosen, and why (timed candidates, notes)
            r["auto_record"] = str(choose_strategy(model, x, mode="auto").record)
        n_calls[mt.name] = calls_per_sample(fastest, min_sample_s)
        log(f"   {mt.name:<24} first call {t_first:.3f} s"
            + (f", auto chose {r['first_call_strategy']}, then" if "first_call_strategy" in r else "")
            + (f", auto chose {r['auto_strategy']}" if "auto_strategy" in r else "")
            + ("" if r["status"] == "ok" else f"  [{r['status'].upper()}: {r['reason']}]"))
        if r["status"] in ("ok", "mismatch"):
            live.append(mt)
        gc.collect()
    del ref
    gc.collect()

    # Timed repeats, round robin -------------------------------------------------------
    for rep in range(repeats):
        # Each round starts one method later, so that no method always follows the same
        # one (on this VM, a call right after another's 1 GiB result was freed pays
        # different page-fault costs).
        shift = rep % max(1, len(live))
        for mt in live[shift:] + live[:shift]:
            t, n, _ = _timed_sample(lambda mt=mt: mt.run(model, x), device, min_sample_s, n_calls[mt.name])
            rec["methods"][mt.name]["times_s"].append(t)
            rec["methods"][mt.name].setdefault("calls_per_sample", []).append(n)
        log(f"   repeat {rep + 1}/{repeats} done")

    # Summary ----------------------------------------------------------------------------
    for r in rec["methods"].values():
        if r["times_s"]:
            r["median_s"] = statistics.median(r["times_s"])
            r["examples_per_s"] = b / r["median_s"]
    # Auto's first call (measuring, and compiling if it chose to, included) as a row of its
    # own, with its cost as a share of a steady-state call.
    auto = rec["methods"].get("distjac auto")
    if auto and auto.get("first_call_s") and auto["status"] in ("ok", "mismatch"):
        first = auto["first_call_s"]
        rec["methods"]["distjac auto (first call)"] = {
            "kind": "distjac", "status": auto["status"], "reason": auto["reason"], "times_s": [first],
            "median_s": first, "examples_per_s": b / first,
            "first_call_share": first / auto["median_s"] if auto.get("median_s") else None,
        }
    baselines = {k: r for k, r in rec["methods"].items()
                 if r["kind"] == "baseline" and r["status"] == "ok" and "examples_per_s" in r}
    best = max(baselines, key=lambda k: baselines[k]["examples_per_s"], default=None)
    rec["best_baseline"] = best
    rec["best_baseline_examples_per_s"] = baselines[best]["examples_per_s"] if best else None
    for r in rec["methods"].values():
        r["ratio_to_best_baseline"] = (r["examples_per_s"] / rec["best_baseline_examples_per_s"]
                                       if best and "examples_per_s" in r else None)
    return rec


# --------------------------------------------------------------------------------------
# Peers: TensorFlow and JAX, in their own interpreter
# --------------------------------------------------------------------------------------


def export_workload(path: Path, w: Workload, model: torch.nn.Module, x: torch.Tensor, reference: torch.Tensor) -> None:
    """The npz a peer rebuilds the workload from (layout: :mod:`distjac.bench.peers`)."""
    arrays: dict[str, np.ndarray] = {"x": x.detach().cpu().numpy(), "reference": reference.detach().cpu().numpy()}
    if w.kind == "mlp":
        linears = [m for m in model if isinstance(m, torch.nn.Linear)]
        for i, lin in enumerate(linears):
            arrays[f"w{i}"] = lin.weight.detach().cpu().numpy()
            arrays[f"b{i}"] = lin.bias.detach().cpu().numpy()
    elif w.kind == "convnet":
        conv = next(m for m in model if isinstance(m, torch.nn.Conv2d))
        lin = next(m for m in model if isinstance(m, torch.nn.Linear))
        arrays.update(conv_w=conv.weight.detach().cpu().numpy(), conv_b=conv.bias.detach().cpu().numpy(),
                      lin_w=lin.weight.detach().cpu().numpy(), lin_b=lin.bias.detach().cpu().numpy())
    np.savez(path, **arrays)


def run_peers(workloads: dict[str, Workload], npz: dict[str, Path], *, python: str, device: torch.device,
              threads: int, repeats: int, rtol: float, max_call_s: float, workdir: Path,
              peers: Sequence[str] | None = None, min_sample_s: float = 0.0,
              warmup_s: float = 0.0) -> dict[str, Any]:
    """Run peers.py under ``python``; its OUT.json, or ``{"error": ...}`` if it failed."""
    spec = {
        "device": "gpu" if device.type == "cuda" else "cpu", "threads": threads, "repeats": repeats,
        "rtol": rtol, "atol_scale": ATOL_SCALE, "max_call_s": max_call_s, "min_sample_s": min_sample_s,
        "warmup_s": warmup_s, "workloads": [{"name": name, "kind": w.kind, "npz": str(npz[name]),
                       **({"activation": w.activation} if w.activation else {})}
                      for name, w in workloads.items() if name in npz],
    }
    if peers is not None:
        spec["peers"] = list(peers)
    spec_path, out_path = workdir / "peers_spec.json", workdir / "peers_out.json"
    spec_path.write_text(json.dumps(spec))
    timeout = max(PEER_TIMEOUT_FLOOR_S, 4 * max_call_s * (repeats + 2) * len(spec["workloads"]))
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the peers' interpreter has its own site-packages
    if device.type == "cuda" and device.index is not None:
        # The peers take "the GPU": make it the one torch runs on.
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[device.index] if device.index < len(visible) else str(device.index)
    try:
        proc = subprocess.run([python, str(PEERS_SCRIPT), str(spec_path), str(out_path)], env=env,
                              stdout=subprocess.PIPE, stderr=None, timeout=timeout, text=True)
    except (OSError, subprocess.TimeoutExpired) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    if proc.returncode != 0 or not out_path.exists():
        return {"error": f"{python} {PEERS_SCRIPT.name} exited with status {proc.returncode}"}
    return json.loads(out_path.read_text())


def _peer_records(peers: dict[str, Any], python: str) -> list[dict[str, Any]]:
    records = []
    if "error" in peers:
        return [{"workload": None, "method": "peers", "kind": "peer", "status": "error", "reason": peers["error"],
                 "times_s": []}]
    where = f"{peers.get('python', python)}"
    for wname, wl in peers.get("workloads", {}).items():
        for pname, p in wl.get("peers", {}).items():
            rec = {"workload": wname, "method": pname, "kind": "peer", "status": p.get("status", "error"),
                   "reason": p.get("reason"), "times_s": list(p.get("times_s") or []), "batch": wl.get("batch"),
                   "peer_python": where}
            for key in ("first_call_s", "warmup_calls", "calls_per_sample", "max_abs_err", "median_s",
                        "examples_per_s"):
                if p.get(key) is not None:
                    rec[key] = p[key]
            records.append(rec)
    return records


# --------------------------------------------------------------------------------------
# Records, table and plot
# --------------------------------------------------------------------------------------


def _workload_records(name: str, rec: dict) -> list[dict[str, Any]]:
    out = []
    for mname, r in rec["methods"].items():
        out.append({"workload": name, "method": mname, "batch": rec["batch"], **r})
    return out


# The float32 matmul the machine's rate is measured on: (N x N) @ (N x N), 2 N^3 FLOPs.
MATMUL_N = 2048


def matmul_gflops(device: torch.device, repeats: int = 5) -> float:
    """This machine's float32 matmul rate at the suite's threads: GFLOP/s of the median of
    ``repeats`` (N x N) @ (N x N) products after one warm-up (MATMUL_N)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(MATMUL_N, MATMUL_N, generator=gen).to(device)
    b = torch.randn(MATMUL_N, MATMUL_N, generator=gen).to(device)
    times = []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return 2 * MATMUL_N ** 3 / sorted(times)[len(times) // 2] / 1e9


def mlp_jacobian_flops(sizes: Sequence[int]) -> int:
    """The fewest FLOPs per example that give an MLP's Jacobian: the forward pass, and the
    product of its layers' Jacobians W_k D_{k-1} ... D_1 W_1 bracketed in the cheapest
    order (the matrix-chain order; the diagonal activation factors cost O(n^2) and are
    left out), 2 m n p per (m x n) @ (n x p)."""
    dims = list(sizes)  # W_i is (dims[i] x dims[i-1])
    k = len(dims) - 1
    cost = [[0] * (k + 1) for _ in range(k + 1)]  # cost[i][j]: W_j ... W_i, 1 <= i <= j <= k
    for span in range(1, k):
        for i in range(1, k - span + 1):
            j = i + span
            cost[i][j] = min(cost[i][m] + cost[m + 1][j] + 2 * dims[j] * dims[m] * dims[i - 1] for m in range(i, j))
    forward = sum(2 * dims[i] * dims[i + 1] for i in range(k))
    return forward + cost[1][k]


def _add_ratios(result: dict[str, Any]) -> None:
    """Each record's ratio to its workload's best torch baseline (same run)."""
    for name, wl in result["workloads"].items():
        best = wl.get("best_baseline_examples_per_s")
        for r in result["records"]:
            if r["workload"] == name:
                eps = r.get("examples_per_s")
                r["ratio_to_best_baseline"] = eps / best if best and eps else None


def markdown(result: dict[str, Any]) -> str:
    names = list(result["workloads"])
    cfg = result["config"]
    lines = [f"### Kernels ({cfg['device']}, {cfg['threads']} threads, median of {cfg['repeats']})", "",
             machine_line(result), f"Command: `{result.get('command')}`", ""]
    header = "| method | " + " | ".join(f"{k} (B={result['workloads'][k]['batch']})" for k in names) + " |"
    lines += [header, "|---|" + "---:|" * len(names)]
    # One footnote per distinct status and reason (a framework that is not importable is
    # said once, not once per workload and method), listing the cells it applies to.
    notes: list[str] = []
    where: dict[str, list[str]] = {}
    order: list[str] = []
    for r in result["records"]:
        if r["workload"] in names and r["method"] not in order:
            order.append(r["method"])
    index = {(r["workload"], r["method"]): r for r in result["records"]}
    for mname in order:
        cells = []
        for k in names:
            r = index.get((k, mname))
            if r is None:
                cells.append("—")
                continue
            if r.get("examples_per_s"):
                cell = f"{r['examples_per_s']:,.0f}"
                if r.get("ratio_to_best_baseline") is not None:
                    cell += f" ({r['ratio_to_best_baseline']:.2f}x)"
                if result["workloads"][k].get("best_baseline") == mname:
                    cell = f"**{cell}**"
            else:
                cell = r["status"]
            if r["status"] != "ok":
                text = f"{r['status']}: {r['reason']}"
                if text not in where:
                    notes.append(text)
                    where[text] = []
                where[text].append(f"{k} {mname}")
                cell += f" [{notes.index(text) + 1}]"
            cells.append(cell)
        kind = next((index[(k, mname)]["kind"] for k in names if (k, mname) in index), "")
        label = f"{mname} (peer)" if kind == "peer" else mname
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("examples/s; in parentheses the ratio to the best torch.func/autograd baseline of the "
                 "workload (bold), measured in the same run.")
    for k in names:
        wl = result["workloads"][k]
        auto = index.get((k, "distjac auto"), {})
        first = auto.get("first_call_s")
        share = index.get((k, "distjac auto (first call)"), {}).get("first_call_share")
        then = auto.get("first_call_strategy")
        lines.append(f"- {k} ({wl['description']}): auto chose `{wl.get('auto_strategy', 'n/a')}`"
                     + (f" (first call, measuring included: {first:.2f} s" if first is not None else "")
                     + (f", {share:.1f}x a steady-state call)" if share is not None else ")" if first is not None
                        else "")
                     + (f"; its first call ran `{then}`, and the warm-up's repeated calls measured it again "
                        f"(NOTE [repeated small calls], [provisional choices])" if then else ""))
    rate = result.get("matmul_gflops")
    for k in names:
        flops = result["workloads"][k].get("jacobian_flops_per_example")
        auto = index.get((k, "distjac auto"), {})
        if rate and flops and auto.get("examples_per_s"):
            got = flops * auto["examples_per_s"] / 1e9
            lines.append(f"- {k}: distjac auto does the Jacobian's fewest FLOPs ({flops / 1e6:.2f} MFLOP per example: "
                         f"the forward pass and the layers' Jacobians multiplied in the cheapest order) at "
                         f"{got:,.1f} GFLOP/s, {100 * got / rate:.0f}% of this machine's float32 matmul rate "
                         f"({rate:,.1f} GFLOP/s, {MATMUL_N}^2 x {MATMUL_N}^2, {cfg['threads']} threads)")
    for r in result["records"]:
        if r["workload"] is None:
            text = f"{r['status']}: {r['reason']}"
            if text not in where:
                notes.append(text)
                where[text] = []
            where[text].append("peers")
    for i, note in enumerate(notes, 1):
        cells = where[note]
        on = cells[0] if len(cells) == 1 else f"{len(cells)} cells: {', '.join(cells[:4])}" + (
            ", ..." if len(cells) > 4 else "")
        lines.append(f"- [{i}] {on}: {note}")
    return "\n".join(lines)


def plot(result: dict[str, Any], out_dir: Path) -> list[str]:
    """kernels.png: examples/s of every method per workload (log scale), the best torch
    baseline marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["workloads"])
    methods: list[str] = []
    for r in result["records"]:
        if r["workload"] in names and r.get("examples_per_s") and r["method"] not in methods:
            methods.append(r["method"])
    if not methods:
        return []
    index = {(r["workload"], r["method"]): r for r in result["records"]}
    fig, ax = plt.subplots(figsize=(max(8, 1.9 * len(names) + 0.35 * len(methods)), 5))
    width = 0.8 / len(methods)
    cmap = plt.get_cmap("tab20")
    for j, mname in enumerate(methods):
        xs, ys = [], []
        for i, k in enumerate(names):
            r = index.get((k, mname))
            if r and r.get("examples_per_s"):
                xs.append(i - 0.4 + (j + 0.5) * width)
                ys.append(r["examples_per_s"])
        kind = next((index[(k, mname)]["kind"] for k in names if (k, mname) in index), "")
        ax.bar(xs, ys, width, label=mname + (" (peer)" if kind == "peer" else ""), color=cmap(j % 20),
               hatch="//" if kind == "peer" else None, edgecolor="black" if kind == "distjac" else None)
    for i, k in enumerate(names):
        best = result["workloads"][k].get("best_baseline_examples_per_s")
        if best:
            ax.hlines(best, i - 0.45, i + 0.45, colors="black", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(names)), [f"{k}\nB={result['workloads'][k]['batch']}" for k in names])
    ax.set_yscale("log")
    ax.set_ylabel("examples/s (log)")
    cfg = result["config"]
    ax.set_title(f"Per-example Jacobians, {cfg['device']}, {cfg['threads']} threads "
                 "(dashed: best torch baseline)")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out_dir / "kernels.png", dpi=110)
    plt.close(fig)
    return ["kernels.png"]


# --------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------


def run(out_dir: str | os.PathLike, *, size: str = "full", workloads: Sequence[str] = tuple(WORKLOADS),
        methods: Sequence[str] | None = None, repeats: int | None = None, threads: int = 2,
        device: str = "cpu", rtol: float = DEFAULT_RTOL, max_call_s: float = DEFAULT_MAX_CALL_S,
        peer_python: str | None = None, peers: bool = True, plots: bool = True,
        batch: int | Mapping[str, int] | None = None,
        min_sample_s: float = DEFAULT_MIN_SAMPLE_S, warmup_s: float = DEFAULT_WARMUP_S) -> dict[str, Any]:
    """Run the kernels suite; write ``kernels.json``, ``kernels.md`` and ``kernels.png``
    under ``out_dir``; return the result document.

    ``size="tiny"`` uses small batches (a smoke run in seconds). ``batch``: the batch size
    of every workload (an int), or of some (``{"W1": 65536}``), instead of the suite's;
    the peers run on the same rows. ``peer_python``: the interpreter that runs the
    TensorFlow/JAX peers (default: this one); ``peers=False`` leaves them out.
    ``min_sample_s``: a timed sample repeats a call until this many seconds have passed
    and counts its mean (one call, for calls longer than that), here and in the peers.
    ``warmup_s``: untimed calls of each method until this long after its first call
    began (DEFAULT_WARMUP_S), here and in the peers.
    """
    quick = size == "tiny"
    repeats = repeats if repeats is not None else (1 if quick else 5)
    _check(workloads, methods, repeats, threads, device, min_sample_s, warmup_s)
    batches = _batches(batch, workloads)
    chosen = METHODS if methods is None else [mt for mt in ALL_METHODS if mt.name in methods]
    dev = torch.device(device)
    saved = (torch.get_num_threads(), torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.set_num_threads(threads)
    # Full float32 on a GPU, as the peers run (JAX "highest", TF32 off in TF): torch's
    # default lets cuDNN convolutions use TF32, whose ~1e-3 relative error fails the check
    # of modes that take another convolution path (measured on an H200: W4 fwd vs rev).
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    # Auto's first call is reported as measured from scratch: its on-disk tuning cache
    # (NOTE [the tuning cache]) stays off for the suite.
    saved_tuning = os.environ.get("DISTJAC_TUNING_CACHE")
    os.environ["DISTJAC_TUNING_CACHE"] = "0"
    peer_python = peer_python or sys.executable
    config = {"size": size, "batch": batches or None, "repeats": repeats, "threads": threads, "device": str(dev),
              "rtol": rtol,
              "atol_scale": ATOL_SCALE, "max_call_s": max_call_s, "workloads": list(workloads),
              "methods": [mt.name for mt in chosen], "reference": REFERENCE,
              "peers": peers, "peer_python": peer_python if peers else None, "tf32": False,
              "min_sample_s": min_sample_s, "warmup_s": warmup_s,
              "timing": "wall clock per call (device synchronised), after untimed calls until warmup_s from the "
                        "first; a sample is the mean of as many calls as fill min_sample_s at the method's "
                        "fastest call (at least one, the same in every sample), each result released before the "
                        "next; median of "
                        "the samples, interleaved across methods; results may be views"}
    result = new_result(SUITE, config, str(dev))
    result["workloads"] = {}
    _log(machine_line(result))
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="distjac-bench-") as tmp:
            npz: dict[str, Path] = {}
            result["matmul_gflops"] = matmul_gflops(dev, repeats)
            _log(f"float32 matmul ({MATMUL_N}^2 x {MATMUL_N}^2): {result['matmul_gflops']:,.1f} GFLOP/s")
            for name in workloads:
                export = Path(tmp) / f"{name}.npz" if peers else None
                w = WORKLOADS[name]
                if name in batches:
                    w = dataclasses.replace(w, batch=batches[name], quick_batch=batches[name])
                rec = bench_workload(w, chosen, quick=quick, repeats=repeats, rtol=rtol,
                                     max_call_s=max_call_s, device=dev, log=_log, export=export,
                                     min_sample_s=min_sample_s, warmup_s=warmup_s)
                if WORKLOADS[name].kind == "mlp":
                    rec["jacobian_flops_per_example"] = mlp_jacobian_flops(_mlp_sizes(WORKLOADS[name]))
                if export is not None:
                    npz[name] = export
                result["records"] += _workload_records(name, rec)
                result["workloads"][name] = {k: v for k, v in rec.items() if k != "methods"}
            if peers:
                _log(f"\n== peers (TensorFlow, JAX) under {peer_python}")
                out = run_peers({k: WORKLOADS[k] for k in workloads}, npz, python=peer_python, device=dev,
                                threads=threads, repeats=repeats, rtol=rtol, max_call_s=max_call_s,
                                workdir=Path(tmp), min_sample_s=min_sample_s, warmup_s=warmup_s)
                result["peers"] = {k: v for k, v in out.items() if k != "workloads"}
                result["records"] += _peer_records(out, peer_python)
    finally:
        if saved_tuning is None:
            os.environ.pop("DISTJAC_TUNING_CACHE", None)
        else:
            os.environ["DISTJAC_TUNING_CACHE"] = saved_tuning
        torch.set_num_threads(saved[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[1:]
    _add_ratios(result)
    result["total_s"] = time.perf_counter() - t0
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    table = markdown(result)
    return write_outputs(result, Path(out_dir), table, plot, plots=plots)


def _check(workloads: Sequence[str], methods: Sequence[str] | None, repeats: int, threads: int,
           device: str, min_sample_s: float = 0.0, warmup_s: float = 0.0) -> None:
    if bad := [w for w in workloads if w not in WORKLOADS]:
        raise ValueError(f"unknown workload(s) {bad}; choose from {sorted(WORKLOADS)}")
    known = [mt.name for mt in ALL_METHODS]
    if methods is not None and (bad := [m for m in methods if m not in known]):
        raise ValueError(f"unknown method(s) {bad}; choose from {known}")
    if repeats < 1 or threads < 1:
        raise ValueError("repeats and threads must be >= 1")
    for name, value in (("min_sample_s", min_sample_s), ("warmup_s", warmup_s)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    check_device(device)


def _batches(batch: int | Mapping[str, int] | None, workloads: Sequence[str]) -> dict[str, int]:
    """Per workload, the batch size that replaces the suite's; ValueError if one is bad."""
    if batch is None:
        return {}
    given = dict(batch) if isinstance(batch, Mapping) else dict.fromkeys(workloads, batch)
    for name, b in given.items():
        if name not in WORKLOADS:
            raise ValueError(f"--batch names unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"--batch for {name} must be an integer >= 1, got {b!r}")
    return {k: v for k, v in given.items() if k in workloads}


def parse_batch(text: str | None) -> int | dict[str, int] | None:
    """``--batch``: ``N`` for every workload, or ``W1=N,W3=M`` for some."""
    if text is None:
        return None
    try:
        if "=" not in text:
            return int(text)
        return {k.strip(): int(v) for k, v in (item.split("=", 1) for item in text.split(","))}
    except ValueError:
        raise ValueError(f"--batch {text!r}: give an integer (every workload) or W1=N,W3=M (some)") from None


def check_args(args: argparse.Namespace) -> None:
    """The CLI's arguments for this suite; ValueError saying what is wrong (before any
    suite runs, so a bad argument writes nothing)."""
    workloads = args.workloads.split(",")
    _check(workloads, None if args.methods is None else args.methods.split(","),
           1 if args.repeats is None else args.repeats, args.threads, args.device, args.min_sample_s,
           args.warmup_s)
    _batches(parse_batch(args.batch), workloads)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kernels")
    g.add_argument("--workloads", default="W1,W2,W3,W4", help="comma-separated subset of W1,W2,W3,W4")
    g.add_argument("--methods", default=None,
                   help="comma-separated subset of method names (default: all but the opt-in ones): "
                   + ", ".join(mt.name for mt in METHODS) + "; opt-in: "
                   + ", ".join(mt.name for mt in OPT_IN_METHODS))
    g.add_argument("--batch", default=None,
                   help="batch size instead of the suite's: N for every workload, or W1=N,W3=M for some")
    g.add_argument("--threads", type=int, default=2, help="torch intra-op threads (and the peers' cores)")
    g.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="relative tolerance of the check")
    g.add_argument("--max-call-s", type=float, default=DEFAULT_MAX_CALL_S,
                   help="skip a method whose single call would take longer (seconds)")
    g.add_argument("--min-sample-s", type=float, default=DEFAULT_MIN_SAMPLE_S,
                   help="a timed sample repeats a call until this many seconds have passed and counts its "
                        "mean (default %(default)s; 0: one call a sample)")
    g.add_argument("--warmup-s", type=float, default=DEFAULT_WARMUP_S,
                   help="untimed calls of each method until this long after its first call began "
                        "(default %(default)s)")
    g.add_argument("--peer-python", default=None,
                   help="interpreter with TensorFlow and/or JAX for the peers (default: this one)")
    g.add_argument("--no-peers", action="store_true", help="leave the TensorFlow/JAX peers out")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(args.out, size=args.size, workloads=args.workloads.split(","),
               methods=None if args.methods is None else args.methods.split(","), repeats=args.repeats,
               threads=args.threads, device=args.device, rtol=args.rtol, max_call_s=args.max_call_s,
               peer_python=args.peer_python, peers=not args.no_peers, plots=not args.no_plots,
               batch=parse_batch(args.batch), min_sample_s=args.min_sample_s, warmup_s=args.warmup_s)
