"""Jobs on an object store: a real S3 protocol server (moto's server mode) on 127.0.0.1,
reached the way users configure S3 (AWS_* environment variables, AWS_ENDPOINT_URL).

Issue 12, item 4: Parquet input read from s3://, parts, manifest, report and _SUCCESS
written to s3://, resume, read_result("s3://..."), and never a local ./s3:/ folder.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

moto_server = pytest.importorskip("moto.server", reason="the test extra installs moto[server]")
pd = pytest.importorskip("pandas")

import distjac  # noqa: E402
from distjac.errors import ConfigError, OutputLockedError  # noqa: E402
from distjac.io import fs as dfs  # noqa: E402
from distjac.jobs import prepare_job, run_job  # noqa: E402

BUCKET = "distjac-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port, and the environment that points at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in (*env, "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_PROFILE")}
    os.environ.update(env)
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_PROFILE"):
        os.environ.pop(k, None)
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(BUCKET)
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _put_parquet(uri: str, n: int = 40, width: int = 3, seed: int = 0) -> np.ndarray:
    """A Parquet file as pandas writes a column of arrays (list<double>), with id and label."""
    x = np.random.default_rng(seed).standard_normal((n, width))
    df = pd.DataFrame({"id": [f"ex{i}" for i in range(n)], "label": np.arange(n) % 3, "x": list(x)})
    table = pa.Table.from_pandas(df, preserve_index=False)
    assert pa.types.is_list(table.schema.field("x").type)
    fs, path = dfs.file_system(uri)
    with fs.open_output_stream(path) as f:
        pq.write_table(table, f, row_group_size=16)
    return x.astype(np.float32)


def _spec(data_uri: str, out_uri: str, **output) -> distjac.JobSpec:
    return distjac.JobSpec.from_dict({
        "model": {"factory": "distjac.models:mlp", "kwargs": {"sizes": [3, 5, 2], "seed": 0}},
        "data": {"kind": "parquet", "path": data_uri, "column": "x"},
        "jacobian": {"mode": "rev"},
        "engine": {"num_workers": 0, "shard_size": 16},
        "output": {"path": out_uri, **output},
    })


def _run(spec: distjac.JobSpec) -> dict:
    # run_job as the runner will once jobs.prepare_job records URIs as they are
    # (distjac.io.sink.resolve_output_path); see the report of issue 12.
    job = prepare_job(spec)
    job = dataclasses.replace(job, out_dir=dfs.normalize(spec.output.path))
    return run_job(spec, prepared=job)


def _keys(uri: str) -> list[str]:
    return sorted(dfs.listdir(uri))


def test_job_reads_and_writes_s3_and_resumes(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x = _put_parquet(f"s3://{BUCKET}/in/data.parquet")
    out = f"s3://{BUCKET}/results/job1"
    spec = _spec(f"s3://{BUCKET}/in/data.parquet", out)
    report = _run(spec)
    assert report["status"] == "succeeded" and report["computed_shards"] == 3
    names = _keys(out)
    assert names == [".distjac.lock", "_SUCCESS", "_manifest.json", "_report.json", "part-00000.arrow",
                     "part-00001.arrow", "part-00002.arrow"] or ".distjac.lock" not in names
    assert not any(".tmp-" in n for n in names), names  # object stores: no temporaries
    assert not (tmp_path / "s3:").exists()

    got = distjac.read_result(out)
    model = distjac.config.build_model(spec.model)
    import torch

    want = distjac.batch_jacobian(model, torch.from_numpy(x), mode="rev").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert json.loads(dfs.read_bytes(out + "/_SUCCESS"))["distjac"]

    # A re-run verifies and reuses everything; a lost part object is computed again.
    again = _run(spec)
    assert again["computed_shards"] == 0 and again["reused_shards"] == 3
    dfs.unlink(out + "/part-00001.arrow")
    third = _run(spec)
    assert third["computed_shards"] == 1 and third["recomputed_shards"] == [1]
    np.testing.assert_allclose(distjac.read_result(out), want, rtol=1e-5, atol=1e-6)
    summary = distjac.io.inspect_output(out)
    assert summary["complete"] and summary["success_marker"]


def test_lock_object_refuses_a_second_run(s3):
    out = f"s3://{BUCKET}/results/locked"
    held = {"distjac": "0", "host": "another-host", "pid": 1234, "started": "2026-01-01T00:00:00"}
    dfs.write_atomic(out + "/.distjac.lock", json.dumps(held).encode())
    with pytest.raises(OutputLockedError, match=r"in use by another run \(host another-host, pid 1234.*delete "
                       r"s3://distjac-test/results/locked/.distjac.lock"):
        distjac.io.lock_output(out)
    dfs.unlink(out + "/.distjac.lock")
    with distjac.io.lock_output(out) as lock:
        assert dfs.exists(lock.path)
    assert not dfs.exists(out + "/.distjac.lock")


def test_missing_bucket_is_named(s3):
    with pytest.raises(distjac.OutputExistsError, match=r"bucket 'no-such-bucket' does not exist"):
        distjac.io.lock_output("s3://no-such-bucket/out")


def test_s3_path_never_becomes_a_local_folder(s3, tmp_path, monkeypatch):
    """Before issue 12, output.path s3://bucket/x wrote to ./s3:/bucket/x."""
    monkeypatch.chdir(tmp_path)
    _put_parquet(f"s3://{BUCKET}/in/small.parquet", n=8)
    spec = _spec(f"s3://{BUCKET}/in/small.parquet", f"s3://{BUCKET}/results/never-local")
    report = run_job(spec)
    assert report["path"] == f"s3://{BUCKET}/results/never-local" and report["computed_shards"] >= 1
    assert distjac.read_result(f"s3://{BUCKET}/results/never-local").shape[0] == 8
    with pytest.raises(ConfigError, match="lost its '//'"):
        _spec(f"s3://{BUCKET}/in/small.parquet", "s3:/bucket/x")
    assert list(tmp_path.iterdir()) == []


def test_keep_columns_read_from_s3(s3):
    from distjac.arrow import to_record_batch
    from distjac.io.sources import open_source, read_columns

    _put_parquet(f"s3://{BUCKET}/in/keep.parquet", n=20)
    spec = _spec(f"s3://{BUCKET}/in/keep.parquet", f"s3://{BUCKET}/results/keep", keep_columns=["id", "label"])
    source = open_source(spec.data)
    assert source.shape == (3,) and source.lists
    cols = read_columns(source, spec.output.keep_columns, 14, 19)  # across row groups 0 and 1
    assert cols["id"].to_pylist() == [f"ex{i}" for i in range(14, 19)]
    assert cols["label"].to_pylist() == [i % 3 for i in range(14, 19)]
    import torch

    batch = to_record_batch(range(14, 19), torch.zeros((5, 2, 3)), extra_columns=cols)
    assert batch.schema.names == ["row", "jacobian", "id", "label"]


def test_npy_on_s3(s3):
    import io

    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    buf = io.BytesIO()
    np.save(buf, x)
    dfs.write_atomic(f"s3://{BUCKET}/in/x.npy", buf.getvalue())
    from distjac.io.sources import open_source

    src = open_source(distjac.config.DataSpec(kind="npy", path=f"s3://{BUCKET}/in/x.npy"))
    assert (src.num_rows, src.shape, src.dtype) == (6, (4,), "float32")
    np.testing.assert_array_equal(src.read(2, 5).numpy(), x[2:5])
