"""The ``scaling`` suite: a synthetic dataset of millions of rows through the engine, over
1..N workers, on the embedded local Ray and on a multi-node cluster on this machine.

The workload is a small tanh MLP (16 -> 64 -> 8; each row's Jacobian is 8 x 16 float32,
512 bytes), cheap enough per row that the engine's own costs (reading, Arrow, gathering,
writing, scheduling) show next to the kernel's. Three variants of the same rows:

``gather``
    ``Engine.batch_jacobian`` on the rows held by the driver: every shard comes back
    as an Arrow record batch and is copied into one stacked output (1 GB at full size).
``write``
    ``Engine.run`` of a job: each worker reads its rows from the synthetic source and
    writes its shard as an Arrow IPC part (1 GB of parts at full size).
``write+frobenius``
    The same job reduced to one Frobenius norm per row (8 MB of parts).

Two more variants compare distjac with a Ray Data pipeline on the same data and workers
(``--variants dataset-job,ray-data``; not in the default run). The rows are the same
synthetic rows, made by a Ray Data pipeline (``range -> map_batches``) and materialized
once in the object store, with an ``id`` column:

``dataset-job``
    ``Engine.run`` of a job whose source is that Dataset (``data.kind: ray_dataset``),
    writing Parquet parts (``output.keep_columns: [id]``).
``ray-data``
    ``ds.map_batches(distjac.ray_data.Jacobians, concurrency=workers, batch_size=shard
    rows).write_parquet(...)``: the transform in Ray Data's own actor pool, the same
    Parquet output.

Both are timed from cold, as a user runs them: Ray Data starts its actor pool with each
execution, so each ``dataset-job`` run starts its Engine (workers, model) and checks the
dataset's blocks inside the timing too.

Topologies: ``local`` is the embedded Ray instance an Engine starts (one per process);
``cluster`` is ``ray.cluster_utils.Cluster`` with a head of no CPUs and one node of one
CPU per worker, all on this machine: separate raylets and object stores, so results cross
nodes as they would on a real cluster (though not a real network). ``local`` also runs
each job variant in-process (``workers=0``, no Ray, one torch thread): the kernel's and
the sink's own speed on one core, without the engine.

Procedure, per (topology, variant, workers): start the engine and its workers; one
warm-up on a small slice (workers load the model, torch warms up); one run on all rows
whose result is checked (sampled rows against ``distjac.batch_jacobian`` in this process,
reductions against ``distjac.reduce``); then ``repeats`` timed runs, each on all rows into
a fresh output, and the median. Efficiency is rows/s over (workers x the 1-worker rows/s)
of the same topology and variant. The time breakdown is each stage's seconds summed over
the shards of the median run, divided by the shards: read, compute, to host and Arrow on
the worker; gather (driver) or write (worker); and wait, the workers' idle time (wall time
x workers, less their busy time, per shard: scheduling, the driver, the last shards'
stragglers). With more workers the stages overlap; the breakdown says where each shard's
time goes, not the wall time. The JSON also keeps ``queue_s_per_shard``: submission to
start on a worker, mostly shards waiting behind others, as ``parallel_iterations`` intends.

    distjac bench scaling                           # 2M rows, workers 1..cores, ~15 min on 2 cores
    distjac bench scaling --size tiny               # seconds (the test suite runs this)
    distjac bench scaling --rows 500000 --workers 1,2,4 --nodes 4
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import distjac
from distjac.models import mlp
from distjac.reduce import reduce_block

from .common import check_device, log, machine_line, median, new_result, write_outputs

SUITE = "scaling"
MODEL_SIZES = [16, 64, 8]
DEFAULT_VARIANTS = ("gather", "write", "write+frobenius")
DATA_VARIANTS = ("dataset-job", "ray-data")  # a Ray Data Dataset in, Parquet out
VARIANTS = DEFAULT_VARIANTS + DATA_VARIANTS
TOPOLOGIES = ("local", "cluster")
STAGES = ("read_s", "compute_s", "to_host_s", "arrow_s", "gather_s", "write_s", "wait_s")
WORKER_BUSY = ("read_s", "compute_s", "to_host_s", "arrow_s", "write_s")
PRESETS = {
    "tiny": {"rows": 6_000, "shard_size": 500, "repeats": 1, "workers": [1, 2]},
    "full": {"rows": 2_000_000, "shard_size": 50_000, "repeats": 3, "workers": None},  # None: 1..cores
}
CHECK_ROWS = 24  # rows of each checked run compared with the in-process kernel


def default_workers() -> list[int]:
    """1, 2, 4, ... up to this machine's cores, and the core count itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    out, n = [], 1
    while n < cores:
        out.append(n)
        n *= 2
    return [*out, cores]


