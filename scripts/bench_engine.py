#!/usr/bin/env python
"""Benchmark of the distributed engine (issue 3), side by side in one run.

On W1 (MLP tanh 64-256-256-32) at B=65536 (float32):

1. throughput of the in-process kernel using every core, of ``Engine`` with 1 local
   worker and with 2 local workers (warm-up, then ``--repeat`` runs, median);
2. the engine's gather bandwidth (reading each shard's record batch and copying it into
   the output) against a plain numpy copy of the same bytes, into fresh and into
   pre-touched memory;
3. the driver's peak memory during an engine call (RSS sampled every 5 ms, above the
   level before the call) against the plan's estimate: output + in-flight shards.

Writes JSON (``--out``) and prints a markdown table for docs/benchmarks.md.

    python scripts/bench_engine.py                      # ~3 minutes on 2 cores
    python scripts/bench_engine.py --batch 8192 --repeat 1   # a quick look
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

import distjac
from distjac.models import mlp
from distjac.plan import format_bytes

W1 = [64, 256, 256, 32]


def release_free_memory() -> None:
    """Return freed heap memory to the OS so RSS starts from what is really in use
    (glibc keeps large freed blocks after its mmap threshold adapts)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakRSS:
    """Samples this process's memory in a thread: peak RSS, and peak private memory
    (RSS minus shared pages, such as object-store buffers mapped zero-copy)."""

    def __init__(self, every: float = 0.005):
        self.proc, self.every = psutil.Process(), every
        self.peak = self.start = self.peak_private = self.start_private = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        m = self.proc.memory_info()
        self.peak = max(self.peak, m.rss)
        self.peak_private = max(self.peak_private, m.rss - getattr(m, "shared", 0))

    def __enter__(self):
        release_free_memory()
        m = self.proc.memory_info()
        self.start = self.peak = m.rss
        self.start_private = self.peak_private = m.rss - getattr(m, "shared", 0)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def timed(fn, repeat: int) -> tuple[float, list[float]]:
    fn()  # warm-up: worker start, kernels' first passes, caches
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return statistics.median(times), times


