"""The distjac command: exit codes 0/1/2, errors on stderr in one or two plain lines, plan
and inspect output. A few runs go through a real subprocess (``python -m distjac.cli``);
the rest call ``main(argv)`` in this process."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from job_helpers import TESTS_DIR, tiny_dict

import distjac
from distjac.cli import main


def _config(tmp_path, name="job.yaml", **sections):
    d = tiny_dict(tmp_path / "out", **sections)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d))
    return str(path)


def _cli(*args, script=False):
    """Run the command in a subprocess: ``python -m distjac.cli``, or the installed
    console script when ``script`` (falling back to -m where it is not on PATH)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")])}
    exe = shutil.which("distjac", path=os.path.dirname(sys.executable)) if script else None
    cmd = [exe] if exe else [sys.executable, "-m", "distjac.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=300)


def _lines(text):
    return [line for line in text.strip().splitlines() if line.strip()]


# ------------------------------------------------------------------------ subprocess


def test_a_finished_job_reruns_without_ray_or_the_model(tmp_path):
    """NOTE [a finished job runs nothing]: a rerun verifies and reports in process; no
    worker starts (none builds the model) and the first run's report stays."""
    built = tmp_path / "built.txt"
    config = _config(tmp_path, model={"factory": "job_helpers:counting_mlp", "kwargs": {"log": str(built)}})
    assert main(["run", config, "--no-progress"]) == 0  # engine.num_workers 0: in process
    report_path = tmp_path / "out" / "_report.json"
    first = json.loads(report_path.read_text())
    built.unlink()
    r = _cli("run", config, "--json", "--set", "engine.num_workers=2")
    assert r.returncode == 0, r.stderr
    rerun = json.loads(r.stdout)
    assert rerun["computed_shards"] == 0 and rerun["reused_shards"] == 4 and rerun["report_kept"]
    assert not built.exists(), "the model was built: Ray workers (or the driver) ran it"
    assert json.loads(report_path.read_text()) == first


def test_run_in_a_subprocess(tmp_path, capsys):
    config = _config(tmp_path)
    r = _cli("run", config, "--no-progress", "--set", "data.rows=40")
    assert r.returncode == 0, r.stderr
    assert "40 rows in 3 shards" in r.stdout and "3 computed" in r.stdout
    assert distjac.read_result(tmp_path / "out").shape == (40, 2, 3)
    assert main(["inspect", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "rows       40" in out and "3 of 3 finished" in out and "all 3 ok (sha256)" in out


def test_config_error_exits_2_with_one_line_and_no_traceback(tmp_path):
    config = _config(tmp_path, jacobian={"mode": "sideways"})
    r = _cli("run", config, script=True)
    assert r.returncode == 2 and r.stdout == ""
    assert len(_lines(r.stderr)) <= 2 and "Traceback" not in r.stderr
    assert "jacobian.mode='sideways' is not valid; use one of 'rev', 'fwd', 'auto'" in r.stderr
    assert not os.path.exists(tmp_path / "out")


def test_job_failure_exits_1_and_debug_shows_the_traceback(tmp_path, capsys):
    x = np.zeros((20, 3), np.float32)
    x[18] = np.nan
    np.save(tmp_path / "x.npy", x)
    config = _config(tmp_path, model={"factory": "job_helpers:nan_guard", "kwargs": {}},
                     data={"kind": "npy", "path": str(tmp_path / "x.npy"), "rows": None, "shape": None})
    r = _cli("run", config, "--no-progress")
    assert r.returncode == 1
    assert len(_lines(r.stderr)) <= 2 and "Traceback" not in r.stderr
    assert "shard 1 (rows [16, 20)) failed on" in r.stderr and "NaN in the batch" in r.stderr
    assert main(["--debug", "run", config, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: NaN in the batch" in err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"distjac {distjac.__version__}"


# ------------------------------------------------------------------------ in process


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["frobnicate"], ["run"], ["run", "x.yaml", "--workers", "two"], ["inspect"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert 1 <= len(_lines(err)) <= 2 and "Traceback" not in err, (argv, err)


def test_missing_config_file(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "nope.yaml")]) == 2
    assert "config file" in capsys.readouterr().err


@pytest.mark.parametrize("item,message", [
    ("jacobian.reduce=[nuclear]", "unknown reduction 'nuclear'"),
    ("jacobian.reduce=[trace]", "'trace' needs a square per-example Jacobian"),
    ("engine.frobnicate=1", "unknown key engine.'frobnicate'"),
    ("data.kind=npy", "data.shape is only for data.kind 'synthetic'"),
    ("model.factory=nowhere:model", "cannot import module 'nowhere'"),
])
def test_bad_inputs_exit_2(tmp_path, capsys, item, message):
    assert main(["run", _config(tmp_path), "--set", item]) == 2
    err = capsys.readouterr().err
    assert message in err and len(_lines(err)) <= 2
    assert not os.path.exists(tmp_path / "out")


def test_missing_input_file_and_wrong_column(tmp_path, capsys):
    assert main(["run", _config(tmp_path, data={"kind": "parquet", "path": str(tmp_path / "in.parquet"),
                                                "rows": None, "shape": None})]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_plan(tmp_path, capsys):
    config = _config(tmp_path)
    # the shard plan needs the model's output shape: --probe builds and runs the model
    assert main(["plan", config, "--probe", "--set", "engine.shard_size=10"]) == 0
    out = capsys.readouterr().out
    assert "5 shards x 10 rows (last 10)" in out and "output now       new" in out
    assert not os.path.exists(tmp_path / "out")
    assert main(["plan", config, "--probe", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["plan"]["shards"] == 4 and plan["columns"] == ["row", "jacobian"] and plan["output_state"] == "new"
    assert main(["plan", config, "--json"]) == 0  # without --probe: checks, no model (tests/test_input_checks.py)
    plan = json.loads(capsys.readouterr().out)
    assert plan["probed"] is False and "plan" not in plan and plan["output_state"] == "new"


def test_changed_spec_needs_overwrite(tmp_path, capsys):
    config = _config(tmp_path)
    assert main(["run", config]) == 0
    capsys.readouterr()
    assert main(["run", config, "--set", "data.seed=5"]) == 2
    err = capsys.readouterr().err
    assert "holds results of a different job spec" in err and "--overwrite" in err and len(_lines(err)) <= 2
    assert main(["plan", config, "--set", "data.seed=5"]) == 0
    assert "run needs --overwrite" in capsys.readouterr().out
    assert main(["run", config, "--set", "data.seed=5", "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["computed_shards"] == 4


def test_inspect_reports_missing_and_corrupted_parts(tmp_path, capsys):
    config = _config(tmp_path)
    assert main(["run", config]) == 0
    out = tmp_path / "out"
    os.unlink(out / "part-00001.arrow")
    with open(out / "part-00002.arrow", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 1
    text = capsys.readouterr().out
    assert "2 bad: shard 1: part-00001.arrow is missing; shard 2: part-00002.arrow does not match" in text
    assert "complete   no" in text
    assert main(["inspect", str(out), "--json", "--quick"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert [b["shard"] for b in summary["bad"]] == [1] and summary["checked"] == "size"
    assert main(["run", config, "--json"]) == 0  # resume recomputes both
    assert json.loads(capsys.readouterr().out)["recomputed_shards"] == [1, 2]
    assert main(["inspect", str(out)]) == 0


def test_inspect_of_a_plain_directory_exits_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "is not a distjac output" in capsys.readouterr().err


def test_workers_flag_and_engine_errors(tmp_path, capsys, monkeypatch):
    """--workers N (N > 0) hands the job to distjac.Engine; its failure is a job failure (1)."""
    calls = {}

    class FakeEngine:
        def __init__(self, **kwargs):
            calls.update(kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def run(self, spec, progress=None):
            raise RuntimeError("the job failed on the cluster")

    monkeypatch.setattr(distjac, "Engine", FakeEngine)
    assert main(["run", _config(tmp_path), "--workers", "3", "--address", "auto"]) == 1
    err = capsys.readouterr().err
    assert "the job failed on the cluster" in err and len(_lines(err)) <= 2
    assert calls["num_workers"] == 3 and calls["address"] == "auto" and calls["shard_size"] == 16


def test_plan_probe_estimates_the_run_time(tmp_path, capsys):
    config = _config(tmp_path)
    assert main(["plan", config, "--probe"]) == 0
    out = capsys.readouterr().out
    assert "estimated run" in out and "rows/s" in out
    assert main(["plan", config, "--probe", "--json"]) == 0
    eta = json.loads(capsys.readouterr().out)["estimated_run"]
    assert eta["rows_timed"] == 16 and eta["seconds"] > 0 and eta["workers"] == 1
    assert eta["seconds"] == pytest.approx(50 / eta["rows_per_s"])
    assert not (tmp_path / "out").exists()  # plan writes nothing


@pytest.mark.ray
def test_the_summary_counts_the_start_up(tmp_path):
    r = _cli("run", _config(tmp_path, engine={"num_workers": 1}), "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    # an Engine's first job: its seconds include starting Ray and the worker
    assert report["startup_seconds"] > 0
    assert report["seconds"] >= report["startup_seconds"] + report["run_seconds"] - 1e-6
