"""Driver memory of a job against its number of rows (issue 4, item 7).

Runs the same job (a reduction, so the output stays small) with ROWS and 8 x ROWS rows,
each in a fresh ``distjac run`` process, and reads that process's peak RSS from its job
report (``VmHWM`` of the driver's own memory map; ``os.wait4``'s ``ru_maxrss`` would
include this script's memory, which Linux carries over at fork and exec): the driver
must not grow by more than 20%.
With ``--workers 0`` the driver also computes the shards, so its peak includes one
shard's Jacobian; with ``--workers N`` the shards run in Ray workers (not children of
the driver) and only the driver is measured.

    python scripts/bench_job_memory.py                      # in-process, W1, frobenius
    python scripts/bench_job_memory.py --workers 2          # through the Ray engine
    python scripts/bench_job_memory.py --rows 16384 --repeat 3 --json bench_out/job_memory.json

Prints a Markdown table (for docs/benchmarks.md) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(path: str, rows: int, out: str, args) -> None:
    spec = {
        "model": {"factory": "distjac.models:mlp", "kwargs": {"sizes": args.sizes}},
        "data": {"kind": "synthetic", "rows": rows, "shape": [args.sizes[0]], "seed": 0},
        "jacobian": {"mode": "rev", "reduce": ["frobenius"]},
        "engine": {"num_workers": args.workers, "shard_size": args.shard_size, "progress": False},
        "output": {"path": out, "format": "arrow"},
    }
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)


def _run(rows: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="distjac-mem-") as tmp:
        cfg = os.path.join(tmp, "job.yaml")
        _config(cfg, rows, os.path.join(tmp, "out"), args)
        t0 = time.perf_counter()
        with open(os.path.join(tmp, "stdout"), "w+b") as out, open(os.path.join(tmp, "stderr"), "w+b") as err:
            proc = subprocess.Popen([sys.executable, "-m", "distjac.cli", "run", cfg, "--json"],
                                    stdout=out, stderr=err, cwd=ROOT)
            _, status, _usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        if proc.returncode != 0:
            raise SystemExit(f"distjac run failed ({proc.returncode}): {stderr.decode().strip()}")
        report = json.loads(stdout)
        return {"rows": rows, "peak_rss_mib": report["driver_peak_rss_bytes"] / 2**20,
                "seconds": time.perf_counter() - t0,
                "shards": report["shards"], "rows_per_s": report["rows_per_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32768, help="the smaller job's rows (the larger has 8x)")
    p.add_argument("--factor", type=int, default=8)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 256, 32], help="MLP sizes (W1)")
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--workers", type=int, default=0, help="0: in-process (no Ray)")
    p.add_argument("--repeat", type=int, default=2, help="runs per size; the median is reported")
    p.add_argument("--json", default=os.path.join(ROOT, "bench_out", "job_memory.json"))
    args = p.parse_args()

    results = {}
    for rows in (args.rows, args.rows * args.factor):
        runs = [_run(rows, args) for _ in range(args.repeat)]
        results[rows] = {
            "rows": rows,
            "shards": runs[0]["shards"],
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
            "runs_mib": [round(r["peak_rss_mib"], 1) for r in runs],
            "seconds": statistics.median(r["seconds"] for r in runs),
        }
    small, large = results[args.rows], results[args.rows * args.factor]
    growth = large["peak_rss_mib"] / small["peak_rss_mib"] - 1
    record = {"workers": args.workers, "sizes": args.sizes, "shard_size": args.shard_size,
              "python": sys.version.split()[0], "results": list(results.values()), "growth": growth,
              "ok": growth <= 0.20}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)
    print(f"| rows | shards | driver peak RSS (MiB, median of {args.repeat}) | runs | wall (s) |")
    print("|---:|---:|---:|---|---:|")
    for r in results.values():
        print(f"| {r['rows']:,} | {r['shards']} | {r['peak_rss_mib']:.0f} | {r['runs_mib']} | {r['seconds']:.1f} |")
    print(f"\n{args.factor}x rows: peak driver RSS {growth:+.1%} (limit +20%: {'ok' if record['ok'] else 'EXCEEDED'})")


if __name__ == "__main__":
    main()
