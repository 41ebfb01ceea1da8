"""The private (or version-dependent) Ray, torch and cloudpickle APIs distjac relies on,
one function each, with a fallback.

Nothing else in distjac names ``ray._private``, ``ray._raylet``, ``ray._common``,
``torch._C`` or ``cloudpickle.cloudpickle``. Each function says the versions it was
read from and tested with (Ray 2.60.0, torch 2.13.0, cloudpickle 3.1.3); where the
private name is gone in another version, the fallback does what those versions do, or
the least surprising thing, and never raises for the name's absence.

Ray is imported inside the functions only (this module is imported by the kernels,
which must not import Ray): see DESIGN.md, "Layers".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = [
    "gcs_cluster_id",
    "in_functorch_transform",
    "mark_batch_dynamic",
    "pickled_by_value",
    "ray_address_file",
    "ray_cluster_mode_off",
    "running_gcs_addresses",
]


# -- Ray -------------------------------------------------------------------------------


def ray_address_file() -> str:
    """The file where ``ray start`` records the latest local cluster's GCS address.

    Tested with Ray 2.60.0: ``ray._common.utils.get_ray_address_file(None)``, i.e.
    ``$RAY_TMPDIR/ray/ray_current_cluster`` (else ``$TMPDIR``, else ``/tmp``); the
    fallback builds that path itself.
    """
    try:
        from ray._common.utils import get_ray_address_file

        return get_ray_address_file(None)
    except Exception:  # pragma: no cover - another Ray version
        base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
        return os.path.join(base, "ray", "ray_current_cluster")


def running_gcs_addresses() -> list[str]:
    """GCS addresses of Ray clusters running on this machine, found from the process
    table.

    Tested with Ray 2.60.0: ``ray._private.services.find_gcs_addresses`` (what "auto"
    falls back to when no address file exists); the fallback is [] (no cluster found).
    """
    try:
        from ray._private import services

        return sorted(services.find_gcs_addresses())
    except Exception:  # pragma: no cover - another Ray version
        return []


def gcs_cluster_id(address: str) -> object | None:
    """Ask the GCS at ``address`` (``host:port``, or what Ray canonicalizes to it) for
    its cluster id; whatever the GCS client raises (a refused token, say) propagates.

    Tested with Ray 2.60.0: ``ray._private.services.canonicalize_bootstrap_address`` and
    ``ray._raylet.GcsClient(address=...).cluster_id``. Returns None without asking when
    the address cannot be canonicalized or those names are gone (the fallback: no
    preflight; ``ray.init`` reports what it finds, more slowly).
    """
    try:
        from ray._private import services
        from ray._raylet import GcsClient
    except Exception:  # pragma: no cover - another Ray version
        return None
    canonicalize = getattr(services, "canonicalize_bootstrap_address", None)
    if canonicalize is None:  # pragma: no cover - another Ray version
        return None
    gcs = canonicalize(address)
    if gcs is None:
        return None
    return GcsClient(address=gcs).cluster_id


@contextlib.contextmanager
def ray_cluster_mode_off() -> Iterator[None]:
    """Within the block, a local ``ray.init`` starts a single-machine instance: Ray binds
    its listeners to loopback where it allows (see NOTE [loopback listeners] in
    distjac.engine).

    Tested with Ray 2.60.0: sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` and
    ``ray._private.ray_constants.ENABLE_RAY_CLUSTER = False``, restoring both after. The
    fallback, where that module is gone, sets the environment variable alone.
    """
    key = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    try:
        from ray._private import ray_constants
    except Exception:  # pragma: no cover - another Ray version
        ray_constants = None
    missing = object()
    saved_env = os.environ.get(key)
    saved_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", missing)
    os.environ[key] = "0"
    if ray_constants is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if ray_constants is not None:
            if saved_flag is missing:  # pragma: no cover - another Ray version
                with contextlib.suppress(AttributeError):
                    del ray_constants.ENABLE_RAY_CLUSTER
            else:
                ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved_env


def most_free_cpus_on_a_node() -> float | None:
    """The most CPUs free on any one node of the connected cluster (a 1-CPU task needs
    one node with a whole CPU free; the cluster's sum may be spread in fractions), or
    None where Ray cannot say.

    Tested with Ray 2.60, through ``ray._private.state.available_resources_per_node()``
    (node id -> free resources).
    """
    try:
        from ray._private import state

        per_node = state.available_resources_per_node()
    except Exception:  # pragma: no cover - another Ray version
        return None
    return max((float(r.get("CPU", 0.0)) for r in per_node.values()), default=0.0)


# -- torch -----------------------------------------------------------------------------


def in_functorch_transform() -> bool:
    """Whether the caller runs inside a torch.func transform (vmap, jvp, grad, ...).

    Tested with torch 2.13.0: ``torch._C._functorch.peek_interpreter_stack() is not
    None``. torch has no public equivalent; the fallback, where the name is gone, says
    False (distjac then takes its autograd path, and a call nested in a transform fails
    with torch's own error instead of composing).
    """
    import torch

    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    if peek is None:  # pragma: no cover - another torch version
        return False
    return peek() is not None


def mark_batch_dynamic(t) -> bool:
    """Tell torch.compile that dimension 0 of ``t`` (the batch of a block) varies, so
    blocks of other sizes reuse one compiled graph instead of recompiling.

    Tested with torch 2.13.0: ``torch._dynamo.mark_dynamic(t, 0)`` (the documented way;
    torch.compiler has no public alias of it there). The fallback, where it is gone,
    marks nothing and says False: each new block size then compiles once more.
    """
    import torch

    mark = getattr(getattr(torch, "_dynamo", None), "mark_dynamic", None)
    if mark is None:  # pragma: no cover - another torch version
        return False
    mark(t, 0)
    return True


# -- cloudpickle -----------------------------------------------------------------------


def pickled_by_value(module) -> bool:
    """Whether cloudpickle already pickles ``module`` by value (it, or a package above
    it, was registered with ``register_pickle_by_value``).

    Tested with cloudpickle 3.1.3, through its public ``list_registry_pickle_by_value()``
    (the same answer as its private ``_is_registered_pickle_by_value``). The fallback,
    where neither exists, says False (distjac registers the module itself and
    unregisters it afterwards).
    """
    import cloudpickle

    registry = getattr(cloudpickle, "list_registry_pickle_by_value", None)
    if registry is None:  # pragma: no cover - another cloudpickle version
        check = getattr(getattr(cloudpickle, "cloudpickle", None), "_is_registered_pickle_by_value", None)
        return bool(check(module)) if check is not None else False
    names = registry()
    name = module.__name__
    while True:
        if name in names:
            return True
        parent = name.rpartition(".")[0]
        if not parent:
            return False
        name = parent
