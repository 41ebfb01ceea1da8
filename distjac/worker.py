"""The Ray worker: loads the shipped function or model once, runs shards, returns results.

A :class:`JacobianWorker` is a plain class that :mod:`distjac.engine` turns into a Ray
actor, one per GPU or CPU slot, with ``max_concurrency`` :data:`distjac.shard.PIPELINE_DEPTH`
so that its shards' stages overlap (NOTE [overlapped stages] in :mod:`distjac.shard`).
The driver pickles what the shards run once (:func:`serialize_function`): the user's
function for ``Engine.batch_jacobian``, a :class:`distjac.shard.ModelRecipe` for a job;
it puts the bytes into Ray's object store once and passes every worker the reference. A
worker deserializes it on first use (building a job's model on its own device), keeps it
keyed by the bytes' hash (so the kernels' per-function caches also survive across calls),
and runs each :class:`distjac.shard.ShardTask` with its :class:`distjac.shard.ShardRunner`,
the same runner a job uses in process.

NOTE [shipping user code by value]
Ray pickles functions by reference when their module is importable in the driver. A
function defined in a script, a notebook, a test file or any module that is not installed
then fails on a worker with ModuleNotFoundError. :func:`serialize_function` registers
every such module with ``cloudpickle.register_pickle_by_value`` for the duration of one
``cloudpickle.dumps``, so the function, its classes and the helpers it calls travel by
value; modules of installed distributions (torch, distjac itself, the standard library)
stay by reference and must be installed on the workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import site
import socket
import sys
import sysconfig
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import cloudpickle
import torch

from . import arrow, kernels
from ._compat import pickled_by_value
from .errors import ConfigError, DistjacError
from .shard import ModelRecipe, ShardResult, ShardRunner, ShardTask, probe_model

__all__ = [
    "PROBE_ROWS",
    "PROGRESS_GROUP",
    "JacobianWorker",
    "function_key",
    "serialize_function",
]

# Rows the probe runs fn on to learn its output shape and whether it depends on x: the
# kernels' own probe size, so the kernel call inside the probe probes nothing more.
PROBE_ROWS = kernels.PROBE_ROWS
# Deserialized functions a worker keeps (most recent first); each may hold a model.
FUNCTION_CACHE_SIZE = 4
# The actor's concurrency group for progress polls: a thread of its own, beside the
# PIPELINE_DEPTH threads that run shards (NOTE [progress within a shard]).
PROGRESS_GROUP = "progress"

_PICKLE_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------
# Shipping the function (driver side)
# --------------------------------------------------------------------------------------


def _install_roots() -> tuple[str, ...]:
    roots = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(os.path.realpath(path))
    try:
        roots.update(os.path.realpath(p) for p in site.getsitepackages())
    except AttributeError:  # pragma: no cover - virtualenvs without getsitepackages
        pass
    user = getattr(site, "USER_SITE", None)
    if user:
        roots.add(os.path.realpath(user))
    return tuple(sorted(roots))


_ROOTS: tuple[str, ...] | None = None
_VERDICTS: dict[str, tuple[str | None, bool]] = {}  # module name -> (its file, importable)
_DISTRIBUTED_TOPS: frozenset[str] | None = None


def _importable_on_workers(module: Any) -> bool:
    """Whether workers can import ``module`` by name (installed, or built in)."""
    global _ROOTS, _DISTRIBUTED_TOPS
    if getattr(module, "__name__", "") == "__main__":
        return False
    path = getattr(module, "__file__", None)
    if not path or not os.path.isabs(path):
        return True  # built-in, frozen, a namespace package, or a synthetic one (torch.ops)
    if _ROOTS is None:
        roots = _install_roots()
        _ROOTS = tuple(sorted({*roots, *(os.path.abspath(r) for r in sysconfig.get_paths().values())}))
    if any(path.startswith(root + os.sep) for root in _ROOTS):
        return True
    if not os.path.exists(path):
        return True  # nothing on disk to ship
    real = os.path.realpath(path)
    if any(real.startswith(root + os.sep) for root in _ROOTS):
        return True
    # Editable installs (distjac in development): the top-level package belongs to an
    # installed distribution and the file lies inside that package.
    name = module.__name__
    top = name.partition(".")[0]
    top_file = getattr(sys.modules.get(top), "__file__", None)
    if not top_file:
        return False
    if _DISTRIBUTED_TOPS is None:
        _DISTRIBUTED_TOPS = frozenset(importlib.metadata.packages_distributions())
    return top in _DISTRIBUTED_TOPS and real.startswith(os.path.dirname(os.path.realpath(top_file)) + os.sep)


def serialize_function(fn: Callable) -> bytes:
    """``fn`` pickled so that workers without the user's code can load it.

    See NOTE [shipping user code by value].
    """
    with _PICKLE_LOCK:
        registered = []
        for name, module in list(sys.modules.items()):
            if module is None or name == "__main__" or getattr(module, "__name__", None) != name:
                continue
            path = getattr(module, "__file__", None)
            verdict = _VERDICTS.get(name)
            if verdict is None or verdict[0] != path:
                verdict = _VERDICTS[name] = (path, _importable_on_workers(module))
            if verdict[1]:
                continue
            try:
                if not pickled_by_value(module):
                    cloudpickle.register_pickle_by_value(module)
                    registered.append(module)
            except (ValueError, AttributeError):  # not importable under its own name
                continue
        try:
            return cloudpickle.dumps(fn)
        finally:
            for module in registered:
                try:
                    cloudpickle.unregister_pickle_by_value(module)
                except ValueError:  # pragma: no cover
                    pass


def function_key(blob: bytes) -> str:
    """A short content hash naming a serialized function (the workers' cache key)."""
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


# --------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------


def _running_ray():
    """The ``ray`` module when this process is connected to Ray (a Ray worker, a driver
    after ``ray.init``), else None. Never imports or starts Ray: outside Ray (the class
    used directly) ``ray.get_runtime_context()`` would start a local instance with
    Ray's defaults (all interfaces, no distjac hardening)."""
    ray = sys.modules.get("ray")
    try:
        return ray if ray is not None and ray.is_initialized() else None
    except Exception:  # pragma: no cover - a half-imported ray
        return None


def _node_id() -> str:
    ray = _running_ray()
    if ray is None:  # outside Ray (tests calling the class directly)
        return socket.gethostname()
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return socket.gethostname()


def _assigned(resource: str) -> float:
    ray = _running_ray()
    if ray is None:
        return 0.0
    try:
        return float(ray.get_runtime_context().get_assigned_resources().get(resource, 0.0))
    except Exception:
        return 0.0


class JacobianWorker:
    """Runs shards on one device; made a Ray actor by the engine (``max_concurrency``
    :data:`distjac.shard.PIPELINE_DEPTH`: its methods are called from several threads).

    Args:
        device: "auto" (the GPU Ray assigned this worker, else CPU), "cpu", "cuda" or
            "cuda:N".
        num_threads: torch threads; None matches the CPUs Ray assigned (at least 1).
            Ray sets OMP_NUM_THREADS, but a reused worker process kept torch at one
            thread, so it is set explicitly.
        max_memory: the kernels' memory budget per shard in bytes (None: their default).
    """

    def __init__(self, device: str = "auto", num_threads: int | None = None, max_memory: int | None = None):
        self.device = self._resolve_device(device)
        cpus = _assigned("CPU")
        self.threads = max(1, int(num_threads or cpus or 1))
        torch.set_num_threads(self.threads)
        self.max_memory = max_memory
        self._fns: OrderedDict[str, Callable] = OrderedDict()
        self._fns_lock = threading.Lock()
        self._recipes: dict[str, ModelRecipe] = {}
        self.pid = os.getpid()
        self.node = _node_id()
        self.runner = ShardRunner(self.device, max_memory=max_memory, node=self.node)
        self._warm_up()

    def _warm_up(self) -> None:
        """Pay a process's one-off costs while the worker starts, not on its first shard:
        the first autograd and vmap passes (~0.5 s here), the first Arrow tensor batch
        (pyarrow imports pandas, ~0.3 s) and Ray's first serialization of one (~0.15 s)."""
        for mode in ("rev", "fwd"):
            jac = kernels.batch_jacobian(lambda t: t * t, torch.ones(2, 2, device=self.device), mode=mode)
        batch = arrow.annotate(arrow.to_record_batch(range(2), jac, dtype=None), {})
        ray = _running_ray()
        if ray is not None:  # outside Ray (the class used directly): nothing to warm
            with contextlib.suppress(Exception):
                ray.put(batch)

    @staticmethod
    def _resolve_device(device: str) -> torch.device:
        if device == "auto":
            # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned: they are cuda:0...
            return torch.device("cuda:0") if _assigned("GPU") > 0 and torch.cuda.is_available() else torch.device("cpu")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"JacobianWorker(device={device!r}): this worker sees no CUDA device.")
        return dev

    def info(self) -> dict:
        """Where this worker runs: pid, node id, host, device, torch threads."""
        return {"pid": self.pid, "node": self.node, "host": socket.gethostname(),
                "device": str(self.device), "threads": torch.get_num_threads()}

    # -- what the shards run ------------------------------------------------------------

    def _function(self, key: str, box: list) -> Callable:
        """The shipped function, or the model a shipped ModelRecipe builds on this
        worker's device: deserialized (and built) once per key, then kept."""
        with self._fns_lock:
            fn = self._fns.get(key)
            if fn is not None:
                self._fns.move_to_end(key, last=False)
                return fn
            ref = box[0]  # boxed in a list so Ray does not resolve it on every call
            ray = sys.modules.get("ray")  # an ObjectRef exists only where Ray was imported
            blob = ray.get(ref) if ray is not None and isinstance(ref, ray.ObjectRef) else ref
            fn = cloudpickle.loads(blob)
            if isinstance(fn, ModelRecipe):
                self._recipes[key] = fn
                fn = fn.build(self.device)
            elif isinstance(fn, torch.nn.Module):
                fn = fn.to(self.device)
            self._fns[key] = fn
            self._fns.move_to_end(key, last=False)
            while len(self._fns) > FUNCTION_CACHE_SIZE:
                self._fns.popitem(last=True)
            return fn

    def prepare(self, key: str, box: list) -> float:
        """Load the function (build the model) ahead of its shards; returns the seconds
        it took. A failure is left for the first shard or probe to report."""
        import time

        t0 = time.perf_counter()
        with contextlib.suppress(Exception):
            self._function(key, box)
        return time.perf_counter() - t0

    # -- probe and run -------------------------------------------------------------------

    def probe(self, key: str, box: list, task: ShardTask) -> dict:
        """``Engine.batch_jacobian``'s probe: fn's output shape on the task's rows and
        whether it depends on x (see :meth:`distjac.shard.ShardRunner.probe`)."""
        torch.set_num_threads(self.threads)
        try:
            fn = self._function(key, box)
        except Exception as err:
            raise self.runner._fail(err, task, "probe") from None
        return {**self.runner.probe(fn, task), **self.info()}

    def probe_model(self, key: str, box: list, source: Any, rows: int) -> dict:
        """A job's probe: build the shipped ModelRecipe here and run it on the source's
        first ``rows`` rows (:func:`distjac.shard.probe_model`); raises ConfigError."""
        torch.set_num_threads(self.threads)
        try:
            model = self._function(key, box)
        except DistjacError:
            raise
        except Exception as err:  # a model that cannot be loaded or moved: the config's problem
            recipe = self._recipes.get(key)
            factory = recipe.spec.factory if recipe is not None else None
            raise ConfigError(f"config: model.factory={factory!r} could not be built on this worker "
                              f"({self.device}): {type(err).__name__}: {err}") from err
        recipe = self._recipes[key]
        out = probe_model(model, source, rows, self.device, factory=recipe.spec.factory, dtype=recipe.dtype)
        return {**out, **self.info()}

    def choose(self, key: str, box: list, task: ShardTask, work_rows: int | None = None):
        """A job's kernel strategy, measured here once on the task's rows for the whole job
        (:meth:`distjac.shard.ShardRunner.choose`); with where it was chosen."""
        torch.set_num_threads(self.threads)
        try:
            fn = self._function(key, box)
        except DistjacError:
            raise
        except Exception as err:
            raise self.runner._fail(err, task, "load") from None
        return self.runner.choose(fn, task, work_rows), self.info()

    def block_info(self, table: Any, column: str | None, shape: tuple | None, where: str) -> dict:
        """A Ray Data block's rows, tensor column, shape, dtype and content hash, checked
        here (:func:`distjac.ray_data._block_info`; NOTE [a Dataset as a source])."""
        from .ray_data import _block_info

        return _block_info(table, column, shape, where)

    def progress(self) -> dict[int, float]:
        """The shards running here, each with the fraction of its compute done
        (NOTE [progress within a shard] in distjac.shard). The engine calls it in the
        :data:`PROGRESS_GROUP` concurrency group, so it never waits behind a shard."""
        return self.runner.progress()

    def run(self, key: str, box: list, task: ShardTask) -> ShardResult:
        """Run one shard (:meth:`distjac.shard.ShardRunner.run`): its record batch, or for
        a job's task its written part.

        Raises:
            ShardRunError: a stage failed; carries the original exception.
        """
        torch.set_num_threads(self.threads)
        try:
            fn = self._function(key, box)
        except Exception as err:
            raise self.runner._fail(err, task, "load") from None
        return self.runner.run(fn, task)
