"""The one shard runner (distjac/shard.py), on both of its paths: in process (a
ShardRunner, as ``engine.num_workers: 0`` runs it) and in the Ray worker's class (a
JacobianWorker used directly, with the function or model shipped as bytes). The Ray
engine's own runs are in tests/test_job_ray.py and tests/test_engine*.py."""

from __future__ import annotations

import os
import pickle
import threading

import numpy as np
import pyarrow as pa
import pyarrow.ipc  # noqa: F401 - pa.ipc
import pyarrow.parquet as pq
import pytest
import torch
from job_helpers import reference, tiny_spec

import distjac
from distjac import arrow as arrow_mod
from distjac.config import build_model
from distjac.jobs import prepare_job, run_job
from distjac.reduce import reduce_block
from distjac.shard import (
    STAGES,
    KernelOptions,
    ShardResult,
    ShardRunError,
    ShardRunner,
    ShardTask,
    local_executor,
    to_wire,
)
from distjac.worker import JacobianWorker, function_key, serialize_function

CPU = torch.device("cpu")
PATHS = ("in_process", "worker")


def run_on(path: str, fn_or_recipe, task: ShardTask) -> ShardResult:
    """One shard on one of the two paths: what the in-process executor and the Ray worker do."""
    if path == "in_process":
        fn = fn_or_recipe.build(CPU) if hasattr(fn_or_recipe, "build") else fn_or_recipe
        return ShardRunner(CPU).run(fn, task)
    blob = serialize_function(fn_or_recipe)
    worker = JacobianWorker("cpu", num_threads=1)
    return worker.run(function_key(blob), [blob], task)


def _read_part(out_dir: str, part) -> pa.Table:
    path = os.path.join(out_dir, part.file)
    return pa.ipc.open_file(path).read_all() if part.file.endswith(".arrow") else pq.read_table(path)


def test_a_job_task_is_small_picklable_and_typed(tmp_path):
    job = prepare_job(tiny_spec(tmp_path / "out"))
    task = job.task(1, 16, 32)
    blob = pickle.dumps(task)
    assert len(blob) < 4096  # a source descriptor, never rows
    back = pickle.loads(blob)
    assert back == task and back.rows is None and back.source is not None
    assert back.options == KernelOptions(mode="rev", chunk_size=None, call="run_job(spec)")
    assert back.target.out_dir == job.out_dir and back.target.spec_hash == job.spec_hash
    assert back.target.metadata() == {"spec_hash": job.spec_hash, "in_ndim": "1", "rows": "50"}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("reduce", "dtype", "fmt"), [(None, "float32", "arrow"), (None, "float16", "parquet"),
                                                       (["trace", "frobenius"], "float64", "arrow")])
def test_a_job_shard_is_the_same_part_on_both_paths(tmp_path, path, reduce, dtype, fmt):
    spec = tiny_spec(tmp_path / "out", model={"kwargs": {"sizes": [3, 3]}},
                     jacobian={"reduce": reduce, "dtype": dtype}, output={"format": fmt})
    job = prepare_job(spec)
    os.makedirs(job.out_dir)
    result = run_on(path, job.recipe, job.task(2, 32, 48))
    part = result.part
    assert result.batch is None and part.file == f"part-00002.{fmt}" and (part.start, part.stop) == (32, 48)
    table = _read_part(job.out_dir, part)
    full = torch.from_numpy(reference(spec))[32:48]
    if reduce:
        assert table.column_names == ["row", *reduce]
        want = reduce_block(full.double(), reduce, 1)
        for name in reduce:
            assert table.schema.field(name).type == pa.float64()
            np.testing.assert_allclose(table.column(name).to_numpy(), want[name].numpy(), rtol=1e-5)
    else:
        assert table.column_names == ["row", "jacobian"]
        rows, values = arrow_mod.from_record_batch(table)
        assert values.dtype == np.dtype(dtype) and rows.tolist() == list(range(32, 48))
        tol = 1e-3 if dtype == "float16" else 1e-6
        np.testing.assert_allclose(values.astype(np.float32), full.numpy(), rtol=tol, atol=tol)
    # One set of stage names, one timing record, and the part's seconds are its stages'.
    t = result.timing
    assert tuple(k for k in t.to_dict() if k.endswith("_s") and k != "queued_s") == STAGES
    assert t.compute_s > 0 and t.write_s > 0 and t.to_host_s == 0 and t.ended >= t.started
    assert part.seconds == pytest.approx(t.busy_s)
    meta = arrow_mod.annotation(table.schema)
    assert meta["shard"] == 2 and meta["pid"] == os.getpid() and meta["device"] == "cpu"


