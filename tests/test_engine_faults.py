"""Faults that used to hang a job (issue 9, items 8, 9, 10, 15): nothing waits forever.

Real Ray, real signals: a model that SIGKILLs its own worker on some rows (a poison
shard), a worker SIGSTOPped mid-job, a model that never returns, a stale cluster address,
and ``distjac run --json`` while a worker dies. Each test is bounded by a timeout, so a
regression fails instead of hanging CI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml

import distjac
from distjac import ShardError
from distjac.errors import ConfigError, OptionError

SENTINEL = 12345.0  # a row holding this value is poison
WORKER_TIMEOUT_S = 120  # bound for anything that waits on workers


def poison_kill(x):
    """tanh(x) * 2, but the worker process SIGKILLs itself on a block with the sentinel."""
    if bool((x.detach() == SENTINEL).any()):
        os.kill(os.getpid(), signal.SIGKILL)
    return torch.tanh(x) * 2


def poison_loop(x):
    """tanh(x) * 2, but never returns on a block with the sentinel."""
    if bool((x.detach() == SENTINEL).any()):
        while True:
            time.sleep(0.1)
    return torch.tanh(x) * 2


def slow_tanh(marker: str):
    """tanh(x) * 2, 0.1 s per call on a whole shard (10 rows, not the probe's 8); the
    first call drops a marker."""
    def fn(x):
        if x.shape[0] >= 10:
            if not os.path.exists(marker):
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            time.sleep(0.1)
        return torch.tanh(x) * 2

    return fn


def assert_same(actual, want):
    assert actual is not None and actual.dtype == want.dtype and actual.shape == want.shape
    torch.testing.assert_close(actual, want, rtol=1e-5, atol=1e-5)


def expected(x):
    return distjac.batch_jacobian(lambda t: torch.tanh(t) * 2, x, mode="rev")


@pytest.fixture(scope="module")
def engine():
    eng = distjac.Engine(num_workers=2, device="cpu", shard_size=10, parallel_iterations=4,
                         max_retries=1, progress=False)
    try:
        yield eng
    finally:
        eng.shutdown()


@pytest.fixture
def settings(engine):
    saved = (engine.max_retries, engine.shard_timeout_s)
    yield engine
    engine.max_retries, engine.shard_timeout_s = saved


def usable(engine) -> None:
    """Two live workers (no replacement left waiting for a CPU), and right results."""
    infos = engine.workers()
    assert len(infos) == 2 and len({i["pid"] for i in infos}) == 2
    y = torch.randn(30, 3)
    assert_same(engine.batch_jacobian(poison_kill, y, mode="rev"), expected(y))


# -- item 8: a shard that kills its worker every time ------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(WORKER_TIMEOUT_S)
@pytest.mark.parametrize("max_retries", [1, 3])
def test_poison_shard_ends_with_a_shard_error_in_seconds(settings, caplog, max_retries):
    engine = settings
    engine.max_retries = max_retries
    engine.workers()
    x = torch.randn(60, 3, generator=torch.Generator().manual_seed(0))
    x[25, 1] = SENTINEL  # shard 2: rows [20, 30)
    before = engine.replacements
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="distjac"):
        with pytest.raises(ShardError, match=r"shard 2 \(rows \[20, 30\)\) was lost "
                                             f"{max_retries + 1} times \\(its worker died") as info:
            engine.batch_jacobian(poison_kill, x, mode="rev")
    assert time.monotonic() - t0 < 60
    assert (info.value.shard, info.value.start, info.value.stop) == (2, 20, 30)
    # One replacement per dead worker: the poison shard killed max_retries + 1 of them.
    assert engine.replacements - before == max_retries + 1
    assert sum("started a replacement" in r.getMessage() for r in caplog.records) == max_retries + 1
    usable(engine)


# -- item 9: a stopped worker, a model that never returns ---------------------------------


@pytest.mark.ray
@pytest.mark.timeout(WORKER_TIMEOUT_S)
def test_sigstopped_worker_is_replaced_and_the_job_finishes(settings, tmp_path, caplog):
    engine = settings
    engine.shard_timeout_s = 4.0
    engine.max_retries = 1
    victim = engine.workers()[0]["pid"]
    marker = tmp_path / "started"
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(1))
    box: dict = {}

    def job():
        try:
            box["jac"] = engine.batch_jacobian(slow_tanh(str(marker)), x, mode="rev")
        except BaseException as err:  # reported below
            box["err"] = err

    thread = threading.Thread(target=job, daemon=True)
    try:
        with caplog.at_level(logging.WARNING, logger="distjac"):
            thread.start()
            deadline = time.monotonic() + 60
            while not marker.exists():
                assert time.monotonic() < deadline, "no shard started"
                time.sleep(0.02)
            os.kill(victim, signal.SIGSTOP)
            thread.join(timeout=60)
        assert not thread.is_alive(), "the job hung on a stopped worker"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)  # the process this test stopped
    assert "err" not in box, box.get("err")
    assert_same(box["jac"], expected(x))
    stats = engine.last_stats
    assert [s.shard for s in stats.shards] == list(range(20)) and stats.duplicates == 0
    assert stats.retries >= 1 and victim not in {s.pid for s in stats.shards[-5:]}
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("distjac: shard ") and "has been running for" in m for m in messages), messages
    assert any("did not finish within 4 s" in m and "started a replacement" in m for m in messages), messages
    usable(engine)


@pytest.mark.ray
@pytest.mark.timeout(WORKER_TIMEOUT_S)
def test_model_that_never_returns_ends_with_a_shard_error(settings):
    engine = settings
    engine.shard_timeout_s = 2.0
    engine.max_retries = 1
    engine.workers()
    x = torch.randn(40, 3)
    x[33, 0] = SENTINEL  # shard 3: rows [30, 40)
    t0 = time.monotonic()
    with pytest.raises(ShardError, match=r"shard 3 \(rows \[30, 40\)\) was lost 2 times \(shard 3 did not "
                                         r"finish within 2 s"):
        engine.batch_jacobian(poison_loop, x, mode="rev")
    assert time.monotonic() - t0 < 40
    engine.shard_timeout_s = None
    usable(engine)


def test_bad_shard_timeouts_are_rejected_before_anything_starts():
    for bad in (0, -1, "10", float("nan"), True):
        with pytest.raises(OptionError, match="shard_timeout_s=.* is not valid; use None or a number"):
            distjac.Engine(shard_timeout_s=bad)
    with pytest.raises(OptionError, match="connect_timeout=0 is not valid"):
        distjac.Engine(address="auto", connect_timeout=0)
    base = {"model": {"factory": "distjac.models:cube"}, "data": {"kind": "synthetic", "rows": 4, "shape": [2]},
            "output": {"path": "results/x"}}
    for bad in (0, -2.5, "soon"):
        with pytest.raises(ConfigError, match="engine.shard_timeout_s=.* is not valid"):
            distjac.JobSpec.from_dict({**base, "engine": {"shard_timeout_s": bad}})
    a = distjac.JobSpec.from_dict({**base, "engine": {"shard_timeout_s": 30}})
    assert a.engine.shard_timeout_s == 30
    assert a.spec_hash() == distjac.JobSpec.from_dict(base).spec_hash()


# -- item 10: a stale cluster address ------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def env_for(tmp_path, ray_tmpdir: bool = True, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    if ray_tmpdir:  # Ray's address file lives under it (too long a path for Ray's sockets)
        env["RAY_TMPDIR"] = str(tmp_path / "raytmp")
    env.update(extra)
    return env


def tiny_job(tmp_path, **engine) -> str:
    d = {"model": {"factory": "distjac.models:mlp", "kwargs": {"sizes": [3, 5, 2]}},
         "data": {"kind": "synthetic", "rows": 40, "shape": [3]}, "jacobian": {"mode": "rev"},
         "engine": {"shard_size": 10, "num_workers": 2, "progress": False, **engine},
         "output": {"path": str(tmp_path / "out")}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where", ["RAY_ADDRESS", "address file"])
def test_auto_with_a_stale_address_fails_in_seconds(tmp_path, where):
    port = closed_port()
    extra = {}
    if where == "RAY_ADDRESS":
        extra["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        origin = "from RAY_ADDRESS"
    else:
        (tmp_path / "raytmp" / "ray").mkdir(parents=True)
        (tmp_path / "raytmp" / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
        origin = f"from {tmp_path / 'raytmp' / 'ray' / 'ray_current_cluster'}"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "distjac.cli", "run", tiny_job(tmp_path), "--address", "auto"],
                       env=env_for(tmp_path, **extra), capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 45
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"could not reach the Ray cluster at 127.0.0.1:{port} ({origin}) within 10 s" in r.stderr, r.stderr
    assert "ray start --head" in r.stderr and "Traceback" not in r.stderr


# -- item 15: --json stays JSON while a worker dies ----------------------------------------

FAULTY = '''
import os, signal
import torch
from distjac.models import mlp

class KillOnce(torch.nn.Module):
    """An MLP whose first forward on a Ray worker SIGKILLs that worker (once: a marker)."""

    def __init__(self, marker, sizes):
        super().__init__()
        self.inner, self.marker = mlp(sizes), marker

    def forward(self, x):
        import ray
        if x.shape[0] >= 5 and ray.get_runtime_context().get_actor_id() is not None:
            try:
                os.close(os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            else:
                print("a line on the worker's stdout", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(x)

def kill_once(marker, sizes):
    return KillOnce(marker, sizes)
'''


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_cli_json_stays_json_when_a_worker_dies(tmp_path):
    (tmp_path / "faulty_models.py").write_text(FAULTY)
    config = tiny_job(tmp_path)
    d = yaml.safe_load(open(config))
    d["model"] = {"factory": "faulty_models:kill_once",
                  "kwargs": {"marker": str(tmp_path / "killed"), "sizes": [3, 5, 2]}}
    open(config, "w").write(yaml.safe_dump(d))
    proc = subprocess.Popen([sys.executable, "-m", "distjac.cli", "run", config, "--json"],
                            env=env_for(tmp_path, ray_tmpdir=False), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this test started
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert (tmp_path / "killed").exists(), "no worker was killed"
    report = json.loads(stdout)  # all of it
    assert report["status"] == "succeeded" and report["rows"] == 40
