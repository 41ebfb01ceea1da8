"""Sources read exact row ranges; the sink writes parts atomically, the manifest verifies
them, resume adopts or drops them, and results read back (zero-copy where Arrow allows)."""

import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import torch
from job_helpers import write_arrow, write_parquet

import distjac
from distjac import arrow as arrow_mod
from distjac.config import DataSpec
from distjac.errors import OutputExistsError, ResultError, SourceError, SourceNotFoundError
from distjac.io import sources as src_mod
from distjac.io.sink import (
    MANIFEST_NAME,
    SUCCESS_NAME,
    Manifest,
    clean_temporaries,
    file_checksum,
    inspect_output,
    iter_result,
    open_output,
    write_part,
)
from distjac.io.sources import ArrowSource, NpySource, ParquetSource, SyntheticSource, TensorSource, open_source

RANGES = [(0, 1), (0, 37), (5, 16), (9, 10), (16, 17), (20, 37), (36, 37), (12, 12)]


def _values(n=37, shape=(3,), dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(dtype)


def _check_ranges(source, values):
    assert source.num_rows == len(values) and source.shape == values.shape[1:] and source.dtype == values.dtype.name
    for start, stop in RANGES:
        got = source.read(start, stop)
        assert isinstance(got, torch.Tensor) and got.shape == (stop - start, *values.shape[1:])
        np.testing.assert_array_equal(got.numpy(), values[start:stop])
    clone = pickle.loads(pickle.dumps(source))  # what a worker receives
    np.testing.assert_array_equal(clone.read(3, 30).numpy(), values[3:30])
    with pytest.raises(IndexError, match=r"rows \[30, 38\) are outside \[0, 37\)"):
        source.read(30, 38)


# ------------------------------------------------------------------------ synthetic


def test_synthetic_does_not_depend_on_shard_size():
    s = SyntheticSource(rows=3000, shape=(5,), seed=7)
    whole = s.read(0, 3000)
    for size in (1, 7, 100, 1024, 1500):
        parts = [s.read(a, min(3000, a + size)) for a in range(0, 3000, size)] if size > 1 else \
            [s.read(a, a + 1) for a in range(1020, 1030)]
        got = torch.cat(parts)
        want = whole if size > 1 else whole[1020:1030]
        assert torch.equal(got, want)
    assert SyntheticSource(rows=10, shape=(5,), seed=7).read(0, 10).equal(whole[:10])  # nor on rows
    assert not SyntheticSource(rows=10, shape=(5,), seed=8).read(0, 10).equal(whole[:10])


def test_synthetic_large_examples_use_smaller_blocks():
    s = SyntheticSource(rows=40, shape=(3, 64, 64), seed=0)
    assert s.block_rows * 3 * 64 * 64 <= src_mod.SYNTHETIC_BLOCK_ELEMENTS
    assert torch.equal(torch.cat([s.read(0, 13), s.read(13, 40)]), s.read(0, 40))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_synthetic_dtypes(dtype):
    x = open_source(DataSpec(kind="synthetic", rows=5, shape=(2,), dtype=dtype)).read(0, 5)
    assert x.dtype == getattr(torch, dtype)


# ------------------------------------------------------------------------ files


def test_npy(tmp_path):
    values = _values(shape=(2, 3), dtype=np.float64)
    np.save(tmp_path / "x.npy", values)
    _check_ranges(NpySource.open(str(tmp_path / "x.npy")), values)
    assert NpySource.open(str(tmp_path / "x.npy"), rows=10).num_rows == 10


def test_npy_directory_reads_its_files_in_name_order(tmp_path):
    """data.path may be a directory of .npy files (jobs.md): one array, files in name order."""
    values = _values(shape=(2, 3), dtype=np.float32)
    (tmp_path / "d").mkdir()
    for name, (lo, hi) in (("b.npy", (15, 29)), ("a.npy", (0, 15)), ("c.npy", (29, len(values)))):
        np.save(tmp_path / "d" / name, values[lo:hi])
    (tmp_path / "d" / "notes.txt").write_text("not data")
    (tmp_path / "d" / ".hidden.npy").write_bytes(b"")  # hidden files are not sources
    source = NpySource.open(str(tmp_path / "d"))
    assert source.num_rows == len(values) and len(source.files) == 3
    _check_ranges(source, values)
    limited = NpySource.open(str(tmp_path / "d"), rows=20)
    assert limited.num_rows == 20 and torch.equal(limited.read(10, 20), torch.from_numpy(values[10:20]))
    np.save(tmp_path / "d" / "z.npy", values[:3, :1])  # rows of another shape
    with pytest.raises(SourceError, match=r"z\.npy.* holds rows of shape \(1, 3\).*all files of a source must agree"):
        NpySource.open(str(tmp_path / "d"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceNotFoundError, match="holds no npy files"):
        NpySource.open(str(tmp_path / "empty"))


def test_npy_needs_rank_two(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(5, np.float32))
    with pytest.raises(SourceError, match=r"has shape \(5,\); .* Reshape to \(5, 1\)"):
        NpySource.open(str(tmp_path / "x.npy"))


@pytest.mark.parametrize("as_list", [False, True], ids=["fixed_shape_tensor", "fixed_size_list"])
@pytest.mark.parametrize("shape", [(3,), (2, 3)])
def test_parquet(tmp_path, as_list, shape):
    values = _values(shape=shape)
    path = write_parquet(tmp_path / "x.parquet", values, row_group_size=10, as_list=as_list)
    _check_ranges(ParquetSource.open(path, "x"), values)
    _check_ranges(ParquetSource.open(path, None), values)  # the only tensor column


@pytest.mark.parametrize("as_list", [False, True], ids=["fixed_shape_tensor", "fixed_size_list"])
def test_arrow_ipc(tmp_path, as_list):
    values = _values(shape=(2, 2))
    path = write_arrow(tmp_path / "x.arrow", values, batch_rows=8, as_list=as_list)
    _check_ranges(ArrowSource.open(path, "x"), values)


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_directory_of_files_is_one_table(tmp_path, kind):
    values = _values()
    (tmp_path / "in").mkdir()
    write = write_parquet if kind == "parquet" else write_arrow
    write(tmp_path / "in" / f"a.{kind}", values[:20])
    write(tmp_path / "in" / f"b.{kind}", values[20:])
    (tmp_path / "in" / "_SUCCESS").write_text("")
    source = open_source(DataSpec(kind=kind, path=str(tmp_path / "in"), column="x"))
    _check_ranges(source, values)


def test_parquet_reads_only_the_row_groups_it_needs(tmp_path, monkeypatch):
    values = _values(n=100)
    path = write_parquet(tmp_path / "x.parquet", values, row_group_size=10)
    source = ParquetSource.open(path, "x")
    read = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: read.append(i) or original(self, i, *a, **k))
    for cache in src_mod._CACHES.values():
        cache.clear()
    np.testing.assert_array_equal(source.read(35, 52).numpy(), values[35:52])
    assert read == [3, 4, 5]


def test_source_errors(tmp_path):
    y = pa.FixedShapeTensorArray.from_numpy_ndarray(_values())
    two = write_parquet(tmp_path / "two.parquet", _values(), extra={"y": y})
    with pytest.raises(SourceError, match=r"has 2 tensor columns; set data.column to one of its columns: id \(int64\)"):
        ParquetSource.open(two, None)
    with pytest.raises(SourceError, match="is not a readable Parquet file"):
        (tmp_path / "junk.parquet").write_bytes(b"not parquet")
        ParquetSource.open(str(tmp_path / "junk.parquet"), "x")
    with pytest.raises(SourceError, match="is not an Arrow IPC file"):
        ArrowSource.open(two, "x")
    (tmp_path / "d").mkdir()
    write_parquet(tmp_path / "d" / "a.parquet", _values())
    write_parquet(tmp_path / "d" / "b.parquet", _values(shape=(4,)))
    with pytest.raises(SourceError, match="all files of a source must agree"):
        ParquetSource.open(str(tmp_path / "d"), "x")


def test_in_memory_tensor():
    x = torch.randn(37, 3)
    s = TensorSource(x)
    _check_ranges(s, x.numpy())
    assert TensorSource(x.numpy()).read(2, 4).equal(x[2:4])


# ------------------------------------------------------------------------ parts and the manifest


def _batch(start, stop, shape=(2, 3)):
    jac = torch.arange((stop - start) * 6, dtype=torch.float32).reshape(stop - start, *shape) + start
    return arrow_mod.to_record_batch(range(start, stop), jac)


def _output(tmp_path, n=30, size=10, fmt="arrow", spec_hash="h1", write=True):
    shards = [(a, min(n, a + size)) for a in range(0, n, size)]
    info = {"rows": n, "input_shape": [3], "output_shape": [2], "format": fmt, "dtype": "float32", "reduce": None}
    out = str(tmp_path / "out")
    manifest, events = open_output(out, spec_hash, shards, info)
    if write:
        for i, (a, b) in enumerate(shards):
            manifest.record(write_part(out, i, a, b, _batch(a, b), fmt, metadata={"spec_hash": spec_hash}))
        manifest.flush()
        manifest.mark_success()
    return out, manifest, shards, info


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_write_part(tmp_path, fmt):
    out = tmp_path / "o"
    out.mkdir()
    part = write_part(str(out), 3, 30, 34, _batch(30, 34), fmt, metadata={"spec_hash": "abc"})
    assert part.file == f"part-00003.{fmt}" and part.rows == 4 and (part.start, part.stop) == (30, 34)
    assert os.listdir(out) == [part.file]  # no temporary left
    assert file_checksum(str(out / part.file)) == (part.sha256, part.bytes)
    table = ds.dataset(str(out), format="arrow" if fmt == "arrow" else "parquet").to_table()
    assert isinstance(table.schema.field("jacobian").type, pa.FixedShapeTensorType)  # kept in Parquet too
    assert table.schema.metadata[b"distjac.spec_hash"] == b"abc" and table.schema.metadata[b"distjac.start"] == b"30"
    rows, values = arrow_mod.from_record_batch(table)
    np.testing.assert_array_equal(rows, [30, 31, 32, 33])
    np.testing.assert_array_equal(values, _batch(30, 34).column(1).to_numpy_ndarray())


def test_write_part_checks_rows(tmp_path):
    with pytest.raises(ValueError, match=r"covers rows \[0, 5\) but the batch has 4 rows"):
        write_part(str(tmp_path), 0, 0, 5, _batch(0, 4))


def test_manifest_round_trip_and_dataset(tmp_path):
    out, manifest, shards, _ = _output(tmp_path)
    loaded = Manifest.load(out)
    assert loaded.spec_hash == "h1" and loaded.shards == shards and loaded.parts == manifest.parts
    assert loaded.complete and loaded.verify() == []
    assert sorted(os.listdir(out)) == sorted([MANIFEST_NAME, SUCCESS_NAME, "part-00000.arrow", "part-00001.arrow",
                                              "part-00002.arrow"])
    table = ds.dataset(out, format="arrow").to_table()  # metadata files are skipped by name
    assert sorted(table.column("row").to_pylist()) == list(range(30))
    d = json.loads(open(os.path.join(out, MANIFEST_NAME)).read())
    assert d["parts"]["1"]["start"] == 10 and len(d["parts"]["1"]["sha256"]) == 64


def test_record_checks_the_plan(tmp_path):
    out, manifest, _, _ = _output(tmp_path, write=False)
    part = write_part(out, 1, 10, 15, _batch(10, 15))
    with pytest.raises(ValueError, match=r"covers \[10, 15\) but shard 1 of the plan is \[10, 20\)"):
        manifest.record(part)


def test_truncated_and_corrupted_parts_are_dropped(tmp_path):
    out, manifest, _, _ = _output(tmp_path)
    p0, p2 = (os.path.join(out, f"part-0000{i}.arrow") for i in (0, 2))
    with open(p0, "r+b") as f:
        f.truncate(os.path.getsize(p0) - 100)
    data = bytearray(open(p2, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(p2, "wb").write(bytes(data))
    report = inspect_output(out)
    assert [b["shard"] for b in report["bad"]] == [0, 2] and not report["complete"]
    assert os.path.exists(p0)  # inspecting changes nothing
    bad = Manifest.load(out).verify()
    assert [s for s, _ in bad] == [0, 2]
    assert "truncated" in bad[0][1] and "corrupted" in bad[1][1]
    m = Manifest.load(out)
    assert m.missing() == [0, 2] and not os.path.exists(p0) and not os.path.exists(os.path.join(out, SUCCESS_NAME))


def test_stale_temporaries_are_cleaned(tmp_path):
    out, _, shards, info = _output(tmp_path)
    stale = os.path.join(out, ".part-00001.arrow.tmp-123-abcd")
    open(stale, "wb").write(b"half a part")
    assert clean_temporaries(out) == [".part-00001.arrow.tmp-123-abcd"]
    open(stale, "wb").write(b"half a part")
    _, events = open_output(out, "h1", shards, info)
    assert events["cleaned"] == [".part-00001.arrow.tmp-123-abcd"] and not os.path.exists(stale)


def test_unrecorded_part_is_adopted_and_foreign_one_deleted(tmp_path):
    out, manifest, shards, info = _output(tmp_path, write=False)
    manifest.record(write_part(out, 0, 0, 10, _batch(0, 10), metadata={"spec_hash": "h1"}), save=True)
    write_part(out, 1, 10, 20, _batch(10, 20), metadata={"spec_hash": "h1"})  # finished after the last save
    write_part(out, 2, 20, 30, _batch(20, 30), metadata={"spec_hash": "other"})
    m, events = open_output(out, "h1", shards, info)
    assert events["adopted"] == [1] and events["reused"] == 1 and m.missing() == [2]
    assert not os.path.exists(os.path.join(out, "part-00002.arrow"))


def test_changed_spec_is_refused_unless_overwrite(tmp_path):
    out, _, shards, info = _output(tmp_path)
    with pytest.raises(OutputExistsError, match=r"holds results of a different job spec \(hash h1, this job's is h2\); "
                       r"pass --overwrite"):
        open_output(out, "h2", shards, info)
    assert len(Manifest.load(out).parts) == 3
    m, events = open_output(out, "h2", shards, info, overwrite=True)
    assert m.spec_hash == "h2" and m.parts == {} and sorted(os.listdir(out)) == [MANIFEST_NAME]


def test_resume_false_refuses_an_existing_output(tmp_path):
    out, _, shards, info = _output(tmp_path)
    with pytest.raises(OutputExistsError, match="output.resume is false"):
        open_output(out, "h1", shards, info, resume=False)


def test_foreign_files_are_never_deleted(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match=r"holds files distjac did not write \(notes.txt\)"):
            open_output(str(tmp_path / "out"), "h", [(0, 1)], {}, overwrite=overwrite)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------ reading results


def _expected(n=30):
    return np.concatenate([_batch(a, min(n, a + 10)).column(1).to_numpy_ndarray() for a in range(0, n, 10)])


def test_read_result_all_and_by_rows(tmp_path):
    out, *_ = _output(tmp_path)
    want = _expected()
    got = distjac.read_result(out)
    assert got.shape == (30, 2, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(distjac.read_result(out, rows=slice(5, 25)), want[5:25])
    np.testing.assert_array_equal(distjac.read_result(out, rows=range(29, 0, -3)), want[29:0:-3])
    np.testing.assert_array_equal(distjac.read_result(out, rows=[29, 0, -1, 15]), want[[29, 0, -1, 15]])
    assert distjac.read_result(out, rows=slice(4, 4)).shape == (0, 2, 3)
    with pytest.raises(IndexError):
        distjac.read_result(out, rows=[30])


def test_read_result_is_zero_copy_within_one_arrow_part(tmp_path):
    out, *_ = _output(tmp_path)
    before = pa.total_allocated_bytes()
    view = distjac.read_result(out, rows=slice(10, 20))
    assert pa.total_allocated_bytes() == before  # nothing copied into Arrow's memory pool
    assert not view.flags.writeable and not view.flags.owndata
    np.testing.assert_array_equal(view, _expected()[10:20])


def test_parquet_result(tmp_path):
    out, *_ = _output(tmp_path, fmt="parquet")
    np.testing.assert_array_equal(distjac.read_result(out), _expected())
    table = ds.dataset(out, format="parquet").to_table()
    assert isinstance(table.schema.field("jacobian").type, pa.FixedShapeTensorType)


def test_reductions_result_is_a_dict(tmp_path):
    shards = [(0, 4), (4, 6)]
    info = {"rows": 6, "format": "arrow", "dtype": "float64", "reduce": ["frobenius", "trace"]}
    out = str(tmp_path / "out")
    m, _ = open_output(out, "h", shards, info)
    for i, (a, b) in enumerate(shards):
        red = {"frobenius": torch.arange(a, b, dtype=torch.float64), "trace": -torch.arange(a, b, dtype=torch.float64)}
        m.record(write_part(out, i, a, b, arrow_mod.to_record_batch(range(a, b), reductions=red, dtype="float64")))
    m.flush()
    got = distjac.read_result(out)
    assert list(got) == ["frobenius", "trace"] and got["frobenius"].dtype == np.float64
    np.testing.assert_array_equal(got["trace"], -np.arange(6))
    np.testing.assert_array_equal(distjac.read_result(out, rows=[5, 1])["frobenius"], [5, 1])
    assert [r.tolist() for r, _ in iter_result(out)] == [[0, 1, 2, 3], [4, 5]]


def test_read_result_of_unfinished_output_names_the_shards(tmp_path):
    out, manifest, _, _ = _output(tmp_path)
    os.unlink(os.path.join(out, "part-00001.arrow"))
    Manifest.load(out).verify()
    np.testing.assert_array_equal(distjac.read_result(out, rows=slice(0, 10)), _expected()[:10])
    with pytest.raises(ResultError, match=r"1 shard\(s\) holding the requested rows are not finished: 1 \[10, 20\)\. "
                       r"Run the job again"):
        distjac.read_result(out)


def test_read_result_of_a_plain_directory(tmp_path):
    with pytest.raises(ResultError, match="is not a distjac output: it has no _manifest.json"):
        distjac.read_result(tmp_path)


def test_iter_result_is_memory_mapped(tmp_path):
    out, *_ = _output(tmp_path)
    rows = np.concatenate([r for r, v in iter_result(out)])
    np.testing.assert_array_equal(rows, np.arange(30))
    assert all(not v.flags.writeable for _, v in iter_result(out))


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_pandas_reads_the_output(tmp_path, fmt):
    pd = pytest.importorskip("pandas")
    out, *_ = _output(tmp_path, fmt=fmt)
    frame = pd.read_parquet(out) if fmt == "parquet" else ds.dataset(out, format="arrow").to_table().to_pandas()
    assert len(frame) == 30 and sorted(frame["row"]) == list(range(30))
    # other tools see the tensor's storage: a fixed-size list of its values in C order
    value = np.asarray(frame.sort_values("row")["jacobian"].iloc[3], np.float32)
    np.testing.assert_array_equal(value.reshape(-1), _expected()[3].reshape(-1))


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_polars_reads_the_output(tmp_path, fmt):
    pl = pytest.importorskip("polars")
    out, *_ = _output(tmp_path, fmt=fmt)
    pattern = os.path.join(out, f"*.{fmt}")
    frame = (pl.read_parquet(pattern) if fmt == "parquet" else pl.read_ipc(pattern)).sort("row")
    assert frame.height == 30 and frame["row"].to_list() == list(range(30))
    value = np.asarray(frame["jacobian"][3].to_list(), np.float32)
    np.testing.assert_array_equal(value.reshape(-1), _expected()[3].reshape(-1))


def test_duckdb_reads_the_output(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    out, *_ = _output(tmp_path, fmt="parquet")
    rows = duckdb.sql(f"SELECT count(*), min(row), max(row) FROM '{out}/*.parquet'").fetchall()
    assert rows == [(30, 0, 29)]
    first = duckdb.sql(f"SELECT jacobian FROM '{out}/*.parquet' WHERE row = 3").fetchall()[0][0]
    np.testing.assert_array_equal(np.asarray(first, np.float32).reshape(-1), _expected()[3].reshape(-1))


def test_ipc_part_is_a_plain_arrow_file(tmp_path):
    out, *_ = _output(tmp_path)
    with pa.memory_map(os.path.join(out, "part-00000.arrow")) as f:
        table = ipc.open_file(f).read_all()
    assert table.num_rows == 10 and table.column_names == ["row", "jacobian"]