def _model():
    return mlp(MODEL_SIZES).eval().requires_grad_(False)


def _job_spec(out: Path, rows: int, shard_size: int, variant: str, device: str, workers: int,
              address: str | None) -> distjac.JobSpec:
    return distjac.JobSpec.from_dict({
        "model": {"factory": "distjac.models:mlp", "kwargs": {"sizes": MODEL_SIZES}},
        "data": {"kind": "synthetic", "rows": rows, "shape": [MODEL_SIZES[0]], "seed": 0},
        "jacobian": {"mode": "rev", "reduce": ["frobenius"] if variant == "write+frobenius" else None},
        "engine": {"address": address, "num_workers": workers, "device": device, "shard_size": shard_size,
                   "max_in_flight": max(8, 2 * workers), "progress": False},
        "output": {"path": str(out), "format": "arrow", "overwrite": True},
    })


def _dataset(rows: int):
    """The synthetic rows as a materialized Ray Data Dataset (columns ``id``, ``x``), made
    by a Ray Data pipeline: ``range`` -> ``map_batches`` reading the synthetic source."""
    import ray.data

    from distjac.io.sources import open_source

    source = open_source(_job_spec(Path("unused"), rows, rows, "gather", "cpu", 1, None).data)

    def rows_of(batch):
        ids = batch["id"]
        return {"id": ids, "x": source.read(int(ids[0]), int(ids[-1]) + 1).numpy()}  # range batches are contiguous

    return ray.data.range(rows).map_batches(rows_of, batch_format="numpy").materialize()


def _dataset_job_spec(out: Path, ds, shard_size: int, workers: int, address: str | None) -> distjac.JobSpec:
    return distjac.JobSpec.from_dict({
        "model": {"factory": "distjac.models:mlp", "kwargs": {"sizes": MODEL_SIZES}},
        "data": {"kind": "ray_dataset", "dataset": ds, "column": "x"},
        "jacobian": {"mode": "rev"},
        "engine": {"address": address, "num_workers": workers, "device": "cpu", "shard_size": shard_size,
                   "max_in_flight": max(8, 2 * workers), "progress": False},
        "output": {"path": str(out), "format": "parquet", "overwrite": True, "keep_columns": ["id"]},
    })


def _ray_data_run(ds, out: Path, workers: int, shard_size: int, device: str) -> float:
    from distjac.ray_data import Jacobians

    t0 = time.perf_counter()
    ds.map_batches(Jacobians, fn_constructor_args=(_model(), "x"),
                   fn_constructor_kwargs={"mode": "rev", "keep_input": False, "device": device},
                   concurrency=workers, batch_size=shard_size, batch_format="numpy",
                   num_gpus=1 if device.startswith("cuda") else None).write_parquet(str(out))
    return time.perf_counter() - t0


