"""Jobs that keep matrix-free estimates (``jacobian.estimate``, issue 13): the parts hold
each estimate and its standard error, equal to ``distjac.estimate`` in process; the plan
says which path a job takes; an exact job whose Jacobian cannot fit is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from job_helpers import tiny_spec

import distjac
from distjac.config import build_model
from distjac.errors import ConfigError
from distjac.io.sources import open_source
from distjac.jobs import job_path, prepare_job, run_job

ESTIMATE = {"frobenius": {"probes": 8}, "trace": {"probes": 4, "seed": 3}}


def _spec(tmp_path, **jacobian):
    return tiny_spec(tmp_path / "out", model={"kwargs": {"sizes": [3, 5, 3]}},
                     jacobian={"estimate": ESTIMATE, **jacobian}, engine={"shard_size": 16})


def test_an_estimate_job_writes_each_estimate_and_its_stderr(tmp_path):
    spec = _spec(tmp_path)
    report = run_job(spec)
    assert report["computed_shards"] == 4
    got = distjac.read_result(spec.output.path)
    assert list(got) == ["frobenius", "frobenius_stderr", "trace", "trace_stderr"]
    model = build_model(spec.model)
    x = open_source(spec.data).read(0, 50)
    fro = distjac.estimate(model, x, "frobenius", probes=8)
    tr = distjac.estimate(model, x, "trace", probes=4, seed=3)
    for name, est in (("frobenius", fro), ("trace", tr)):
        np.testing.assert_allclose(got[name], est.value.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[f"{name}_stderr"], est.stderr.numpy(), rtol=1e-4, atol=1e-6)
    # and near the exact norm (8 probes: a relative standard error of about 1/4 per example)
    exact = torch.linalg.matrix_norm(distjac.batch_jacobian(model, x)).numpy()
    assert np.mean(np.abs(got["frobenius"] - exact) / exact) < 0.35


def test_a_recomputed_shard_writes_the_same_estimates(tmp_path):
    import os

    spec = _spec(tmp_path)
    run_job(spec)
    first = distjac.read_result(spec.output.path)
    os.unlink(os.path.join(spec.output.path, "part-00002.arrow"))
    os.unlink(os.path.join(spec.output.path, "_SUCCESS"))
    assert run_job(spec)["computed_shards"] == 1
    again = distjac.read_result(spec.output.path)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])


def test_the_plan_says_the_path(tmp_path):
    job = prepare_job(_spec(tmp_path))
    assert job.path["path"] == "matrix-free" and job.path["products_per_example"] == {"frobenius": 8, "trace": 4}
    assert "path" in str(job) and "matrix-free" in str(job)
    exact = prepare_job(tiny_spec(tmp_path / "b", jacobian={"reduce": ["frobenius"]}))
    assert exact.path["path"] == "exact" and "reduced (frobenius)" in exact.path["why"]


def test_an_exact_job_whose_jacobian_cannot_fit_is_refused():
    spec = distjac.JobSpec.from_dict({"model": {"factory": "distjac.models:cube"}, "data": {"rows": 4, "shape": [2]},
                                      "jacobian": {"reduce": ["frobenius"]}, "output": {"path": "unused"}})
    with pytest.raises(ConfigError, match=r"1,000 x 150,528 .* cannot be computed exactly.*jacobian.estimate"):
        job_path(spec, (1000,), (3, 224, 224), 4, budget=64 << 20)
    assert job_path(spec, (10,), (3,), 4, budget=64 << 20)["path"] == "exact"


@pytest.mark.parametrize(("jacobian", "match"), [
    ({"estimate": {"frobenius": {}}, "reduce": ["trace"]}, "both set"),
    ({"estimate": {"nuclear": {}}}, "unknown estimate 'nuclear'"),
    ({"estimate": {"frobenius": {"probes": 0}}}, "probes"),
])
def test_bad_estimate_configs_are_refused_before_anything_runs(tmp_path, jacobian, match):
    with pytest.raises(ConfigError, match=match):
        tiny_spec(tmp_path / "out", jacobian=jacobian)
    assert not (tmp_path / "out").exists()


def test_trace_of_a_non_square_jacobian_is_refused_at_prepare(tmp_path):
    spec = tiny_spec(tmp_path / "out", jacobian={"estimate": {"trace": {}}})  # mlp 3 -> 2
    with pytest.raises(ConfigError, match="trace"):
        prepare_job(spec)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------ jacobian.structure: diagonal


def test_a_diagonal_job_keeps_the_diagonal_alone(tmp_path):
    spec = tiny_spec(tmp_path / "out", model={"factory": "distjac.models:cube", "kwargs": {}},
                     jacobian={"structure": "diagonal"})
    run_job(spec)
    got = distjac.read_result(spec.output.path)
    x = open_source(spec.data).read(0, 50)
    assert got.shape == (50, 3)
    dense = distjac.batch_jacobian(lambda t: t * t * t, x, mode="rev")
    np.testing.assert_allclose(got, torch.diagonal(dense, dim1=1, dim2=2).numpy(), rtol=1e-6)
    np.testing.assert_allclose(got, (3 * x * x).numpy(), rtol=1e-6)


def test_a_diagonal_job_of_a_model_that_is_not_elementwise_fails_clearly(tmp_path):
    spec = tiny_spec(tmp_path / "out", model={"kwargs": {"sizes": [3, 5, 3]}}, jacobian={"structure": "diagonal"})
    with pytest.raises(distjac.ShardError, match="elementwise"):
        run_job(spec)
    spec = tiny_spec(tmp_path / "b", jacobian={"structure": "diagonal"})  # mlp 3 -> 2: not square
    with pytest.raises(ConfigError, match="not square"):
        prepare_job(spec)
    with pytest.raises(ConfigError, match="cannot be combined"):
        tiny_spec(tmp_path / "c", jacobian={"structure": "diagonal", "reduce": ["trace"]})


def test_plan_without_probe_says_the_path(tmp_path, capsys):
    import yaml
    from job_helpers import tiny_dict

    from distjac.cli import main

    for jacobian, want in (({"estimate": {"frobenius": {}}}, "matrix-free: jacobian.estimate (frobenius)"),
                           ({"reduce": ["trace"]}, "exact: each example's Jacobian is built and reduced (trace)")):
        cfg = tmp_path / "job.yaml"
        cfg.write_text(yaml.safe_dump(tiny_dict(tmp_path / "out", jacobian=jacobian)))
        assert main(["plan", str(cfg)]) == 0
        assert want in capsys.readouterr().out
