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
