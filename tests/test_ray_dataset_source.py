"""A Ray Data Dataset as Engine.batch_jacobian's input and as a job's source (issue 13):
real Ray Data pipelines (read_parquet -> map_batches, from_numpy) on a real local Ray,
against the in-process kernel on the same rows, in the dataset's order."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

import distjac
from distjac import models
from distjac.errors import ConfigError, OptionError, OutputExistsError, SourceDtypeError, SourceError

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data", reason='Ray Data is not installed: pip install "distjac[data]"')


@pytest.fixture(scope="module")
def engine():
    from distjac.engine import ray_connection

    with ray_connection(min_cpus=3):  # one worker; the rest for Ray Data's tasks
        with distjac.Engine(num_workers=1, device="cpu", shard_size=16, progress=False) as eng:
            yield eng


def _rows(n=70, d=4, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


def _parquet(path, x, *, lists=True, files=3):
    """``x`` as Parquet files with an id column; the tensor column as lists (what pandas
    writes) or a fixed-size list."""
    path.mkdir()
    bounds = np.linspace(0, len(x), files + 1).astype(int)
    for k in range(files):
        lo, hi = bounds[k], bounds[k + 1]
        col = (pa.array([list(map(float, r)) for r in x[lo:hi]], pa.list_(pa.float32())) if lists
               else pa.FixedSizeListArray.from_arrays(pa.array(x[lo:hi].ravel()), x.shape[1]))
        pq.write_table(pa.table({"id": pa.array(np.arange(lo, hi), pa.int64()), "x": col}), path / f"p{k}.parquet")
    return str(path)


def _order(ds) -> np.ndarray:
    return np.concatenate([b["id"] for b in ds.iter_batches(batch_format="numpy")])


def test_batch_jacobian_of_a_lazy_parquet_pipeline(engine, tmp_path):
    x = _rows()
    ds = ray.data.read_parquet(_parquet(tmp_path / "in", x)).map_batches(
        lambda b: {**b, "x": b["x"]}, batch_format="numpy")  # a step of the user's pipeline
    model = models.mlp([4, 8, 3])
    got = engine.batch_jacobian(model, ds, column="x")
    order = _order(ds)
    assert sorted(order) == list(range(70))
    want = distjac.batch_jacobian(model, torch.from_numpy(x[order]))
    assert got.shape == (70, 3, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    assert len(engine.last_stats.shards) == 5  # shards of 16 rows, read by the worker from the blocks


def test_ray_data_tensor_columns_keep_their_shape(engine):
    x = np.random.default_rng(1).standard_normal((40, 1, 4, 4))  # float64, a Ray tensor column
    ds = ray.data.from_numpy(x)  # column "data"
    model = models.convnet((1, 4, 4), channels=2, kernel=3, out=2).double()
    got = engine.batch_jacobian(model, ds)  # the only tensor column
    want = distjac.batch_jacobian(model, torch.from_numpy(x))
    assert got.shape == (40, 2, 1, 4, 4) and got.dtype == torch.float64
    torch.testing.assert_close(got, want)
    flat = ray.data.from_numpy(x.reshape(40, 16))
    torch.testing.assert_close(engine.batch_jacobian(model, flat, shape=(1, 4, 4)), want)


def test_a_job_on_a_dataset_resumes_and_keeps_columns(engine, tmp_path):
    x = _rows(50, seed=2)
    ds = ray.data.read_parquet(_parquet(tmp_path / "in", x, lists=False, files=2))
    model = models.mlp([4, 6, 2])

    def spec(out, dataset=ds, **output):
        return distjac.JobSpec.from_dict({
            "model": {"module": model}, "data": {"kind": "ray_dataset", "dataset": dataset, "column": "x"},
            "jacobian": {"reduce": None}, "engine": {"shard_size": 12},  # the Engine's 16 wins
            "output": {"path": str(out), "keep_columns": ["id"], **output}})

    report = engine.run(spec(tmp_path / "out"))
    assert report["computed_shards"] == 4
    table = pads.dataset(str(tmp_path / "out"), format="arrow").to_table().sort_by("row")
    ids = np.asarray(table.column("id"))
    jac = distjac.read_result(str(tmp_path / "out"))
    want = distjac.batch_jacobian(model, torch.from_numpy(x[ids])).numpy()
    np.testing.assert_allclose(jac, want, rtol=1e-6, atol=1e-7)

    again = engine.run(spec(tmp_path / "out"))  # the same rows: every shard reused
    assert again["computed_shards"] == 0 and again["reused_shards"] == 4

    # in this process (engine.num_workers: 0) the same source gives the same parts' values
    local = spec(tmp_path / "local").with_overrides(["engine.num_workers=0"])
    distjac.jobs.run_job(local)
    np.testing.assert_array_equal(distjac.read_result(str(tmp_path / "local")), jac)

    # other rows are another job: refused, the finished parts kept
    other = ray.data.from_numpy(_rows(50, seed=3)).map_batches(
        lambda b: {"x": b["data"], "id": np.arange(len(b["data"]))}, batch_format="numpy")
    with pytest.raises(OutputExistsError):
        engine.run(spec(tmp_path / "out", other))
    np.testing.assert_array_equal(distjac.read_result(str(tmp_path / "out")), jac)


def test_bad_datasets_are_refused_before_any_work(engine, tmp_path):
    model = models.mlp([4, 3])
    two = ray.data.from_items([{"a": np.zeros(4, np.float32), "b": np.ones(4, np.float32)} for _ in range(6)])
    with pytest.raises(SourceError, match=r"2 tensor columns; name its tensor column \(column=...\) among: a "):
        engine.batch_jacobian(model, two)
    with pytest.raises(SourceError, match=r"no column 'x'; its columns are: a .*, b "):
        engine.batch_jacobian(model, two, column="x")
    ints = ray.data.from_items([{"x": np.arange(4)} for _ in range(6)])
    with pytest.raises(SourceDtypeError, match="holds int64 values; distjac differentiates floating values only"):
        engine.batch_jacobian(model, ints, column="x")
    table = pa.table({"x": pa.array([[1.0, 2.0, 3.0, 4.0], None, [1.0, 2.0, 3.0, 4.0]], pa.list_(pa.float32()))})
    with pytest.raises(SourceError, match="column 'x' has a null row at row 1; a tensor cannot hold nulls"):
        engine.batch_jacobian(model, ray.data.from_arrow(table), column="x")
    ragged = pa.table({"x": pa.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]], pa.list_(pa.float32()))})
    with pytest.raises(SourceError, match="row 1 holds 2 values, but rows of shape \\[4\\] hold 4"):
        engine.batch_jacobian(model, ray.data.from_arrow(ragged), column="x")
    with pytest.raises(OptionError, match="column= and shape= are for a ray.data.Dataset x"):
        engine.batch_jacobian(model, torch.zeros(2, 4), column="x")
    with pytest.raises(ConfigError, match="data.kind 'ray_dataset' needs data.dataset, a ray.data.Dataset"):
        distjac.JobSpec.from_dict({"model": {"module": model}, "data": {"kind": "ray_dataset"},
                                   "output": {"path": str(tmp_path / "o")}})
    with pytest.raises(ConfigError, match="data.dataset must be a ray.data.Dataset, got ndarray"):
        distjac.JobSpec.from_dict({"model": {"module": model}, "data": {"kind": "ray_dataset", "dataset": np.ones(3)},
                                   "output": {"path": str(tmp_path / "o")}})
    assert not (tmp_path / "o").exists()


def test_no_free_cpu_is_an_error_not_a_hang(engine, tmp_path):
    """Workers that hold every CPU leave Ray Data none to execute a lazy dataset: refused at
    once, saying how to make room; a materialized dataset needs none."""
    x = _rows(20, seed=4)
    path = _parquet(tmp_path / "in", x, lists=False, files=1)
    model = models.mlp([4, 3])
    # The CPUs the fixture's engine leaves, once tasks of earlier tests have let theirs go
    # (read while one still ran, the count left a CPU free and the test did not test).
    free = int(ray.cluster_resources()["CPU"] - engine.num_cpus_per_worker)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < free and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) >= free >= 1
    ready = ray.data.read_parquet(path).materialize()  # executed while CPUs were free
    with distjac.Engine(num_workers=free, device="cpu", progress=False) as full:
        full.batch_jacobian(model, torch.from_numpy(x))  # every worker started: all CPUs held
        with pytest.raises(SourceError, match=r"needs a free CPU to execute the dataset.*ds = ds.materialize\(\)"):
            full.batch_jacobian(model, ray.data.read_parquet(path), column="x")
        got = full.batch_jacobian(model, ready, column="x")
    order = _order(ready)
    torch.testing.assert_close(got, distjac.batch_jacobian(model, torch.from_numpy(x[order])))


def test_data_rows_cuts_a_dataset_and_tasks_carry_only_their_blocks(engine, tmp_path):
    from distjac.ray_data import DatasetSource

    x = _rows(60, seed=5)
    tables = [pa.table({"id": pa.array(np.arange(k, k + 20)),
                        "x": pa.FixedSizeListArray.from_arrays(pa.array(x[k:k + 20].ravel()), 4)})
              for k in (0, 20, 40)]
    ds = ray.data.from_arrow(tables)  # one block per table
    src = DatasetSource.open(ds, "x")
    assert [n for _, n in src.blocks] == [20, 20, 20]
    cut = DatasetSource.open(ds, "x", rows=45)  # inside the last block: the block checks are reused
    assert (src.num_rows, cut.num_rows) == (60, 45) and cut.digest != src.digest
    assert sum(n for _, n in cut.blocks) == 45
    order = _order(ds)
    torch.testing.assert_close(cut.read(0, 45), torch.from_numpy(x[order[:45]]))
    part = cut.for_rows(30, 45)
    assert len(part.blocks) < len(cut.blocks) and part.first_row > 0
    torch.testing.assert_close(part.read(30, 45), torch.from_numpy(x[order[30:45]]))
    with pytest.raises(IndexError, match="not in this task's blocks"):
        part.read(0, 5)
    with pytest.raises(SourceError, match="data.rows=61 but the dataset has only 60 rows"):
        DatasetSource.open(ds, "x", rows=61)
    model = models.mlp([4, 3])
    spec = distjac.JobSpec.from_dict({
        "model": {"module": model}, "data": {"kind": "ray_dataset", "dataset": ds, "column": "x", "rows": 45},
        "output": {"path": str(tmp_path / "out")}})
    assert engine.run(spec)["rows"] == 45
    np.testing.assert_allclose(distjac.read_result(str(tmp_path / "out")),
                               distjac.batch_jacobian(model, torch.from_numpy(x[order[:45]])).numpy(),
                               rtol=1e-6, atol=1e-7)
