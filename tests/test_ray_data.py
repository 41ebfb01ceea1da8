"""distjac.ray_data.Jacobians: unit tests of the transform outside Ray, and a real local
Ray Data pipeline (read_parquet -> map_batches -> write_parquet) against the in-process
kernel."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import distjac
from distjac import models
from distjac.ray_data import Jacobians, stack_column
from distjac.reduce import reduce_block


def _rows(n=24, d=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


# --------------------------------------------------------------------------------------
# The transform itself (no Ray needed: Ray Data only constructs and calls it)
# --------------------------------------------------------------------------------------


def test_jacobian_column_keeps_the_other_columns():
    model, x = models.mlp([4, 8, 3]), _rows(6)
    batch = {"id": np.arange(6), "x": x, "tag": np.array([f"r{i}" for i in range(6)], dtype=object)}
    out = Jacobians(model, "x")(batch)
    assert list(out) == ["id", "x", "tag", "jacobian"]
    assert out["jacobian"].shape == (6, 3, 4) and out["jacobian"].dtype == np.float32
    np.testing.assert_array_equal(out["jacobian"], distjac.batch_jacobian(model, torch.from_numpy(x)).numpy())
    assert out["tag"] is batch["tag"]
    assert "x" not in Jacobians(model, "x", keep_input=False)(batch)


def test_object_columns_flat_rows_and_dtypes():
    model, x = models.convnet((1, 4, 4), channels=2, kernel=3, out=2), _rows(5, 16).astype(np.float64)
    col = np.empty(5, dtype=object)  # what a Parquet list column becomes
    for i, r in enumerate(x):
        col[i] = list(r)
    out = Jacobians(model, "x", shape=(1, 4, 4))({"x": col})
    want = distjac.batch_jacobian(model, torch.from_numpy(x).float().reshape(5, 1, 4, 4))
    assert out["jacobian"].dtype == np.float32  # the model's dtype
    np.testing.assert_allclose(out["jacobian"], want.numpy(), rtol=1e-6, atol=1e-7)
    out64 = Jacobians(model, "x", shape=(1, 4, 4), dtype="float64")({"x": col})
    assert out64["jacobian"].dtype == np.float64
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left as it was
    assert stack_column(col).shape == (5, 16)
    nested = np.empty(2, dtype=object)  # a list<list<float>> column: arrays of arrays
    for i in range(2):
        inner = np.empty(3, dtype=object)
        for j in range(3):
            inner[j] = np.full(4, i * 3 + j, dtype=np.float32)
        nested[i] = inner
    assert stack_column(nested).shape == (2, 3, 4) and stack_column(nested)[1, 2, 0] == 5
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros(3), np.zeros(4)
    with pytest.raises(distjac.ShapeError, match="different shapes"):
        stack_column(ragged)
    ragged[1] = None
    with pytest.raises(distjac.ShapeError, match="row 1 of the batch's column 'x' is null"):
        stack_column(ragged)


def test_reduce_and_estimate_columns():
    model, x = models.mlp([4, 8, 3]), _rows(10)
    batch = {"id": np.arange(100, 110), "x": x}
    red = Jacobians(model, "x", reduce=["frobenius", "spectral"])(batch)
    jac = distjac.batch_jacobian(model, torch.from_numpy(x))
    want = reduce_block(jac, ["frobenius", "spectral"], 1)
    assert "jacobian" not in red
    np.testing.assert_allclose(red["frobenius"], want["frobenius"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(red["spectral"], want["spectral"].numpy(), rtol=1e-6)
    est = Jacobians(model, "x", estimate={"frobenius": {"probes": 4}}, row_column="id")(batch)
    ref = distjac.estimate(model, torch.from_numpy(x), "frobenius", probes=4, row_offset=100)
    np.testing.assert_array_equal(est["frobenius"], ref.value.numpy())
    np.testing.assert_array_equal(est["frobenius_stderr"], ref.stderr.numpy())


def test_pandas_batches():
    pd = pytest.importorskip("pandas")
    model, x = models.mlp([4, 8, 3]), _rows(4)
    df = pd.DataFrame({"id": range(4), "x": list(x)})
    out = Jacobians(model, "x")(df)
    assert list(out.columns) == ["id", "x", "jacobian"] and len(out) == 4
    np.testing.assert_array_equal(np.stack(out["jacobian"].to_numpy()),
                                  distjac.batch_jacobian(model, torch.from_numpy(x)).numpy())


@pytest.mark.parametrize(("kwargs", "batch", "match"), [
    ({"reduce": ["frobenius"], "estimate": {"frobenius": {}}}, None, "not both"),
    ({"estimate": {"nuclear": {}}}, None, "unknown estimate 'nuclear'"),
    ({"device": "tpu"}, None, "device='tpu' is not valid"),
    ({"dtype": "int8"}, None, "dtype='int8' is not valid"),
    ({}, {"y": np.zeros((2, 4), np.float32)}, "the batch has no column 'x'; it has 'y'"),
    ({}, {"x": np.zeros((2, 4), np.float32), "jacobian": np.zeros(2)}, "already has column"),
    ({"shape": (3,)}, {"x": np.zeros((2, 4), np.float32)}, "cannot be reshaped"),
    ({"estimate": {"frobenius": {}}, "row_column": "id"}, {"x": np.zeros((2, 4), np.float32)},
     "row_column='id' is not a column"),
])
def test_bad_use_is_refused(kwargs, batch, match):
    with pytest.raises(ValueError, match=match):
        t = Jacobians(models.mlp([4, 8, 3]), "x", **kwargs)
        t(batch)


# --------------------------------------------------------------------------------------
# A real Ray Data pipeline
# --------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(240)
# Ray Data may read the two small files as one block, so one of the 2 actors idles (and says so)
@pytest.mark.filterwarnings("ignore:The minimum number of concurrent actors:UserWarning")
def test_read_parquet_map_batches_write_parquet(tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data", reason='Ray Data is not installed: pip install "distjac[data]"')
    from distjac.engine import ray_connection

    x = _rows(48)
    table = pa.table({
        "id": pa.array(np.arange(48), pa.int64()),
        "x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4),  # a fixed-size list column
        "xl": pa.array([list(map(float, r)) for r in x], pa.list_(pa.float64())),  # a variable list column
        "tag": pa.array([f"row{i}" for i in range(48)]),
    })
    (tmp_path / "in").mkdir()
    pq.write_table(table.slice(0, 24), tmp_path / "in" / "a.parquet")  # two files: work for both actors
    pq.write_table(table.slice(24), tmp_path / "in" / "b.parquet")
    model = models.mlp([4, 8, 3])

    with ray_connection(min_cpus=4):  # 2 + 1 actors, and the read and write tasks
        ds = ray.data.read_parquet(str(tmp_path / "in"))
        ds = ds.map_batches(Jacobians, fn_constructor_args=(model, "x"), concurrency=2, batch_format="numpy",
                            batch_size=16)
        ds = ds.map_batches(Jacobians, fn_constructor_args=(model, "xl"),
                            fn_constructor_kwargs={"estimate": {"frobenius": {"probes": 4}}, "row_column": "id"},
                            concurrency=1, batch_format="pandas", batch_size=10)
        ds.write_parquet(str(tmp_path / "out"))

    back = pq.read_table(tmp_path / "out").to_pandas().sort_values("id")  # ray registered its tensor type
    assert list(back["id"]) == list(range(48)) and list(back["tag"]) == [f"row{i}" for i in range(48)]
    got = np.stack(back["jacobian"].to_numpy())
    want = distjac.batch_jacobian(model, torch.from_numpy(x))
    assert got.shape == (48, 3, 4)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-7)  # batches of 16, not 48: BLAS bits may differ
    # the estimate columns, seeded by row id: equal to the in-process estimate, whatever the batching
    ref = distjac.estimate(model, torch.from_numpy(x), "frobenius", probes=4)
    np.testing.assert_allclose(back["frobenius"].to_numpy(), ref.value.numpy(), rtol=1e-5)
    np.testing.assert_allclose(back["frobenius_stderr"].to_numpy(), ref.stderr.numpy(), rtol=1e-4, atol=1e-7)
