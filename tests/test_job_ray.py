"""Jobs on real Ray workers: ``Engine.run(spec)`` and ``distjac run --workers 2``.

The workers read their rows from each shard's source and write their own part files; the
results must equal ``distjac.batch_jacobian`` on the same rows in this process. Resume
(deleted, truncated, corrupted parts; a driver SIGKILLed mid-job) computes only what is
missing, and a failing model names its shard and leaves nothing half-written.

One Engine (two CPU workers) serves the API tests of this module, as in test_engine.py.
The CLI tests run ``python -m distjac.cli`` in their own session (``start_new_session``),
so every process of that run's private Ray instance shares the driver's session id: after
a run the test finds what is left of it with psutil and kills it, so nothing leaks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from job_helpers import TESTS_DIR, reference, tiny_dict

import distjac
from distjac import ShardError
from distjac import arrow as arrow_mod
from distjac.config import build_model
from distjac.io.sink import MANIFEST_NAME, REPORT_NAME, SUCCESS_NAME, Manifest
from distjac.reduce import reduce_block

psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.ray

# Generous: the CI machine has 2 cores, and a subprocess starts its own Ray instance.
CLI_TIMEOUT_S = 300
# How long the processes of a finished or killed CLI run may take to exit by themselves.
EXIT_GRACE_S = 30


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def job_dict(out, **sections) -> dict:
    """mlp 8 -> 16 -> 4 over 2000 synthetic rows, shards of 300 (7 shards, the last 200)."""
    base = tiny_dict(out, model={"kwargs": {"sizes": [8, 16, 4]}}, data={"rows": 2000, "shape": [8]},
                     engine={"shard_size": 300, "num_workers": 2, "max_in_flight": 4})
    for name, values in sections.items():
        base[name] = {**base[name], **values}
    return base


def job_spec(out, **sections) -> distjac.JobSpec:
    return distjac.JobSpec.from_dict(job_dict(out, **sections))


def write_config(tmp_path, d: dict, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d))
    return str(path)


def part_files(out) -> list[str]:
    return sorted(n for n in os.listdir(out) if n.startswith("part-"))


def temporaries(out) -> list[str]:
    return sorted(n for n in os.listdir(out) if ".tmp-" in n)


def read_part(path: str):
    """A part file as a reader sees it: (row ids, {column: values})."""
    if path.endswith(".arrow"):
        table = ipc.open_file(pa.memory_map(path, "r")).read_all()
    else:
        table = pq.read_table(path)
    cols = {}
    for name in table.column_names:
        if name != arrow_mod.ROW_COLUMN:
            col = table.column(name)
            cols[name] = arrow_mod.column_values(col) if arrow_mod.tensor_info(col.type) else col.to_numpy()
    return table.column(arrow_mod.ROW_COLUMN).to_numpy(), cols


def check_nothing_half_written(out, expected: np.ndarray) -> tuple[set[int], set[int]]:
    """Every part under its final name is complete and right; every recorded part matches
    its checksum. Returns (recorded shards, shards with a part on disk)."""
    manifest = Manifest.load(out)
    assert manifest.verify(full=True, drop=False) == [], "a recorded part does not match the manifest"
    on_disk = set()
    for name in part_files(out):
        shard = int(name.split("-")[1].split(".")[0])
        start, stop = manifest.shards[shard]
        rows, cols = read_part(os.path.join(out, name))
        np.testing.assert_array_equal(rows, np.arange(start, stop), err_msg=name)
        np.testing.assert_allclose(cols["jacobian"], expected[start:stop], rtol=1e-5, atol=1e-6, err_msg=name)
        on_disk.add(shard)
    recorded = set(manifest.parts)
    assert recorded <= on_disk
    assert not os.path.exists(os.path.join(out, SUCCESS_NAME))
    return recorded, on_disk


def drain(engine) -> None:
    """Wait until the workers finished what they still hold. After a shard fails, Ray
    cancels the queued shards but lets a running actor task finish (and write its part).
    A worker runs up to PIPELINE_DEPTH calls at once, so a fresh call can return before
    those are done (it once did: a part was written after the check): poll each worker's
    running shards (``progress``, in its own concurrency group) until none is left twice
    in a row."""
    import ray

    from distjac.worker import PROGRESS_GROUP

    deadline, quiet = time.monotonic() + CLI_TIMEOUT_S, 0
    while quiet < 2:
        running = ray.get([w.progress.options(concurrency_group=PROGRESS_GROUP).remote() for w in engine._workers],
                          timeout=CLI_TIMEOUT_S)
        quiet = 0 if any(running) else quiet + 1
        assert time.monotonic() < deadline, f"workers still running shards after {CLI_TIMEOUT_S} s: {running}"
        time.sleep(0.05)


def nan_job(tmp_path, nan_row: int) -> tuple[dict, str]:
    """job_helpers:nan_guard (mlp 3 -> 5 -> 2 raising on a NaN in its batch) over 600 rows
    of an .npy file with a NaN in ``nan_row``; shards of 100, two in flight."""
    x = np.random.default_rng(3).standard_normal((600, 3)).astype(np.float32)
    x[nan_row, 1] = np.nan
    path = tmp_path / "x.npy"
    np.save(path, x)
    d = job_dict(tmp_path / "out", model={"factory": "job_helpers:nan_guard", "kwargs": {}},
                 data={"kind": "npy", "path": str(path), "rows": None, "shape": None},
                 engine={"shard_size": 100, "max_in_flight": 2})
    return d, str(path)


def fix_nan(path: str) -> None:
    np.save(path, np.nan_to_num(np.load(path), nan=0.25))


def fixed_reference(spec: distjac.JobSpec, path: str) -> np.ndarray:
    """The Jacobians of the NaN job once its NaN is replaced as fix_nan does (computed
    with the guarded MLP itself, which has no NaN check)."""
    x = torch.from_numpy(np.nan_to_num(np.load(path), nan=0.25))
    return distjac.batch_jacobian(build_model(spec.model).inner, x, mode="rev").numpy()


# -- the CLI in a subprocess, in its own session ----------------------------------------


def cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p)
    return env


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "distjac.cli", *args]


def session_processes(sid: int) -> list:
    """Processes of session ``sid`` (a CLI driver started with start_new_session and
    every Ray process it spawned, even once reparented after the driver died)."""
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if proc.pid != sid and os.getsid(proc.pid) == sid:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def _describe(procs) -> list[str]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(f"{p.pid} {p.name()}")
    return out


def is_ray_agent(description: str) -> bool:
    # Ray's per-node agents (ray::DashboardAgent, ray::RuntimeEnvAgent) poll their raylet
    # and exit only 30-90 s after it died (measured with Ray 2.60).
    return "Agent" in description


def reap_session(sid: int, grace: float = EXIT_GRACE_S, *, wait_for_agents: bool = True) -> list[str]:
    """Wait up to ``grace`` seconds for the session's processes (without
    ``wait_for_agents``: all but Ray's agents) to exit by themselves, then SIGKILL what
    is left, by pid. Returns the descriptions of the processes that had to be killed."""
    def waited(procs):
        return [p for p in procs if wait_for_agents or not is_ray_agent(" ".join(_describe([p])))]

    deadline = time.monotonic() + grace
    left = session_processes(sid)
    while waited(left) and time.monotonic() < deadline:
        time.sleep(0.25)
        left = session_processes(sid)
    survivors = _describe(left)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=10)
    assert not session_processes(sid), "processes of the run survived SIGKILL"
    return survivors


def run_cli(*args) -> subprocess.CompletedProcess:
    """``distjac ARGS`` to completion; its Ray processes must exit with it."""
    proc = subprocess.Popen(cli_command(*args), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        survivors = reap_session(proc.pid)
    assert not survivors, f"`distjac {' '.join(args)}` left processes running: {survivors}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def json_report(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


# --------------------------------------------------------------------------------------
# Engine.run on a shared engine
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    import ray

    eng = distjac.Engine(num_workers=2, device="cpu", max_retries=3, progress=False)
    try:
        yield eng
    finally:
        eng.shutdown()
    if eng.owns_local:
        assert not ray.is_initialized(), "the Ray instance distjac started outlived its last Engine"


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_run_equals_batch_jacobian(engine, tmp_path, fmt):
    spec = job_spec(tmp_path / "out", output={"format": fmt})
    report = engine.run(spec)
    assert report["status"] == "succeeded" and report["format"] == fmt
    assert (report["rows"], report["shards"], report["shard_size"]) == (2000, 7, 300)
    assert report["computed_shards"] == 7 and report["computed_rows"] == 2000
    assert report["finished_shards"] == 7 and report["reused_shards"] == 0 and not report["resumed"]
    assert report["bytes_written"] > 2000 * 4 * 8 * 4  # rows x jacobian values x float32

    out = spec.output.path
    got = distjac.read_result(out)
    assert got.shape == (2000, 4, 8) and got.dtype == np.float32
    want = reference(spec)  # distjac.batch_jacobian(model, rows the job's source reads), rev
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    assert part_files(out) == [f"part-0000{i}.{fmt}" for i in range(7)]
    assert os.path.exists(os.path.join(out, SUCCESS_NAME)) and not temporaries(out)
    manifest = json.load(open(os.path.join(out, MANIFEST_NAME)))
    assert manifest["spec_hash"] == spec.spec_hash() and manifest["finished"] == 7
    assert manifest["shards"] == [[i * 300, min(2000, (i + 1) * 300)] for i in range(7)]
    assert json.load(open(os.path.join(out, REPORT_NAME)))["computed_shards"] == 7
    # Any Arrow reader takes the directory as it is.
    assert pads.dataset(out, format="arrow" if fmt == "arrow" else "parquet").count_rows() == 2000

    # The parts were written by the workers (two processes, not this one), and the
    # report's per-worker time covers their compute, not only their write.
    assert sum(w["shards"] for w in report["workers"].values()) == 7
    assert sum(w["rows"] for w in report["workers"].values()) == 2000
    writers = {p["worker"] for p in manifest["parts"].values()}
    assert len(writers) == 2 and f":{os.getpid()}" not in " ".join(writers)
    for info in manifest["parts"].values():
        schema = ipc.open_file(os.path.join(out, info["file"])).schema if fmt == "arrow" else \
            pq.read_schema(os.path.join(out, info["file"]))
        annotation = arrow_mod.annotation(schema)
        assert annotation["shard"] == info["shard"] and annotation["pid"] != os.getpid()
        worker_s = annotation["read_s"] + annotation["compute_s"]
        assert info["seconds"] >= worker_s > 0 and annotation["compute_s"] > 0

    # The report breaks each shard's time into stages that add up to the part's seconds.
    timing = report["timing"]
    assert [s["shard"] for s in timing["shards"]] == list(range(7))
    for s in timing["shards"]:
        assert s["worker"] == manifest["parts"][str(s["shard"])]["worker"] and s["rows"] in (300, 200)
        assert s["compute_s"] > 0 and s["write_s"] > 0 and s["wait_s"] >= 0 and s["to_host_s"] == 0
    # The driver waited at least as long as the slowest shard's own work took.
    assert report["run_seconds"] >= max(
        sum(s[k] for k in ("read_s", "compute_s", "arrow_s", "write_s")) for s in timing["shards"])
    assert set(timing["worker_peak_rss_bytes"]) == writers
    assert all(peak > 50 * 2**20 for peak in timing["worker_peak_rss_bytes"].values())  # torch alone is more


def test_the_driver_never_builds_the_model_each_worker_builds_it_once(engine, tmp_path):
    """Issue 10, item 4: Engine.run imports the factory, never calls it; the workers build
    the model (the probe's model is the shards' model) once per process."""
    log = tmp_path / "built.txt"
    spec = job_spec(tmp_path / "out", model={"factory": "job_helpers:counting_mlp",
                                             "kwargs": {"log": str(log), "sizes": [8, 16, 4]}})
    report = engine.run(spec)
    assert report["computed_shards"] == 7
    pids = [int(p) for p in log.read_text().split()]
    assert os.getpid() not in pids
    assert len(pids) == len(set(pids)) and set(pids) <= {w["pid"] for w in engine.workers()}
    np.testing.assert_allclose(distjac.read_result(spec.output.path), reference(spec), rtol=1e-6, atol=1e-7)


def test_auto_is_chosen_once_per_job_and_shipped_to_every_worker(engine, tmp_path):
    """Issue 11: with mode auto, worker 0 chooses the strategy once for the job; every shard,
    on either worker, runs that very strategy (none measures for itself)."""
    spec = job_spec(tmp_path / "out", jacobian={"mode": "auto"})
    report = engine.run(spec)
    decision = engine.last_decision
    assert decision is not None and decision["how"] in ("sizes", "measured", "structure", "cached", "tuning cache")
    assert decision["chosen_on"]["pid"] in {w["pid"] for w in engine.workers()}
    assert report["strategies"] == {decision["strategy"]: 7}
    writers = {p["worker"] for p in json.load(open(os.path.join(spec.output.path, MANIFEST_NAME)))["parts"].values()}
    assert len(writers) == 2  # both workers ran shards, with the one shipped choice
    np.testing.assert_allclose(distjac.read_result(spec.output.path), reference(spec), rtol=1e-5, atol=1e-6)


def test_a_diagonal_job_on_the_engine_measures_nothing_dense(engine, tmp_path):
    spec = job_spec(tmp_path / "out", model={"factory": "distjac.models:cube", "kwargs": {}},
                    jacobian={"mode": "auto", "structure": "diagonal"})
    report = engine.run(spec)
    assert engine.last_decision is None and report["strategies"] == {}
    x = distjac.io.sources.open_source(spec.data).read(0, 2000)
    np.testing.assert_allclose(distjac.read_result(spec.output.path), (3 * x * x).numpy(), rtol=1e-6)


def test_reduction_job_equals_in_process_reductions(engine, tmp_path):
    spec = job_spec(tmp_path / "out", model={"kwargs": {"sizes": [8, 16, 8]}},
                    jacobian={"reduce": ["frobenius", "trace", "spectral", "logabsdet"]})
    report = engine.run(spec)
    assert report["computed_shards"] == 7 and report["rows"] == 2000
    got = distjac.read_result(spec.output.path)
    assert list(got) == ["frobenius", "trace", "spectral", "logabsdet"]
    full = torch.from_numpy(reference(spec))
    assert full.shape == (2000, 8, 8)
    want = reduce_block(full, list(got), in_ndim=1)
    for name in got:
        assert got[name].shape == (2000,)
        np.testing.assert_allclose(got[name], want[name].numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    # Kilobytes per shard, not the Jacobians.
    assert report["bytes_written"] < 2000 * (8 + 4 * 4) + 7 * 4096


@pytest.mark.gpu
def test_gpu_worker_reduces_before_the_host_copy(tmp_path):
    """A reduced job on a GPU worker: the reductions are computed on the device, so what
    crosses to the host per shard is a few floats per row, not the Jacobians."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    spec = job_spec(tmp_path / "out", model={"kwargs": {"sizes": [8, 16, 8]}},
                    jacobian={"reduce": ["frobenius", "trace"]}, engine={"device": "cuda", "num_workers": 1})
    with distjac.Engine(num_workers=1, device="cuda", progress=False) as eng:
        report = eng.run(spec)
    assert report["computed_shards"] == 7
    got = distjac.read_result(spec.output.path)
    want = reduce_block(torch.from_numpy(reference(spec)), ["frobenius", "trace"], in_ndim=1)
    for name in ("frobenius", "trace"):
        np.testing.assert_allclose(got[name], want[name].numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    annotation = arrow_mod.annotation(ipc.open_file(os.path.join(spec.output.path, "part-00000.arrow")).schema)
    assert annotation["device"].startswith("cuda")


def test_tensor_source_job_in_the_compute_dtype(engine, tmp_path):
    """An in-memory tensor (float32) computed in float64: each task carries only its rows."""
    x = torch.randn(700, 8, generator=torch.Generator().manual_seed(5))
    spec = job_spec(tmp_path / "out", data={"kind": "tensor", "tensor": x, "rows": None, "shape": None},
                    jacobian={"compute_dtype": "float64", "dtype": "float64"}, engine={"shard_size": 100})
    report = engine.run(spec)
    assert report["shards"] == 7 and report["computed_rows"] == 700
    got = distjac.read_result(spec.output.path)
    assert got.dtype == np.float64
    want = distjac.batch_jacobian(build_model(spec.model).double(), x.double(), mode="rev").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_resume_recomputes_only_deleted_and_damaged_parts(engine, tmp_path):
    spec = job_spec(tmp_path / "out")
    engine.run(spec)
    out = spec.output.path
    first = distjac.read_result(out).copy()

    os.unlink(os.path.join(out, "part-00001.arrow"))
    os.unlink(os.path.join(out, "part-00005.arrow"))
    with open(os.path.join(out, "part-00002.arrow"), "r+b") as f:  # truncated
        f.truncate(os.path.getsize(f.name) // 2)
    with open(os.path.join(out, "part-00004.arrow"), "r+b") as f:  # same size, one bit flipped
        f.seek(-300, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))

    report = engine.run(spec)
    assert report["status"] == "succeeded" and report["resumed"]
    assert report["recomputed_shards"] == [1, 2, 4, 5]
    problems = {d["shard"]: d["problem"] for d in report["dropped"]}
    assert "missing" in problems[1] and "truncated" in problems[2] and "corrupted" in problems[4]
    assert report["computed_shards"] == 4 and report["computed_rows"] == 4 * 300
    assert report["reused_shards"] == 3 and report["adopted_shards"] == 0
    np.testing.assert_array_equal(distjac.read_result(out), first)
    assert os.path.exists(os.path.join(out, SUCCESS_NAME))

    again = engine.run(spec)  # nothing left to do: the workers are not even asked
    assert again["computed_shards"] == 0 and again["reused_shards"] == 7 and again["workers"] == {}
    np.testing.assert_array_equal(distjac.read_result(out), first)


def test_failing_model_names_the_shard_and_keeps_finished_parts(engine, tmp_path):
    d, data_path = nan_job(tmp_path, nan_row=345)  # shard 3: rows [300, 400)
    spec = distjac.JobSpec.from_dict(d)
    out = spec.output.path
    with pytest.raises(ShardError, match=r"shard 3 \(rows \[300, 400\)\) failed on node .*NaN in the batch") as info:
        engine.run(spec)
    err = info.value
    assert (err.shard, err.start, err.stop) == (3, 300, 400)
    assert isinstance(err.__cause__, ValueError)
    assert "forward" in err.remote_traceback  # the worker's traceback, through NanGuard.forward
    report = json.load(open(os.path.join(out, REPORT_NAME)))
    assert report["status"] == "failed" and "shard 3" in report["error"]

    # NOTE [a failed job's shards in flight]: the shards sent with shard 3 (two in flight)
    # were waited for before the error, so every part on disk is already in the manifest
    # (they used to be written a moment after it, unrecorded).
    want = fixed_reference(spec, data_path)
    recorded, on_disk = check_nothing_half_written(out, want)
    assert recorded == on_disk and {0, 1, 2} <= recorded and 3 not in on_disk, (recorded, on_disk)
    drain(engine)
    assert check_nothing_half_written(out, want) == (recorded, on_disk)

    # A writer that died mid-part leaves a temporary: the next run deletes it, keeps every
    # finished part (recorded or not) and computes only the others.
    (tmp_path / "out" / ".part-00003.arrow.tmp-999999-0badf00d").write_bytes(b"half a part")
    fix_nan(data_path)  # same path, same spec hash
    report = engine.run(spec)
    assert report["status"] == "succeeded" and report["cleaned_temporaries"] == 1 and not temporaries(out)
    assert report["reused_shards"] == len(on_disk) and report["adopted_shards"] == 0
    assert report["computed_shards"] == 6 - len(on_disk)
    np.testing.assert_allclose(distjac.read_result(out), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# `distjac run` in a subprocess, on its own embedded Ray instance
# --------------------------------------------------------------------------------------


def test_cli_run_on_ray_end_to_end(tmp_path):
    d = job_dict(tmp_path / "out", data={"rows": 600}, engine={"shard_size": 100},
                 output={"format": "parquet"})
    config = write_config(tmp_path, d)
    r = run_cli("run", config, "--workers", "2", "--no-progress", "--json")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    report = json_report(r.stdout)
    assert report["status"] == "succeeded" and report["rows"] == 600 and report["shards"] == 6
    assert report["computed_shards"] == 6 and len(report["workers"]) == 2
    spec = distjac.JobSpec.from_dict(d)
    np.testing.assert_allclose(distjac.read_result(tmp_path / "out"), reference(spec), rtol=1e-5, atol=1e-6)
    assert part_files(tmp_path / "out") == [f"part-0000{i}.parquet" for i in range(6)]
    assert (tmp_path / "out" / SUCCESS_NAME).exists() and not temporaries(tmp_path / "out")


def test_cli_job_failure_on_ray_exits_1_and_leaves_nothing_half_written(engine, tmp_path):
    d, data_path = nan_job(tmp_path, nan_row=450)  # shard 4: rows [400, 500)
    config = write_config(tmp_path, d)
    r = run_cli("run", config, "--workers", "2", "--no-progress")
    assert r.returncode == 1, (r.stdout, r.stderr)
    # One plain line from distjac (Ray may add its own log lines), no traceback.
    assert "Traceback" not in r.stderr
    message = [line for line in r.stderr.splitlines() if line.startswith("distjac")]
    assert len(message) == 1 and message[0].startswith("distjac run: error: "), r.stderr
    assert "shard 4 (rows [400, 500)) failed on node" in message[0] and "NaN in the batch" in message[0]

    out = tmp_path / "out"
    spec = distjac.JobSpec.from_yaml(config)
    want = fixed_reference(spec, data_path)
    recorded, on_disk = check_nothing_half_written(out, want)
    # NOTE [a failed job's shards in flight]: waited for before the driver exited
    assert recorded == on_disk and {0, 1, 2, 3} <= recorded and 4 not in on_disk, (recorded, on_disk)
    left = temporaries(out)  # the driver stopped its workers, perhaps mid-write

    fix_nan(data_path)
    report = engine.run(spec)  # the same job (the engine section is not in the spec hash)
    assert report["status"] == "succeeded" and report["resumed"]
    assert report["cleaned_temporaries"] == len(left) and not temporaries(out)
    assert report["reused_shards"] + report["adopted_shards"] == len(on_disk)
    assert report["computed_shards"] == 6 - len(on_disk)
    np.testing.assert_allclose(distjac.read_result(out), want, rtol=1e-5, atol=1e-6)


# NOTE [the Engine's settings and the job's] (distjac/engine.py): an Engine argument
# given wins over the spec's engine section, which wins over the defaults.


@pytest.fixture
def settings(engine):
    """The module's engine, its shard size and shards in flight restored afterwards."""
    saved = (engine.shard_size, engine.parallel_iterations)
    yield engine
    engine.shard_size, engine.parallel_iterations = saved


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("rows", "step"), [(1, "probe"), (8, "choice")])
def test_the_jobs_shard_timeout_bounds_its_probe_and_its_choice(engine, tmp_path, rows, step):
    """A model that stalls in the job's probe (2 rows) or in auto's choice on the first
    shard (more than the kernel's 8-row probe) is bounded by the spec's shard_timeout_s,
    not only its shards: the worker is replaced; a stalled probe is made again, a stalled
    choice gives way to the choice by sizes; the job finishes."""
    assert engine.shard_timeout_s is None  # the spec's value is the one that applies
    marker = tmp_path / "stall"
    marker.write_text("")
    spec = job_spec(tmp_path / "out", model={"factory": "job_helpers:stalls_once",
                                             "kwargs": {"marker": str(marker), "rows": rows, "sizes": [64, 64, 64]}},
                    data={"rows": 1200, "shape": [64]}, jacobian={"mode": "auto"},
                    engine={"shard_timeout_s": 3, "shard_size": 300})
    before = engine.replacements
    report = engine.run(spec)
    assert not marker.exists() and engine.replacements - before == 1  # it stalled once, and was replaced
    assert report["shards"] == 4
    decision = engine.last_decision
    if step == "choice":
        assert decision["how"] == "sizes" and "did not finish within 3 s" in decision["record"], decision
        assert report["strategies"] == {decision["strategy"]: 4}
    np.testing.assert_allclose(distjac.read_result(spec.output.path), reference(spec), rtol=1e-5, atol=1e-6)


def _small_job(out, **engine_keys) -> distjac.JobSpec:
    return job_spec(out, data={"rows": 200}, engine=engine_keys)


def test_run_uses_the_specs_settings_where_the_engine_gives_none(settings, tmp_path):
    assert (settings.shard_size, settings.parallel_iterations) == (None, None)
    report = settings.run(_small_job(tmp_path / "out", shard_size=50, max_in_flight=3))
    assert (report["shards"], report["shard_size"], report["in_flight"]) == (4, 50, 3)


def test_run_engine_arguments_win_over_the_spec(settings, tmp_path):
    settings.shard_size, settings.parallel_iterations = 40, 2
    spec = _small_job(tmp_path / "out", shard_size=50, max_in_flight=3)
    report = settings.run(spec)
    assert (report["shards"], report["shard_size"], report["in_flight"]) == (5, 40, 2)
    assert json.load(open(os.path.join(spec.output.path, MANIFEST_NAME)))["shards"] == [
        [i * 40, (i + 1) * 40] for i in range(5)]
    np.testing.assert_allclose(distjac.read_result(spec.output.path), reference(spec), rtol=1e-5, atol=1e-6)


def test_run_defaults_where_neither_says(settings, tmp_path):
    d = job_dict(tmp_path / "out", data={"rows": 200})
    d["engine"] = {"num_workers": 2}  # no shard_size, no parallel_iterations
    report = settings.run(distjac.JobSpec.from_dict(d))
    assert report["shards"] == 1 and report["in_flight"] == 1  # 200 small rows: one default shard
    assert settings.plan(200, (8,), (4,)).parallel_iterations == distjac.plan.DEFAULT_PARALLEL_ITERATIONS


@pytest.mark.slow
def test_cli_driver_sigkilled_mid_job_then_resumed(engine, tmp_path):
    """SIGKILL `distjac run --workers 2` once parts are on disk: its Ray processes go with
    it (leftovers are killed), and the rerun keeps every part on disk, computes exactly
    the rest, and ends equal to an uninterrupted run."""
    base = tiny_dict(tmp_path / "out", model={"factory": "job_helpers:slow_mlp", "kwargs": {"sizes": [3, 5, 2]}})
    config = write_config(tmp_path, base)
    total = 40
    # 40 shards of 10 rows, each sleeping 0.3 s on a worker, 2 in flight: ~6 s of work
    # after Ray starts (~10-15 s), mostly asleep, so robust on a loaded machine. Killed
    # once 8 parts are on disk, when 30 or so are still to come.
    args = ["run", config, "--workers", "2", "--no-progress", "--set", "data.rows=400",
            "--set", "engine.shard_size=10", "--set", "engine.parallel_iterations=2",
            "--set", "model.kwargs.delay=0.3"]
    out = tmp_path / "out"

    log = tmp_path / "killed.stderr"
    with open(log, "wb") as stderr:  # a file: nobody reads a pipe while the job runs
        proc = subprocess.Popen(cli_command(*args), env=cli_env(), stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            if out.exists() and len(part_files(out)) >= 8:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the job ended before it was killed: {log.read_text()[-2000:]}"
        assert len(part_files(out)) >= 8, "parts were not written in time"
        workers = [p for p in session_processes(proc.pid) if "JacobianWorker" in (p.info["name"] or "")]
        assert len(workers) == 2, _describe(session_processes(proc.pid))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        survivors = reap_session(proc.pid, wait_for_agents=False)
    # Ray's own processes die with the driver (fate sharing): the workers stop writing.
    # Its per-node agents notice only later; reap_session killed them.
    assert [s for s in survivors if not is_ray_agent(s)] == []

    manifest = Manifest.load(out)
    recorded = set(manifest.parts)
    finished = {int(n.split("-")[1].split(".")[0]) for n in part_files(out)}
    assert recorded <= finished and 8 <= len(finished) < total, (recorded, finished)
    assert not (out / SUCCESS_NAME).exists()

    r = run_cli(*args, "--json")  # the same command again: resumes
    assert r.returncode == 0, r.stderr
    report = json_report(r.stdout)
    assert report["status"] == "succeeded" and report["resumed"] and report["shards"] == total
    assert report["computed_shards"] <= total - len(finished)
    assert report["reused_shards"] + report["adopted_shards"] == len(finished)
    assert report["adopted_shards"] == len(finished - recorded)
    assert report["computed_shards"] + len(finished) == total
    assert (out / SUCCESS_NAME).exists() and not temporaries(out)

    # An uninterrupted run of the same job (no sleep: the same numbers), on Ray workers.
    spec = distjac.JobSpec.from_yaml(config, args[args.index("--set"):][1::2])
    clean = spec.with_overrides([f"output.path={tmp_path / 'clean'}", "model.kwargs.delay=0"])
    assert engine.run(clean)["computed_shards"] == total
    got = distjac.read_result(out)
    np.testing.assert_array_equal(got, distjac.read_result(tmp_path / "clean"))
    np.testing.assert_allclose(got, reference(clean), rtol=1e-5, atol=1e-6)
