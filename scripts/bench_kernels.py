"""Benchmark distjac's per-example Jacobian kernels against what a PyTorch user would write.

Side by side in one process, on the four workloads of issue 2 (item 7):

    W1  MLP tanh 64-256-256-32                           B = 8192
    W2  MLP 16-128-256 (wide output)                     B = 8192
    W3  y = x**3, x of shape (B, 512)                    B = 1024
    W4  conv 1x28x28 -> conv(8, 3x3) -> relu -> linear 10   B = 2048

Methods: distjac ``auto``, ``rev``, ``fwd`` and ``rev`` with ``experimental_use_pfor=False``
against the baselines torch.func ``vmap(jacrev)``, ``vmap(jacfwd)``, ``jacrev`` of the
batch sum, ``autograd.grad(is_grads_batched=True)`` and a plain loop of ``autograd.grad``
over output rows.

Procedure, per workload (see STYLE.md, "Benchmarks"):

1. distjac ``rev`` runs first; its result is the reference every method is checked against
   (``allclose`` with a relative tolerance) before anything is timed. A mismatch is marked
   in the table and the JSON and the method is not counted as a baseline.
2. Every method first runs on a pilot slice of the batch (1/8); its time and peak-RSS
   growth are extrapolated to the full batch, and a method that would take more than
   ``--max-call-s`` seconds or more memory than is available is skipped with the reason
   (not in ``--quick`` mode, whose batches are small).
3. Every method then runs once on the full batch (the check, which is also the warm-up;
   for distjac auto this first call measures and caches its choice, reported separately
   as ``first_call_s``), then ``--repeats`` timed calls, interleaved across methods (round
   robin) so that drift from other load on the machine hits every method alike.
4. The median time gives examples/s; the ratio is to the best baseline that ran and
   matched on the same workload, in the same run.

Usage:
    python scripts/bench_kernels.py                      # full size, 5 repeats, 2 threads
    python scripts/bench_kernels.py --quick --workloads W1,W3 --repeats 1
    python scripts/bench_kernels.py --threads 2 --out bench_out/kernels.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import jacfwd, jacrev, vmap

import distjac
from distjac import models
from distjac.kernels import choose_strategy, clear_caches

DEFAULT_OUT = "bench_out/kernels.json"
# A method whose single full-batch call would take longer than this is skipped (issue 2:
# e.g. vmap(jacfwd) on W3); the pilot run on 1/8 of the batch estimates it.
DEFAULT_MAX_CALL_S = 60.0
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
    name: str
    description: str
    build: Callable[[], torch.nn.Module]
    in_shape: tuple[int, ...]
    batch: int
    quick_batch: int


WORKLOADS = {
    "W1": Workload("W1", "MLP tanh 64-256-256-32", lambda: models.mlp([64, 256, 256, 32]), (64,), 8192, 128),
    "W2": Workload("W2", "MLP tanh 16-128-256 (wide output)", lambda: models.mlp([16, 128, 256]), (16,), 8192, 128),
    # quick W3: 16 x 512 x 512 = 2**22 Jacobian elements, just enough for auto to measure.
    "W3": Workload("W3", "y = x**3, x (B, 512)", models.cube, (512,), 1024, 16),
    "W4": Workload("W4", "conv 1x28x28 -> conv(8, 3x3) -> relu -> linear 10", models.convnet, (1, 28, 28), 2048, 16),
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


METHODS = [
    Method("distjac auto", "distjac", m_distjac("auto")),
    Method("distjac rev", "distjac", m_distjac("rev")),
    Method("distjac fwd", "distjac", m_distjac("fwd")),
    Method("distjac rev loop", "distjac", m_distjac("rev", use_pfor=False)),
    Method("vmap(jacrev)", "baseline", m_vmap_jacrev),
    Method("vmap(jacfwd)", "baseline", m_vmap_jacfwd),
    Method("jacrev(batch sum)", "baseline", m_jacrev_batch_sum),
    Method("grad(is_grads_batched)", "baseline", m_autograd_batched),
    Method("row loop of grad", "baseline", m_row_loop),
]
REFERENCE = "distjac rev"


# --------------------------------------------------------------------------------------
# Machine, clock and memory
# --------------------------------------------------------------------------------------


def machine_info(threads: int, device: torch.device) -> dict:
    info = {
        "cpu_model": None,
        "cpu_flags_avx512f": None,
        "logical_cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_bytes": _meminfo("MemTotal"),
        "mem_available_bytes": _meminfo("MemAvailable"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "distjac": getattr(distjac, "__version__", None),
        "threads": threads,
        "interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and info["cpu_model"] is None:
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                if line.startswith("flags") and info["cpu_flags_avx512f"] is None:
                    info["cpu_flags_avx512f"] = "avx512f" in line.split()
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0: write 5 to clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable, device: torch.device):
    _sync(device)
    t0 = time.perf_counter()
    res = fn()
    _sync(device)
    return res, time.perf_counter() - t0


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return "out of memory" in text or "not enough memory" in text or "can't allocate memory" in text


# --------------------------------------------------------------------------------------
# One workload
# --------------------------------------------------------------------------------------


def _pilot(method: Method, f, x, device, max_call_s: float) -> str | None:
    """Run on 1/8 of the batch; return a skip reason if the full call looks too slow or big."""
    b = x.shape[0]
    rows = max(PILOT_MIN_ROWS, b // PILOT_FRACTION)
    if rows >= b:
        return None
    xs = x[:rows]
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
        return f"too slow: pilot of {rows} rows took {t:.2f} s, about {est_t:.0f} s per full call > {max_call_s:.0f} s"
    if can_peak and device.type == "cpu":
        grew = max(0, (_status_bytes("VmHWM") or 0) - rss0)
        est_mem = grew * b / rows
        avail = _meminfo("MemAvailable") or 0
        if avail and est_mem > MEMORY_FRACTION * avail:
            return (f"would run out of memory: about {est_mem / 2**30:.1f} GiB per full call, "
                    f"{avail / 2**30:.1f} GiB available")
    return None


def bench_workload(w: Workload, methods: Sequence[Method], *, quick: bool, repeats: int, rtol: float,
                   max_call_s: float, device: torch.device, log: Callable[[str], None]) -> dict:
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

    # Pilots, checks and warm-up ------------------------------------------------------
    live: list[Method] = []
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
        if tuple(res.shape) != tuple(ref.shape):
            r.update(status="mismatch", reason=f"shape {tuple(res.shape)} != reference {tuple(ref.shape)}")
        else:
            diff = (res.detach() - ref).abs()
            r["max_abs_err"] = diff.max().item() if diff.numel() else 0.0
            r["max_rel_err"] = r["max_abs_err"] / max(scale, 1e-30)
            if not torch.allclose(res.detach(), ref, rtol=rtol, atol=atol):
                r.update(status="mismatch", reason=f"not allclose to {REFERENCE}: max abs err "
                         f"{r['max_abs_err']:.3g} (rtol {rtol:g}, atol {atol:.3g})")
            del diff
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
        log(f"   {mt.name:<24} first call {t_first:.3f} s"
            + (f", auto chose {r['auto_strategy']}" if "auto_strategy" in r else "")
            + ("" if r["status"] == "ok" else f"  [{r['status'].upper()}: {r['reason']}]"))
        if r["status"] in ("ok", "mismatch"):
            live.append(mt)
        gc.collect()
    del ref
    gc.collect()

    # Timed repeats, round robin -------------------------------------------------------
    for rep in range(repeats):
        for mt in live:
            res, t = _timed(lambda mt=mt: mt.run(model, x), device)
            del res
            rec["methods"][mt.name]["times_s"].append(t)
        log(f"   repeat {rep + 1}/{repeats} done")

    # Summary ----------------------------------------------------------------------------
    for r in rec["methods"].values():
        if r["times_s"]:
            r["median_s"] = statistics.median(r["times_s"])
            r["examples_per_s"] = b / r["median_s"]
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
# Report
# --------------------------------------------------------------------------------------


def markdown_table(result: dict) -> str:
    names = list(result["workloads"])
    header = "| method | " + " | ".join(
        f"{k} (B={result['workloads'][k]['batch']})" for k in names) + " |"
    lines = [header, "|---|" + "---:|" * len(names)]
    notes: list[str] = []
    methods = [mt.name for mt in METHODS if any(mt.name in result["workloads"][k]["methods"] for k in names)]
    for name in methods:
        cells = []
        for k in names:
            r = result["workloads"][k]["methods"].get(name)
            if r is None:
                cells.append("—")
                continue
            if "examples_per_s" in r:
                cell = f"{r['examples_per_s']:,.0f}"
                if r["ratio_to_best_baseline"] is not None:
                    cell += f" ({r['ratio_to_best_baseline']:.2f}x)"
                if result["workloads"][k]["best_baseline"] == name:
                    cell = f"**{cell}**"
            else:
                cell = r["status"]
            if r["status"] != "ok":
                notes.append(f"{k} {name}: {r['status']}: {r['reason']}")
                cell += f" [{len(notes)}]"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("examples/s (median of {repeats}, {threads} threads); in parentheses the ratio to the best "
                 "torch.func/autograd baseline of the workload (bold).".format(**result["config"]))
    for k in names:
        wl = result["workloads"][k]
        auto = wl["methods"].get("distjac auto", {})
        first = auto.get("first_call_s")
        lines.append(f"- {k} ({wl['description']}): auto chose `{wl.get('auto_strategy', 'n/a')}`"
                     + (f" (first call, measuring included: {first:.2f} s)" if first is not None else ""))
    for i, note in enumerate(notes, 1):
        lines.append(f"- [{i}] {note}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="W1,W2,W3,W4", help="comma-separated subset of W1,W2,W3,W4")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of method names (default: all): "
                   + ", ".join(mt.name for mt in METHODS))
    p.add_argument("--repeats", type=int, default=5, help="timed calls per method (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true", help="small batches: a smoke run in seconds")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON output path (default {DEFAULT_OUT})")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="relative tolerance of the check")
    p.add_argument("--max-call-s", type=float, default=DEFAULT_MAX_CALL_S,
                   help="skip a method whose single call would take longer (seconds)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    args = p.parse_args(argv)
    bad = [w for w in args.workloads.split(",") if w not in WORKLOADS]
    if bad:
        p.error(f"unknown workload(s) {bad}; choose from {sorted(WORKLOADS)}")
    if args.methods is not None:
        known = {mt.name for mt in METHODS}
        bad = [mname for mname in args.methods.split(",") if mname not in known]
        if bad:
            p.error(f"unknown method(s) {bad}; choose from {sorted(known)}")
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = METHODS if args.methods is None else [mt for mt in METHODS if mt.name in args.methods.split(",")]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = {
        "machine": machine_info(args.threads, device),
        "config": {"quick": args.quick, "repeats": args.repeats, "threads": args.threads,
                   "rtol": args.rtol, "atol_scale": ATOL_SCALE, "max_call_s": args.max_call_s,
                   "workloads": args.workloads.split(","), "reference": REFERENCE,
                   "timing": "wall clock per call (device synchronised), median of repeats; "
                             "repeats interleaved across methods; results may be views"},
        "workloads": {},
    }
    log(f"machine: {result['machine']['cpu_model']}, {result['machine']['logical_cores']} cores, "
        f"torch {torch.__version__}, {args.threads} threads")
    t0 = time.perf_counter()
    for name in args.workloads.split(","):
        result["workloads"][name] = bench_workload(
            WORKLOADS[name], methods, quick=args.quick, repeats=args.repeats, rtol=args.rtol,
            max_call_s=args.max_call_s, device=device, log=log)
    result["total_s"] = time.perf_counter() - t0
    result["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["table_markdown"] = markdown_table(result)
    print(result["table_markdown"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"wrote {out} ({result['total_s']:.0f} s in all)")
    return result


if __name__ == "__main__":
    main()
