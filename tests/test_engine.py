"""The distributed engine against the in-process kernels, on a real local Ray instance.

One Engine (two workers) serves the whole module: Ray starts once (~10 s here). Tests
that change its shard size or shards in flight set them back. The option checks at the
top need no Ray.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import stat
import sys
import textwrap
import threading
import time

import pytest
import torch
from helpers import HUGE_PAGES, huge_page_flags

import distjac
from distjac import DtypeError, OptionError, ShapeError, ShardError, _alloc

# --------------------------------------------------------------------------------------
# Option checks: before Ray is started (no marker)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_workers": 0}, r"num_workers=0 is not valid: an Engine computes on Ray workers.*--workers 0"),
        ({"num_workers": -2}, r"num_workers=-2 is not valid; use None \(what the cluster offers\)"),
        ({"device": "tpu"}, "device='tpu' is not valid; use one of 'auto', 'cpu', 'cuda'"),
        ({"shard_size": -4}, "shard_size=-4"),
        ({"parallel_iterations": 0}, "parallel_iterations=0"),
        ({"chunk_size": 2.5}, "chunk_size=2.5"),
        ({"max_retries": -1}, "max_retries=-1"),
        ({"address": 5}, "address=5"),
        ({"num_cpus_per_worker": -1}, "num_cpus_per_worker=-1"),
    ],
)
def test_engine_options_are_checked_before_ray_starts(kwargs, match):
    started = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    with pytest.raises(OptionError, match=match):
        distjac.Engine(**kwargs)
    assert ("ray" in sys.modules and sys.modules["ray"].is_initialized()) == started


# --------------------------------------------------------------------------------------
# Helpers and functions defined here (shipped to the workers by value)
# --------------------------------------------------------------------------------------


def assert_same(actual, expected, dtype=torch.float32):
    assert actual is not None and expected is not None
    assert actual.dtype == expected.dtype == dtype
    assert actual.shape == expected.shape
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def cubic(x):
    return x * x * x


def mixing(x):
    """Couples the features of one example (not the examples): a dense Jacobian."""
    w = torch.linspace(-1.0, 1.0, x.shape[1] * 4, dtype=x.dtype).reshape(x.shape[1], 4)
    return torch.tanh(x @ w) * x.sum(dim=1, keepdim=True)


def matrix_fn(x):
    """(B, 3, 2) -> (B, 2, 2)."""
    return torch.sin(x.transpose(1, 2) @ x) + x[:, :2, :] ** 2


class SmallNet(torch.nn.Module):
    """A module class defined in the test file: workers must get it by value."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin1 = torch.nn.Linear(6, 16)
        self.lin2 = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x)))


class BoomError(ValueError):
    """A user exception class from the test module."""


def fails_on_marked_rows(x):
    if (x[:, 0] > 1000).any():
        raise BoomError(f"marked row in a block of {x.shape[0]}")
    return x * 2


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


@pytest.fixture
def settings(engine):
    """Restore the engine's shard size and shards in flight after a test changes them."""
    saved = (engine.shard_size, engine.parallel_iterations)
    yield engine
    engine.shard_size, engine.parallel_iterations = saved


