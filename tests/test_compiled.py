"""Compiled strategies (distjac/compiled.py, NOTE [compiled blocks]): against reverse mode,
the float64 per-example loop and TensorFlow's fixture; every way a compile can fail
falls back to eager with the reason kept.

torch.compile is slow (tens of seconds per graph from a cold cache on 2 cores): the real
compiles are two, of one tiny model (TF's fixture MLP), shared by the module-scoped
fixture below; the failure paths replace torch.compile instead of compiling.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_close, make_mlp, randn, reference_batch_jacobian

import distjac
from distjac import compiled as dc
from distjac import kernels
from distjac.kernels import Strategy, choose_strategy, clear_caches, compiled_status, run_strategy

FIXTURE = Path(__file__).parent / "fixtures" / "tf_reference.npz"


def _tf_mlp():
    fx = np.load(FIXTURE, allow_pickle=False)
    t = lambda k: torch.from_numpy(np.array(fx[k]))  # noqa: E731
    model = make_mlp((5, 7, 3))
    with torch.no_grad():
        model[0].weight.copy_(t("mlp/w1"))
        model[0].bias.copy_(t("mlp/b1"))
        model[2].weight.copy_(t("mlp/w2"))
        model[2].bias.copy_(t("mlp/b2"))
    return model, t("mlp/x"), t("mlp/jac")


@pytest.fixture(scope="module")
def tf_mlp():
    """TF's MLP, its 4 rows and TF's Jacobian; compiled once per mode for the module."""
    clear_caches()
    model, x, tf_jac = _tf_mlp()
    out = {}
    for mode in ("rev", "fwd"):
        # fwd compiles a static graph for blocks of 4 rows: the fixture's batch.
        s = Strategy(mode, compiled=True, block=4)
        out[mode] = (s, run_strategy(model, x, s))
    return model, x, tf_jac, out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_compiled_matches_tf_rev_and_float64_loop(tf_mlp, mode):
    model, x, tf_jac, out = tf_mlp
    s, jac = out[mode]
    status = compiled_status(model, x, s)
    assert status.startswith("compiled in"), status  # it did compile (not an eager fallback)
    assert not jac.requires_grad and jac.grad_fn is None
    assert_close(jac, tf_jac, dtype=torch.float32)
    assert_close(jac, distjac.batch_jacobian(model, x, mode="rev"))
    assert_close(jac, reference_batch_jacobian(model, x))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_compiled_graph_serves_other_batches(tf_mlp, mode):
    """Rev: one dynamic graph for every block size >= 2; fwd: blocks of the compiled size,
    the rest (here a remainder of 3 and a last row) eagerly. No second compile either way."""
    model, _, _, out = tf_mlp
    s, _ = out[mode]
    x = randn(12, 5, seed=3)
    before = len(dc._COMPILE_TIMES.get("cpu", []))
    jac = run_strategy(model, x, s)
    jac1 = run_strategy(model, x[:1], s)  # one row: eager
    assert len(dc._COMPILE_TIMES.get("cpu", [])) == before
    assert_close(jac, reference_batch_jacobian(model, x))
    assert_close(jac1, reference_batch_jacobian(model, x[:1]))
    # also through the public entry point, as a worker reusing a shipped strategy would
    assert_close(distjac.batch_jacobian(model, x, strategy=s), jac)


@pytest.mark.slow
def test_compiled_falls_back_where_the_result_must_be_differentiable(tf_mlp):
    model, _, _, out = tf_mlp
    s, _ = out["rev"]
    m64 = make_mlp((5, 7, 3)).double()
    x = randn(6, 5, seed=4, dtype=torch.float64).requires_grad_(True)
    jac = run_strategy(m64, x, s)
    assert jac.requires_grad  # eager reverse mode, with history
    assert_close(jac, reference_batch_jacobian(m64, x))


@pytest.mark.slow
def test_inductor_cache_goes_where_distjac_says(tf_mlp):
    folder = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    if folder == str(dc.cache_root() / "inductor"):
        assert any(Path(folder).iterdir()), "the compiles above wrote nothing to distjac's folder"


def test_inductor_cache_dir_respects_the_users_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTJAC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert dc.direct_inductor_cache() == str(tmp_path / "inductor")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert dc.direct_inductor_cache() == str(tmp_path / "mine")


# --------------------------------------------------------------------------------------
# Every failure falls back to eager, with the reason kept (no real compiles)
# --------------------------------------------------------------------------------------


def _raising_compile(*args, **kwargs):
    raise RuntimeError("Unsupported: graph break in user code (simulated)")


def _wrong_compile(fn, **kwargs):
    return lambda xb: 2 * fn(xb)  # "compiles" to a wrong result


@pytest.mark.parametrize("patch, reason", [
    (_raising_compile, "torch.compile failed (RuntimeError: Unsupported: graph break"),
    (_wrong_compile, "the compiled result differs from eager"),
])
@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_compile_failure_or_mismatch_falls_back_to_eager(monkeypatch, patch, reason, mode):
    clear_caches()
    monkeypatch.setattr(dc.torch, "compile", patch)
    fn = make_mlp((4, 6, 5), seed=2, dtype=torch.float64)
    x = randn(9, 4, seed=5, dtype=torch.float64)
    s = Strategy(mode, compiled=True)
    jac = run_strategy(fn, x, s)  # no exception escapes
    assert_close(jac, reference_batch_jacobian(fn, x))
    assert reason in compiled_status(fn, x, s)
    chosen = choose_strategy(fn, x, mode=mode, compiled=True)
    assert not chosen.compiled
    assert any(reason in note for note in chosen.record.notes), chosen.record


def test_real_graph_break_falls_back(monkeypatch):
    """A data-dependent Python branch is a graph break; fullgraph=True makes it an error."""
    clear_caches()

    def branchy(z):
        if bool((z.sum() > 0).item()):
            return torch.sin(z) * 2
        return torch.cos(z)

    x = randn(5, 3, seed=1, dtype=torch.float64)
    s = Strategy("rev", compiled=True)
    assert_close(run_strategy(branchy, x, s), distjac.batch_jacobian(branchy, x, mode="rev"))
    status = compiled_status(branchy, x, s)
    assert status.startswith("fell back to eager: torch.compile failed"), status


def test_compile_disabled_by_environment(monkeypatch):
    clear_caches()
    monkeypatch.setenv("DISTJAC_COMPILE", "0")
    fn = make_mlp((3, 4, 2), seed=1)
    x = randn(4, 3, seed=1)
    s = Strategy("rev", compiled=True)
    assert_close(run_strategy(fn, x, s), reference_batch_jacobian(fn, x))
    assert "DISTJAC_COMPILE=0" in compiled_status(fn, x, s)


def test_auto_weighs_compiling_against_the_work(monkeypatch):
    """Auto proposes compiling only when its predicted cost can be won back; the record says so
    either way. (Here the prediction is huge: never tried; then nil, with torch.compile
    replaced by a wrong one: tried, and the mismatch keeps eager.)"""
    monkeypatch.setattr(kernels, "AUTO_MEASURE_MIN_ELEMENTS", 1)
    w1, w2 = randn(8, 6, seed=1), randn(6, 8, seed=2)
    fn = lambda z: torch.tanh(z @ w1.T) @ w2.T  # noqa: E731 - a function: no chain candidate
    x = randn(64, 6, seed=3)
    clear_caches()
    monkeypatch.setattr(dc, "COMPILE_COST_PRIOR_S", {"cpu": 1e9})
    monkeypatch.setattr(dc, "_COMPILE_TIMES", {})
    rec = choose_strategy(fn, x, mode="auto").record
    assert any(n.startswith("compiled: not tried") for n in rec.notes), rec
    clear_caches()
    monkeypatch.setattr(dc, "COMPILE_COST_PRIOR_S", {"cpu": 0.0})
    monkeypatch.setattr(dc.torch, "compile", _wrong_compile)
    s = choose_strategy(fn, x, mode="auto")
    assert not s.compiled
    assert any("the compiled result differs from eager" in n for n in s.record.notes), s.record
    assert_close(distjac.batch_jacobian(fn, x, mode="auto"), distjac.batch_jacobian(fn, x, mode="rev"))
    # compiled=False never even considers it
    clear_caches()
    rec = choose_strategy(fn, x, mode="auto", compiled=False).record
    assert not any(n.startswith("compiled") for n in rec.notes), rec