@pytest.mark.parametrize("path", PATHS)
def test_a_gather_shard_returns_the_kernels_batch(path):
    x = torch.randn(12, 4, dtype=torch.float64)
    fn = lambda t: torch.tanh(t) * t.sum(-1, keepdim=True)  # noqa: E731 - shipped by value
    task = ShardTask(0, 4, 12, dtype="float64", rows=to_wire(x[4:12]),
                     options=KernelOptions(mode="fwd", chunk_size=2, use_pfor=False))
    result = run_on(path, fn, task)
    rows, values = arrow_mod.from_record_batch(result.batch)
    assert rows.tolist() == list(range(4, 12)) and result.part is None
    want = distjac.batch_jacobian(fn, x[4:12], mode="rev")
    np.testing.assert_allclose(values, want.numpy(), rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_a_failing_model_has_one_error_format_on_both_paths(tmp_path, path):
    x = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    x[40, 1] = np.nan  # shard 2 = rows [32, 48)
    np.save(tmp_path / "x.npy", x)
    spec = tiny_spec(tmp_path / "out", model={"factory": "job_helpers:nan_guard", "kwargs": {}},
                     data={"kind": "npy", "path": str(tmp_path / "x.npy"), "rows": None, "shape": None})
    job = prepare_job(spec)
    os.makedirs(job.out_dir)
    with pytest.raises(ShardRunError) as info:
        run_on(path, job.recipe, job.task(2, 32, 48))
    failure = pickle.loads(pickle.dumps(info.value))  # as it travels from a Ray worker
    assert (failure.shard, failure.start, failure.stop, failure.stage) == (2, 32, 48, "compute")
    err = failure.shard_error("Engine.run(spec)")
    assert isinstance(err, distjac.ShardError) and isinstance(err.__cause__, ValueError)
    assert (err.shard, err.start, err.stop) == (2, 32, 48)
    assert str(err).startswith("Engine.run(spec): shard 2 (rows [32, 48)) failed on node ")
    assert "ValueError: NaN in the batch" in str(err) and f"(pid {os.getpid()})" in str(err)
    assert os.listdir(job.out_dir) == []  # nothing written, not even a temporary


class _Rows:
    """A source of rows 0, 1, 2, ... (one feature) that can block or fail a shard's read."""

    kind = "test"
    dtype = "float32"
    shape = (1,)

    def __init__(self, n: int, *, on_read=None):
        self.num_rows, self.on_read = n, on_read

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self.on_read is not None:
            self.on_read(start)
        return torch.arange(start, stop, dtype=torch.float32).reshape(-1, 1)


@pytest.mark.parametrize(("depth", "overlapped"), [(3, True), (1, False)])
def test_the_next_shard_is_read_while_one_computes(depth, overlapped):
    """NOTE [overlapped stages]: shard 0's model waits until shard 1 has been read. With the
    stages overlapped that read happens while shard 0 computes; one shard at a time, it
    cannot (the wait then times out, and this test shows it)."""
    second_read = threading.Event()
    seen = []

    def on_read(start):
        if start == 4:
            second_read.set()

    def fn(x):
        if x[0, 0] == 0 and not seen:  # shard 0's first call
            seen.append(second_read.wait(20 if overlapped else 1.0))
        return x * x

    tasks = [ShardTask(i, 4 * i, 4 * i + 4, source=_Rows(12, on_read=on_read), options=KernelOptions(mode="rev"))
             for i in range(3)]
    results = list(local_executor(fn, ShardRunner(CPU), tasks, depth=depth))
    assert seen == [overlapped]
    assert sorted(r.shard for r in results) == [0, 1, 2]
    for r in results:
        _, values = arrow_mod.from_record_batch(r.batch)
        np.testing.assert_allclose(values[:, 0, 0], 2 * np.arange(r.start, r.stop))


def test_a_failing_stage_fails_its_shard_alone(tmp_path):
    """A read that fails (shard 1) fails that shard: the others finish and are yielded,
    then the ShardError names the shard and the stage; nothing of shard 1 is on disk."""
    from distjac.shard import PartTarget

    def on_read(start):
        if start == 4:
            raise OSError("the disk went away")

    target = PartTarget(out_dir=str(tmp_path), format="arrow", spec_hash="h")
    tasks = [ShardTask(i, 4 * i, 4 * i + 4, source=_Rows(12, on_read=on_read), target=target,
                       options=KernelOptions(mode="rev")) for i in range(3)]
    done = []
    with pytest.raises(distjac.ShardError, match=r"run_job\(spec\): shard 1 \(rows \[4, 8\)\) failed on node .* "
                                                 r"reading its rows: OSError: the disk went away") as info:
        for r in local_executor(lambda t: t * t, ShardRunner(CPU), tasks, depth=3):
            done.append(r.shard)
    assert isinstance(info.value.__cause__, OSError)
    assert "check the data source" in str(info.value) and "fix fn" not in str(info.value)
    assert 1 not in done and 0 in done
    assert sorted(os.listdir(tmp_path)) == [f"part-{i:05d}.arrow" for i in sorted(done)]


def test_the_model_is_built_once_in_process(tmp_path):
    """engine.num_workers: 0: the probe and every shard use one model, built once."""
    log = tmp_path / "built.txt"
    spec = tiny_spec(tmp_path / "out", model={"factory": "job_helpers:counting_mlp", "kwargs": {"log": str(log)}})
    report = run_job(spec)
    assert report["computed_shards"] == 4
    assert log.read_text().split() == [str(os.getpid())]
    got = distjac.read_result(spec.output.path)
    want = distjac.batch_jacobian(build_model(spec.model), distjac.io.sources.open_source(spec.data).read(0, 50))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-7)


