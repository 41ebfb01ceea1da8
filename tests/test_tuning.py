"""The on-disk tuning cache (distjac/tuning.py, NOTE [the tuning cache]), shipping a chosen
Strategy to another process, and ``distjac tune CONFIG``. Assertions are on records and
files, never on times."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import assert_close, make_mlp, randn, reference_batch_jacobian

import distjac
from distjac import kernels, models, tuning
from distjac.kernels import Strategy, choose_strategy, clear_caches

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """The tuning cache on, in a folder of this test; auto measures even tiny problems."""
    monkeypatch.setenv("DISTJAC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DISTJAC_TUNING_CACHE", "1")
    monkeypatch.setattr(kernels, "AUTO_MEASURE_MIN_ELEMENTS", 1)
    clear_caches()
    yield tmp_path / "tuning.json"
    clear_caches()


def _fn():
    return models.mlp([6, 10, 6], seed=1), randn(48, 6, seed=2)


# --------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------


def test_key_follows_versions_and_the_tuner_revision(monkeypatch):
    fn, x = _fn()
    key, parts = tuning.make_key(fn, x, ("rev",))
    assert parts["distjac"] == distjac.__version__ and parts["torch"] == torch.__version__
    assert tuning.make_key(fn, x, ("rev",))[0] == key
    monkeypatch.setattr(tuning, "TUNER_REVISION", tuning.TUNER_REVISION + 1)
    assert tuning.make_key(fn, x, ("rev",))[0] != key  # a changed tuner measures afresh


def test_fingerprint_follows_code_and_shapes_not_values():
    a, b = models.mlp([4, 8, 3], seed=0), models.mlp([4, 8, 3], seed=1)
    assert tuning.fingerprint(a) == tuning.fingerprint(b)  # other weights, same work
    assert tuning.fingerprint(a) != tuning.fingerprint(models.mlp([4, 9, 3]))
    assert tuning.fingerprint(a) != tuning.fingerprint(a.double())
    a.train()
    assert tuning.fingerprint(a) != tuning.fingerprint(b)
    f1 = lambda z: torch.tanh(z) * 2  # noqa: E731
    f2 = lambda z: torch.tanh(z) * 3  # noqa: E731
    f1_again = lambda z: torch.tanh(z) * 2  # noqa: E731
    assert tuning.fingerprint(f1) != tuning.fingerprint(f2)
    assert tuning.fingerprint(f1) == tuning.fingerprint(f1_again)
    w_small, w_big = torch.ones(3, 2), torch.ones(5, 2)
    assert tuning.fingerprint(lambda z: z @ w_small.T) != tuning.fingerprint(lambda z: z @ w_big.T)
    m1, m2 = models.mlp([4, 8, 3]), models.mlp([4, 5, 3])
    assert tuning.fingerprint(lambda z: m1(z)) != tuning.fingerprint(lambda z: m2(z))
    assert tuning.fingerprint(torch.tanh) is None  # a builtin: nothing stable to hash


# --------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------


def test_store_lookup_clear_and_atomic_writes(cache):
    assert tuning.lookup("k") is None
    assert tuning.store("k", {"strategy": Strategy("fwd", block=8).to_dict()})
    assert tuning.lookup("k")["strategy"] == Strategy("fwd", block=8).to_dict()
    assert [p.name for p in cache.parent.iterdir()] == ["tuning.json"]  # no temporary left behind
    doc = json.loads(cache.read_text())
    assert doc["format"] == tuning.FORMAT and "k" in doc["entries"]
    assert tuning.clear() and not cache.exists() and not tuning.clear()


def test_corrupt_file_is_ignored_with_a_warning_and_rewritten(cache):
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("{ not json")
    fn, x = _fn()
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache .*not valid JSON"):
        s = choose_strategy(fn, x, mode="auto")
    assert s.record.how == "measured"
    assert json.loads(cache.read_text())["entries"]  # rewritten with the new entry
    # an entry that is not a strategy is skipped, not trusted
    doc = json.loads(cache.read_text())
    for entry in doc["entries"].values():
        entry["strategy"] = {"mode": "sideways"}
    cache.write_text(json.dumps(doc))
    clear_caches()
    assert choose_strategy(fn, x, mode="auto").record.how == "measured"


def test_disabled_reads_and_writes_nothing(cache, monkeypatch):
    monkeypatch.setenv("DISTJAC_TUNING_CACHE", "0")
    fn, x = _fn()
    assert choose_strategy(fn, x, mode="auto").record.how == "measured"
    assert not cache.exists()


# --------------------------------------------------------------------------------------
# choose_strategy consults it; a choice travels to another process
# --------------------------------------------------------------------------------------


def test_choice_comes_back_from_the_tuning_cache(cache):
    fn, x = _fn()
    first = choose_strategy(fn, x, mode="auto")
    assert first.record.how == "measured" and cache.exists()
    clear_caches()  # a new process, as far as memory goes
    again = choose_strategy(fn, x, mode="auto")
    assert again.record.how == "tuning cache", again.record
    assert any(n.startswith("from the tuning cache") for n in again.record.notes)
    assert again == first and again.record.times
    assert_close(distjac.batch_jacobian(fn, x, mode="auto"), reference_batch_jacobian(fn, x))
    # another batch-size bucket, max_memory or dtype is another key: measured afresh
    assert choose_strategy(fn, randn(3000, 6, seed=1), mode="auto").record.how == "measured"
    assert choose_strategy(fn, x, mode="auto", max_memory=1 << 30).record.how == "measured"
    assert choose_strategy(fn.double(), x.double(), mode="auto").record.how == "measured"


def test_a_choice_whose_measuring_stopped_early_is_measured_in_full_once_calls_pay(cache, monkeypatch):
    """NOTE [provisional choices]: a first call whose measuring budget stopped it after the
    pilot race leaves a provisional choice (in memory and on disk); the calls it serves are
    counted, and once they have paid for the rest the next call measures in full."""
    fn, x = models.mlp([6, 10, 6], seed=1), randn(600, 6, seed=2)  # pilot 75 rows, sample 600

    def entry():
        (value,) = json.loads(cache.read_text())["entries"].values()
        return value

    monkeypatch.setattr(kernels, "AUTO_MEASURE_SHARE", 1e-9)  # no budget beyond the pilot race
    jac = distjac.batch_jacobian(fn, x)
    first = choose_strategy(fn, x).record
    assert any(n.startswith("measuring stopped after stage one") for n in first.notes), first
    assert first.provisional is not None and first.provisional[0] == 600
    assert "provisional" in entry()
    distjac.batch_jacobian(fn, x)  # counted, far from due at this budget
    assert choose_strategy(fn, x).record.provisional is not None

    monkeypatch.setattr(kernels, "AUTO_MEASURE_SHARE", 1e9)  # now the rows served pay for anything
    assert_close(distjac.batch_jacobian(fn, x), reference_batch_jacobian(fn, x))  # measures in full
    again = choose_strategy(fn, x).record
    assert any("measured again once calls like this one had served 1,800 rows" in n for n in again.notes), again
    assert again.provisional is None and not any(n.startswith("measuring stopped") for n in again.notes)
    assert "provisional" not in entry()
    assert_close(jac, reference_batch_jacobian(fn, x))

    # In another process (memory cleared) the provisional mark comes back from the disk.
    monkeypatch.setattr(kernels, "AUTO_MEASURE_SHARE", 1e-9)
    clear_caches()
    tuning.clear()
    distjac.batch_jacobian(fn, x)
    clear_caches()
    monkeypatch.setattr(kernels, "AUTO_MEASURE_SHARE", 1e9)
    loaded = choose_strategy(fn, x).record
    assert loaded.how == "tuning cache" and loaded.provisional is not None and loaded.provisional[0] == 600
    again = choose_strategy(fn, x).record  # due on the rows served before: measured in full
    assert again.how == "measured" and any("measured again" in n for n in again.notes), again

    # The measurement in full is final, even where its own budget fell short again.
    clear_caches()
    tuning.clear()
    monkeypatch.setattr(kernels, "AUTO_MEASURE_SHARE", 1e-9)
    distjac.batch_jacobian(fn, x)
    served, _, per_row = kernels._PROVISIONAL.get(fn, choose_strategy(fn, x).record.key)
    kernels._PROVISIONAL.put(fn, choose_strategy(fn, x).record.key, (served, 0.0, per_row))  # due now
    distjac.batch_jacobian(fn, x)  # measures again, and stops after stage one again
    final = choose_strategy(fn, x).record
    assert any("measured again" in n for n in final.notes) and final.provisional is None, final
    assert any(n.startswith("not provisional again") for n in final.notes)
    assert "provisional" not in entry()


def test_a_chosen_strategy_pickles_and_is_reused_as_given():
    fn, x = make_mlp((5, 7, 3), seed=2, dtype=torch.float64), randn(9, 5, seed=1, dtype=torch.float64)
    for s in (Strategy("fwd", block=4), Strategy("rev", vectorize=False), Strategy("chain", block=2),
              choose_strategy(fn, x, mode="auto")):
        shipped = pickle.loads(pickle.dumps(s))
        assert shipped == s and str(shipped) == str(s)
        assert (shipped.record is None) == (s.record is None)
        assert_close(distjac.batch_jacobian(fn, x, strategy=shipped), reference_batch_jacobian(fn, x))
    with pytest.raises(TypeError, match="strategy must be a distjac.kernels.Strategy"):
        distjac.batch_jacobian(fn, x, strategy="rev")


def test_another_process_reads_the_choice(cache):
    """What a Ray worker on the same node does: the same model built from its import path
    and a batch of the same shape find the choice on disk, without measuring."""
    fn, x = _fn()
    first = choose_strategy(fn, x, mode="auto")
    code = textwrap.dedent(f"""
        import torch
        from distjac import kernels, models
        torch.set_num_threads({torch.get_num_threads()})  # part of the key: the same machine setup
        kernels.AUTO_MEASURE_MIN_ELEMENTS = 1
        fn = models.mlp([6, 10, 6], seed=7)  # other weights, same shapes
        x = torch.randn(48, 6)
        s = kernels.choose_strategy(fn, x, mode="auto")
        print(s.record.how, "|", s)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout.strip()
    assert out == f"tuning cache | {first}", out