def _parquet_sample(out: Path, idx: np.ndarray) -> np.ndarray:
    """The Jacobians of the rows whose ``id`` is in ``idx`` (sorted by id) from a Parquet
    output of either data variant (distjac's fixed_shape_tensor or Ray Data's tensor column)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from distjac import arrow

    table = pads.dataset(str(out), format="parquet").to_table(columns=["id", "jacobian"])
    table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(idx))).sort_by("id")
    col = table.column("jacobian")
    if arrow.tensor_info(col.type) is not None:
        return arrow.column_values(col)
    return np.concatenate([c.to_numpy(zero_copy_only=False) for c in col.chunks])


def synthetic_rows(rows: int) -> torch.Tensor:
    from distjac.io.sources import open_source

    spec = _job_spec(Path("unused"), rows, rows, "gather", "cpu", 1, None)
    return open_source(spec.data).read(0, rows)


def sample_rows(rows: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.unique(np.concatenate([[0, rows // 2, rows - 1], rng.integers(0, rows, CHECK_ROWS)]))


def check_sample(variant: str, result: Any, x_rows: torch.Tensor, idx: np.ndarray) -> float:
    """Largest relative error of sampled rows against the in-process kernel; raises if
    it is off (nothing is timed on a wrong result)."""
    ref = distjac.batch_jacobian(_model(), x_rows, mode="rev")
    if variant == "write+frobenius":
        want = reduce_block(ref, ["frobenius"], 1)["frobenius"].numpy()
        got = np.asarray(result["frobenius"])
    else:
        want, got = ref.numpy(), np.asarray(result)
    err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))
    if not np.allclose(got, want, rtol=1e-4, atol=1e-6 * float(np.max(np.abs(want)))):
        raise AssertionError(f"scaling {variant}: sampled rows differ from the in-process kernel "
                             f"(max relative error {err:.3g}); nothing was timed")
    return err


# --------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------


def _gather_run(engine, x: torch.Tensor) -> tuple[float, dict[str, float], int, torch.Tensor]:
    t0 = time.perf_counter()
    out = engine.batch_jacobian(_model(), x, mode="rev")
    wall = time.perf_counter() - t0
    stats = engine.last_stats
    totals = dict.fromkeys(STAGES, 0.0)
    for s in stats.shards:
        totals["read_s"] += s.read_s
        totals["compute_s"] += s.compute_s
        totals["to_host_s"] += s.to_host_s
        totals["arrow_s"] += s.arrow_s
        totals["gather_s"] += s.gather_s
        totals["queue_s"] = totals.get("queue_s", 0.0) + max(0.0, s.wait_s - s.worker_s)
    return wall, totals, len(stats.shards), out


def _job_run(run_job, spec) -> tuple[float, dict[str, float], int, dict]:
    t0 = time.perf_counter()
    report = run_job(spec)
    wall = time.perf_counter() - t0
    totals = dict.fromkeys(STAGES, 0.0)
    for k, v in report["timing"]["totals_s"].items():
        key = "queue_s" if k == "wait_s" else k
        totals[key] = totals.get(key, 0.0) + v
    return wall, totals, report["computed_shards"], report


def _measure(kind: str, variant: str, workers: int, *, rows: int, shard_size: int, repeats: int, device: str,
             address: str | None, x: torch.Tensor | None, tmp: Path) -> dict[str, Any]:
    """Warm-up, checked run, timed repeats of one (variant, workers) configuration."""
    from distjac.io.sink import read_result
    from distjac.jobs import run_job

    idx = sample_rows(rows)
    x_check = synthetic_rows(rows)[idx] if x is None else x[idx]
    rec: dict[str, Any] = {"topology": kind, "variant": variant, "workers": workers, "rows": rows,
                           "shard_size": shard_size, "times_s": [], "status": "ok"}
    warm_rows = min(rows, 2 * max(workers, 1) * shard_size)

    datasets: dict[int, Any] = {}

    def one(n_rows: int, label: str):
        out = tmp / f"{kind}-{variant}-{workers}-{label}"
        if variant in DATA_VARIANTS:
            if n_rows not in datasets:
                datasets[n_rows] = _dataset(n_rows)
            if variant == "ray-data":
                wall = _ray_data_run(datasets[n_rows], out, workers, shard_size, device)
                totals, shards = dict.fromkeys(STAGES, 0.0), -(-n_rows // shard_size)
            else:  # from cold, as Ray Data's run is: the Engine's start and the dataset's check are timed
                import distjac.ray_data

                distjac.ray_data._OPENED = None  # no block checks kept from the previous run
                spec = _dataset_job_spec(out, datasets[n_rows], shard_size, workers, address)
                t0 = time.perf_counter()
                with distjac.Engine(address=address, num_workers=workers, device=device, shard_size=shard_size,
                                    parallel_iterations=max(8, 2 * workers), progress=False) as cold:
                    _, totals, shards, _ = _job_run(cold.run, spec)
                wall = time.perf_counter() - t0
            return wall, totals, shards, None, out, out
        if variant == "gather":
            wall, totals, shards, res = _gather_run(engine, x[:n_rows])
            view = res
        else:
            spec = _job_spec(out, n_rows, shard_size, variant, device, workers, address)
            wall, totals, shards, res = _job_run(run_job if workers == 0 else engine.run, spec)
            view = out
        return wall, totals, shards, res, view, out

    engine = None
    try:
        if workers > 0 and variant not in DATA_VARIANTS:
            engine = distjac.Engine(address=address, num_workers=workers, device=device, shard_size=shard_size,
                                    parallel_iterations=max(8, 2 * workers), progress=False)
            rec["nodes"] = len({w["node"] for w in engine.workers()})
        elif variant in DATA_VARIANTS:
            import ray

            rec["nodes"] = len([n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")])
        else:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            rec["nodes"] = 1
        try:
            *_, out = one(warm_rows, "warmup")
            shutil.rmtree(out, ignore_errors=True)
            wall, totals, shards, res, view, out = one(rows, "check")
            try:
                if variant in DATA_VARIANTS:
                    got = _parquet_sample(out, idx)
                else:
                    got = res[torch.as_tensor(idx)] if variant == "gather" else read_result(view, rows=idx)
                rec["check_max_rel_err"] = check_sample(variant, got, x_check, idx)
                del res, got
            finally:
                shutil.rmtree(out, ignore_errors=True)
            runs = []
            for _ in range(repeats):
                wall, totals, shards, res, view, out = one(rows, "timed")
                del res
                runs.append((wall, totals, shards))
                rec["times_s"].append(wall)
                shutil.rmtree(out, ignore_errors=True)
        finally:
            if workers == 0:
                torch.set_num_threads(threads)
        if variant == "gather" and engine is not None:
            rec["gather_gbps"] = engine.last_stats.gather_gbps
            rec["worker_peak_rss_bytes"] = max(s.worker_peak_rss_bytes for s in engine.last_stats.shards)
    finally:
        if engine is not None:
            engine.shutdown()
    rec["median_s"] = median(rec["times_s"])
    rec["rows_per_s"] = rows / rec["median_s"]
    wall, totals, shards = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    rec["shards"] = shards
    if variant == "ray-data":  # Ray Data's own stages are not distjac's to break down
        rec["breakdown_s_per_shard"] = None
        return rec
    # "wait": the workers' idle time, (wall x workers - their busy time) per shard: what
    # the engine costs beyond the work itself (scheduling, the driver, stragglers at the
    # end). "queue" (submission to start, kept in the JSON) is mostly shards waiting
    # behind others on a busy worker, which keeping parallel_iterations in flight intends.
    busy = sum(totals.get(k, 0.0) for k in WORKER_BUSY)
    totals["wait_s"] = max(0.0, wall * max(workers, 1) - busy)
    rec["breakdown_s_per_shard"] = {k: totals.get(k, 0.0) / max(shards, 1) for k in STAGES}
    rec["queue_s_per_shard"] = totals.get("queue_s", 0.0) / max(shards, 1)
    # With a worker's stages overlapped (NOTE [overlapped stages] in distjac.shard), a
    # shard costs its slowest stage, not their sum: "wall per shard" is each worker's
    # wall time over its shards, and its ratio to the slowest stage is 1 when the
    # pipeline is full. Busy share: a stage's seconds over the workers' wall time.
    per_shard = wall * max(workers, 1) / max(shards, 1)
    slowest = max(rec["breakdown_s_per_shard"][k] for k in WORKER_BUSY)
    rec["wall_s_per_shard"] = per_shard
    rec["wall_over_slowest_stage"] = per_shard / slowest if slowest > 0 else None
    rec["busy_share"] = {k: totals.get(k, 0.0) / (wall * max(workers, 1)) for k in WORKER_BUSY}
    return rec


def _measure_or_record(kind: str, variant: str, workers: int, **kw) -> dict[str, Any]:
    """_measure, or a record of why it could not (the other configurations still run)."""
    try:
        rec = _measure(kind, variant, workers, **kw)
    except Exception as err:  # reported in the table and the JSON, never hidden
        status = "mismatch" if isinstance(err, AssertionError) else "error"
        log(f"      {status}: {type(err).__name__}: {err}")
        return {"topology": kind, "variant": variant, "workers": workers, "rows": kw["rows"],
                "shard_size": kw["shard_size"], "times_s": [], "status": status,
                "reason": f"{type(err).__name__}: {str(err)[:300]}"}
    log(f"      {rec['rows_per_s']:,.0f} rows/s")
    return rec


# --------------------------------------------------------------------------------------
# Topologies
# --------------------------------------------------------------------------------------


class _LocalRay:
    """The embedded local Ray instance, held open across the Engines of one topology."""

    address = None

    def __init__(self, cpus: int):
        self.cpus = cpus

    def __enter__(self):
        from distjac.engine import ray_connection

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(ray_connection(None, min_cpus=self.cpus))
        return self

    def __exit__(self, *exc):
        self._stack.close()


class _OneMachineCluster:
    """A head with no CPUs and ``nodes`` nodes of one CPU (distjac.engine.local_cluster),
    held open across the Engines of the topology."""

    def __init__(self, nodes: int):
        self.nodes = nodes

    def __enter__(self):
        from distjac.engine import local_cluster, ray_connection

        with contextlib.ExitStack() as stack:
            self.address = stack.enter_context(local_cluster(self.nodes))
            stack.enter_context(ray_connection(self.address, min_cpus=self.nodes))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc):
        self._stack.close()


def _efficiency(records: list[dict[str, Any]]) -> None:
    for r in records:
        if r["workers"] < 1 or r.get("rows_per_s") is None:
            continue
        base = next((b for b in records if b["topology"] == r["topology"] and b["variant"] == r["variant"]
                     and b["workers"] == 1 and b.get("rows_per_s")), None)
        if base is not None:
            r["speedup"] = r["rows_per_s"] / base["rows_per_s"]
            r["efficiency"] = r["speedup"] / r["workers"]


# --------------------------------------------------------------------------------------
# Table and plots
# --------------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [f"### Scaling ({cfg['rows']:,} rows, MLP {'-'.join(map(str, MODEL_SIZES))}, shards of "
             f"{cfg['shard_size']:,} rows, median of {cfg['repeats']})", "", machine_line(result),
             f"Command: `{result.get('command')}`", "",
             "| topology | variant | workers | nodes | rows/s | speedup | efficiency | "
             "per shard (ms): read / compute / to host / Arrow / gather / write / wait | wall per shard (ms) | "
             "wall / slowest stage | compute busy |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in result["records"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['topology']} | {r['variant']} | {r['workers']} | | {r['status']} | | | "
                         f"{r.get('reason')} |")
            continue
        b = r["breakdown_s_per_shard"]
        parts = " / ".join(f"{1e3 * b[k]:.0f}" for k in STAGES) if b else "(Ray Data's)"
        solo = "in-process, 1 thread" if cfg["device"] == "cpu" else f"in-process, {cfg['device']}"
        who = solo if r["workers"] == 0 else str(r["workers"])
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "—"
        eff = f"{100 * r['efficiency']:.0f}%" if "efficiency" in r else "—"
        ratio = r.get("wall_over_slowest_stage")
        busy = r.get("busy_share", {}).get("compute_s")
        lines.append(f"| {r['topology']} | {r['variant']} | {who} | {r.get('nodes', '')} | "
                     f"{r['rows_per_s']:,.0f} | {sp} | {eff} | {parts} | {1e3 * r.get('wall_s_per_shard', 0):.0f} | "
                     f"{f'{ratio:.2f}' if ratio else '—'} | {f'{100 * busy:.0f}%' if busy is not None else '—'} |")
    pairs = [(r, next((o for o in result["records"] if o.get("status") == "ok" and o["variant"] == "dataset-job"
                       and (o["topology"], o["workers"]) == (r["topology"], r["workers"])), None))
             for r in result["records"] if r.get("status") == "ok" and r["variant"] == "ray-data"]
    if any(job for _, job in pairs):
        ratios = ", ".join(f"{r['topology']} {r['workers']} worker(s) {r['rows_per_s'] / job['rows_per_s']:.2f}x"
                           for r, job in pairs if job)
        lines += ["", f"Ray Data transform vs distjac's job on the same Dataset and workers, both from cold "
                  f"(rows/s): {ratios}."]
        # Ray Data cannot fuse its write into an actor pool: an actor pool that holds
        # every CPU leaves its write tasks waiting, so the same worker count is not the
        # same machine. The best of each over the worker counts run compares the machine.
        best = []
        for topo in dict.fromkeys(r["topology"] for r, _ in pairs):
            tops = [max((o for o in result["records"] if o.get("status") == "ok" and o["variant"] == v
                         and o["topology"] == topo and o["workers"] >= 1), key=lambda o: o["rows_per_s"],
                        default=None) for v in ("ray-data", "dataset-job")]
            if all(tops):
                rd, job = tops
                best.append(f"{topo}: Ray Data with {rd['workers']} worker(s) {rd['rows_per_s']:,.0f}, distjac with "
                            f"{job['workers']} {job['rows_per_s']:,.0f}, {rd['rows_per_s'] / job['rows_per_s']:.2f}x")
        if best:
            lines += ["", "The best of each over the worker counts run, on the same machine (rows/s): "
                      + "; ".join(best) + "."]
    lines += ["", "Speedup and efficiency are against 1 worker of the same topology and variant. The "
              "breakdown is each stage's time summed over the median run's shards, per shard; wait is the "
              "workers' idle time (wall x workers - busy) per shard, 0 when the stages overlap. A worker "
              "overlaps its shards' stages, so a shard's wall time (each worker's wall over its shards) "
              "approaches its slowest stage: the ratio is 1 when the pipeline is full. Compute busy: the "
              "share of the workers' wall time spent computing."]
    return "\n".join(lines)


def plot(result: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in result["records"] if r.get("status") == "ok" and r["workers"] >= 1]
    if not recs:
        return []
    files = []
    # Throughput against workers, with the linear ideal from each 1-worker point.
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series = sorted({(r["topology"], r["variant"]) for r in recs})
    cmap = plt.get_cmap("tab10")
    max_w = max(r["workers"] for r in recs)
    for i, (topo, var) in enumerate(series):
        pts = sorted((r["workers"], r["rows_per_s"]) for r in recs if (r["topology"], r["variant"]) == (topo, var))
        ws, ys = zip(*pts)
        style = "-" if topo == "local" else "--"
        ax.plot(ws, ys, style, marker="o", color=cmap(i), label=f"{topo}, {var}")
        one = dict(pts).get(1)
        if one:
            ax.plot([1, max_w], [one, one * max_w], ":", color=cmap(i), linewidth=1)
    ax.set_xlabel("workers")
    ax.set_ylabel("rows/s")
    ax.set_xticks(sorted({r["workers"] for r in recs}))
    ax.set_title("Throughput vs workers (dotted: linear from 1 worker)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "scaling_throughput.png", dpi=110)
    plt.close(fig)
    files.append("scaling_throughput.png")

    # Time per shard by stage, stacked (not for Ray Data's pipeline: its stages are its own).
    recs = [r for r in recs if r["breakdown_s_per_shard"]]
    fig, ax = plt.subplots(figsize=(max(7.5, 0.7 * len(recs) + 2), 4.8))
    short = {"gather": "gather", "write": "write", "write+frobenius": "write+frob"}
    labels = [f"{r['topology'][0].upper()} {short.get(r['variant'], r['variant'])}\n{r['workers']}w" for r in recs]
    bottom = np.zeros(len(recs))
    for j, stage in enumerate(STAGES):
        vals = np.array([1e3 * r["breakdown_s_per_shard"][stage] for r in recs])
        ax.bar(range(len(recs)), vals, bottom=bottom, label=stage.removesuffix("_s"), color=cmap(j))
        bottom += vals
    ax.set_xticks(range(len(recs)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("ms per shard")
    ax.set_title(f"Where a shard's time goes ({result['config']['shard_size']:,} rows per shard; "
                 "L = local, C = cluster)")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(out_dir / "scaling_breakdown.png", dpi=110)
    plt.close(fig)
    files.append("scaling_breakdown.png")
    return files


# --------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------


def run(out_dir: str | os.PathLike, *, size: str = "full", rows: int | None = None, shard_size: int | None = None,
        workers: Sequence[int] | None = None, topologies: Sequence[str] = TOPOLOGIES,
        variants: Sequence[str] = DEFAULT_VARIANTS, repeats: int | None = None, device: str = "cpu",
        in_process: bool = True, plots: bool = True, tmp_dir: str | None = None) -> dict[str, Any]:
    """Run the scaling suite; write ``scaling.json``, ``scaling.md`` and the plots
    ``scaling_throughput.png`` and ``scaling_breakdown.png`` under ``out_dir``.

    The job variants' parts go to a temporary folder under ``tmp_dir`` (default: the
    system's), deleted after each run; at full size one run writes about 1 GB.
    """
    rows, shard_size, repeats, workers = _resolve(size, rows, shard_size, repeats, workers, topologies, variants,
                                                  device)
    config = {"size": size, "rows": rows, "shard_size": shard_size, "repeats": repeats, "workers": workers,
              "topologies": list(topologies), "variants": list(variants), "device": device,
              "model": f"distjac.models.mlp({MODEL_SIZES})", "mode": "rev", "in_process": in_process,
              "cluster_nodes": max(workers), "stages": list(STAGES)}
    result = new_result(SUITE, config, device)
    log(machine_line(result))
    t0 = time.perf_counter()
    x = synthetic_rows(rows) if "gather" in variants else None
    with tempfile.TemporaryDirectory(prefix="distjac-scaling-", dir=tmp_dir) as tmp:
        if in_process and "local" in topologies:
            for variant in variants:
                if variant not in ("gather", *DATA_VARIANTS):
                    log(f"   in-process {variant} ...")
                    result["records"].append(_measure_or_record(
                        "local", variant, 0, rows=rows, shard_size=shard_size, repeats=repeats, device=device,
                        address=None, x=None, tmp=Path(tmp)))
        for topo in topologies:
            # Ray Data's read and write tasks need a CPU beside its actor pool's.
            extra = 1 if set(variants) & set(DATA_VARIANTS) else 0
            holder = _LocalRay(max(workers) + extra) if topo == "local" else _OneMachineCluster(max(workers) + extra)
            with holder:
                for variant in variants:
                    for n in workers:
                        log(f"   {topo} {variant} {n} worker(s) ...")
                        rec = _measure_or_record(topo, variant, n, rows=rows, shard_size=shard_size,
                                                 repeats=repeats, device=device, address=holder.address, x=x,
                                                 tmp=Path(tmp))
                        result["records"].append(rec)
    _efficiency(result["records"])
    result["total_s"] = time.perf_counter() - t0
    return write_outputs(result, Path(out_dir), markdown(result), plot, plots=plots)


def _resolve(size, rows, shard_size, repeats, workers, topologies, variants, device):
    """The preset's values where none are given; ValueError for values that cannot run."""
    preset = PRESETS[size]
    rows = preset["rows"] if rows is None else rows
    shard_size = preset["shard_size"] if shard_size is None else shard_size
    repeats = preset["repeats"] if repeats is None else repeats
    workers = sorted(set(preset["workers"] or default_workers() if workers is None else workers))
    if not workers or any(w < 1 for w in workers) or rows < 1 or shard_size < 1 or repeats < 1:
        raise ValueError("--workers, --rows, --shard-size and --repeats must be >= 1")
    if bad := [t for t in topologies if t not in TOPOLOGIES]:
        raise ValueError(f"unknown topology {bad}; choose from {list(TOPOLOGIES)}")
    if bad := [v for v in variants if v not in VARIANTS]:
        raise ValueError(f"unknown variant {bad}; choose from {list(VARIANTS)}")
    check_device(device)
    return rows, shard_size, repeats, workers


def _workers_arg(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--workers {text!r}: give comma-separated integers, e.g. 1,2,4") from None


def check_args(args: argparse.Namespace) -> None:
    """The CLI's arguments for this suite; ValueError saying what is wrong."""
    _resolve(args.size, args.rows, args.shard_size, args.repeats, _workers_arg(args.workers),
             args.topologies.split(","), args.variants.split(","), args.device)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scaling")
    g.add_argument("--rows", type=int, default=None, help="rows of the synthetic dataset (full: 2,000,000)")
    g.add_argument("--shard-size", type=int, default=None, help="rows per shard (full: 50,000)")
    g.add_argument("--workers", default=None, help="comma-separated worker counts (full: 1, 2, 4, ... cores)")
    g.add_argument("--topologies", default=",".join(TOPOLOGIES), help="comma-separated: local, cluster")
    g.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated: " + ", ".join(VARIANTS) + f" (default: {', '.join(DEFAULT_VARIANTS)})")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(args.out, size=args.size, rows=args.rows, shard_size=args.shard_size, workers=_workers_arg(args.workers),
               topologies=args.topologies.split(","), variants=args.variants.split(","), repeats=args.repeats,
               device=args.device, plots=not args.no_plots)
