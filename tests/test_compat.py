"""distjac._compat: the one home of private Ray, torch and cloudpickle APIs."""

from __future__ import annotations

import os
import pathlib
import re
import sys
import types

import cloudpickle
import torch

import distjac
from distjac import _compat

PRIVATE = re.compile(r"ray\._private|ray\._raylet|ray\._common|torch\._C\b|_functorch\.|cloudpickle\.cloudpickle"
                     r"|_is_registered_pickle_by_value")


def test_no_private_api_outside_compat():
    root = pathlib.Path(distjac.__file__).parent
    offenders = [f"{p.relative_to(root)}:{i}" for p in sorted(root.rglob("*.py")) if p.name != "_compat.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if PRIVATE.search(line)]
    assert offenders == []


def test_every_helper_names_the_versions_it_was_tested_with():
    for name in _compat.__all__:
        doc = getattr(_compat, name).__doc__
        assert "Tested with" in doc and re.search(r"\d+\.\d+\.\d+", doc), name


def test_pickled_by_value_follows_cloudpickle_registry():
    pkg = types.ModuleType("compat_probe_pkg")
    sub = types.ModuleType("compat_probe_pkg.sub")
    sys.modules.update({pkg.__name__: pkg, sub.__name__: sub})
    try:
        assert not _compat.pickled_by_value(sub)
        cloudpickle.register_pickle_by_value(pkg)
        try:
            assert _compat.pickled_by_value(pkg) and _compat.pickled_by_value(sub)  # a package covers its modules
        finally:
            cloudpickle.unregister_pickle_by_value(pkg)
        assert not _compat.pickled_by_value(pkg)
    finally:
        for name in (pkg.__name__, sub.__name__):
            sys.modules.pop(name, None)


def test_in_functorch_transform():
    assert not _compat.in_functorch_transform()
    seen = []

    def f(t):
        seen.append(_compat.in_functorch_transform())
        return t * 2

    torch.func.vmap(f)(torch.ones(3, 2))
    assert seen == [True]


def test_ray_cluster_mode_off_restores_the_environment():
    key = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    before = os.environ.get(key)
    with _compat.ray_cluster_mode_off():
        assert os.environ[key] == "0"
    assert os.environ.get(key) == before
