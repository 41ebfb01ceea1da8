"""Tests of ``distjac/bench/peers.py``, the TensorFlow/JAX peers of the kernel benchmark.

The script runs in a separate interpreter, so most tests run it as a subprocess:

* with this interpreter (no TensorFlow, no JAX): every peer is skipped with a reason
  naming the missing framework, OUT.json has its full structure, the exit status is 0;
* with a malformed spec: a non-zero exit status and one clear line on stderr;
* with the interpreter named by ``DISTJAC_PEER_PYTHON`` (one with TensorFlow and JAX;
  skipped where it is not set): all four peers on tiny workloads of each kind must match
  the Jacobians distjac computes here.

Spec validation, and the procedure with fake peers (statuses: ok, mismatch, out of memory,
error in a timed call, too slow, missing framework), are tested in process, on the script
loaded as a module. The workloads' npz files are made here with torch: weights from
``distjac.models``, the reference from ``distjac.batch_jacobian(mode="rev")``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import distjac
from distjac import models

SCRIPT = Path(__file__).resolve().parents[1] / "distjac" / "bench" / "peers.py"
PEER_PYTHON_ENV = "DISTJAC_PEER_PYTHON"
ALL_PEERS = ["tf.function pfor", "tf.function loop", "jax jit(vmap(jacrev))", "jax jit(vmap(jacfwd))"]
FRAMEWORK = {"tf.function pfor": "tensorflow", "tf.function loop": "tensorflow",
             "jax jit(vmap(jacrev))": "jax", "jax jit(vmap(jacfwd))": "jax"}
CHECK_ROWS = 3


@pytest.fixture(scope="module")
def peers():
    """The script, loaded as a module (it imports only numpy and the standard library)."""
    spec = importlib.util.spec_from_file_location("distjac_bench_peers_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


# --------------------------------------------------------------------------------------
# Workloads: npz files in the layout peers.py reads
# --------------------------------------------------------------------------------------


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _save(path: Path, model: torch.nn.Module, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> str:
    reference = distjac.batch_jacobian(model, x[:CHECK_ROWS], mode="rev")
    arrays = {k: v.detach().numpy() for k, v in weights.items()}
    np.savez(path, x=x.numpy(), reference=reference.detach().numpy(), **arrays)
    return str(path)


def mlp_workload(tmp: Path, name: str, sizes: list[int], activation: str, batch: int, seed: int = 0) -> dict:
    model = models.mlp(sizes, activation, seed=seed)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    weights = {}
    for i, lin in enumerate(linears):
        weights[f"w{i}"], weights[f"b{i}"] = lin.weight, lin.bias
    npz = _save(tmp / f"{name}.npz", model, _randn(batch, sizes[0], seed=seed + 1), weights)
    return {"name": name, "kind": "mlp", "activation": activation, "npz": npz}


def cube_workload(tmp: Path, name: str, width: int, batch: int, seed: int = 0) -> dict:
    npz = _save(tmp / f"{name}.npz", models.cube(), _randn(batch, width, seed=seed), {})
    return {"name": name, "kind": "cube", "npz": npz}


def convnet_workload(tmp: Path, name: str, in_shape: tuple[int, int, int], batch: int, seed: int = 0) -> dict:
    # H != W and several channels, so a flattening order other than torch's (C, H, W) fails.
    model = models.convnet(in_shape, channels=3, kernel=3, out=4, seed=seed)
    conv, lin = model[0], model[3]
    weights = {"conv_w": conv.weight, "conv_b": conv.bias, "lin_w": lin.weight, "lin_b": lin.bias}
    npz = _save(tmp / f"{name}.npz", model, _randn(batch, *in_shape, seed=seed + 1), weights)
    return {"name": name, "kind": "convnet", "npz": npz}


def tiny_workloads(tmp: Path, batch: int = 8) -> list[dict]:
    return [
        mlp_workload(tmp, "mlp_tanh", [6, 12, 10, 4], "tanh", batch),
        mlp_workload(tmp, "mlp_gelu", [5, 9, 3], "gelu", batch, seed=1),
        cube_workload(tmp, "cube", 7, batch),
        convnet_workload(tmp, "convnet", (2, 7, 6), batch),
    ]


def run_script(python: str, spec: dict | str, tmp: Path, timeout: float = 60) -> tuple[subprocess.CompletedProcess,
                                                                                       Path]:
    spec_path, out_path = tmp / "spec.json", tmp / "out.json"
    spec_path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    proc = subprocess.run([python, str(SCRIPT), str(spec_path), str(out_path)], capture_output=True, text=True,
                          timeout=timeout)
    return proc, out_path


def check_structure(out: dict, python: str, spec: dict) -> None:
    """The keys OUT.json always has, whatever happened to the peers."""
    assert os.path.samefile(out["python"], python)
    assert isinstance(out["python_version"], str) and out["complete"] is True
    assert out["versions"]["numpy"] == np.__version__ or python != sys.executable
    assert set(out["versions"]) >= {"numpy", "tensorflow", "jax", "jaxlib"}
    assert set(out["devices"]) >= {"tensorflow", "jax"}
    assert out["device"] == spec.get("device", "cpu") and out["threads"] == spec["threads"]
    if hasattr(os, "sched_getaffinity"):
        mine = sorted(os.sched_getaffinity(0))
        assert out["affinity"] == mine[: spec["threads"]]
    requested = spec.get("peers", ALL_PEERS)
    assert list(out["workloads"]) == [w["name"] for w in spec["workloads"]]
    for wl in spec["workloads"]:
        rec = out["workloads"][wl["name"]]
        with np.load(wl["npz"]) as data:
            assert rec["batch"] == data["x"].shape[0]
        assert list(rec["peers"]) == requested
        for r in rec["peers"].values():
            assert r["status"] in ("ok", "mismatch", "skipped", "error")
            assert (r["reason"] is None) == (r["status"] == "ok")
            assert isinstance(r["times_s"], list)


# --------------------------------------------------------------------------------------
# Without TensorFlow or JAX (this interpreter)
# --------------------------------------------------------------------------------------


def test_without_frameworks_every_peer_is_skipped(tmp_path):
    spec = {"device": "cpu", "threads": 1, "repeats": 2, "workloads": tiny_workloads(tmp_path)}
    proc, out_path = run_script(sys.executable, spec, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(out_path.read_text())
    check_structure(out, sys.executable, spec)
    for name in ("tensorflow", "jax"):
        if importlib.util.find_spec(name) is None:
            assert out["versions"][name] is None and out["devices"][name] is None
    for rec in out["workloads"].values():
        for peer, r in rec["peers"].items():
            framework = FRAMEWORK[peer]
            if importlib.util.find_spec(framework) is not None:
                continue  # this interpreter has it after all: nothing to say about skipping
            assert r["status"] == "skipped" and r["times_s"] == []
            assert r["reason"].startswith(f"{framework} is not importable in {sys.executable}: ")
            assert "ModuleNotFoundError" in r["reason"]
    assert "[peers " in proc.stderr  # progress goes to stderr


def test_peer_subset_and_defaults(peers, tmp_path):
    wl = cube_workload(tmp_path, "c", 3, 4)
    spec = peers.parse_spec({"workloads": [wl], "peers": ["jax jit(vmap(jacfwd))"]})
    assert spec.peers == ["jax jit(vmap(jacfwd))"] and spec.workloads[0].batch == 4
    assert (spec.device, spec.threads, spec.repeats, spec.rtol, spec.atol_scale, spec.max_call_s) == (
        "cpu", 2, 5, 1e-4, 1e-5, 60.0)
    assert peers.parse_spec({"workloads": [wl]}).peers == ALL_PEERS == list(peers.PEERS)


# --------------------------------------------------------------------------------------
# Malformed specs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"workloads": [{"name": "a", "kind": "resnet", "npz": "x.npz"}]}, "workloads[0].kind: expected one of"),
    ],
    ids=["not-json", "bad-kind"],
)
def test_malformed_spec_exits_nonzero(tmp_path, spec, message):
    proc, out_path = run_script(sys.executable, spec, tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peers.py: malformed spec ") and message in lines[0], proc.stderr
    assert not out_path.exists()


def test_wrong_arguments_exit_nonzero():
    proc = subprocess.run([sys.executable, str(SCRIPT), "only-one-argument"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "usage: peers.py SPEC.json OUT.json" in proc.stderr


def _rewrite(path: str, **changes) -> None:
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del arrays[k]
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no workloads", "workloads: expected a non-empty list"),
        ("unknown peer", "peers: unknown peer 'torch vmap'"),
        ("bad device", "device: expected one of cpu, gpu, got 'cuda'"),
        ("unknown key", "unknown key(s) 'repeat'"),
        ("bool threads", "threads: expected an integer >= 1"),
        ("negative rtol", "rtol: expected a finite number >= 0"),
        ("negative min_sample_s", "min_sample_s: expected a finite number >= 0"),
        ("no activation", "activation: an mlp needs one of"),
        ("missing npz", "cannot read the npz"),
        ("duplicate name", "'m' is used twice"),
        ("no reference", "has no 'reference'"),
        ("float64 x", "x has dtype float64, expected float32"),
        ("bad layer", "w1 has shape (4, 7), expected (out, 9)"),
        ("bad reference", "reference has shape (3, 4, 5), expected (K, 4, 6)"),
        ("too many rows", "reference has 9 rows, expected 1 <= K <= B = 8"),
        ("bad conv", "lin_w has shape"),
    ],
)
def test_spec_validation_messages(peers, tmp_path, case, message):
    mlp = mlp_workload(tmp_path, "m", [6, 9, 4], "tanh", 8)
    raw = {"workloads": [mlp]}
    if case == "no workloads":
        raw["workloads"] = []
    elif case == "unknown peer":
        raw["peers"] = ["torch vmap"]
    elif case == "bad device":
        raw["device"] = "cuda"
    elif case == "unknown key":
        raw["repeat"] = 3
    elif case == "bool threads":
        raw["threads"] = True
    elif case == "negative rtol":
        raw["rtol"] = -1
    elif case == "negative min_sample_s":
        raw["min_sample_s"] = -0.5
    elif case == "no activation":
        del mlp["activation"]
    elif case == "missing npz":
        mlp["npz"] = str(tmp_path / "nowhere.npz")
    elif case == "duplicate name":
        raw["workloads"] = [mlp, dict(mlp)]
    elif case == "no reference":
        _rewrite(mlp["npz"], reference=None)
    elif case == "float64 x":
        with np.load(mlp["npz"]) as data:
            _rewrite(mlp["npz"], x=data["x"].astype(np.float64))
    elif case == "bad layer":
        _rewrite(mlp["npz"], w1=np.zeros((4, 7), np.float32))
    elif case == "bad reference":
        _rewrite(mlp["npz"], reference=np.zeros((3, 4, 5), np.float32))
    elif case == "too many rows":
        _rewrite(mlp["npz"], reference=np.zeros((9, 4, 6), np.float32))
    elif case == "bad conv":
        conv = convnet_workload(tmp_path, "c", (1, 5, 4), 8)
        _rewrite(conv["npz"], lin_w=np.zeros((4, 3 * 3 * 3), np.float32))
        raw["workloads"] = [conv]
    with pytest.raises(peers.SpecError) as info:
        peers.parse_spec(raw)
    assert message in str(info.value)


# --------------------------------------------------------------------------------------
# The procedure, in process, with fake peers (no TensorFlow or JAX needed)
# --------------------------------------------------------------------------------------


class FakeFrameworks:
    """Stands in for peers.Frameworks: every framework is there, except those in ``missing``."""

    def __init__(self, peers_module, missing=()):
        self.peers, self.missing = peers_module, set(missing)

    def get(self, name):
        fw = self.peers.Framework(name, module=object())
        if name in self.missing:
            fw.unavailable = f"{name} is not importable in fake: ModuleNotFoundError"
        return fw


def _cube_jacobian(x: np.ndarray) -> np.ndarray:
    return np.stack([np.diag(3 * row * row) for row in x]).astype(np.float32)


def test_procedure_statuses(peers, tmp_path, monkeypatch):
    w = peers.parse_spec({"workloads": [cube_workload(tmp_path, "c", 4, 6)]}).workloads[0]
    right = _cube_jacobian(w.x)
    calls = {p: 0 for p in ALL_PEERS}

    def fake_build(peer, fw, workload):
        def call():
            calls[peer] += 1
            if peer == "jax jit(vmap(jacrev))":
                raise MemoryError("cannot allocate 4 TiB")
            if peer == "jax jit(vmap(jacfwd))" and calls[peer] == 3:
                raise RuntimeError("boom\n  in the second timed call")
            return right * 2 if peer == "tf.function loop" else right

        return peers.Runner(call=call, wait=lambda y: None, to_numpy=np.asarray)

    monkeypatch.setattr(peers, "build_peer", fake_build)
    spec = peers.Spec(device="cpu", threads=1, repeats=3, rtol=1e-4, atol_scale=1e-5, max_call_s=60.0,
                      peers=ALL_PEERS, workloads=[w])
    rec = peers.bench_workload(w, spec, FakeFrameworks(peers))
    r = rec["peers"]
    assert rec["batch"] == 6 and rec["out_shape"] == rec["in_shape"] == [4] and rec["check_rows"] == CHECK_ROWS

    ok = r["tf.function pfor"]
    assert ok["status"] == "ok" and ok["reason"] is None and ok["max_abs_err"] < 1e-6
    assert len(ok["times_s"]) == 3 and ok["examples_per_s"] == pytest.approx(6 / ok["median_s"])

    bad = r["tf.function loop"]
    assert bad["status"] == "mismatch" and "max abs err" in bad["reason"] and len(bad["times_s"]) == 3

    oom = r["jax jit(vmap(jacrev))"]
    assert oom["status"] == "skipped" and oom["reason"] == "out of memory: MemoryError: cannot allocate 4 TiB"
    assert oom["times_s"] == [] and "median_s" not in oom

    late = r["jax jit(vmap(jacfwd))"]  # first call and one timed call fine, then an error
    assert late["status"] == "error" and late["reason"] == "timed call 2: RuntimeError: boom in the second timed call"
    assert len(late["times_s"]) == 1 and calls["jax jit(vmap(jacfwd))"] == 3  # not called again

    # Too slow, a wrong shape, a missing framework.
    def slow_build(peer, fw, workload):
        result = right if peer == "tf.function pfor" else right[:, :2]
        return peers.Runner(call=lambda: time.sleep(0.02) or result, wait=lambda y: None, to_numpy=np.asarray)

    monkeypatch.setattr(peers, "build_peer", slow_build)
    spec.max_call_s, spec.peers = 0.01, ["tf.function pfor", "jax jit(vmap(jacrev))"]
    rec = peers.bench_workload(w, spec, FakeFrameworks(peers, missing={"jax"}))
    slow = rec["peers"]["tf.function pfor"]
    assert slow["status"] == "skipped" and slow["reason"].startswith("too slow: one call took ")
    assert slow["times_s"] == [] and slow["first_call_s"] >= 0.02
    assert rec["peers"]["jax jit(vmap(jacrev))"]["reason"] == "jax is not importable in fake: ModuleNotFoundError"

    spec.max_call_s, spec.peers = 60.0, ["tf.function loop"]
    shape = peers.bench_workload(w, spec, FakeFrameworks(peers))["peers"]["tf.function loop"]
    assert shape["status"] == "mismatch" and shape["reason"] == "result has shape (6, 2, 4), expected (6, 4, 4)"


# --------------------------------------------------------------------------------------
# With TensorFlow and JAX (DISTJAC_PEER_PYTHON)
# --------------------------------------------------------------------------------------


def test_a_sample_repeats_short_calls(peers, tmp_path, monkeypatch):
    """With min_sample_s, a sample of a short call is the mean of the calls that fill it,
    each waited for; a long call is a sample of one."""
    w = peers.parse_spec({"workloads": [cube_workload(tmp_path, "c", 4, 6)]}).workloads[0]
    right = _cube_jacobian(w.x)
    sleep = {"tf.function pfor": 0.002, "tf.function loop": 0.05}
    calls, waits = dict.fromkeys(sleep, 0), dict.fromkeys(sleep, 0)

    def build(peer, fw, workload):
        def call():
            calls[peer] += 1
            time.sleep(sleep[peer])
            return right

        def wait(y):
            waits[peer] += 1

        return peers.Runner(call=call, wait=wait, to_numpy=np.asarray)

    monkeypatch.setattr(peers, "build_peer", build)
    spec = peers.parse_spec({"workloads": [cube_workload(tmp_path, "c", 4, 6)], "repeats": 3,
                             "min_sample_s": 0.03, "warmup_s": 0.02, "peers": list(sleep)})
    assert spec.min_sample_s == 0.03 and spec.summary()["min_sample_s"] == 0.03 and spec.warmup_s == 0.02
    rec = peers.bench_workload(w, spec, FakeFrameworks(peers))["peers"]
    short, long = rec["tf.function pfor"], rec["tf.function loop"]
    assert len(short["times_s"]) == len(short["calls_per_sample"]) == 3
    assert short["calls_per_sample"][0] >= 2 and len(set(short["calls_per_sample"])) == 1, short  # fixed
    assert short["warmup_calls"] >= 2 and "warmup_calls" not in long  # a first call of 0.05 s is warm-up enough
    assert (1 + short["warmup_calls"] + sum(short["calls_per_sample"]) == calls["tf.function pfor"]
            == waits["tf.function pfor"])
    assert all(0.002 <= t < 0.03 for t in short["times_s"]), short["times_s"]  # a mean, not a sum
    assert long["calls_per_sample"] == [1, 1, 1] and all(t >= 0.05 for t in long["times_s"])


def test_peers_match_torch(tmp_path):
    python = os.environ.get(PEER_PYTHON_ENV)
    if not python:
        pytest.skip(f"set {PEER_PYTHON_ENV} to a Python with tensorflow and jax to run the peers")
    assert os.access(python, os.X_OK), f"{PEER_PYTHON_ENV}={python} is not an executable"
    # (How a mismatch is flagged is tested above with fake peers; the check is numpy's.)
    good = tiny_workloads(tmp_path)
    spec = {"device": "cpu", "threads": 2, "repeats": 2, "rtol": 1e-4, "atol_scale": 1e-5, "max_call_s": 60.0,
            "peers": ALL_PEERS, "workloads": good}
    proc, out_path = run_script(python, spec, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(out_path.read_text())
    check_structure(out, python, spec)
    for name in ("tensorflow", "jax", "jaxlib"):
        assert out["versions"][name], f"{name} is missing in {python}"
    assert out["devices"]["tensorflow"] and out["devices"]["jax"]
    for wl in good:
        for peer, r in out["workloads"][wl["name"]]["peers"].items():
            where = f"{wl['name']} / {peer}"
            assert r["status"] == "ok", f"{where}: {r['reason']}"
            assert r["max_abs_err"] <= 1e-5, where
            assert r["first_call_s"] > 0 and len(r["times_s"]) == 2, where
            assert r["median_s"] > 0 and r["examples_per_s"] == pytest.approx(8 / r["median_s"]), where
