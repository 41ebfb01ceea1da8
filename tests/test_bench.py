"""``distjac bench``: each suite in a tiny configuration, its outputs' shape checked.

The numbers are not checked (speed is measured by the benchmarks, never by tests); what is
checked is that every suite checks correctness before timing, writes one JSON record per
measurement with the machine, versions and config, a Markdown table and its plots, and
that the CLI reports bad arguments as usage errors. The scaling and memory suites run a
real Ray instance (and a real multi-node ``ray.cluster_utils.Cluster``) and real jobs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from distjac.bench import kernels, memory, scaling
from distjac.cli import main as cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

try:
    import matplotlib  # noqa: F401

    HAVE_MATPLOTLIB = True
except ImportError:  # the plot extra is optional; the test extra installs it
    HAVE_MATPLOTLIB = False


def _common_shape(doc: dict, suite: str, out: Path, plots: list[str]) -> None:
    assert doc["suite"] == suite
    for key in ("cpu_model", "logical_cores", "mem_total_bytes", "platform", "device"):
        assert key in doc["machine"], key
    assert doc["versions"]["torch"] and doc["versions"]["numpy"] and doc["versions"]["pyarrow"]
    assert doc["versions"]["ray"] and doc["versions"]["distjac"]
    assert isinstance(doc["config"], dict) and doc["records"]
    assert json.loads((out / f"{suite}.json").read_text())["records"] == json.loads(json.dumps(doc["records"]))
    table = (out / f"{suite}.md").read_text()
    assert table.startswith("### ") and "| " in table and "Machine:" in table
    if HAVE_MATPLOTLIB:
        assert doc["files"]["plots"] == plots
        for name in plots:
            assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    else:
        assert doc["files"]["plots"] == [] and "matplotlib" in doc["plots_skipped"]


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


def test_kernels_tiny(tmp_path, keep_threads, monkeypatch):
    torch.set_num_threads(1)
    # The compiled method runs, but eagerly (its compile is tens of seconds per workload;
    # tests/test_compiled.py compiles for real): its row is what is checked here.
    monkeypatch.setenv("DISTJAC_COMPILE", "0")
    doc = kernels.run(tmp_path, size="tiny", workloads=["W1", "W3"], repeats=2, warmup_s=0.05)
    assert torch.get_num_threads() == 1, "run() restores the caller's thread count"
    _common_shape(doc, "kernels", tmp_path, ["kernels.png"])
    assert doc["config"]["repeats"] == 2 and doc["config"]["threads"] == 2 and doc["config"]["tf32"] is False

    torch_methods = [m.name for m in kernels.METHODS]
    for w in ("W1", "W3"):
        wl = doc["workloads"][w]
        assert wl["best_baseline"] in torch_methods and wl["best_baseline_examples_per_s"] > 0
        assert "/" in wl["auto_strategy"]
        mine = {r["method"]: r for r in doc["records"] if r["workload"] == w and r["kind"] != "peer"}
        assert list(mine) == torch_methods + ["distjac auto (first call)"]
        first = mine.pop("distjac auto (first call)")
        assert first["times_s"] == [mine["distjac auto"]["first_call_s"]] and first["first_call_share"] > 0
        for name, r in mine.items():
            assert r["status"] == "ok", (w, name, r["reason"])  # tiny sizes: all run, all match
            assert len(r["times_s"]) == 2 and r["examples_per_s"] > 0 and r["max_rel_err"] < 1e-4
            assert len(r["calls_per_sample"]) == 2 and min(r["calls_per_sample"]) >= 1
            assert (r.get("warmup_calls", 0) >= 1) == (r["first_call_s"] < 0.05), (name, r)
            assert r["ratio_to_best_baseline"] > 0
        assert mine[wl["best_baseline"]]["ratio_to_best_baseline"] == pytest.approx(1.0)
        # The peers ran in this interpreter: where TF or JAX is missing they are skipped
        # with the reason, never silently left out.
        peers = {r["method"]: r for r in doc["records"] if r["workload"] == w and r["kind"] == "peer"}
        assert set(peers) == {"tf.function pfor", "tf.function loop", "jax jit(vmap(jacrev))",
                              "jax jit(vmap(jacfwd))"}
        for r in peers.values():
            assert r["status"] in ("ok", "skipped"), r
            if r["status"] == "skipped":
                assert "not importable" in r["reason"]
            else:
                assert r["examples_per_s"] > 0 and r["ratio_to_best_baseline"] > 0
    table = (tmp_path / "kernels.md").read_text()
    assert "| distjac auto |" in table and "(peer)" in table and "auto chose" in table
    assert "| distjac compiled |" in table and "| distjac auto (first call) |" in table
    assert "a steady-state call)" in table


def test_kernels_cli(tmp_path, capsys, keep_threads):
    rc = cli(["bench", "kernels", "--size", "tiny", "--workloads", "W3", "--methods", "distjac rev,vmap(jacrev)",
              "--repeats", "1", "--no-peers", "--no-plots", "--out", str(tmp_path)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "| distjac rev |" in captured.out and "| vmap(jacrev) |" in captured.out
    assert "wrote" in captured.err and "kernels.json" in captured.err
    doc = json.loads((tmp_path / "kernels.json").read_text())
    assert [(r["workload"], r["method"]) for r in doc["records"]] == [("W3", "distjac rev"), ("W3", "vmap(jacrev)")]
    assert doc["files"]["plots"] == [] and not list(tmp_path.glob("*.png"))


def test_kernels_sample_is_the_mean_of_the_calls_that_fill_it():
    calls = []

    def fn():
        calls.append(time.perf_counter())
        time.sleep(0.003)
        return torch.zeros(1)

    t, n, fastest = kernels._timed_sample(fn, torch.device("cpu"), 0.03)
    assert n == len(calls) and 2 <= n <= 11 and 0.003 <= fastest <= t < 0.03
    calls.clear()
    t, n, _ = kernels._timed_sample(fn, torch.device("cpu"), 0.0)
    assert n == len(calls) == 1 and t >= 0.003
    calls.clear()
    t, n, _ = kernels._timed_sample(fn, torch.device("cpu"), 10.0, calls=3)  # a fixed count wins
    assert n == len(calls) == 3 and t < 0.1
    assert kernels.calls_per_sample(0.003, 0.05) == 17 and kernels.calls_per_sample(0.2, 0.05) == 1
    assert kernels.calls_per_sample(1e-9, 0.05) == kernels.MAX_CALLS_PER_SAMPLE


def test_kernels_pilot_grows_and_stops_early():
    """The pilot runs on slices growing 4x from 16 rows to 1/8 of the batch, and stops at
    the first slice whose extrapolation fails: a method too big for the 1/8 slice itself
    never runs on it."""
    import time

    seen = []

    def slow(f, x):  # 20 ms a row: 16 rows take 0.32 s, so the next slice (64) ~1.3 s
        seen.append(x.shape[0])
        time.sleep(0.02 * x.shape[0])
        return x

    x = torch.zeros(8192, 2)
    reason = kernels._pilot(kernels.Method("slow", "baseline", slow), None, x, torch.device("cpu"), max_call_s=1.0)
    assert seen == [16] and reason.startswith("too slow: pilot of 16 rows"), (seen, reason)
    assert "for 64 rows" in reason
    seen.clear()

    def overhead(f, x):  # a fixed 0.1 s a call: the small slices are not extrapolated to 8192 rows
        seen.append(x.shape[0])
        time.sleep(0.1)
        return x

    assert kernels._pilot(kernels.Method("set-up", "baseline", overhead), None, x, torch.device("cpu"),
                          max_call_s=5.0) is None
    assert seen == [16, 64, 256, 1024]
    seen.clear()

    def fast(f, x):
        seen.append(x.shape[0])
        return x

    method = kernels.Method("fast", "baseline", fast)
    assert kernels._pilot(method, None, x, torch.device("cpu"), max_call_s=5.0) is None
    assert seen == [16, 64, 256, 1024]


def test_kernels_compare_in_slices():
    """The check compares slice by slice and still sees a difference in the last row."""
    ref = torch.randn(3000, 64, 128)  # 32 KiB a row: slices of 2048 rows
    got = ref.clone()
    assert kernels._compare(got, ref, rtol=1e-4, atol=1e-6) == (0.0, True)
    got[-1, 5, 7] += 1.0
    worst, close = kernels._compare(got, ref, rtol=1e-4, atol=1e-6)
    assert worst == pytest.approx(1.0, rel=1e-5) and not close


def test_kernels_batch_override(tmp_path, capsys, keep_threads):
    """--batch replaces the suite's batch sizes, for every workload or for some; the table
    and the records say which batch ran."""
    rc = cli(["bench", "kernels", "--size", "tiny", "--workloads", "W1,W3", "--methods", "distjac rev,vmap(jacrev)",
              "--batch", "W1=40", "--repeats", "1", "--no-peers", "--no-plots", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "kernels.json").read_text())
    assert doc["config"]["batch"] == {"W1": 40}
    assert doc["workloads"]["W1"]["batch"] == 40
    assert doc["workloads"]["W3"]["batch"] == kernels.WORKLOADS["W3"].quick_batch  # not named: the suite's
    assert {r["batch"] for r in doc["records"] if r["workload"] == "W1"} == {40}
    assert "W1 (B=40)" in capsys.readouterr().out
    doc = kernels.run(tmp_path / "all", size="tiny", workloads=["W3"], methods=["distjac rev", "vmap(jacrev)"],
                      repeats=1, peers=False, plots=False, batch=3)
    assert doc["workloads"]["W3"]["batch"] == 3
    assert all(r["status"] == "ok" and r["max_rel_err"] < 1e-4 for r in doc["records"])


@pytest.mark.parametrize("argv, message", [
    (["bench", "nonsense"], "unknown suite(s) nonsense"),
    (["bench", "kernels", "--batch", "0"], "--batch for W1 must be an integer >= 1"),
    (["bench", "kernels", "--batch", "W9=64"], "--batch names unknown workload 'W9'"),
    (["bench", "kernels", "--batch", "W1=many"], "give an integer (every workload) or W1=N,W3=M"),
    (["bench", "kernels", "--workloads", "W9"], "unknown workload(s) ['W9']"),
    (["bench", "kernels", "--repeats", "0"], "--repeats must be >= 1"),
    (["bench", "kernels", "--min-sample-s", "-1"], "min_sample_s must be a finite number of seconds >= 0"),
    (["bench", "kernels", "--warmup-s", "nan"], "warmup_s must be a finite number of seconds >= 0"),
    (["bench", "scaling", "--variants", "gather,scatter"], "unknown variant ['scatter']"),
    (["bench", "--size", "huge"], "invalid choice: 'huge'"),
    # a later suite's bad argument stops the run before the first suite writes anything
    (["bench", "kernels", "scaling", "--variants", "x"], "unknown variant ['x']"),
    (["bench", "memory", "--memory-rows", "0,100"], "must be >= 1"),
    (["bench", "scaling", "--workers", "1,two"], "comma-separated integers"),
    (["bench", "kernels", "--device", "meta"], "the suites run on cpu or cuda"),
])
def test_bench_usage_errors(argv, message, tmp_path, capsys):
    assert cli([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not list(tmp_path.iterdir()), "a usage error writes nothing"


# --------------------------------------------------------------------------------------
# scaling and memory: real Ray, real jobs
# --------------------------------------------------------------------------------------


def _scaling_records(doc: dict) -> dict:
    return {(r["topology"], r["variant"], r["workers"]): r for r in doc["records"]}


@pytest.mark.ray
@pytest.mark.slow
def test_scaling_tiny_local(tmp_path, keep_threads):
    doc = scaling.run(tmp_path, size="tiny", rows=2400, shard_size=300, workers=[1, 2], topologies=["local"],
                      variants=["gather", "write+frobenius"], tmp_dir=str(tmp_path))
    _common_shape(doc, "scaling", tmp_path, ["scaling_throughput.png", "scaling_breakdown.png"])
    recs = _scaling_records(doc)
    assert set(recs) == {("local", "write+frobenius", 0), ("local", "gather", 1), ("local", "gather", 2),
                         ("local", "write+frobenius", 1), ("local", "write+frobenius", 2)}
    for key, r in recs.items():
        assert r["status"] == "ok" and r["rows"] == 2400 and r["shards"] == 8, key
        assert r["check_max_rel_err"] < 1e-4, key  # checked against the in-process kernel first
        assert len(r["times_s"]) == 1 and r["rows_per_s"] > 0
        b = r["breakdown_s_per_shard"]
        assert list(b) == list(scaling.STAGES) and b["compute_s"] > 0 and b["to_host_s"] == 0
        assert b["wait_s"] >= 0 and r["queue_s_per_shard"] >= 0
        busy = sum(b[k] for k in scaling.WORKER_BUSY) * r["shards"]
        assert b["wait_s"] * r["shards"] == pytest.approx(max(0.0, r["median_s"] * max(r["workers"], 1) - busy))
        if r["variant"] == "gather":
            assert b["gather_s"] > 0 and b["write_s"] == 0 and r["gather_gbps"] > 0
        else:
            assert b["write_s"] > 0 and b["gather_s"] == 0
        if r["workers"] >= 1:
            assert r["efficiency"] == pytest.approx(r["rows_per_s"] / (r["workers"] * recs[
                ("local", r["variant"], 1)]["rows_per_s"]))
    assert recs[("local", "gather", 1)]["efficiency"] == pytest.approx(1.0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("distjac-scaling-")], "parts are cleaned up"
    table = (tmp_path / "scaling.md").read_text()
    assert "| local | gather | 2 |" in table and "in-process, 1 thread" in table


@pytest.mark.ray
@pytest.mark.slow
def test_scaling_ray_data_variants(tmp_path, keep_threads):
    """distjac's job on a Ray Data Dataset and Ray Data's own pipeline with the transform,
    both checked against the in-process kernel before they are timed."""
    pytest.importorskip("ray.data")
    doc = scaling.run(tmp_path, size="tiny", rows=1200, shard_size=300, workers=[1], topologies=["local"],
                      variants=["dataset-job", "ray-data"], plots=False, tmp_dir=str(tmp_path))
    recs = _scaling_records(doc)
    assert set(recs) == {("local", "dataset-job", 1), ("local", "ray-data", 1)}  # no in-process row for these
    for r in recs.values():
        assert r["status"] == "ok" and r["check_max_rel_err"] < 1e-4 and r["rows_per_s"] > 0, r
    assert recs[("local", "ray-data", 1)]["breakdown_s_per_shard"] is None
    assert recs[("local", "dataset-job", 1)]["breakdown_s_per_shard"]["write_s"] > 0
    md = (tmp_path / "scaling.md").read_text()
    assert "Ray Data transform vs distjac's job on the same Dataset and workers" in md
    assert "The best of each over the worker counts run, on the same machine" in md


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.cluster
def test_scaling_tiny_cluster(tmp_path, keep_threads):
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray connection is already open in this process")
    doc = scaling.run(tmp_path, size="tiny", rows=1200, shard_size=300, workers=[1, 2], topologies=["cluster"],
                      variants=["write"], plots=False, tmp_dir=str(tmp_path))
    recs = _scaling_records(doc)
    assert set(recs) == {("cluster", "write", 1), ("cluster", "write", 2)}
    assert recs[("cluster", "write", 2)]["nodes"] == 2, "one worker on each one-CPU node"
    assert all(r["check_max_rel_err"] < 1e-4 and r["breakdown_s_per_shard"]["write_s"] > 0 for r in recs.values())
    assert not ray.is_initialized(), "the suite disconnects and stops its cluster"


@pytest.mark.ray
@pytest.mark.slow
def test_memory_tiny(tmp_path):
    doc = memory.run(tmp_path, size="tiny", rows=[1000, 3000], shard_size=500, workers=2, tmp_dir=str(tmp_path))
    _common_shape(doc, "memory", tmp_path, ["memory.png"])
    assert [(r["mode"], r["rows"]) for r in doc["records"]] == [
        ("engine", 1000), ("engine", 3000), ("in-process", 1000), ("in-process", 3000)]
    for r in doc["records"]:
        assert r["shards"] == r["rows"] // 500 and r["bytes_written"] > r["rows"] * 512
        assert r["check_max_rel_err"] < 1e-4  # the job's result was checked too
        # torch alone is over 100 MiB resident in any process that imported it
        assert r["driver_peak_rss_bytes"] > 100 * 2**20 and r["worker_peak_rss_bytes"] > 100 * 2**20
        if r["mode"] == "in-process":  # the driver is its own worker, read a little later
            # (VmHWM can lose a few pages that glibc hands back with madvise: not strictly monotonic)
            assert r["worker_peak_rss_bytes"] <= 1.02 * r["driver_peak_rss_bytes"]
    table = (tmp_path / "memory.md").read_text()
    assert "| engine | 3,000 |" in table and "driver peak" in table


def test_estimates_tiny(tmp_path, keep_threads):
    from distjac.bench import estimates

    doc = estimates.run(tmp_path, size="tiny", estimate_rows=2, repeats=1)
    assert doc["suite"] == "estimates" and doc["files"]["plots"] == [] and doc["versions"]["torch"]
    assert json.loads((tmp_path / "estimates.json").read_text())["records"] == json.loads(json.dumps(doc["records"]))
    est, exact = doc["records"]
    assert est["method"].startswith("estimate frobenius (8 probes)") and est["products_per_row"] == 9
    assert 0 < est["rel_stderr_median"] <= est["rel_stderr_max"] < 1
    assert exact["rows"] == 1 and exact["rows_per_s"] > 0
    assert doc["speedup"] == pytest.approx(est["rows_per_s"] / exact["rows_per_s"])
    assert doc["check"]["max_z"] < 5  # the estimate agrees with the exact norm within its error bar
    assert "| estimate frobenius (8 probes) | 2 |" in (tmp_path / "estimates.md").read_text()


def test_mlp_jacobian_flops_is_the_cheapest_bracketing():
    fwd = lambda d: sum(2 * a * b for a, b in zip(d, d[1:]))  # noqa: E731
    # W1's widths: from the output end, 2*32*256*256 + 2*32*256*64
    assert kernels.mlp_jacobian_flops([64, 256, 256, 32]) == fwd([64, 256, 256, 32]) + 4194304 + 1048576
    # 1000 -> 2 -> 1000 -> 2: (W3 W2) W1 costs 16,000; W3 (W2 W1) would cost 8,000,000
    assert kernels.mlp_jacobian_flops([1000, 2, 1000, 2]) == fwd([1000, 2, 1000, 2]) + 16000
    assert kernels.mlp_jacobian_flops([3, 5]) == 30  # one layer: its Jacobian is its weight
    assert kernels.matmul_gflops(torch.device("cpu"), repeats=1) > 0
