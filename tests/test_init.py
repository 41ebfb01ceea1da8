"""distjac's public surface: what ``import distjac`` promises (DESIGN.md, Public API)."""

from __future__ import annotations

import inspect
import types

import pytest
import torch

import distjac
from distjac import errors


def test_all_names_exist_and_nothing_else_is_exported():
    assert sorted(distjac.__all__) == sorted(set(distjac.__all__))
    for name in distjac.__all__:
        assert hasattr(distjac, name), name
    # Every public attribute that is not a submodule is in __all__.
    stray = {name for name, value in vars(distjac).items()
             if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert stray == set(distjac.__all__) - {"__version__"}


def test_the_whole_error_tree_is_exported():
    for name in errors.__all__:
        assert getattr(distjac, name) is getattr(errors, name)
        assert name in distjac.__all__
    assert issubclass(distjac.OutputLockedError, distjac.OutputExistsError)
    assert issubclass(distjac.SourceDtypeError, distjac.JobInputError)
    assert issubclass(distjac.ResultError, distjac.DistjacError)


@pytest.mark.parametrize("func", [distjac.batch_jacobian, distjac.Engine.batch_jacobian],
                         ids=["distjac.batch_jacobian", "Engine.batch_jacobian"])
def test_everything_after_x_is_keyword_only(func):
    params = list(inspect.signature(func).parameters.values())
    names = [p.name for p in params]
    after_x = params[names.index("x") + 1:]
    assert after_x and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in after_x)


def test_positional_mode_is_a_type_error():
    with pytest.raises(TypeError):
        distjac.batch_jacobian(lambda t: t * t, torch.ones(2, 2), "rev")
    jac = distjac.batch_jacobian(lambda t: t * t, torch.ones(2, 2), mode="rev")
    assert jac.shape == (2, 2, 2)


def test_each_constant_and_check_has_one_source():
    import inspect as _inspect

    from distjac import _proc, arrow, config, engine, jobs, kernels, options, plan, reduce, shard, worker
    from distjac.bench import common

    assert config.REDUCTIONS is reduce.REDUCTIONS
    assert config.STORAGE_DTYPES is arrow.STORAGE_DTYPES == ("float16", "float32", "float64")
    assert config.DEVICES is engine.DEVICES is options.DEVICES
    assert config.is_int is options.is_int
    assert worker.PROBE_ROWS == kernels.PROBE_ROWS and engine.PROBE_ROWS == kernels.PROBE_ROWS
    assert jobs.JOB_PROBE_ROWS < kernels.PROBE_ROWS  # on purpose: see its comment
    assert kernels.format_bytes is engine.format_bytes is plan.format_bytes
    assert common.proc_bytes is kernels.proc_bytes is shard.proc_bytes is _proc.proc_bytes
    default = plan.DEFAULT_PARALLEL_ITERATIONS
    assert config.EngineSpec().parallel_iterations == default
    assert _inspect.signature(plan.make_plan).parameters["parallel_iterations"].default == default
    assert plan.ShardPlan(rows=1, in_shape=(1,), out_shape=(1,), shard_size=1).parallel_iterations == default


@pytest.mark.parametrize(("value", "ok"), [(1, True), (0, False), (True, False), (2.0, False), (None, True)])
def test_one_integer_check(value, ok):
    from distjac.options import check_int

    if ok:
        assert check_int(value, "n", "f()") == value
    else:
        with pytest.raises(distjac.OptionError, match=r"f\(\): n=.* is not valid; use None or an integer >= 1"):
            check_int(value, "n", "f()")