# --------------------------------------------------------------------------------------
# distjac tune CONFIG
# --------------------------------------------------------------------------------------


def test_tune_subcommand_prints_the_record_and_fills_the_cache(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(textwrap.dedent(f"""
        model: {{factory: "distjac.models:mlp", kwargs: {{sizes: [16, 24, 16], seed: 0}}}}
        data: {{kind: synthetic, rows: 20000, shape: [16], seed: 0}}
        jacobian: {{mode: auto}}
        engine: {{device: cpu, shard_size: 512}}
        output: {{path: {tmp_path / 'out'}}}
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DISTJAC_CACHE_DIR": str(tmp_path / "cache"),
           "DISTJAC_TUNING_CACHE": "1"}
    cmd = [sys.executable, "-m", "distjac.cli", "tune", str(cfg)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr
    assert "(measured)" in first.stdout.splitlines()[0], first.stdout
    assert f"tuning cache: {tmp_path / 'cache' / 'tuning.json'}" in first.stdout
    entries = json.loads((tmp_path / "cache" / "tuning.json").read_text())["entries"]
    assert len(entries) == 1
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr
    assert "(tuning cache)" in second.stdout.splitlines()[0], second.stdout
    assert first.stdout.splitlines()[0].split()[0] == second.stdout.splitlines()[0].split()[0]
    bad = subprocess.run([sys.executable, "-m", "distjac.cli", "tune", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr


def test_a_job_after_tune_reads_the_tuned_choice(tmp_path):
    """`distjac tune` chooses with the thread count the job's workers run torch with (part
    of the key): the job that follows, on real Ray workers, finds the entry and measures
    nothing (it once stored a second entry under its workers' one thread)."""
    cfg = tmp_path / "job.yaml"
    cfg.write_text(textwrap.dedent(f"""
        model: {{factory: "distjac.models:mlp", kwargs: {{sizes: [16, 24, 16], seed: 0}}}}
        data: {{kind: synthetic, rows: 20000, shape: [16], seed: 0}}
        jacobian: {{mode: auto}}
        engine: {{device: cpu, shard_size: 4096, num_workers: 2}}
        output: {{path: {tmp_path / 'out'}}}
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DISTJAC_CACHE_DIR": str(tmp_path / "cache"),
           "DISTJAC_TUNING_CACHE": "1", "OMP_NUM_THREADS": "2"}
    tuned = subprocess.run([sys.executable, "-m", "distjac.cli", "tune", str(cfg)], capture_output=True, text=True,
                           timeout=300, env=env)
    assert tuned.returncode == 0, tuned.stderr
    entries = json.loads((tmp_path / "cache" / "tuning.json").read_text())["entries"]
    assert len(entries) == 1
    run = subprocess.run([sys.executable, "-m", "distjac.cli", "run", "--no-progress", str(cfg)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "cache" / "tuning.json").read_text())["entries"] == entries
