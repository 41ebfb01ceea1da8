"""Whole jobs in this process (no Ray): results equal distjac.batch_jacobian on the same
data, resume computes only what is missing, a changed spec is refused, failures keep
every finished shard."""

import json
import os

import numpy as np
import pyarrow.ipc  # noqa: F401 - pa.ipc
import pytest
import torch
from job_helpers import reference, tiny_spec, write_arrow, write_parquet

import distjac
from distjac.config import build_model
from distjac.errors import OutputExistsError
from distjac.io.sink import MANIFEST_NAME, REPORT_NAME, SUCCESS_NAME, Manifest
from distjac.io.sources import open_source
from distjac.jobs import prepare_job, run_job
from distjac.models import mlp
from distjac.reduce import reduce_block


def _parts(out):
    return sorted(n for n in os.listdir(out) if n.startswith("part-"))


def test_job_equals_batch_jacobian(tmp_path):
    spec = tiny_spec(tmp_path / "out")
    report = run_job(spec)
    assert report["status"] == "succeeded" and report["rows"] == 50 and report["shards"] == 4
    assert report["computed_shards"] == 4 and report["computed_rows"] == 50 and report["reused_shards"] == 0
    got = distjac.read_result(spec.output.path)
    assert got.shape == (50, 2, 3)
    np.testing.assert_allclose(got, reference(spec), rtol=1e-6, atol=1e-7)
    out = spec.output.path
    assert _parts(out) == [f"part-0000{i}.arrow" for i in range(4)]
    assert os.path.exists(os.path.join(out, SUCCESS_NAME))
    assert json.load(open(os.path.join(out, REPORT_NAME)))["rows"] == 50
    (worker, figures), = report["workers"].items()
    assert figures["shards"] == 4 and figures["rows"] == 50
    # In process: every shard's time per stage; nothing waits in a queue, nothing leaves a GPU.
    timing = report["timing"]
    assert [s["shard"] for s in timing["shards"]] == [0, 1, 2, 3]
    assert all(s["compute_s"] > 0 and s["write_s"] > 0 and s["to_host_s"] == 0 and "wait_s" not in s
               for s in timing["shards"])
    assert timing["totals_s"]["compute_s"] == pytest.approx(sum(s["compute_s"] for s in timing["shards"]))
    assert list(timing["worker_peak_rss_bytes"]) == [worker]


@pytest.mark.parametrize("kind", ["npy", "parquet", "arrow", "tensor"])
def test_file_sources(tmp_path, kind):
    x = np.random.default_rng(0).standard_normal((41, 3)).astype(np.float32)
    data = {"kind": kind, "rows": None, "shape": None}
    if kind == "npy":
        np.save(tmp_path / "x.npy", x)
        data["path"] = str(tmp_path / "x.npy")
    elif kind == "parquet":
        data["path"] = write_parquet(tmp_path / "x.parquet", x, row_group_size=7)
    elif kind == "arrow":
        data["path"] = write_arrow(tmp_path / "x.arrow", x, batch_rows=9)
    else:
        data["tensor"] = torch.from_numpy(x)
    spec = tiny_spec(tmp_path / "out", data=data)
    run_job(spec)
    want = distjac.batch_jacobian(mlp([3, 5, 2]), torch.from_numpy(x), mode="rev").numpy()
    np.testing.assert_allclose(distjac.read_result(spec.output.path), want, rtol=1e-6, atol=1e-7)


def test_parquet_output_float64_fwd(tmp_path):
    spec = tiny_spec(tmp_path / "out", output={"format": "parquet"},
                     jacobian={"mode": "fwd", "dtype": "float64", "compute_dtype": "float64"})
    run_job(spec)
    got = distjac.read_result(spec.output.path)
    assert got.dtype == np.float64 and _parts(spec.output.path)[0].endswith(".parquet")
    x = open_source(spec.data).read(0, 50).double()
    want = distjac.batch_jacobian(mlp([3, 5, 2]).double(), x, mode="rev").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_reductions_job(tmp_path):
    spec = tiny_spec(tmp_path / "out", model={"kwargs": {"sizes": [3, 6, 3]}},
                     jacobian={"reduce": ["frobenius", "spectral", "trace", "logabsdet"]})
    run_job(spec)
    got = distjac.read_result(spec.output.path)
    assert list(got) == ["frobenius", "spectral", "trace", "logabsdet"]
    full = torch.from_numpy(reference(spec))
    for name, values in reduce_block(full, list(got), in_ndim=1).items():
        np.testing.assert_allclose(got[name], values.numpy(), rtol=1e-5, atol=1e-6)
    assert distjac.read_result(spec.output.path, rows=[3])["trace"].shape == (1,)


def test_matrix_shaped_examples(tmp_path):
    spec = tiny_spec(tmp_path / "out", model={"factory": "distjac.models:cube", "kwargs": {}},
                     data={"shape": [2, 3], "rows": 20})
    run_job(spec)
    got = distjac.read_result(spec.output.path)
    x = open_source(spec.data).read(0, 20)
    np.testing.assert_allclose(got, distjac.batch_jacobian(lambda t: t ** 3, x, mode="rev").numpy(), rtol=1e-6)
    assert got.shape == (20, 2, 3, 2, 3)