# --------------------------------------------------------------------------------------
# Results equal the in-process kernel
# --------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.parametrize(
    ("batch", "shard_size"),
    [(1, 8), (5, 8), (23, 5), (1000, 64)],
    ids=["batch-1", "smaller-than-a-shard", "non-divisible", "large"],
)
def test_equals_in_process_kernel(settings, batch, shard_size):
    engine = settings
    engine.shard_size = shard_size
    x = torch.randn(batch, 5, generator=torch.Generator().manual_seed(batch))
    jac = engine.batch_jacobian(mixing, x)
    assert_same(jac, distjac.batch_jacobian(mixing, x))
    stats = engine.last_stats
    assert len(stats.shards) == -(-batch // shard_size)
    rows = [r for s in stats.shards for r in range(s.start, s.stop)]
    assert rows == list(range(batch)), "every row in exactly one shard, placed once"
    assert stats.duplicates == 0 and stats.retries == 0


@pytest.mark.ray
def test_default_shard_size_from_budget(engine):
    from distjac.models import mlp

    x = torch.randn(4096, 64)

    model = mlp([64, 128, 32])
    model.eval()
    # mode="rev": the kernels' auto mode measures at this size (their concern, not the engine's).
    jac = engine.batch_jacobian(model, x, mode="rev")
    assert_same(jac, distjac.batch_jacobian(model, x, mode="rev"))
    plan = engine.last_stats.plan
    assert plan.shard_size == plan.rows or plan.shard_out_bytes() >= 4 << 20
    assert plan == engine.plan(4096, (64,), (32,))


@pytest.mark.ray
def test_float64(settings):
    settings.shard_size = 7
    x = torch.randn(30, 4, dtype=torch.float64)
    assert_same(settings.batch_jacobian(mixing, x), distjac.batch_jacobian(mixing, x), torch.float64)


@pytest.mark.ray
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precisions_keep_their_dtype(settings, dtype):
    settings.shard_size = 4
    x = torch.randn(10, 3).to(dtype)
    jac = settings.batch_jacobian(cubic, x, mode="rev")
    assert jac.dtype == dtype
    torch.testing.assert_close(jac.float(), distjac.batch_jacobian(cubic, x, mode="rev").float(), rtol=2e-2, atol=2e-2)


@pytest.mark.ray
def test_matrix_shaped_sources_and_targets(settings):
    settings.shard_size = 4
    x = torch.randn(11, 3, 2)
    jac = settings.batch_jacobian(matrix_fn, x)
    assert jac.shape == (11, 2, 2, 3, 2)
    assert_same(jac, distjac.batch_jacobian(matrix_fn, x))


@pytest.mark.ray
@pytest.mark.skipif(not HUGE_PAGES, reason="transparent huge pages are a Linux kernel feature")
def test_the_gathered_result_is_advised_for_huge_pages(settings, monkeypatch):
    # NOTE [huge pages]: the stacked output the shards are copied into is the driver's
    # largest allocation; 40 x 512 x 512 float32 is 40 MiB. Advised whatever the host
    # does with free pages (the rule for hosts that take them back: test_alloc.py).
    monkeypatch.setattr(_alloc, "_setting", lambda: "always")
    settings.shard_size = 16
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(3))
    jac = settings.batch_jacobian(cubic, x)
    assert "hg" in huge_page_flags(jac)
    assert_same(jac, distjac.batch_jacobian(cubic, x))


@pytest.mark.ray
def test_design_seed_example(engine):
    x = torch.tensor([[4.0, 2.0], [1.0, 3.0]])
    expected = torch.tensor([[[48.0, 0.0], [0.0, 12.0]], [[3.0, 0.0], [0.0, 27.0]]])
    assert torch.equal(engine.batch_jacobian(cubic, x), expected)


@pytest.mark.ray
@pytest.mark.parametrize("parallel_iterations", [1, 2, 5, 16])
def test_shards_in_flight(settings, parallel_iterations):
    settings.shard_size = 3
    settings.parallel_iterations = parallel_iterations
    x = torch.randn(40, 4)
    assert_same(settings.batch_jacobian(mixing, x), distjac.batch_jacobian(mixing, x))
    assert settings.last_stats.plan.in_flight == min(parallel_iterations, 14)


@pytest.mark.ray
def test_per_call_shards_in_flight_and_chunk_size(settings):
    """A call's own parallel_iterations (shards in flight) and chunk_size (the kernels'
    rows per pass) apply to that call only; the Engine keeps its own."""
    settings.shard_size = 3
    settings.parallel_iterations = 8
    x = torch.randn(40, 4)
    expected = distjac.batch_jacobian(mixing, x)
    for in_flight, chunk in ((1, 1), (3, 2), (None, 5)):
        got = settings.batch_jacobian(mixing, x, mode="rev", parallel_iterations=in_flight, chunk_size=chunk)
        assert_same(got, expected)
        assert settings.last_stats.plan.in_flight == (in_flight or 8)
    assert (settings.parallel_iterations, settings.chunk_size) == (8, None)
    for bad in ({"parallel_iterations": 0}, {"chunk_size": -1}, {"parallel_iterations": 1.5}):
        with pytest.raises(OptionError, match=next(iter(bad))):
            settings.batch_jacobian(mixing, x, **bad)


@pytest.mark.ray
@pytest.mark.parametrize("mode", ["rev", "fwd", "auto"])
def test_modes_and_a_module_class_from_the_test_file(settings, mode):
    settings.shard_size = 16
    net = SmallNet().eval()
    x = torch.randn(50, 6)
    assert_same(settings.batch_jacobian(net, x, mode=mode), distjac.batch_jacobian(net, x, mode=mode))