def test_report_has_each_runners_busy_share(tmp_path):
    report = run_job(tiny_spec(tmp_path / "out"))
    runners = report["timing"]["runners"]
    assert len(runners) == 1
    (r,) = runners.values()
    assert r["shards"] == 4 and r["span_s"] > 0
    assert set(r["busy"]) == set(STAGES) and all(0 <= v for v in r["busy"].values() if v is not None)
    assert 0 < r["busy"]["compute_s"]
    for s in report["timing"]["shards"]:
        assert s["queued_s"] >= 0 and set(STAGES) <= set(s)


def test_a_tensor_sources_rows_are_copied_for_the_shard():
    """fn may write into its input: a tensor source's rows reach it as a copy, so neither
    the caller's tensor nor a retried shard sees the change."""
    from distjac.io.sources import TensorSource

    t = torch.arange(12.0).reshape(6, 2)
    task = ShardTask(0, 2, 4, source=TensorSource(t))
    x = task.read(CPU)
    x.mul_(0)
    assert t[2:4].tolist() == [[4.0, 5.0], [6.0, 7.0]]


def test_choosing_a_strategy_fails_as_a_shard_does():
    def fn(x):
        raise ValueError("bad rows")

    task = ShardTask(0, 0, 4, source=_Rows(4), options=KernelOptions(mode="auto"))
    with pytest.raises(ShardRunError) as info:
        ShardRunner(CPU).choose(fn, task, work_rows=100)
    assert info.value.stage == "compute" and isinstance(info.value.error, ValueError)


def test_local_executor_progress_never_counts_a_shard_twice_or_drops_it(monkeypatch):
    """Rows of the results taken plus the rows reported in flight never go down: a shard's
    rows leave the in-flight report only once its result has been yielded."""
    import time

    from distjac import shard
    from distjac.shard import KernelOptions, ShardRunner, local_executor, to_wire

    monkeypatch.setattr(shard, "PROGRESS_POLL_S", 0.02)  # polls within each ~0.1 s shard

    def slow(t):  # 12 outputs, chunk 1: 12 passes of ~10 ms per shard
        y = torch.cat([t, t], dim=1) * 2.0
        if y.requires_grad:
            y.register_hook(lambda g: (time.sleep(0.01), g)[1])
        return y

    x = torch.randn(40, 6)
    opts = KernelOptions(mode="rev", chunk_size=1)
    tasks = [ShardTask(i, i * 8, i * 8 + 8, dtype="float32", rows=to_wire(x[i * 8:i * 8 + 8]), options=opts)
             for i in range(5)]
    seen: list[float] = []
    taken = [0]

    def report(rows):
        seen.append(taken[0] + rows)

    for result in local_executor(slow, ShardRunner(torch.device("cpu")), tasks, depth=2, on_progress=report):
        taken[0] += result.stop - result.start
    assert taken[0] == 40 and seen[-1] == 40
    assert all(a <= b + 1e-9 for a, b in zip(seen, seen[1:])), seen
    assert any(0 < v % 8 for v in seen), seen  # reports within shards, not only at their ends
