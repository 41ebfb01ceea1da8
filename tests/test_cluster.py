"""The engine on a multi-node Ray cluster on one machine, with a node removed mid-job.

``ray.cluster_utils.Cluster`` starts a head (no CPUs: it runs only the driver) and two
worker nodes of two CPUs each, with health checks tight enough that a dead node is noticed
in about a second (Ray's default is ~15 s). One worker actor runs on each node; removing
a node mid-job kills its actor, which Ray restarts on the surviving node, and the shards
it held (and finished results that lived only on that node) are computed again.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

import distjac

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.ray]

FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 300,
    "health_check_timeout_ms": 300,
    "health_check_failure_threshold": 3,
}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("a Ray connection is already open in this process")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH_CHECKS})
    nodes = [c.add_node(num_cpus=2), c.add_node(num_cpus=2)]
    try:
        c.wait_for_nodes()
        yield c, nodes
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


def slow_tanh(marker: str):
    """y = tanh(x) * 3, slowly; the first process to start its 2nd shard drops a marker."""
    state = {"calls": 0}

    def fn(x):
        if x.shape[0] >= 10:
            state["calls"] += 1
            if state["calls"] == 2:
                try:
                    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    pass
                else:
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                    time.sleep(1.0)
            time.sleep(0.05)
        return torch.tanh(x) * 3

    return fn


def test_node_removed_mid_job(cluster, tmp_path):
    c, nodes = cluster
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(3))
    expected = (3 / torch.cosh(x).pow(2)).unsqueeze(-1) * torch.eye(3)
    with distjac.Engine(address=c.address, num_workers=2, device="cpu", shard_size=10,
                        parallel_iterations=6, max_retries=3, progress=False) as engine:
        infos = engine.workers()
        assert len({info["node"] for info in infos}) == 2, "one worker on each node (SPREAD)"
        marker = tmp_path / "victim"
        box: dict = {}

        def job():
            try:
                box["jac"] = engine.batch_jacobian(slow_tanh(str(marker)), x, mode="rev")
            except BaseException as err:  # pragma: no cover - reported below
                box["err"] = err

        thread = threading.Thread(target=job)
        thread.start()
        deadline = time.time() + 60
        while not marker.exists() or not marker.read_text():
            assert time.time() < deadline, "no worker reached its second shard"
            time.sleep(0.02)
        victim_pid = int(marker.read_text())
        victim_node = next(info["node"] for info in infos if info["pid"] == victim_pid)
        node = next(n for n in nodes if n.node_id == victim_node)
        c.remove_node(node, allow_graceful=False)
        thread.join(timeout=180)
        assert not thread.is_alive() and "err" not in box, box.get("err")
        torch.testing.assert_close(box["jac"], expected, rtol=1e-5, atol=1e-6)
        stats = engine.last_stats
        assert [s.shard for s in stats.shards] == list(range(20)), "each shard placed exactly once"
        assert stats.duplicates == 0
        before = {info["pid"] for info in infos}
        print(f"\nnode removal: retries={stats.retries}, restarted workers="
              f"{sorted({(s.pid, s.node[:8]) for s in stats.shards if s.pid not in before})}")
        assert any(s.pid not in before for s in stats.shards) or stats.retries, (
            "the killed worker's shard was recomputed (by a restarted actor or a resubmission)")
        assert all(s.node != victim_node for s in stats.shards if s.pid not in before)
        # The engine keeps working on what is left of the cluster.
        y = torch.randn(30, 3)
        torch.testing.assert_close(engine.batch_jacobian(lambda t: t * 2, y), 2 * torch.eye(3).expand(30, 3, 3))


# --------------------------------------------------------------------------------------
# A cluster and a driver that disagree on authentication: a clear error, not a hang
# --------------------------------------------------------------------------------------

HEAD = """
import sys
from ray.cluster_utils import Cluster
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
print(c.address, flush=True)
sys.stdin.read()
c.shutdown()
"""

DRIVER = """
import sys, time, torch, distjac
t = time.time()
try:
    with distjac.Engine(address=sys.argv[1], num_workers=1, startup_timeout=60) as engine:
        engine.batch_jacobian(lambda x: x * 2, torch.ones(3, 2))
    print("OK")
except ConnectionError as err:
    print("CONNECTION-ERROR", round(time.time() - t, 1), err)
"""


def _env(auth_mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = auth_mode
    return env


@pytest.mark.parametrize(("cluster_auth", "driver_auth"), [("token", "disabled"), ("disabled", "token")])
def test_auth_mismatch_is_a_clear_error(cluster_auth, driver_auth):
    import subprocess
    import sys

    head = subprocess.Popen([sys.executable, "-c", HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=_env(cluster_auth), start_new_session=True)
    try:
        address = head.stdout.readline().strip()
        assert address, "the head did not start"
        t0 = time.time()
        out = subprocess.run([sys.executable, "-c", DRIVER, address], capture_output=True, text=True,
                             env=_env(driver_auth), timeout=120).stdout
        assert "CONNECTION-ERROR" in out, out
        assert "authentication" in out and f"RAY_AUTH_MODE={driver_auth}" in out
        assert time.time() - t0 < 60, "the error must come quickly, not after a hang"
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:  # pragma: no cover
            os.killpg(head.pid, 9)
