"""The ``estimates`` suite: the matrix-free Frobenius estimate against the exact Jacobian on
the large reference model (issue 13), in one process.

Model: ``distjac.models.resnet_small()`` (3x224x224 inputs, 1,000 outputs: a per-example
Jacobian of 1,000 x 150,528, 602 MB in float32). Two methods, each timed on its own rows:

- ``estimate``: ``distjac.estimate(model, x, "frobenius", probes=8)`` (one forward pass
  and 8 VJPs per example), on ``--estimate-rows`` examples; also records each example's
  relative standard error (stderr / value).
- ``exact``: ``distjac.batch_jacobian(model, x, mode="rev")`` then the Frobenius norm
  (``distjac.reduce``), on ``--exact-rows`` examples (1 by default): the real cost of a
  small slice, measured, not extrapolated from sampled output rows.

Before anything is timed, the estimate on the exact slice is compared with the exact norm
(its error in units of its stderr is recorded). Each method gets a warm-up call (the exact
one on the same slice: its first call also chooses the chunking), then ``--repeats`` timed
calls; the median is reported. rows/s = rows / median seconds; the speedup is the ratio of
the two rows/s.

    distjac bench estimates                        # resnet_small, 16 + 1 rows, 3 repeats
    distjac bench estimates --size tiny            # a 32x32, 10-class variant: seconds
    distjac bench estimates --device cuda --estimate-rows 64
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from .common import check_device, log, machine_line, median, new_result, write_outputs

SUITE = "estimates"
PROBES = 8
PRESETS = {
    "tiny": {"model": {"num_classes": 10, "width": 4}, "in_shape": (3, 32, 32), "estimate_rows": 4,
             "exact_rows": 1, "repeats": 1},
    "full": {"model": {}, "in_shape": (3, 224, 224), "estimate_rows": 16, "exact_rows": 1, "repeats": 3},
}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(f, device: str, repeats: int) -> tuple[Any, list[float]]:
    out = f()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = f()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return out, times


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [f"### Frobenius estimate ({PROBES} probes) vs the exact Jacobian: `{cfg['model']}`, input "
             f"{'x'.join(map(str, cfg['in_shape']))}, {cfg['device']}, {cfg['threads']} threads, median of "
             f"{cfg['repeats']}", "", machine_line(result), f"Command: `{result.get('command')}`", "",
             "| method | rows timed | s (median) | rows/s | relative stderr (median / max) |",
             "|---|---:|---:|---:|---|"]
    for r in result["records"]:
        se = (f"{r['rel_stderr_median']:.2%} / {r['rel_stderr_max']:.2%}" if "rel_stderr_median" in r else "exact")
        lines.append(f"| {r['method']} | {r['rows']} | {r['seconds']:.3f} | {r['rows_per_s']:.4g} | {se} |")
    if result.get("speedup"):
        lines.append(f"- Speedup of the estimate per example: **{result['speedup']:.1f}x** the exact Jacobian's "
                     f"measured cost.")
    if result.get("check"):
        c = result["check"]
        lines.append(f"- Check on the exact slice: estimate vs exact norm, relative error {c['max_rel_err']:.2%} "
                     f"(largest), {c['max_z']:.2f} stderr.")
    return "\n".join(lines)


def run(out_dir: str | os.PathLike, *, size: str = "full", device: str = "cpu", repeats: int | None = None,
        estimate_rows: int | None = None, exact_rows: int | None = None, threads: int = 2,
        plots: bool = True) -> dict[str, Any]:
    """Run the suite; write ``estimates.json`` and ``estimates.md`` (no plot)."""
    import torch

    import distjac
    from distjac.models import resnet_small
    from distjac.reduce import reduce_block

    preset, repeats, estimate_rows, exact_rows = _resolve(size, device, repeats, estimate_rows, exact_rows, threads)
    kwargs = preset["model"]
    config = {"size": size, "device": device, "threads": threads, "repeats": repeats, "probes": PROBES,
              "model": f"distjac.models.resnet_small({', '.join(f'{k}={v}' for k, v in kwargs.items())})",
              "in_shape": list(preset["in_shape"]), "estimate_rows": estimate_rows, "exact_rows": exact_rows,
              "measure": "wall seconds of one call on the rows (median of repeats, after a warm-up call); "
                         "rows/s = rows / seconds"}
    result = new_result(SUITE, config, device)
    log(machine_line(result))
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = resnet_small(**kwargs).to(device)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(max(estimate_rows, exact_rows), *preset["in_shape"], generator=g).to(device)
        est_fn = lambda rows: distjac.estimate(model, x[:rows], "frobenius", probes=PROBES)  # noqa: E731

        def exact_fn():
            jac = distjac.batch_jacobian(model, x[:exact_rows], mode="rev")
            return reduce_block(jac, ["frobenius"], len(preset["in_shape"]))["frobenius"]

        log(f"   exact Jacobian of {exact_rows} row(s) ...")
        want, t_exact = _timed(exact_fn, device, repeats)
        got = est_fn(exact_rows)
        err = (got.value - want).abs()
        result["check"] = {"max_rel_err": float((err / want).max()), "max_z": float((err / got.stderr).max())}
        log(f"   estimate of {estimate_rows} row(s) ...")
        est, t_est = _timed(lambda: est_fn(estimate_rows), device, repeats)
        rel = (est.stderr / est.value).cpu()
        s_est, s_exact = median(t_est), median(t_exact)
        result["records"] = [
            {"method": f"estimate frobenius ({PROBES} probes)", "rows": estimate_rows, "seconds": s_est,
             "seconds_runs": t_est, "rows_per_s": estimate_rows / s_est, "products_per_row": est.products,
             "rel_stderr_median": float(rel.median()), "rel_stderr_max": float(rel.max())},
            {"method": "exact batch_jacobian (rev) + frobenius", "rows": exact_rows, "seconds": s_exact,
             "seconds_runs": t_exact, "rows_per_s": exact_rows / s_exact},
        ]
        result["speedup"] = (estimate_rows / s_est) / (exact_rows / s_exact)
    finally:
        torch.set_num_threads(saved_threads)
    return write_outputs(result, Path(out_dir), markdown(result), None, plots=plots)


def _resolve(size, device, repeats, estimate_rows, exact_rows, threads):
    preset = PRESETS[size]
    repeats = preset["repeats"] if repeats is None else repeats
    estimate_rows = preset["estimate_rows"] if estimate_rows is None else estimate_rows
    exact_rows = preset["exact_rows"] if exact_rows is None else exact_rows
    if repeats < 1 or estimate_rows < 1 or exact_rows < 1 or threads < 1:
        raise ValueError("--repeats, --estimate-rows, --exact-rows and --threads must be >= 1")
    check_device(device)
    return preset, repeats, estimate_rows, exact_rows


def check_args(args: argparse.Namespace) -> None:
    """The CLI's arguments for this suite; ValueError saying what is wrong."""
    _resolve(args.size, args.device, args.repeats, args.estimate_rows, args.exact_rows, args.threads)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("estimates")
    g.add_argument("--estimate-rows", type=int, default=None, help="examples the estimate is timed on (full: 16)")
    g.add_argument("--exact-rows", type=int, default=None, help="examples the exact Jacobian is timed on (1)")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(args.out, size=args.size, device=args.device, repeats=args.repeats, estimate_rows=args.estimate_rows,
               exact_rows=args.exact_rows, threads=args.threads, plots=not args.no_plots)


if __name__ == "__main__":  # python -m distjac.bench.estimates [--size tiny] [--out DIR]
    import sys

    _p = argparse.ArgumentParser(prog="python -m distjac.bench.estimates")
    _p.add_argument("--size", choices=tuple(PRESETS), default="full")
    _p.add_argument("--out", default="bench_out")
    _p.add_argument("--device", default="cpu")
    _p.add_argument("--repeats", type=int, default=None)
    _p.add_argument("--threads", type=int, default=2)
    add_arguments(_p)
    _a = _p.parse_args()
    _a.no_plots = True
    try:
        check_args(_a)
    except ValueError as _e:
        _p.error(str(_e))
    print((Path(_a.out) / run_from_args(_a)["files"]["markdown"]).read_text())
    sys.exit(0)
