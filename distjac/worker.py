"""The Ray worker: builds the user's function once, computes shards, returns Arrow.

A :class:`JacobianWorker` is a plain class that :mod:`distjac.engine` turns into a Ray
actor, one per GPU or CPU slot. Per call of ``Engine.batch_jacobian`` the driver pickles
the function once (:func:`serialize_function`), puts the bytes into Ray's object store
once, and passes every worker the reference; a worker deserializes it on first use, moves
it to its device and keeps it (keyed by the bytes' hash, so the kernels' per-function
caches also survive across calls). A shard then costs one actor call: its input rows in,
one Arrow record batch (``row`` + ``jacobian``) out, computed by :mod:`distjac.kernels` —
the same kernels as the in-process API.

NOTE [shipping user code by value]
Ray pickles functions by reference when their module is importable in the driver. A
function defined in a script, a notebook, a test file or any module that is not installed
then fails on a worker with ModuleNotFoundError. :func:`serialize_function` registers
every such module with ``cloudpickle.register_pickle_by_value`` for the duration of one
``cloudpickle.dumps``, so the function, its classes and the helpers it calls travel by
value; modules of installed distributions (torch, distjac itself, the standard library)
stay by reference and must be installed on the workers.

NOTE [the seam for jobs (issue 4)]
A shard is described by a :class:`ShardTask`. For the in-memory path the driver ships the
shard's input rows in ``rows``; a job instead sets ``source``, an object with
``read(start, stop) -> torch.Tensor`` that the worker calls itself, so the driver sends
no data. ``compute(..., sink=None)`` returns the record batch; a job passes a ``sink``
with ``write(batch, task) -> dict`` that writes the part file on the worker and returns
a small receipt instead. Both hooks are plain duck-typed objects pickled by value.
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
import time
import traceback
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle
import numpy as np
import torch

from . import arrow, kernels
from ._compat import pickled_by_value
from ._proc import proc_bytes
from .errors import DistjacError
from .options import check_batched, check_floating, check_same_batch, check_tensor

__all__ = [
    "PROBE_ROWS",
    "JacobianWorker",
    "RemoteShardError",
    "ShardTask",
    "from_wire",
    "serialize_function",
    "to_wire",
]

# Rows the probe runs fn on to learn its output shape and whether it depends on x: the
# kernels' own probe size, so the kernel call inside the probe probes nothing more.
PROBE_ROWS = kernels.PROBE_ROWS
# Deserialized functions a worker keeps (most recent first); each may hold a model.
FUNCTION_CACHE_SIZE = 4
# Tensors numpy cannot hold travel as the bits of a same-width integer.
_BIT_VIEWS = {torch.bfloat16: torch.int16}

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
# Tensors on the wire: numpy arrays (zero-copy through Ray's object store)
# --------------------------------------------------------------------------------------


def to_wire(x: torch.Tensor) -> np.ndarray:
    """A host numpy view of ``x`` (contiguous, detached) that Ray ships without pickling."""
    x = x.detach().cpu().contiguous()
    bits = _BIT_VIEWS.get(x.dtype)
    return (x.view(bits) if bits is not None else x).numpy()


def from_wire(a: np.ndarray, dtype: str, device: torch.device) -> torch.Tensor:
    """The tensor ``to_wire`` shipped, copied once onto ``device`` (arrays from the
    object store are read-only, and fn may write into its input)."""
    t = torch.from_numpy(np.array(a, copy=True))
    want = getattr(torch, dtype)
    if want in _BIT_VIEWS:
        t = t.view(want)
    return t.to(device, non_blocking=False)


@dataclass(frozen=True)
class ShardTask:
    """One shard as a worker sees it: rows [start, stop) and where they come from.

    Attributes:
        shard: the shard's index in the plan.
        start: first row (inclusive).
        stop: end of the range (exclusive).
        dtype: torch dtype name of the input, e.g. "float32".
        rows: the shard's input rows from :func:`to_wire` (in-memory path), or None.
        source: for jobs, an object whose ``read(start, stop)`` returns the rows as a
            tensor (see NOTE [the seam for jobs (issue 4)]).
    """

    shard: int
    start: int
    stop: int
    dtype: str = "float32"
    rows: np.ndarray | None = None
    source: Any = None


# --------------------------------------------------------------------------------------
# Failures travel back as one exception carrying the original
# --------------------------------------------------------------------------------------


class RemoteShardError(Exception):
    """Raised by a worker when fn (or the kernel) fails on a shard.

    Carries the original exception, the node and process it ran in, and its formatted
    traceback; the engine turns it into one :class:`distjac.ShardError`. The original is
    pickled with the same cloudpickle that shipped fn, so an exception class defined in
    the user's (uninstalled) module comes back as that very class on the driver, not as
    a look-alike copy (cloudpickle tracks classes it shipped by value).
    """

    def __init__(self, error: BaseException | bytes, shard: int, start: int, stop: int, node: str,
                 pid: int, tb: str, phase: str = "shard"):
        self._blob = error if isinstance(error, bytes) else _dump_error(error)
        self._error: BaseException | None = None if isinstance(error, bytes) else error
        super().__init__(f"shard {shard} (rows [{start}, {stop})) failed on {node}")
        self.shard, self.start, self.stop = shard, start, stop
        self.node, self.pid, self.tb, self.phase = node, pid, tb, phase

    @property
    def error(self) -> BaseException:
        """The original exception (or a RuntimeError with its text if it cannot travel)."""
        if self._error is None:
            try:
                self._error = cloudpickle.loads(self._blob)
            except Exception as err:  # a class the driver cannot rebuild
                self._error = RuntimeError(f"(the worker's exception could not be unpickled: {err})")
        return self._error

    def __reduce__(self):
        return (RemoteShardError, (self._blob, self.shard, self.start, self.stop, self.node,
                                     self.pid, self.tb, self.phase))


def values_to_host(values: dict[str, Any]) -> dict[str, Any]:
    """``to_record_batch``'s values (a ``jacobian`` tensor or a dict of ``reductions``)
    on the host: one device-side copy at most and one transfer per tensor off a GPU;
    CPU tensors as they are."""
    def host(t: torch.Tensor) -> torch.Tensor:
        return t if t.device.type == "cpu" else t.contiguous().cpu()

    return {k: ({n: host(t) for n, t in v.items()} if isinstance(v, dict) else host(v)) for k, v in values.items()}


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far, in bytes.

    On Linux, ``VmHWM`` of /proc/self/status: the peak of this program's own memory map.
    Not ``getrusage``'s ``ru_maxrss``, which Linux carries over from the parent at fork
    and exec (a worker spawned by a 2 GiB process would report at least 2 GiB). Elsewhere
    ``ru_maxrss`` (bytes on macOS, KiB on other systems). Either is the peak since the
    process started: a long-lived process (a notebook, a worker) reports earlier work too."""
    peak = proc_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource  # Unix only; imported here so that the module imports anywhere

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _dump_error(err: BaseException) -> bytes:
    try:
        blob = cloudpickle.dumps(err)
        cloudpickle.loads(blob)
        return blob
    except Exception:
        return cloudpickle.dumps(RuntimeError(f"{type(err).__name__}: {err}"))


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
    """Computes shards' Jacobians on one device; made a Ray actor by the engine.

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
        self.pid = os.getpid()
        self.node = _node_id()
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

    # -- the function ------------------------------------------------------------------

    def _function(self, key: str, box: list) -> Callable:
        fn = self._fns.get(key)
        if fn is not None:
            self._fns.move_to_end(key, last=False)
            return fn
        ref = box[0]  # boxed in a list so Ray does not resolve it on every call
        ray = sys.modules.get("ray")  # an ObjectRef exists only where Ray was imported
        blob = ray.get(ref) if ray is not None and isinstance(ref, ray.ObjectRef) else ref
        fn = cloudpickle.loads(blob)
        if isinstance(fn, torch.nn.Module):
            fn = fn.to(self.device)
        self._fns[key] = fn
        self._fns.move_to_end(key, last=False)
        while len(self._fns) > FUNCTION_CACHE_SIZE:
            self._fns.popitem(last=True)
        return fn

    def prepare(self, key: str, box: list) -> float:
        """Load the function ahead of its shards; returns the seconds it took."""
        t0 = time.perf_counter()
        self._function(key, box)
        return time.perf_counter() - t0

    def _fail(self, err: BaseException, task: ShardTask, phase: str) -> RemoteShardError:
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        return RemoteShardError(err, task.shard, task.start, task.stop, self.node, self.pid, tb, phase)

    def _load(self, task: ShardTask) -> torch.Tensor:
        if task.rows is not None:
            return from_wire(task.rows, task.dtype, self.device)
        if task.source is not None:
            return task.source.read(task.start, task.stop).to(self.device)
        raise ValueError(f"shard {task.shard}: the task carries neither rows nor a source.")

    # -- probe and compute -------------------------------------------------------------

    def probe(self, key: str, box: list, task: ShardTask, options: dict) -> dict:
        """Run fn on a few rows: its output shape and whether it depends on x.

        Output checks raise the core's errors (ShapeError, DtypeError, TypeError) as they
        are; anything fn itself raises comes back as a RemoteShardError.
        """
        call = options.get("call", "batch_jacobian(fn, x)")
        try:
            fn = self._function(key, box)
            x = self._load(task)
            with torch.no_grad():
                y = fn(x)
        except Exception as err:
            raise self._fail(err, task, "probe") from None
        check_tensor(y, "fn(x) (the target)", call)
        check_batched(y, "fn(x) (the target)", call)
        check_same_batch(y, x, call)
        check_floating(y, "fn(x) (the target)", call)
        connected = True
        if x.shape[0] > 0:
            try:
                jac = kernels.batch_jacobian(
                    fn, x, mode=options["mode"], parallel_iterations=options["chunk_size"],
                    experimental_use_pfor=options["use_pfor"], unconnected_gradients="none",
                    max_memory=self.max_memory,
                )
            except DistjacError:
                raise
            except Exception as err:
                raise self._fail(err, task, "probe") from None
            connected = jac is not None
        return {"out_shape": list(y.shape[1:]), "connected": connected, **self.info()}

    def compute(self, key: str, box: list, task: ShardTask, options: dict, sink: Any = None):
        """The Jacobian of one shard as an annotated Arrow record batch.

        Returns ``arrow.to_record_batch(range(start, stop), jacobian)`` with the shard's
        provenance in its metadata (:func:`distjac.arrow.annotation`), or, when a
        ``sink`` is given, what ``sink.write(batch, task)`` returns.

        Raises:
            RemoteShardError: fn or the kernel failed; carries the original.
        """
        t0 = time.perf_counter()
        try:
            torch.set_num_threads(self.threads)
            fn = self._function(key, box)
            x = self._load(task)
            t1 = time.perf_counter()
            jac = kernels.batch_jacobian(
                fn, x, mode=options["mode"], parallel_iterations=options["chunk_size"],
                experimental_use_pfor=options["use_pfor"], unconnected_gradients="zero",
                max_memory=self.max_memory,
            )
            # A sink that reduces (a job's PartSink) does it here, on the worker's device,
            # so only the reductions cross to the host and into Arrow.
            values = sink.prepare(jac) if hasattr(sink, "prepare") else {"jacobian": jac}
            del jac
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t2 = time.perf_counter()
            values = values_to_host(values)
            t3 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                batch = arrow.to_record_batch(range(task.start, task.stop), dtype=None, **values)
            del values
            t4 = time.perf_counter()
        except Exception as err:
            raise self._fail(err, task, "shard") from None
        batch = arrow.annotate(batch, {
            "shard": task.shard, "start": task.start, "stop": task.stop, "node": self.node,
            "pid": self.pid, "device": str(self.device), "load_s": t1 - t0,
            "compute_s": t2 - t1, "to_host_s": t3 - t2 if self.device.type != "cpu" else 0.0, "arrow_s": t4 - t3,
            "peak_rss_bytes": peak_rss_bytes(),
        })
        if sink is not None:
            return sink.write(batch, task)
        return batch