def positive_rows_double(t):
    """2 t where the shard's rows sum to more than 0, else a constant (control flow on values)."""
    return t * 2 if t.sum() > 0 else torch.zeros_like(t)


@pytest.mark.ray
def test_shards_beyond_the_probes_rows_decide_whether_fn_is_connected(settings):
    """NOTE [connected somewhere]: the probe's 8 rows do not reach the output, later
    shards do: their rows are computed, the probe's shard is zeros; no shard: None."""
    settings.shard_size = 8
    x = torch.cat([-torch.ones(8, 3), torch.ones(12, 3)])
    expected = 2 * torch.eye(3).expand(20, 3, 3).clone()
    expected[:8] = 0
    for mode in ("rev", "auto"):
        assert_same(settings.batch_jacobian(positive_rows_double, x, mode=mode), expected)
    assert settings.batch_jacobian(positive_rows_double, -x.abs()) is None
    assert torch.equal(settings.batch_jacobian(positive_rows_double, -x.abs(), unconnected_gradients="zero"),
                       torch.zeros(20, 3, 3))


@pytest.mark.ray
def test_unconnected_gradients(engine):
    x = torch.randn(6, 3)

    def const(t):
        return torch.ones(t.shape[0], 2)

    assert engine.batch_jacobian(const, x) is None
    zeros = engine.batch_jacobian(const, x, unconnected_gradients="zero")
    assert torch.equal(zeros, torch.zeros(6, 2, 3))


@pytest.mark.ray
def test_empty_batch(engine):
    jac = engine.batch_jacobian(mixing, torch.empty(0, 5))
    assert jac.shape == (0, 4, 5)


@pytest.mark.ray
def test_function_from_an_uninstalled_module_is_shipped_by_value(engine, tmp_path):
    # A module the workers cannot import: its directory is on no one's sys.path.
    src = tmp_path / "user_code_xyz.py"
    src.write_text(textwrap.dedent("""
        import torch
        SCALE = 3.0
        def helper(x):
            return x * SCALE
        def user_fn(x):
            return torch.sin(helper(x))
    """))
    spec = importlib.util.spec_from_file_location("user_code_xyz", src)
    module = importlib.util.module_from_spec(spec)
    sys.modules["user_code_xyz"] = module
    try:
        spec.loader.exec_module(module)
        x = torch.randn(9, 2)
        assert_same(engine.batch_jacobian(module.user_fn, x), distjac.batch_jacobian(module.user_fn, x))
    finally:
        del sys.modules["user_code_xyz"]


@pytest.mark.ray
def test_stats_after_a_call(settings):
    settings.shard_size = 10
    settings.batch_jacobian(mixing, torch.randn(45, 5))
    stats = settings.last_stats
    assert [s.shard for s in stats.shards] == list(range(5))
    assert sum(w.rows for w in stats.workers) == 45
    assert {w.pid for w in stats.workers} == {info["pid"] for info in settings.workers()}
    assert stats.gather_bytes == 45 * 4 * 5 * 4
    assert all(s.compute_s >= 0 and s.wait_s >= 0 for s in stats.shards)
    text = str(stats)
    assert "45 rows in 5 shards" in text and "rows/s" in text


@pytest.mark.ray
def test_workers_match_their_cpus(engine):
    infos = engine.workers()
    assert len(infos) == 2 == engine.num_workers
    assert all(info["threads"] == 1 and info["device"] == "cpu" for info in infos)


@pytest.mark.ray
def test_progress_bar_when_asked(engine, capsys):
    engine.batch_jacobian(cubic, torch.randn(20, 2), progress=True)
    assert "distjac" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.parametrize(
    ("fn", "x", "error", "match"),
    [
        (cubic, torch.randn(4), ShapeError, r"x \(the source\) has shape \(4,\), rank 1"),
        (cubic, torch.ones(4, 2, dtype=torch.int64), DtypeError, "only floating dtypes"),
        ("not callable", torch.randn(4, 2), TypeError, "fn must be callable"),
        (lambda t: t.sum(dim=1), torch.randn(4, 2), ShapeError, r"fn\(x\) \(the target\) has shape \(4,\), rank 1"),
        (lambda t: t[:2], torch.randn(4, 2), ShapeError, "must match"),
    ],
    ids=["rank-1-source", "integer-source", "not-callable", "rank-1-target", "batch-mismatch"],
)
def test_bad_input_raises_the_core_errors(engine, fn, x, error, match):
    before = engine.last_stats
    with pytest.raises(error, match=match):
        engine.batch_jacobian(fn, x)
    assert engine.last_stats is before  # nothing was scheduled
    with pytest.raises(error, match=match):
        distjac.batch_jacobian(fn, x)  # the core says the same