def test_resume_recomputes_only_deleted_parts(tmp_path):
    spec = tiny_spec(tmp_path / "out")
    run_job(spec)
    first = distjac.read_result(spec.output.path).copy()
    out = spec.output.path
    for i in (1, 3):
        os.unlink(os.path.join(out, f"part-0000{i}.arrow"))
    report = run_job(spec)
    assert report["resumed"] and report["recomputed_shards"] == [1, 3]
    assert report["computed_shards"] == 2 and report["reused_shards"] == 2
    np.testing.assert_array_equal(distjac.read_result(out), first)
    again = run_job(spec)  # nothing left to do
    assert again["computed_shards"] == 0 and again["reused_shards"] == 4


def test_corrupted_part_is_recomputed(tmp_path):
    spec = tiny_spec(tmp_path / "out")
    run_job(spec)
    first = distjac.read_result(spec.output.path).copy()
    path = os.path.join(spec.output.path, "part-00002.arrow")
    data = bytearray(open(path, "rb").read())
    data[-200] ^= 0x01
    open(path, "wb").write(bytes(data))
    report = run_job(spec)
    assert report["recomputed_shards"] == [2] and report["computed_shards"] == 1
    np.testing.assert_array_equal(distjac.read_result(spec.output.path), first)


def test_changed_spec_refused_unless_overwrite(tmp_path):
    spec = tiny_spec(tmp_path / "out")
    run_job(spec)
    changed = spec.with_overrides(["data.seed=1"])
    with pytest.raises(OutputExistsError, match="holds results of a different job spec .* pass --overwrite"):
        run_job(changed)
    assert os.path.exists(os.path.join(spec.output.path, SUCCESS_NAME))  # untouched
    report = run_job(changed.with_overrides(["output.overwrite=true"]))
    assert report["computed_shards"] == 4
    np.testing.assert_allclose(distjac.read_result(spec.output.path), reference(changed), rtol=1e-6, atol=1e-7)


def test_engine_settings_do_not_block_resume(tmp_path):
    spec = tiny_spec(tmp_path / "out")
    run_job(spec)
    os.unlink(os.path.join(spec.output.path, "part-00000.arrow"))
    # another shard size and chunk size: the output's own plan is kept, only shard 0 runs
    report = run_job(spec.with_overrides(["engine.shard_size=7", "jacobian.chunk_size=1"]))
    assert report["computed_shards"] == 1 and report["shards"] == 4 and report["shard_size"] == 16