def memcpy_gbps(nbytes: int, repeat: int) -> dict:
    src = np.ones(nbytes // 4, dtype=np.float32)
    fresh, touched = [], []
    dst = np.empty_like(src)
    dst.fill(0)
    for _ in range(repeat):
        new = np.empty_like(src)
        t0 = time.perf_counter()
        np.copyto(new, src)
        fresh.append(time.perf_counter() - t0)
        del new
        t0 = time.perf_counter()
        np.copyto(dst, src)
        touched.append(time.perf_counter() - t0)
    return {"fresh_gbps": nbytes / statistics.median(fresh) / 1e9,
            "touched_gbps": nbytes / statistics.median(touched) / 1e9}


def isolated_gather(jac: torch.Tensor, shard_size: int, repeat: int) -> dict:
    """The engine's gather alone, with idle workers: the result's shards as record batches
    in Ray's object store, read back zero-copy and placed with the engine's own
    ``place_shard`` into a fresh output and into a pre-touched one."""
    import ray

    from distjac import arrow
    from distjac.engine import place_shard

    bounds = [(s, min(jac.shape[0], s + shard_size)) for s in range(0, jac.shape[0], shard_size)]
    refs = [ray.put(arrow.to_record_batch(range(a, b), jac[a:b], dtype=None)) for a, b in bounds]
    fresh, touched = [], []
    warm = torch.zeros_like(jac)
    for _ in range(repeat):
        for target, times in ((None, fresh), (warm, touched)):
            release_free_memory()
            t0 = time.perf_counter()
            out = torch.empty_like(jac) if target is None else target
            for ref, (a, b) in zip(refs, bounds):
                place_shard(out, ray.get(ref), a, b)
            times.append(time.perf_counter() - t0)
            del out
    del refs
    nbytes = jac.numel() * jac.element_size()
    return {"bytes": nbytes, "fresh_gbps": nbytes / statistics.median(fresh) / 1e9,
            "touched_gbps": nbytes / statistics.median(touched) / 1e9}


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import ray

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "platform": platform.platform()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mode", default="rev", help="kernel mode (W1: rev, one pass per output)")
    ap.add_argument("--parallel-iterations", type=int, default=8)
    ap.add_argument("--out", default="bench_out/bench_engine.json")
    args = ap.parse_args(argv)

    model = mlp(W1).eval()
    x = torch.randn(args.batch, W1[0], generator=torch.Generator().manual_seed(0))
    results: dict = {"workload": f"W1 MLP tanh {'-'.join(map(str, W1))}", "batch": args.batch,
                     "mode": args.mode, "repeat": args.repeat, "machine": machine(), "runs": {}}

    # 1. In-process kernel on every core.
    torch.set_num_threads(os.cpu_count() or 1)
    med, times = timed(lambda: distjac.batch_jacobian(model, x, mode=args.mode), args.repeat)
    reference = distjac.batch_jacobian(model, x, mode=args.mode)
    results["runs"]["in-process"] = {"threads": torch.get_num_threads(), "median_s": med, "times_s": times,
                                     "rows_per_s": args.batch / med}
    print(f"in-process ({torch.get_num_threads()} threads): {args.batch / med:,.0f} rows/s", file=sys.stderr)

    # 2. The engine with 1 and 2 local workers (one CPU each; torch threads follow).
    for workers in (1, 2):
        with distjac.Engine(num_workers=workers, device="cpu", parallel_iterations=args.parallel_iterations,
                            progress=False) as engine:
            engine.workers()
            med, times = timed(lambda e=engine: e.batch_jacobian(model, x, mode=args.mode), args.repeat)
            with PeakRSS() as mem:
                jac = engine.batch_jacobian(model, x, mode=args.mode)
            stats = engine.last_stats
            assert torch.allclose(jac, reference, rtol=1e-5, atol=1e-6), "engine result differs from the kernel"
            if workers == 2:
                results["gather_isolated"] = isolated_gather(jac, stats.plan.shard_size, max(3, args.repeat))
            del jac
            plan = stats.plan
            estimate = plan.driver_peak_bytes - plan.driver_overhead
            results["runs"][f"engine-{workers}"] = {
                "workers": workers, "median_s": med, "times_s": times, "rows_per_s": args.batch / med,
                "shards": len(plan), "shard_size": plan.shard_size, "shard_out_bytes": plan.shard_out_bytes(),
                "in_flight": plan.in_flight, "gather_bytes": stats.gather_bytes, "gather_s": stats.gather_s,
                "gather_gbps": stats.gather_gbps, "driver_peak_increase_bytes": mem.peak - mem.start,
                "driver_private_peak_increase_bytes": mem.peak_private - mem.start_private,
                "driver_estimate_bytes": estimate, "output_bytes": plan.total_out_bytes,
                "per_worker_rows_per_s": [w.rows_per_s for w in stats.workers],
            }
            print(f"engine {workers} worker(s): {args.batch / med:,.0f} rows/s; {stats}", file=sys.stderr)

    # 3. A plain copy of the same bytes.
    nbytes = results["runs"]["engine-2"]["gather_bytes"]
    results["memcpy"] = {"bytes": nbytes, **memcpy_gbps(nbytes, max(3, args.repeat))}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(table(results))
    return results


def table(r: dict) -> str:
    runs, base = r["runs"], r["runs"]["in-process"]["rows_per_s"]
    m = r["machine"]
    lines = [
        f"{r['workload']}, B={r['batch']:,}, float32, mode={r['mode']}; median of {r['repeat']} after a warm-up.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
        f"torch {m['torch']}, Ray {m['ray']}.",
        "",
        "| run | rows/s | vs in-process | shards x rows | gather GB/s | driver peak: measured / estimate |",
        "|---|---:|---:|---|---:|---|",
        f"| in-process kernel, {runs['in-process']['threads']} threads | {base:,.0f} | 1.00x | - | - | - |",
    ]
    for key in ("engine-1", "engine-2"):
        e = runs[key]
        lines.append(
            f"| Engine, {e['workers']} local worker(s) x 1 CPU | {e['rows_per_s']:,.0f} | "
            f"{e['rows_per_s'] / base:.2f}x | "
            f"{e['shards']} x {e['shard_size']:,} ({format_bytes(e['shard_out_bytes'])}) | {e['gather_gbps']:.2f} | "
            f"+{format_bytes(e['driver_peak_increase_bytes'])} (private +"
            f"{format_bytes(e['driver_private_peak_increase_bytes'])}) / {format_bytes(e['driver_estimate_bytes'])} |"
        )
    mc, gi = r["memcpy"], r["gather_isolated"]
    e2 = runs["engine-2"]
    lines += [
        "",
        f"| gather of {format_bytes(mc['bytes'])}, GB/s | into fresh memory | into pre-touched memory |",
        "|---|---:|---:|",
        f"| np.copyto of the same bytes | {mc['fresh_gbps']:.2f} | {mc['touched_gbps']:.2f} |",
        f"| engine gather alone (object store -> output, workers idle) | {gi['fresh_gbps']:.2f} "
        f"({gi['fresh_gbps'] / mc['fresh_gbps']:.2f}x) | {gi['touched_gbps']:.2f} "
        f"({gi['touched_gbps'] / mc['touched_gbps']:.2f}x) |",
        f"| engine gather during the run (2 workers busy on the same 2 cores) | {e2['gather_gbps']:.2f} "
        f"({e2['gather_gbps'] / mc['fresh_gbps']:.2f}x) | - |",
        "",
        f"Driver estimate = output ({format_bytes(e2['output_bytes'])}) + {e2['in_flight']} shards in flight "
        "x (input + output bytes); measured: peak RSS above the level before the call (private: "
        "without shared pages, i.e. without object-store buffers mapped zero-copy).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
