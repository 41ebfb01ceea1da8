"""The output directory's guarantees (issue 9): distjac deletes only what its manifest or
markers record, part names are plain, adoption checks content, one run holds the lock,
read_result verifies, nulls are refused, a manifest must agree with its plan, a lost
manifest is rebuilt, and a finished job on a read-only output writes nothing.

Every test uses real files and real processes (a second run in a subprocess, SIGKILL, a
read-only bind mount in a private mount namespace when run as root)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch
import yaml
from job_helpers import TESTS_DIR, reference, tiny_dict, tiny_spec

import distjac
from distjac import arrow as arrow_mod
from distjac.errors import OutputExistsError, ResultError
from distjac.io.sink import MANIFEST_NAME, SUCCESS_NAME, Manifest, inspect_output, open_output, write_part
from distjac.jobs import run_job
from distjac.models import mlp

REPO = os.path.dirname(TESTS_DIR)


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, REPO, os.environ.get("PYTHONPATH", "")])}


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "distjac.cli", *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout)


def _snapshot(path):
    """Names, inodes, sizes and mtimes of a directory and its entries."""
    st = os.stat(path)
    entries = {n: (s.st_ino, s.st_size, s.st_mtime_ns) for n in os.listdir(path)
               for s in [os.stat(os.path.join(path, n))]}
    return st.st_mtime_ns, entries


def _flip_value_byte(path, values: np.ndarray, zero=False):
    """Change the stored bytes of ``values`` inside a part file (found by their bytes), so
    the file still opens and its schema and row ids are intact."""
    data = bytearray(open(path, "rb").read())
    needle = np.ascontiguousarray(values).tobytes()
    at = data.find(needle)
    assert at >= 0, "the values are not stored verbatim in the file"
    if zero:
        data[at: at + len(needle)] = bytes(len(needle))
    else:
        data[at + len(needle) // 2] ^= 0x40
    open(path, "wb").write(bytes(data))


def _drop_from_manifest(out, shards):
    """The manifest as the driver last saved it before a crash: ``shards`` not recorded."""
    path = os.path.join(out, MANIFEST_NAME)
    d = json.load(open(path))
    for s in shards:
        d["parts"].pop(str(s))
    d["finished"] = len(d["parts"])
    json.dump(d, open(path, "w"))
    os.unlink(os.path.join(out, SUCCESS_NAME))


# ------------------------------------------------------------------ 1. --overwrite and foreign files


@pytest.mark.parametrize("markers", [False, True])
def test_overwrite_never_deletes_a_pyarrow_dataset(tmp_path, markers):
    out = tmp_path / "theirs"
    table = pa.table({"a": np.arange(10), "b": np.arange(10.0)})
    ds.write_dataset(table, str(out), format="parquet", basename_template="part-{i}.parquet")
    if markers:
        (out / "_SUCCESS").write_text("")
        (out / "_report.json").write_text('{"mine": true}')
    before = _snapshot(out)
    spec = tiny_spec(out, output={"format": "parquet", "overwrite": True})
    with pytest.raises(OutputExistsError, match=r"holds files distjac did not write \(.*part-0\.parquet"):
        run_job(spec)
    assert _snapshot(out) == before
    r = _cli("run", _config(tmp_path, spec), "--overwrite")
    assert r.returncode == 2 and "part-0.parquet" in r.stderr, r.stderr
    assert _snapshot(out) == before


def test_user_markers_without_a_manifest_are_not_ours(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "_SUCCESS").write_text("")
    (out / "_report.json").write_text("{}")
    with pytest.raises(OutputExistsError, match=r"_SUCCESS"):
        run_job(tiny_spec(out, output={"overwrite": True}))
    assert sorted(os.listdir(out)) == ["_SUCCESS", "_report.json"]


def test_overwrite_replaces_what_the_manifest_records(tmp_path):
    out = tmp_path / "o"
    run_job(tiny_spec(out))
    spec = tiny_spec(out, jacobian={"dtype": "float64"}, output={"overwrite": True})
    run_job(spec)
    np.testing.assert_allclose(distjac.read_result(out), reference(spec), rtol=1e-6)


# ------------------------------------------------------------------ 2. part names


@pytest.mark.parametrize("bad", ["../victim.txt", "ABS", "sub/part-00000.arrow", "part-00001.arrow"])
def test_manifest_part_names_must_be_plain(tmp_path, bad):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "o"
    spec = tiny_spec(out)
    run_job(spec)
    d = json.load(open(out / MANIFEST_NAME))
    d["parts"]["0"]["file"] = str(victim) if bad == "ABS" else bad
    json.dump(d, open(out / MANIFEST_NAME, "w"))
    for call in (lambda: run_job(spec), lambda: distjac.read_result(out), lambda: inspect_output(out)):
        with pytest.raises(ResultError, match=r"parts\['0'\]\.file"):
            call()
    assert victim.read_text() == "keep me"
    assert sorted(n for n in os.listdir(out) if n.startswith("part-")) == [f"part-0000{i}.arrow" for i in range(4)]


# ------------------------------------------------------------------ 3. adoption checks content


@pytest.mark.parametrize("zero", [False, True])
def test_corrupted_unrecorded_part_is_not_adopted(tmp_path, zero):
    out = tmp_path / "o"
    spec = tiny_spec(out)
    run_job(spec)
    want = reference(spec)
    _drop_from_manifest(out, [1, 2])
    _flip_value_byte(out / "part-00001.arrow", want[16:32].astype(np.float32)[5], zero=zero)
    report = run_job(spec)
    assert report["adopted_shards"] == 1 and report["computed_shards"] == 1  # part 2 adopted, part 1 recomputed
    np.testing.assert_allclose(distjac.read_result(out), want, rtol=1e-6, atol=1e-7)
    assert inspect_output(out)["complete"]


@pytest.mark.parametrize("fmt,dtype,reduce", [("arrow", "float16", None), ("parquet", "float64", None),
                                              ("parquet", "float32", ["frobenius", "spectral"]),
                                              ("arrow", "float64", ["frobenius"])])
def test_unrecorded_parts_are_adopted_in_every_format(tmp_path, fmt, dtype, reduce):
    out = tmp_path / "o"
    spec = tiny_spec(out, output={"format": fmt}, jacobian={"dtype": dtype, **({"reduce": reduce} if reduce else {})})
    run_job(spec)
    first = distjac.read_result(out)
    _drop_from_manifest(out, [0, 3])
    report = run_job(spec)
    assert report["adopted_shards"] == 2 and report["computed_shards"] == 0
    got = distjac.read_result(out)
    for a, b in zip(first.values() if reduce else [first], got.values() if reduce else [got]):
        np.testing.assert_array_equal(a, b)


def test_empty_part_round_trip(tmp_path):
    out = str(tmp_path / "o")
    info = {"rows": 0, "input_shape": [3], "output_shape": [2], "format": "arrow", "dtype": "float32"}
    m, _ = open_output(out, "h", [], info)
    m.flush()
    assert distjac.read_result(out).shape == (0, 2, 3)
    os.makedirs(tmp_path / "p")
    batch = arrow_mod.to_record_batch(range(0, 0), reductions={"frobenius": torch.zeros(0)})
    part = write_part(str(tmp_path / "p"), 0, 0, 0, batch, "parquet", metadata={"spec_hash": "h"})
    from distjac.io.sink import check_part

    assert check_part(os.path.join(tmp_path, "p", part.file), "parquet", shard=0, start=0, stop=0,
                      spec_hash="h")[1] is None


# ------------------------------------------------------------------ 4. one run at a time


def slow_mlp(sizes):
    """mlp(sizes) that takes 1.5 s on every batch of more than 2 rows (not the probe)."""
    model = mlp(sizes)

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            if x.shape[0] > 2:
                time.sleep(1.5)
            return self.inner(x)

    return Slow()


@pytest.mark.slow
def test_a_second_run_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    out = tmp_path / "o"
    d = tiny_dict(out, model={"factory": "test_output_guarantees:slow_mlp"}, data={"rows": 20},
                  engine={"shard_size": 5})
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(d))
    first = subprocess.Popen([sys.executable, "-m", "distjac.cli", "run", str(cfg)], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(out / MANIFEST_NAME):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        spec = distjac.JobSpec.from_dict(d)
        with pytest.raises(OutputExistsError, match=rf"is in use by another run \(host {socket.gethostname()}, "
                           rf"pid {first.pid}"):
            run_job(spec)
        assert first.poll() is None  # the refusal did not disturb the first run
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        report = run_job(spec)  # the dead holder's lock is free
        assert report["status"] == "succeeded"
        np.testing.assert_allclose(distjac.read_result(out), reference(spec), rtol=1e-6, atol=1e-7)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(30)


# ------------------------------------------------------------------ 5. read_result verifies


def test_read_result_refuses_a_damaged_recorded_part(tmp_path):
    out = tmp_path / "o"
    spec = tiny_spec(out)
    run_job(spec)
    want = reference(spec).astype(np.float32)
    _flip_value_byte(out / "part-00001.arrow", want[20])
    with pytest.raises(ResultError, match=r"part-00001\.arrow does not match its SHA-256.*distjac inspect"):
        distjac.read_result(out)
    with pytest.raises(ResultError, match=r"part-00001\.arrow"):
        list(distjac.io.iter_result(out))
    np.testing.assert_array_equal(distjac.read_result(out, rows=slice(0, 16)), want[:16])  # other parts read
    assert not np.array_equal(distjac.read_result(out, verify=False), want)  # told not to verify
    with open(out / "part-00002.arrow", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ResultError, match=r"part-00002\.arrow has 100 bytes") as info:
        distjac.read_result(out, rows=slice(32, 40), verify=False)  # sizes always
    assert "verify=False" not in str(info.value)  # not offered to a call that passed it


# ------------------------------------------------------------------ 6. nulls


def _null_output(tmp_path, batch, info):
    out = str(tmp_path / "o")
    m, _ = open_output(out, "h", [(0, 4)], {"rows": 4, "format": "arrow", **info})
    m.record(write_part(out, 0, 0, 4, batch, metadata={"spec_hash": "h"}), save=True)
    return out


def test_a_null_element_inside_a_tensor_is_refused(tmp_path):
    values = pa.array([0.0, 1.0, 2.0, None, 4.0, 5.0, 6.0, 7.0], pa.float32())
    storage = pa.FixedSizeListArray.from_arrays(values, 2)
    jac = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), [2]), storage)
    batch = pa.RecordBatch.from_arrays([pa.array(np.arange(4)), jac], names=["row", "jacobian"])
    out = _null_output(tmp_path, batch, {"input_shape": [2], "output_shape": [], "dtype": "float32"})
    with pytest.raises(ResultError, match=r"row 1 .*null"):
        distjac.read_result(out)


def test_a_null_reduction_value_is_refused(tmp_path):
    batch = pa.RecordBatch.from_arrays([pa.array(np.arange(4)), pa.array([1.0, 2.0, None, 3.0])],
                                       names=["row", "frobenius"])
    out = _null_output(tmp_path, batch, {"dtype": "float64", "reduce": ["frobenius"]})
    with pytest.raises(ResultError, match=r"row 2 .*null"):
        distjac.read_result(out)


# ------------------------------------------------------------------ 7. the manifest must agree with its plan


@pytest.mark.parametrize("edit", ["cut_shards", "cut_both", "gap", "range"])
def test_an_edited_manifest_is_refused(tmp_path, edit):
    out = tmp_path / "o"
    spec = tiny_spec(out)
    run_job(spec)
    d = json.load(open(out / MANIFEST_NAME))
    if edit == "cut_shards":
        d["shards"] = d["shards"][:2]
    elif edit == "cut_both":
        d["shards"] = d["shards"][:2]
        d["parts"] = {k: v for k, v in d["parts"].items() if int(k) < 2}
        d["num_shards"] = d["finished"] = 2
    elif edit == "gap":
        d["shards"][1][0] += 1
    else:
        d["parts"]["1"]["stop"] -= 1
    json.dump(d, open(out / MANIFEST_NAME, "w"))
    for call in (lambda: distjac.read_result(out), lambda: inspect_output(out), lambda: run_job(spec)):
        with pytest.raises(ResultError, match=r"_manifest\.json"):
            call()
    r = _cli("inspect", str(out))
    assert r.returncode != 0 and "finished" not in r.stdout


# ------------------------------------------------------------------ 14. lost manifest, read-only output


def test_resume_rebuilds_a_lost_manifest(tmp_path):
    out = tmp_path / "o"
    spec = tiny_spec(out)
    run_job(spec)
    os.unlink(out / MANIFEST_NAME)
    report = run_job(spec)
    assert report["computed_shards"] == 0 and report["adopted_shards"] == 4
    np.testing.assert_allclose(distjac.read_result(out), reference(spec), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("how", ["deleted", "invalid"])
def test_repair_rebuilds_the_manifest_from_the_parts(tmp_path, how):
    out = tmp_path / "o"
    spec = tiny_spec(out, output={"format": "parquet"})
    run_job(spec)
    want = distjac.read_result(out)
    if how == "deleted":
        os.unlink(out / MANIFEST_NAME)
    else:
        (out / MANIFEST_NAME).write_text('{"spec_hash": ')
    r = _cli("repair", str(out))
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(distjac.read_result(out), want)
    assert inspect_output(out)["complete"] and (out / SUCCESS_NAME).exists()
    assert run_job(spec)["computed_shards"] == 0  # the job itself accepts the rebuilt manifest


def test_repair_reports_a_bad_part_and_clears_success(tmp_path):
    out = tmp_path / "o"
    spec = tiny_spec(out)
    run_job(spec)
    os.unlink(out / MANIFEST_NAME)
    _flip_value_byte(out / "part-00002.arrow", reference(spec).astype(np.float32)[33])
    r = _cli("repair", str(out))
    assert r.returncode == 1 and "part-00002.arrow" in r.stdout + r.stderr
    assert (out / "part-00002.arrow").exists()  # reported, not deleted
    assert not (out / SUCCESS_NAME).exists()
    m = Manifest.load(str(out))
    assert m.missing() == [2]
    run_job(spec)
    np.testing.assert_allclose(distjac.read_result(out), reference(spec), rtol=1e-6, atol=1e-7)


def _config(tmp_path, spec):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(spec.to_dict()))
    return str(cfg)


@pytest.mark.parametrize("finished", [True, False])
def test_a_finished_job_on_a_read_only_output_writes_nothing(tmp_path, finished):
    out = tmp_path / "o"
    spec = tiny_spec(out)
    run_job(spec)
    if not finished:
        os.unlink(out / "part-00003.arrow")
    cfg = _config(tmp_path, spec)
    before = _snapshot(out)
    cmd = [sys.executable, "-m", "distjac.cli", "run", cfg, "--workers", "0", "--no-progress"]
    if os.geteuid() == 0:  # root writes through chmod: bind the output read-only in a private namespace
        if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
            pytest.skip("running as root without unshare -m: cannot make the output read-only")
        script = (f'mount --make-rprivate / && mount --bind "{out}" "{out}" && '
                  f'mount -o remount,bind,ro "{out}" && exec "$@"')
        cmd = ["unshare", "-m", "sh", "-c", script, "sh", *cmd]
    else:
        os.chmod(out, 0o555)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    finally:
        os.chmod(out, 0o755)
    if finished:
        assert r.returncode == 0, r.stderr
    else:  # refused before any work: it cannot be resumed where it cannot be written
        assert r.returncode == 2 and "cannot be written and its output is not finished" in r.stderr, r.stderr
    assert _snapshot(out) == before


def test_overwrite_of_a_distjac_output_with_a_foreign_file_deletes_nothing(tmp_path):
    out = tmp_path / "o"
    run_job(tiny_spec(out))
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    with pytest.raises(OutputExistsError, match=r"\(notes\.txt\); distjac deletes only files"):
        run_job(tiny_spec(out, jacobian={"dtype": "float64"}, output={"overwrite": True}))
    assert _snapshot(out) == before


def test_a_lock_held_in_this_process_refuses_a_run_and_is_removed_after(tmp_path):
    import pickle

    from distjac.errors import OutputLockedError
    from distjac.io.sink import LOCK_NAME, lock_output

    out = tmp_path / "o"
    spec = tiny_spec(out)
    with lock_output(out):
        with pytest.raises(OutputLockedError, match=rf"pid {os.getpid()}") as info:
            run_job(spec)
        assert json.load(open(out / LOCK_NAME))["pid"] == os.getpid()
    err = pickle.loads(pickle.dumps(info.value))
    assert isinstance(err, OutputExistsError) and err.holder == info.value.holder
    run_job(spec)
    assert not (out / LOCK_NAME).exists()  # removed when the run ends


def test_repair_sets_an_unreadable_manifest_aside(tmp_path):
    out = tmp_path / "o"
    spec = tiny_spec(out)
    run_job(spec)
    (out / MANIFEST_NAME).write_text("not json")
    with pytest.raises(ResultError, match=r"not a readable distjac manifest.*distjac repair"):
        run_job(spec)
    assert (out / MANIFEST_NAME).read_text() == "not json"  # a run refuses and keeps it
    from distjac.io.sink import repair_output

    s = repair_output(out)
    assert s["rebuilt"] and s["complete"] and s["set_aside"].startswith("._manifest.json.invalid-")
    assert (out / s["set_aside"]).read_text() == "not json"
    np.testing.assert_allclose(distjac.read_result(out), reference(spec), rtol=1e-6, atol=1e-7)