def test_failed_shard_keeps_finished_ones_and_resumes(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    x[40, 1] = np.nan  # shard 2 = rows [32, 48)
    np.save(tmp_path / "x.npy", x)
    spec = tiny_spec(tmp_path / "out", model={"factory": "job_helpers:nan_guard", "kwargs": {}},
                     data={"kind": "npy", "path": str(tmp_path / "x.npy"), "rows": None, "shape": None})
    message = r"shard 2 \(rows \[32, 48\)\) failed on .*ValueError: NaN in the batch"
    with pytest.raises(distjac.ShardError, match=message) as info:
        run_job(spec)
    assert (info.value.shard, info.value.start, info.value.stop) == (2, 32, 48)
    assert isinstance(info.value.__cause__, ValueError)
    out = spec.output.path
    # Shards before it finished; shard 3 may have been running beside it (the stages
    # overlap): it finished and was recorded, or never started. Shard 2 left nothing.
    parts = _parts(out)
    assert parts[:2] == ["part-00000.arrow", "part-00001.arrow"] and "part-00002.arrow" not in parts
    assert not os.path.exists(os.path.join(out, SUCCESS_NAME))
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no half-written part
    recorded = sorted(Manifest.load(out).parts)
    assert [f"part-{i:05d}.arrow" for i in recorded] == parts
    assert json.load(open(os.path.join(out, REPORT_NAME)))["status"] == "failed"
    x[40, 1] = 0.0
    np.save(tmp_path / "x.npy", x)
    report = run_job(spec)
    assert report["reused_shards"] == len(recorded) and report["computed_shards"] == 4 - len(recorded)
    np.testing.assert_allclose(distjac.read_result(out)[40], distjac.batch_jacobian(
        build_model(spec.model), torch.from_numpy(x[40:41]))[0].numpy(), rtol=1e-6, atol=1e-7)


def test_parts_finished_after_the_last_manifest_save_are_adopted(tmp_path):
    spec = tiny_spec(tmp_path / "out")
    run_job(spec)
    out = spec.output.path
    m = Manifest.load(out)
    del m.parts[1], m.parts[2]  # as if the driver died before recording them
    m.save()
    os.unlink(os.path.join(out, SUCCESS_NAME))
    report = run_job(spec)
    assert report["adopted_shards"] == 2 and report["computed_shards"] == 0
    assert Manifest.load(out).complete and os.path.exists(os.path.join(out, SUCCESS_NAME))


def test_empty_job(tmp_path):
    spec = tiny_spec(tmp_path / "out", data={"rows": 0})
    report = run_job(spec)
    assert report["shards"] == 0 and os.path.exists(os.path.join(spec.output.path, SUCCESS_NAME))
    assert distjac.read_result(spec.output.path).shape == (0, 2, 3)


def test_plan_is_printable(tmp_path):
    job = prepare_job(tiny_spec(tmp_path / "out"))
    text = str(job)
    assert "spec hash" in text and "4 shards x 16 rows (last 2)" in text and "synthetic: 50 rows of shape (3,)" in text
    assert job.summary()["plan"]["shards"] == 4
    assert not os.path.exists(tmp_path / "out")  # planning writes nothing


def test_manifest_records_the_plan_and_inputs(tmp_path):
    spec = tiny_spec(tmp_path / "out")
    run_job(spec)
    d = json.load(open(os.path.join(spec.output.path, MANIFEST_NAME)))
    assert d["spec_hash"] == spec.spec_hash() and d["shards"] == [[0, 16], [16, 32], [32, 48], [48, 50]]
    assert d["info"]["input_shape"] == [3] and d["info"]["output_shape"] == [2]
    assert d["info"]["spec"]["model"]["factory"] == "distjac.models:mlp"


@pytest.mark.slow
def test_driver_killed_mid_job_resumes_with_the_same_result(tmp_path):
    """SIGKILL the driver of an in-process job (`distjac run --workers 0`) mid-way: the rerun
    keeps every part that was on disk and computes exactly the others."""
    import signal
    import subprocess
    import sys
    import time

    import yaml
    from job_helpers import TESTS_DIR, tiny_dict

    d = tiny_dict(tmp_path / "out", model={"factory": "job_helpers:slow_mlp", "kwargs": {"delay": 0.05}},
                  data={"rows": 200}, engine={"shard_size": 10})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(d))
    env = {**os.environ, "PYTHONPATH": TESTS_DIR}
    proc = subprocess.Popen([sys.executable, "-m", "distjac.cli", "run", str(tmp_path / "job.yaml"), "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "out"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and len(_parts(out)) >= 3:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = len(_parts(out))
    assert 3 <= finished < 20, "the job was not killed mid-way"
    assert not (out / SUCCESS_NAME).exists()
    spec = distjac.JobSpec.from_dict(d)
    report = run_job(spec)
    assert report["reused_shards"] + report["adopted_shards"] == finished
    assert report["computed_shards"] == 20 - finished
    clean = run_job(spec.with_overrides([f"output.path={tmp_path / 'clean'}", "model.kwargs.delay=0"]))
    assert clean["computed_shards"] == 20
    np.testing.assert_array_equal(distjac.read_result(out), distjac.read_result(tmp_path / "clean"))


# --------------------------------------------------------------------------------------
# NOTE [the Engine's settings and the job's]: an Engine's shard size and shards in
# flight (passed to prepare_job) win over the spec's; None leaves the spec's.
# --------------------------------------------------------------------------------------


def test_prepare_job_engine_settings_win_over_the_spec(tmp_path):
    spec = tiny_spec(tmp_path / "out", engine={"shard_size": 16, "max_in_flight": 3})
    plan = prepare_job(spec).plan
    assert (plan.shard_size, len(plan), plan.parallel_iterations) == (16, 4, 3)
    plan = prepare_job(spec, shard_size=None, parallel_iterations=None).plan
    assert (plan.shard_size, plan.parallel_iterations) == (16, 3)
    plan = prepare_job(spec, shard_size=10, parallel_iterations=2).plan
    assert (plan.shard_size, len(plan), plan.parallel_iterations, plan.in_flight) == (10, 5, 2, 2)


def test_in_process_shards_in_flight_are_the_pipelines_at_most(tmp_path):
    from distjac.shard import PIPELINE_DEPTH

    report = run_job(tiny_spec(tmp_path / "a", engine={"max_in_flight": 8}))
    assert (report["shards"], report["shard_size"], report["in_flight"]) == (4, 16, PIPELINE_DEPTH)
    report = run_job(tiny_spec(tmp_path / "b", engine={"max_in_flight": 1}))
    assert report["in_flight"] == 1


def test_cli_engine_takes_the_specs_settings(tmp_path):
    """distjac run builds its Engine from the spec: every setting the Engine would win
    with is the spec's own, so the CLI runs what the spec says."""
    from distjac.cli import _engine_kwargs

    spec = tiny_spec(tmp_path / "out", engine={"shard_size": 7, "max_in_flight": 3},
                     jacobian={"chunk_size": 2})
    kw = _engine_kwargs(spec)
    assert (kw["shard_size"], kw["parallel_iterations"], kw["chunk_size"]) == (7, 3, 2)
    assert "shard_timeout_s" not in kw  # None on the Engine: the spec's applies