@pytest.mark.ray
@pytest.mark.parametrize(("kwargs", "match"), [({"mode": "sideways"}, "mode='sideways'"),
                                               ({"unconnected_gradients": "maybe"}, "unconnected_gradients='maybe'")])
def test_bad_options_raise_option_error(engine, kwargs, match):
    with pytest.raises(OptionError, match=match):
        engine.batch_jacobian(cubic, torch.randn(3, 2), **kwargs)


@pytest.mark.ray
def test_user_exception_becomes_one_shard_error_and_the_engine_stays_usable(settings):
    engine = settings
    engine.shard_size = 10
    x = torch.randn(60, 3)
    # shard 3: rows [30, 40); its last row, past the kernel's probe of a shard's first 8 rows (run
    # only where that worker has not probed fn yet), so fn always fails on the whole block
    x[39, 0] = 5000.0
    with pytest.raises(ShardError) as info:
        engine.batch_jacobian(fails_on_marked_rows, x)
    err = info.value
    assert (err.shard, err.start, err.stop) == (3, 30, 40)
    assert err.node in {w["node"] for w in engine.workers()}
    message = str(err)
    for part in ("shard 3", "rows [30, 40)", f"node {err.node}", "BoomError: marked row in a block of 10"):
        assert part in message
    assert isinstance(err.__cause__, BoomError) and isinstance(err.__cause__, ValueError)
    assert "fails_on_marked_rows" in err.remote_traceback
    # Reuse after the failure: the same engine, a correct result.
    x[39, 0] = 0.5
    assert_same(engine.batch_jacobian(fails_on_marked_rows, x), 2 * torch.eye(3).expand(60, 3, 3))


@pytest.mark.ray
def test_failure_on_the_probe_rows_names_shard_zero(engine):
    x = torch.randn(20, 3)
    x[2, 0] = 5000.0
    with pytest.raises(ShardError, match=r"shard 0 \(rows \[0, 8\)\).*probing") as info:
        engine.batch_jacobian(fails_on_marked_rows, x)
    assert isinstance(info.value.__cause__, BoomError)


@pytest.mark.ray
def test_run_rejects_what_is_not_a_job_spec(engine):
    with pytest.raises(TypeError, match="must be a distjac.JobSpec"):
        engine.run(object())


# --------------------------------------------------------------------------------------
# A worker SIGKILLed mid-shard
# --------------------------------------------------------------------------------------


def make_slow_fn(pid_file: str, delay: float):
    """y = 2 tanh(x); on its 2nd call with a whole shard the process writes its pid (once
    over all processes) and sleeps, so the test can kill it mid-shard."""
    state = {"calls": 0}

    def slow(x):
        if x.shape[0] >= 10:
            state["calls"] += 1
            if state["calls"] == 2:
                try:
                    fd = os.open(pid_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    pass
                else:
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                    time.sleep(30 * delay)  # the kill lands here
            time.sleep(delay)
        return 2 * torch.tanh(x)

    return slow


@pytest.mark.ray
def test_worker_sigkilled_mid_shard_is_recomputed_once(settings, tmp_path):
    engine = settings
    engine.shard_size = 10
    engine.parallel_iterations = 4
    before = {w["pid"] for w in engine.workers()}
    pid_file = tmp_path / "victim.pid"
    fn = make_slow_fn(str(pid_file), delay=0.05)
    x = torch.randn(120, 4, generator=torch.Generator().manual_seed(1))
    box: dict = {}

    def job():
        try:
            box["jac"] = engine.batch_jacobian(fn, x, mode="rev")
        except BaseException as err:  # pragma: no cover - reported below
            box["err"] = err

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.time() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline, "no worker reached its second shard"
        time.sleep(0.02)
    victim = int(pid_file.read_text())
    assert victim in before
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=120)
    assert not thread.is_alive() and "err" not in box, box.get("err")
    assert_same(box["jac"], 2 / torch.cosh(x).pow(2).unsqueeze(-1) * torch.eye(4))
    stats = engine.last_stats
    assert [s.shard for s in stats.shards] == list(range(12)), "each shard placed exactly once"
    assert sum(s.stop - s.start for s in stats.shards) == 120
    assert stats.duplicates == 0
    assert victim not in {s.pid for s in stats.shards if s.pid not in before} and any(
        s.pid not in before for s in stats.shards
    ), "the restarted worker recomputed the killed shard"
    # Still usable afterwards.
    y = torch.randn(7, 4)
    assert_same(engine.batch_jacobian(mixing, y), distjac.batch_jacobian(mixing, y))


