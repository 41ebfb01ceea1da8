"""The ``memory`` suite: peak resident memory of the driver and of the workers as a job's
rows grow.

Each measurement is one ``distjac run`` in a fresh process (so nothing of an earlier run
counts): the scaling suite's synthetic dataset and MLP (16 -> 64 -> 8), written to Arrow
parts, with the same shard size at every row count. The driver reports its own peak in
the job report, and each worker its own with every part it writes (the report keeps the
largest per worker): ``VmHWM``, the peak of the process's own memory map. Not the
kernel's ``ru_maxrss`` of the child (``os.wait4``): Linux carries that over from the
parent at fork and exec, so a child of a 2 GiB benchmark process "peaks" at 2 GiB
whatever it does (measured: 1,890 MiB at every row count, in both modes).

Streaming to parts, neither the driver nor a worker should grow with the rows: the driver
holds the manifest and at most ``parallel_iterations`` receipts, a worker one shard. Each
job's output is then checked: sampled rows against ``distjac.batch_jacobian`` in this
process.

Modes: ``engine`` runs the shards on N local Ray workers (the driver only schedules and
records); ``in-process`` (``--workers 0``) computes them in the driver, which then is its
own worker.

    distjac bench memory                    # 250k .. 2M rows, ~5 min on 2 cores
    distjac bench memory --size tiny        # seconds plus Ray's start
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from distjac.io.sink import read_result

from .common import check_device, log, machine_line, median, new_result, write_outputs
from .scaling import MODEL_SIZES, check_sample, sample_rows, synthetic_rows

SUITE = "memory"
MODES = ("engine", "in-process")
PRESETS = {
    "tiny": {"rows": [2_000, 8_000], "shard_size": 1_000, "repeats": 1, "workers": 2},
    "full": {"rows": [250_000, 500_000, 1_000_000, 2_000_000], "shard_size": 50_000, "repeats": 1, "workers": 2},
}


def _spec(out: Path, rows: int, shard_size: int, workers: int, device: str) -> dict[str, Any]:
    return {
        "model": {"factory": "distjac.models:mlp", "kwargs": {"sizes": MODEL_SIZES}},
        "data": {"kind": "synthetic", "rows": rows, "shape": [MODEL_SIZES[0]], "seed": 0},
        "jacobian": {"mode": "rev"},
        "engine": {"num_workers": workers, "device": device, "shard_size": shard_size, "progress": False},
        "output": {"path": str(out), "format": "arrow", "overwrite": True},
    }


def run_job_measured(rows: int, *, shard_size: int, workers: int, device: str, tmp: Path) -> dict[str, Any]:
    """One ``distjac run`` in a child process: its peak RSS, the workers' and the report."""
    out = tmp / f"out-{rows}-{workers}"
    cfg = tmp / f"job-{rows}-{workers}.yaml"
    cfg.write_text(yaml.safe_dump(_spec(out, rows, shard_size, workers, device)))
    t0 = time.perf_counter()
    with open(tmp / "stdout", "w+b") as so, open(tmp / "stderr", "w+b") as se:
        proc = subprocess.run([sys.executable, "-m", "distjac.cli", "run", str(cfg), "--json"], stdout=so,
                              stderr=se, check=False)
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read().decode(), se.read().decode()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"distjac run of {rows:,} rows failed (exit {proc.returncode}): {stderr.strip()[-500:]}")
    report = json.loads(stdout)
    # What was measured must also be right: sampled rows against the in-process kernel.
    idx = sample_rows(rows)
    check_err = check_sample("write", read_result(out, rows=idx), synthetic_rows(rows)[idx], idx)
    peaks = report["timing"]["worker_peak_rss_bytes"]
    return {"driver_peak_rss_bytes": report["driver_peak_rss_bytes"], "worker_peak_rss_bytes": max(peaks.values()),
            "workers_seen": len(peaks), "wall_s": wall, "rows_per_s": report["rows_per_s"],
            "shards": report["shards"], "bytes_written": report["bytes_written"], "check_max_rel_err": check_err,
            "out": out}


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [f"### Memory (MLP {'-'.join(map(str, MODEL_SIZES))}, Arrow parts, shards of {cfg['shard_size']:,} "
             f"rows, {cfg['workers']} Ray workers in engine mode)", "", machine_line(result),
             f"Command: `{result.get('command')}`", "",
             "| mode | rows | shards | written | driver peak RSS | worker peak RSS | rows/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["records"]:
        if r["status"] != "ok":
            lines.append(f"| {r['mode']} | {r['rows']:,} | {r['status']}: {r['reason']} | | | | |")
            continue
        lines.append(f"| {r['mode']} | {r['rows']:,} | {r['shards']} | {r['bytes_written'] / 2**20:,.0f} MiB | "
                     f"{r['driver_peak_rss_bytes'] / 2**20:,.0f} MiB | {r['worker_peak_rss_bytes'] / 2**20:,.0f} MiB"
                     f" | {r['rows_per_s']:,.0f} |")
    for mode in cfg["modes"]:
        mine = [r for r in result["records"] if r["mode"] == mode and r["status"] == "ok"]
        if len(mine) >= 2:
            a, b = mine[0], mine[-1]
            lines.append(f"- {mode}: {b['rows'] / a['rows']:.0f}x the rows: driver peak "
                         f"{b['driver_peak_rss_bytes'] / a['driver_peak_rss_bytes'] - 1:+.1%}, worker peak "
                         f"{b['worker_peak_rss_bytes'] / a['worker_peak_rss_bytes'] - 1:+.1%}.")
    return "\n".join(lines)


def plot(result: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not result["records"]:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, marker in zip(result["config"]["modes"], "os"):
        mine = [r for r in result["records"] if r["mode"] == mode and r["status"] == "ok"]
        if not mine:
            continue
        rows = [r["rows"] for r in mine]
        ax.plot(rows, [r["driver_peak_rss_bytes"] / 2**20 for r in mine], "-" + marker, label=f"{mode}: driver")
        if mode == "engine":
            ax.plot(rows, [r["worker_peak_rss_bytes"] / 2**20 for r in mine], "--" + marker,
                    label=f"{mode}: worker (largest)")
    rows = result["config"]["rows"]
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(rows, [f"{r:,}" for r in rows], fontsize=8)
    ax.set_xlabel("rows (log)")
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title("Peak memory as rows grow (streamed to Arrow parts)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "memory.png", dpi=110)
    plt.close(fig)
    return ["memory.png"]


def run(out_dir: str | os.PathLike, *, size: str = "full", rows: Sequence[int] | None = None,
        shard_size: int | None = None, workers: int | None = None, modes: Sequence[str] = MODES,
        repeats: int | None = None, device: str = "cpu", plots: bool = True,
        tmp_dir: str | None = None) -> dict[str, Any]:
    """Run the memory suite; write ``memory.json``, ``memory.md`` and ``memory.png``."""
    rows, shard_size, workers, repeats = _resolve(size, rows, shard_size, workers, modes, repeats, device)
    config = {"size": size, "rows": rows, "shard_size": shard_size, "workers": workers, "modes": list(modes),
              "repeats": repeats, "device": device, "model": f"distjac.models.mlp({MODEL_SIZES})",
              "measure": "VmHWM (peak of the process's own memory map) of the `distjac run` driver, from its "
                         "report, and of each worker, reported with each part; median of repeats"}
    result = new_result(SUITE, config, device)
    log(machine_line(result))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distjac-memory-", dir=tmp_dir) as tmp:
        for mode in modes:
            n = workers if mode == "engine" else 0
            for r in rows:
                log(f"   {mode} {r:,} rows ...")
                try:
                    runs = [run_job_measured(r, shard_size=shard_size, workers=n, device=device, tmp=Path(tmp))
                            for _ in range(repeats)]
                except Exception as err:  # recorded (what failed and why), and the other sizes still run
                    status = "mismatch" if isinstance(err, AssertionError) else "error"
                    log(f"      {status}: {type(err).__name__}: {err}")
                    result["records"].append({"mode": mode, "rows": r, "workers": n, "status": status,
                                              "reason": f"{type(err).__name__}: {str(err)[:500]}"})
                    continue
                rec = {"mode": mode, "rows": r, "workers": n, "shards": runs[0]["shards"],
                       "bytes_written": runs[0]["bytes_written"], "status": "ok",
                       "check_max_rel_err": max(x["check_max_rel_err"] for x in runs)}
                for key in ("driver_peak_rss_bytes", "worker_peak_rss_bytes", "wall_s", "rows_per_s"):
                    rec[key] = median([x[key] for x in runs])
                    rec[key + "_runs"] = [x[key] for x in runs]
                for x in runs:
                    shutil.rmtree(x["out"], ignore_errors=True)
                log(f"      driver {rec['driver_peak_rss_bytes'] / 2**20:,.0f} MiB, worker "
                    f"{rec['worker_peak_rss_bytes'] / 2**20:,.0f} MiB")
                result["records"].append(rec)
    result["total_s"] = time.perf_counter() - t0
    return write_outputs(result, Path(out_dir), markdown(result), plot, plots=plots)


def _resolve(size, rows, shard_size, workers, modes, repeats, device):
    """The preset's values where none are given; ValueError for values that cannot run."""
    preset = PRESETS[size]
    rows = sorted(preset["rows"] if rows is None else rows)
    shard_size = preset["shard_size"] if shard_size is None else shard_size
    workers = preset["workers"] if workers is None else workers
    repeats = preset["repeats"] if repeats is None else repeats
    if bad := [m for m in modes if m not in MODES]:
        raise ValueError(f"unknown mode {bad}; choose from {list(MODES)}")
    if not rows or any(r < 1 for r in rows) or shard_size < 1 or workers < 1 or repeats < 1:
        raise ValueError("--memory-rows, --shard-size, --memory-workers and --repeats must be >= 1")
    check_device(device)
    return rows, shard_size, workers, repeats


def _rows_arg(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(r) for r in text.split(",")]
    except ValueError:
        raise ValueError(f"--memory-rows {text!r}: give comma-separated integers") from None


def check_args(args: argparse.Namespace) -> None:
    """The CLI's arguments for this suite; ValueError saying what is wrong."""
    _resolve(args.size, _rows_arg(args.memory_rows), args.shard_size, args.memory_workers, args.modes.split(","),
             args.repeats, args.device)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory")
    g.add_argument("--memory-rows", default=None, help="comma-separated row counts (full: 250k, 500k, 1M, 2M)")
    g.add_argument("--memory-workers", type=int, default=None, help="Ray workers in engine mode (default 2)")
    g.add_argument("--modes", default=",".join(MODES), help="comma-separated: engine, in-process")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(args.out, size=args.size, rows=_rows_arg(args.memory_rows), shard_size=args.shard_size,
               workers=args.memory_workers,
               modes=args.modes.split(","), repeats=args.repeats, device=args.device, plots=not args.no_plots)