# --------------------------------------------------------------------------------------
# Several Engines, one Ray connection; local security
# --------------------------------------------------------------------------------------


@pytest.mark.ray
def test_engines_share_the_ray_connection(engine):
    import ray

    # The module's engine holds both CPUs of the local instance: this one asks for none.
    with distjac.Engine(num_workers=1, device="cpu", num_cpus_per_worker=0, progress=False) as second:
        assert not second.owns_ray or engine.owns_ray
        x = torch.randn(5, 3)
        assert_same(second.batch_jacobian(mixing, x), engine.batch_jacobian(mixing, x))
    assert ray.is_initialized(), "closing one Engine must not stop Ray under another"
    with pytest.raises(RuntimeError, match="shut down"):
        second.batch_jacobian(mixing, x)
    second.shutdown()  # twice is fine


@pytest.mark.ray
def test_cuda_on_a_cluster_without_gpus_is_a_clear_error(engine):
    import ray

    if ray.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this cluster has GPUs")
    with pytest.raises(OptionError, match="has no GPUs; use device='auto' or 'cpu'"):
        distjac.Engine(device="cuda")
    assert ray.is_initialized() and engine.workers(), "a failed Engine leaves the shared connection alone"


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
# Listeners off loopback that a local Engine leaves open (see README, "Security"); with
# Ray 2.60 and the engine's loopback switch this is 0 (a plain ray.init() opened 12).
EXPECTED_PUBLIC_LISTENERS = 0


def ray_listeners() -> list[tuple[str, str, int]]:
    psutil = pytest.importorskip("psutil")
    me = psutil.Process()
    found = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet") if hasattr(proc, "net_connections") else proc.connections("inet")
            name = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            bound = c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr)  # TCP listen, or UDP bound
            if bound:
                found.append((name, c.laddr.ip, c.laddr.port))
    return found


@pytest.mark.ray
def test_local_engine_listens_on_loopback_only_and_keeps_its_token_private(engine):
    if not engine.owns_local:
        pytest.skip("this process's Ray connection was not started by distjac")
    engine.workers()  # the workers' own servers are up
    listeners = ray_listeners()
    assert listeners, "found no Ray listeners at all: the count below would mean nothing"
    public = [entry for entry in listeners if entry[1] not in LOOPBACK]
    assert len(public) == EXPECTED_PUBLIC_LISTENERS, public
    assert os.environ.get("RAY_AUTH_MODE") == "token", "a local Engine keeps Ray's token authentication on"
    from distjac.engine import _token_path

    mode = stat.S_IMODE(_token_path().stat().st_mode)
    assert mode == 0o600, oct(mode)


@pytest.mark.ray
def test_ray_connection_shares_the_engines_connection(engine):
    import ray

    from distjac.engine import ray_connection

    with ray_connection() as owned:
        assert ray.is_initialized() and owned == engine.owns_ray
    assert ray.is_initialized(), "a holder that let go must not stop Ray while an Engine uses it"
    assert engine.workers()


@pytest.mark.gpu
def test_gpu_workers_match_the_cpu_kernel():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    from distjac.models import mlp

    model = mlp([16, 64, 8]).eval()
    x = torch.randn(512, 16)
    with distjac.Engine(num_workers=1, device="auto", shard_size=100, progress=False) as engine:
        assert engine.workers()[0]["device"].startswith("cuda")
        jac = engine.batch_jacobian(model, x)
        assert jac.device == x.device
        torch.testing.assert_close(jac, distjac.batch_jacobian(model, x), rtol=1e-4, atol=1e-5)
        jac_gpu = engine.batch_jacobian(model, x.cuda())
        assert jac_gpu.device.type == "cuda"
