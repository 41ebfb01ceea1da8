"""One shard, from its rows to its result: the one runner every path uses.

A shard is a typed :class:`ShardTask`: its row range, where its rows come from (rows
shipped with it, or a source descriptor the runner reads itself), the kernel's options
(:class:`KernelOptions`) and, for a job, its part target (:class:`PartTarget`). A
:class:`ShardRunner` runs it on one device in five stages and returns one
:class:`ShardResult` with one :class:`ShardTiming`::

    read      rows [start, stop) -> the device, in the compute dtype
    compute   the kernel; a job's reductions on the device; cast to the storage dtype
    to_host   one copy off the device (a pinned buffer, on its own stream, on a GPU)
    arrow     one record batch (``row`` + ``jacobian`` or one column per reduction)
    write     a job's part file (io/sink.write_part: temporary, fsync, rename)

The Ray worker (:class:`distjac.worker.JacobianWorker`) and the in-process path of a job
(:func:`local_executor`, ``engine.num_workers: 0``) both call :meth:`ShardRunner.run`;
``Engine.batch_jacobian`` gathers the batches of tasks without a target. A failure in
any stage is one :class:`ShardRunError` carrying the original exception, turned into one
:class:`distjac.ShardError` by :meth:`ShardRunError.shard_error` on both paths.

NOTE [overlapped stages]
Each stage holds its own lock, so a runner works on up to :data:`PIPELINE_DEPTH` shards
at once, each in a different stage: while shard n computes, shard n+1 is read and shard
n-1 is copied, converted and written. Callers give it shards from that many threads (a
Ray actor with ``max_concurrency=PIPELINE_DEPTH``; a thread pool in process); a shard
moves through its stages in order and waits for the next stage's lock, so at most one
shard is in each stage and memory stays at a few shards. Torch kernels, Arrow's
serialization, hashing and file writes release the GIL, so the stages overlap in one
process. A failure fails that shard alone (its locks are released as the exception
leaves each ``with``); a part is written under a temporary name and renamed only when
complete, so nothing that looks finished is left behind. Each timing excludes the wait
for a stage's lock (``queued_s`` is that wait), so a stage's share of the runner's wall
time is its busy share: the bottleneck is the stage near 1.

NOTE [progress within a shard]
:meth:`ShardRunner.progress` says how far each running shard's compute stage is (0 to
1), from the kernel's reports (NOTE [progress within a call] in distjac.kernels: after
each vectorized pass of each block; a matrix-free estimate and a compiled block report
only when they end). The Ray worker answers it in its own concurrency group, so a poll
never queues behind the stages; the engine and :func:`local_executor` poll it about once
a second while a progress display is on, and report the sum of ``fraction x rows`` over
the shards in flight, which moves the bar between finished shards. It is a display: a
shard counts as done only when its result (or part) is in.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import traceback
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from typing import Any

import cloudpickle
import numpy as np
import torch

from . import arrow, kernels
from ._proc import proc_bytes
from .errors import ConfigError, DistjacError, ShardError
from .options import check_batched, check_floating, check_same_batch, check_tensor
from .plan import PIPELINE_DEPTH

# Seconds between polls of the runners' progress while a progress display is on
# (NOTE [progress within a shard]).
PROGRESS_POLL_S = 1.0

__all__ = [
    "PIPELINE_DEPTH",
    "PROGRESS_POLL_S",
    "STAGES",
    "KernelOptions",
    "ModelRecipe",
    "PartTarget",
    "ShardRunError",
    "ShardResult",
    "ShardRunner",
    "ShardTask",
    "ShardTiming",
    "from_wire",
    "local_executor",
    "rows_in_flight",
    "peak_rss_bytes",
    "to_wire",
]

# The stages of a shard, in order; ShardTiming has one field each.
STAGES = ("read_s", "compute_s", "to_host_s", "arrow_s", "write_s")
# Models a process keeps built (keyed by recipe and device): a worker runs one job's
# shards, so one would do; two let a driver alternate between jobs.
MODEL_CACHE_SIZE = 2
# Tensors numpy cannot hold travel as the bits of a same-width integer.
_BIT_VIEWS = {torch.bfloat16: torch.int16}


# --------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelOptions:
    """How the kernel computes a shard (``distjac.kernels.batch_jacobian``'s options).

    Attributes:
        mode: "rev", "fwd" or "auto".
        chunk_size: Jacobian rows per vectorized pass (the kernel's parallel_iterations).
        use_pfor: vectorize (True) or loop over rows (False).
        max_memory: the kernel's memory budget in bytes; None: the runner's default.
        call: the API call the shard belongs to, for error messages.
        strategy: a ``distjac.kernels.Strategy`` chosen once for the whole job (by one
            worker, :meth:`ShardRunner.choose`) and shipped with every task, so that no
            other runner measures again; None: the kernel chooses (and caches) itself.
        structure: None (the dense Jacobian) or "diagonal" (an elementwise fn's
            diagonal, (B, *in); ``batch_jacobian(..., structure=)``).
    """

    mode: str = "auto"
    chunk_size: int | None = None
    use_pfor: bool = True
    max_memory: int | None = None
    call: str = "batch_jacobian(fn, x)"
    strategy: Any = None
    structure: str | None = None


@dataclass(frozen=True)
class PartTarget:
    """Where a job's shard is stored: a part file of the output directory.

    Attributes:
        out_dir: the output directory (absolute; shared by every worker on a cluster).
        format: "arrow" or "parquet".
        spec_hash: the job's spec hash, recorded in each part (checked on resume).
        dtype: the storage dtype of the values ("float16", "float32", "float64").
        reductions: the job's per-example reductions; empty: the Jacobian itself.
        in_ndim: rank of one example (splits a Jacobian's out and in dimensions).
        rows: the job's rows (for the part's metadata); -1: unknown.
        keep_columns: source columns carried into the part beside ``row``
            (``output.keep_columns``), read by the runner with the shard's rows.
        estimate: ``jacobian.estimate`` checked (``{name: options}``): the part holds
            each estimate and its standard error instead of the Jacobian, which is never
            built (distjac.estimates); None: the Jacobian or its reductions.
    """

    out_dir: str
    format: str
    spec_hash: str
    dtype: str = "float32"
    reductions: tuple[str, ...] = ()
    in_ndim: int = 1
    rows: int = -1
    keep_columns: tuple[str, ...] = ()
    estimate: dict | None = None

    def metadata(self) -> dict[str, str]:
        """What a part's schema records of its job besides its shard: the spec hash, and
        the job's rows and input rank, from which ``distjac repair`` rebuilds a manifest."""
        meta = {"spec_hash": self.spec_hash, "in_ndim": str(self.in_ndim)}
        if self.rows is not None and self.rows >= 0:
            meta["rows"] = str(self.rows)
        return meta


@dataclass(frozen=True)
class ShardTask:
    """One shard as a runner sees it; small and picklable.

    Attributes:
        shard: the shard's index in the plan.
        start, stop: its row range [start, stop).
        dtype: the compute dtype the rows are cast to on the device, e.g. "float32".
        rows: the shard's rows from :func:`to_wire` (in-memory inputs), or None.
        source: a source descriptor (:mod:`distjac.io.sources`) the runner reads rows
            [start, stop) from itself, so the driver sends no data; or None.
        options: the kernel's options.
        target: a job's part target; None returns the record batch (a gather).
    """

    shard: int
    start: int
    stop: int
    dtype: str = "float32"
    rows: np.ndarray | None = None
    source: Any = None
    options: KernelOptions = field(default_factory=KernelOptions)
    target: PartTarget | None = None

    def read(self, device: torch.device) -> torch.Tensor:
        """The shard's rows on ``device`` in the compute dtype (a copy: fn may write into
        its input, and arrays from Ray's object store are read-only)."""
        want = getattr(torch, self.dtype)
        if self.rows is not None:
            return from_wire(self.rows, self.dtype, device)
        if self.source is not None:
            x = self.source.read(self.start, self.stop)
            # File sources read fresh arrays; a tensor source's rows are a view of the
            # caller's tensor, copied so that neither fn nor a retry can change them.
            return x.to(device=device, dtype=want, copy=getattr(self.source, "kind", None) == "tensor")
        raise ValueError(f"shard {self.shard}: the task carries neither rows nor a source.")


def to_wire(x: torch.Tensor) -> np.ndarray:
    """A host numpy view of ``x`` (contiguous, detached) that Ray ships without pickling."""
    x = x.detach().cpu().contiguous()
    bits = _BIT_VIEWS.get(x.dtype)
    return (x.view(bits) if bits is not None else x).numpy()


def from_wire(a: np.ndarray, dtype: str, device: torch.device) -> torch.Tensor:
    """The tensor ``to_wire`` shipped, copied once onto ``device``."""
    t = torch.from_numpy(np.array(a, copy=True))
    want = getattr(torch, dtype)
    if want in _BIT_VIEWS:
        return t.view(want).to(device)
    return t.to(device=device, dtype=want)


# --------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardTiming:
    """A shard's seconds in each stage on its runner (:data:`STAGES`), the seconds it
    waited for a stage's lock behind other shards (``queued_s``), when it started and
    ended (``time.time()`` on the runner's machine) and the process's peak memory."""

    read_s: float = 0.0
    compute_s: float = 0.0
    to_host_s: float = 0.0
    arrow_s: float = 0.0
    write_s: float = 0.0
    queued_s: float = 0.0
    started: float = 0.0
    ended: float = 0.0
    peak_rss_bytes: int = 0

    @property
    def busy_s(self) -> float:
        """The runner's busy seconds on this shard: the sum of its stages."""
        return self.read_s + self.compute_s + self.to_host_s + self.arrow_s + self.write_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardTiming:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class ShardResult:
    """What a runner returns for one shard.

    Attributes:
        shard, start, stop: the shard.
        node, pid, device: where it ran.
        timing: its :class:`ShardTiming`.
        batch: the record batch, for a task without a target (else None).
        part: the written part's :class:`distjac.io.sink.PartInfo`, for a job's task.
        wait_s: set by the engine's driver: the seconds from submission to receipt less
            the runner's own (queueing in Ray and transfer); None in process.
        retries: set by the engine's driver: shards resubmitted so far in the run.
        strategy: the shipped kernel strategy the shard ran (``KernelOptions.strategy``),
            or None where the kernel chose for itself.
    """

    shard: int
    start: int
    stop: int
    node: str
    pid: int
    device: str
    timing: ShardTiming
    batch: Any = None
    part: Any = None
    wait_s: float | None = None
    retries: int = 0
    strategy: str | None = None
    connected: bool = True


class ShardRunError(Exception):
    """A shard failed in a runner: the original exception, where, in which stage.

    It travels from a Ray worker to the driver pickled; the original is pickled with the
    cloudpickle that shipped fn, so an exception class defined in the user's (uninstalled)
    module comes back as that very class. :meth:`shard_error` is the one
    :class:`distjac.ShardError` both paths raise.
    """

    def __init__(self, error: BaseException | bytes, shard: int, start: int, stop: int, node: str,
                 pid: int, tb: str, stage: str = "compute"):
        self._blob = error if isinstance(error, bytes) else _dump_error(error)
        self._error: BaseException | None = None if isinstance(error, bytes) else error
        super().__init__(f"shard {shard} (rows [{start}, {stop})) failed on {node} in its {stage} stage")
        self.shard, self.start, self.stop = shard, start, stop
        self.node, self.pid, self.tb, self.stage = node, pid, tb, stage

    @property
    def error(self) -> BaseException:
        """The original exception (or a RuntimeError with its text if it cannot travel)."""
        if self._error is None:
            try:
                self._error = cloudpickle.loads(self._blob)
            except Exception as err:  # a class the driver cannot rebuild
                self._error = RuntimeError(f"(the worker's exception could not be unpickled: {err})")
        return self._error

    def shard_error(self, call: str) -> ShardError:
        """The ShardError the caller sees: names the call, the shard, its rows, the node
        and the stage, chained from the original (which carries the runner's traceback
        as a note). Raise it ``from`` its ``__cause__``."""
        original = self.error
        if hasattr(original, "add_note") and self.tb and not getattr(original, "_distjac_noted", False):
            original.add_note(f"Traceback on the worker (node {self.node}, pid {self.pid}):\n{self.tb}")
            with contextlib.suppress(Exception):
                original._distjac_noted = True
        where = {"probe": " while probing fn's output shape", "read": " reading its rows",
                 "load": " loading the function or building the model",
                 "write": " writing its part", "to_host": " copying it to the host",
                 "arrow": " converting it to Arrow"}.get(self.stage, "")
        advice = {
            "read": "check the data source (the file or column these rows come from)",
            "write": "check the output directory (space, permissions, the file system)",
            "load": "check the model's factory, its weights and what it imports on the workers",
        }.get(self.stage, "fix fn for these rows (it is called on blocks of rows, never on one example)")
        err = ShardError(
            f"{call}: shard {self.shard} (rows [{self.start}, {self.stop})) failed on node "
            f"{self.node} (pid {self.pid}){where}: {type(original).__name__}: {original}. "
            f"The original exception is chained below with the worker's traceback; {advice} and run again.",
            shard=self.shard, start=self.start, stop=self.stop, node=self.node,
        )
        err.remote_traceback = self.tb
        err.__cause__ = original
        return err

    def __reduce__(self):
        return (ShardRunError, (self._blob, self.shard, self.start, self.stop, self.node,
                               self.pid, self.tb, self.stage))


def _dump_error(err: BaseException) -> bytes:
    try:
        blob = cloudpickle.dumps(err)
        cloudpickle.loads(blob)
        return blob
    except Exception:
        return cloudpickle.dumps(RuntimeError(f"{type(err).__name__}: {err}"))


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


# --------------------------------------------------------------------------------------
# A job's model: built where it runs, once per process
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRecipe:
    """A job's model as shipped to workers: its spec and its factory, resolved (imported)
    by the driver, never called there. A runner builds it on its own device once per
    process (:meth:`build`); the driver sends it to each worker once, by value where its
    module is not installed (NOTE [shipping user code by value] in distjac.worker).

    NOTE [the driver never runs the model]
    ``Engine.run`` imports the job's factory and pickles it with the model spec; it
    never calls it: a model may be too large for the driver, need the workers' GPUs, or
    read files only they have. The workers build it (``JacobianWorker._function``, one
    build per process and recipe, under a lock: the probe, the preparation and the
    shards' threads share it), worker 0 probes it for the plan's output shape and
    compute dtype (``probe_model``). In process (``engine.num_workers: 0``, ``distjac plan
    --probe``) the process that runs the shards builds it once and probes that model.

    Attributes:
        spec: the job's ``model`` section (distjac.config.ModelSpec).
        factory: the resolved factory (``distjac.config.resolve_factory``), or None to
            resolve it where it is built.
        dtype: the compute dtype the model is cast to; None keeps its own.
    """

    spec: Any
    factory: Any = None
    dtype: str | None = None

    def key(self, device: torch.device) -> tuple:
        """Names the model :meth:`build` makes on ``device`` (this process's cache key)."""
        from .config import model_cache_key

        f = self.factory
        where = (getattr(f, "__module__", None), getattr(f, "__qualname__", None)) if f is not None else None
        return (*model_cache_key(self.spec), where, self.dtype, str(device))

    def build(self, device: torch.device) -> Callable:
        """The model on ``device`` (eval mode, parameters frozen), from this process's cache."""
        from .config import build_model

        key = self.key(device)
        with _MODELS_LOCK:
            model = _MODELS.get(key)
            if model is None:
                dtype = getattr(torch, self.dtype) if self.dtype else None
                kwargs = {"factory": self.factory} if self.factory is not None else {}
                model = build_model(self.spec, device=device, dtype=dtype, **kwargs)
                _MODELS[key] = model
                while len(_MODELS) > MODEL_CACHE_SIZE:
                    _MODELS.popitem(last=False)
            _MODELS.move_to_end(key)
        return model


_MODELS: OrderedDict[tuple, Any] = OrderedDict()
_MODELS_LOCK = threading.Lock()


def model_dtype(model: Any, fallback: str) -> str:
    """The dtype a model computes in: its first floating parameter's, else ``fallback``."""
    params = getattr(model, "parameters", None)
    for p in (params() if callable(params) else ()):
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return fallback


def check_job_output(y: Any, x: torch.Tensor, factory: str) -> tuple[int, ...]:
    """A job's model output on a probe batch: one floating tensor (batch, *out); returns
    ``out``. Raises ConfigError naming the factory."""
    key = f"config: model.factory={factory!r}"
    dtype = str(x.dtype).removeprefix("torch.")
    if isinstance(y, (tuple, list, dict)):
        raise ConfigError(
            f"{key} returns a {type(y).__name__} of {len(y)} values on a batch {tuple(x.shape)}; distjac "
            f"differentiates one tensor (batch, *out). Pick one with model.output (a key or an index), "
            f"or wrap the model so that it returns one tensor."
        )
    if isinstance(y, torch.Tensor) and (not y.is_floating_point() or y.is_complex()):
        raise ConfigError(
            f"{key} returns {str(y.dtype).removeprefix('torch.')} values on a batch {tuple(x.shape)} "
            f"({dtype}); a Jacobian needs floating-point outputs (float16, bfloat16, float32, float64). "
            f"Return a floating tensor (integer or bool outputs such as argmax have no gradient)."
        )
    if not isinstance(y, torch.Tensor) or y.dim() < 2 or y.shape[0] != x.shape[0]:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(
            f"{key} maps a batch {tuple(x.shape)} to {got}; it must "
            f"return a tensor (batch, *out) with the same batch size and rank >= 2."
        )
    return tuple(y.shape[1:])


def probe_model(model: Callable, source: Any, rows: int, device: torch.device, *, factory: str,
                dtype: str | None = None) -> dict[str, Any]:
    """Run a job's model (built here) on its source's first ``rows`` rows: what the
    driver needs to plan (the per-example output shape, the compute dtype: ``dtype``,
    else the model's own). Runs where the shards run: on a worker, or in process for
    ``engine.num_workers: 0`` and ``distjac plan --probe``.

    Raises:
        ConfigError: the model fails on the rows, or returns something that is not one
            floating tensor (batch, *out).
    """
    dtype = dtype or model_dtype(model, source.dtype)
    tdtype = getattr(torch, dtype)
    n = min(rows, source.num_rows)
    x = source.read(0, n) if n else torch.zeros((1, *source.shape))
    x = x.to(device=device, dtype=tdtype)
    try:
        with torch.no_grad():
            y = model(x)
    except Exception as e:
        raise ConfigError(
            f"config: model.factory={factory!r} fails on a batch of shape {tuple(x.shape)} "
            f"({dtype}) from the data: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    out_shape = check_job_output(y, x, factory)
    return {"out_shape": list(out_shape), "compute_dtype": dtype}


# --------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------


class _HostBuffers:
    """Pinned host buffers reused across shards (a GPU runner's copies off the device):
    pinning is slow to allocate and a fresh pageable buffer costs a page fault per page,
    so each (dtype, size) keeps at most PIPELINE_DEPTH buffers for the next shards."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.dtype, like.numel())
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop().view(like.shape)
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)

    def give(self, buf: torch.Tensor) -> None:
        key = (buf.dtype, buf.numel())
        with self._lock:
            free = self._free.setdefault(key, [])
            if len(free) < PIPELINE_DEPTH:
                free.append(buf.reshape(-1))


class ShardRunner:
    """Runs shards on one device, overlapping their stages (NOTE [overlapped stages]).

    Args:
        device: the torch device shards run on.
        max_memory: the kernel's memory budget for tasks that set none (None: the
            kernel's default).
        node: the name this runner reports (a Ray node id, or the host name).
    """

    def __init__(self, device: torch.device, *, max_memory: int | None = None, node: str | None = None):
        self.device = torch.device(device)
        self.max_memory = max_memory
        self.node = node or socket.gethostname()
        self.pid = os.getpid()
        self._locks = {stage: threading.Lock() for stage in ("read", "compute", "host", "write")}
        self._buffers = _HostBuffers() if self.device.type == "cuda" else None
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._live: dict[int, float] = {}  # shard -> fraction of its compute done (NOTE [progress within a shard])

    def progress(self) -> dict[int, float]:
        """The shards running now, each with the fraction of its compute stage done
        (0 until the kernel starts, 1 once it has ended): NOTE [progress within a shard]."""
        return dict(self._live)

    def _fail(self, err: BaseException, task: ShardTask, stage: str) -> ShardRunError:
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        return ShardRunError(err, task.shard, task.start, task.stop, self.node, self.pid, tb, stage)

    def _kernel(self, fn: Callable, x: torch.Tensor, o: KernelOptions, unconnected: str = "zero"):
        budget = o.max_memory if o.max_memory is not None else self.max_memory
        if o.structure is not None:
            return kernels.batch_jacobian(fn, x, mode=o.mode, structure=o.structure,
                                          unconnected_gradients=unconnected, max_memory=budget)
        if o.strategy is not None:  # chosen once for the job: nothing is measured here
            return kernels.batch_jacobian(fn, x, strategy=o.strategy, unconnected_gradients=unconnected,
                                          max_memory=budget)
        return kernels.batch_jacobian(
            fn, x, mode=o.mode, parallel_iterations=o.chunk_size, experimental_use_pfor=o.use_pfor,
            unconnected_gradients=unconnected, max_memory=budget,
        )

    @staticmethod
    def _zeros(fn: Callable, x: torch.Tensor, o: KernelOptions) -> torch.Tensor:
        """The Jacobian of a shard none of whose rows reaches fn's output: zeros of the
        result's shape (the probe's output shape, cached), made without running fn again."""
        if o.structure is not None:  # the diagonal alone
            return torch.zeros_like(x)
        out_shape = kernels._probe(fn, x, o.call).out_shape
        return torch.zeros((x.shape[0], *out_shape, *x.shape[1:]), dtype=x.dtype, device=x.device)

    def choose(self, fn: Callable, task: ShardTask, work_rows: int | None = None):
        """The kernel's strategy for ``fn`` on the task's rows (a whole shard), weighed
        against ``work_rows`` (a job's rows): ``kernels.choose_strategy``, under the
        compute lock so that nothing else runs while it measures. The result pickles;
        the engine ships it to every worker in the tasks' options."""
        o = task.options
        try:
            with self._locks["read"]:
                x = task.read(self.device)
            with self._locks["compute"]:
                return kernels.choose_strategy(
                    fn, x, mode=o.mode, parallel_iterations=o.chunk_size, experimental_use_pfor=o.use_pfor,
                    max_memory=o.max_memory if o.max_memory is not None else self.max_memory,
                    work_rows=work_rows, call=o.call)
        except DistjacError:
            raise
        except Exception as err:
            raise self._fail(err, task, "compute") from None

    def probe(self, fn: Callable, task: ShardTask) -> dict[str, Any]:
        """Run fn on the task's rows: its output shape and whether it depends on x.

        Output checks raise the core's errors (ShapeError, DtypeError, TypeError) as they
        are; anything fn itself raises is a ShardRunError of stage "probe".
        """
        call = task.options.call
        try:
            with self._locks["read"]:
                x = task.read(self.device)
            with self._locks["compute"], torch.no_grad():
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
                with self._locks["compute"]:
                    jac = self._kernel(fn, x, task.options, unconnected="none")
            except DistjacError:
                raise
            except Exception as err:
                raise self._fail(err, task, "probe") from None
            connected = jac is not None
        return {"out_shape": list(y.shape[1:]), "connected": connected}

    def run(self, fn: Callable, task: ShardTask) -> ShardResult:
        """Run one shard through its stages; thread-safe (NOTE [overlapped stages]).

        Raises:
            ShardRunError: any stage failed; carries the original exception.
        """
        from .io.sink import write_part

        t_start, wall0 = time.perf_counter(), time.time()
        times = dict.fromkeys(STAGES, 0.0)
        connected = True
        target = task.target
        stage = "read"
        pinned: list[torch.Tensor] = []
        self._live[task.shard] = 0.0
        try:
            with self._locks["read"]:
                t0 = time.perf_counter()
                x = task.read(self.device)
                kept = self._kept_columns(task)
                times["read_s"] = time.perf_counter() - t0
            stage = "compute"
            with self._locks["compute"], kernels.progress_to(partial(self._live.__setitem__, task.shard)):
                t0 = time.perf_counter()
                if target is not None and target.estimate:
                    values = self._estimated(fn, x, task)
                else:
                    # None where no row of the shard reaches fn's output: zeros then, and
                    # the driver returns None if no shard was connected (NOTE [connected
                    # somewhere] in distjac.kernels).
                    jac = self._kernel(fn, x, task.options, unconnected="none")
                    if jac is None:
                        connected = False
                        jac = self._zeros(fn, x, task.options)
                    values = self._stored(jac, target)
                    del jac
                del x
                self._live[task.shard] = 1.0
                if self.device.type == "cuda":
                    # Contiguous here, on the compute stream, so that the host stage's
                    # copy (on its own stream) reads finished values.
                    values = _each(values, torch.Tensor.contiguous)
                    torch.cuda.synchronize(self.device)
                times["compute_s"] = time.perf_counter() - t0
            with self._locks["host"]:
                stage = "to_host"
                t0 = time.perf_counter()
                values = self._to_host(values, pinned if target is not None else None)
                times["to_host_s"] = time.perf_counter() - t0 if self.device.type != "cpu" else 0.0
                stage = "arrow"
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # read-only buffers, only read
                    batch = arrow.to_record_batch(range(task.start, task.stop), dtype=None, **values,
                                                  extra_columns=kept)
                del values
                batch = arrow.annotate(batch, {"shard": task.shard, "start": task.start, "stop": task.stop,
                                               "node": self.node, "pid": self.pid, "device": str(self.device),
                                               **{k: times[k] for k in ("read_s", "compute_s", "to_host_s")}})
                times["arrow_s"] = time.perf_counter() - t0
            part = None
            if target is not None:
                stage = "write"
                with self._locks["write"]:
                    t0 = time.perf_counter()
                    part = write_part(target.out_dir, task.shard, task.start, task.stop, batch, target.format,
                                      metadata=target.metadata())
                    times["write_s"] = time.perf_counter() - t0
                batch = None
        except ShardRunError:
            raise
        except Exception as err:
            raise self._fail(err, task, stage) from None
        finally:
            self._live.pop(task.shard, None)
            if self._buffers is not None:
                for buf in pinned:
                    self._buffers.give(buf)
        wall = time.perf_counter() - t_start
        timing = ShardTiming(**times, queued_s=max(0.0, wall - sum(times.values())), started=wall0,
                             ended=time.time(), peak_rss_bytes=peak_rss_bytes())
        if part is not None:
            part = replace(part, seconds=timing.busy_s)
        o = task.options
        strategy = str(o.strategy) if o.strategy is not None and o.structure is None else None
        return ShardResult(task.shard, task.start, task.stop, self.node, self.pid, str(self.device), timing,
                           batch=batch, part=part, strategy=strategy, connected=connected)

    @staticmethod
    def _kept_columns(task: ShardTask) -> dict | None:
        """The source columns a job's part keeps (``output.keep_columns``), rows [start, stop)."""
        if task.target is None or not task.target.keep_columns:
            return None
        from .io.sources import read_columns

        return read_columns(task.source, task.target.keep_columns, task.start, task.stop)

    @staticmethod
    def _estimated(fn: Callable, x: torch.Tensor, task: ShardTask) -> dict[str, Any]:
        """A job's matrix-free estimates of the shard (JVPs and VJPs only), seeded by the
        rows' global ids so that a recomputed shard writes the same bits; each estimate
        and its standard error as two columns, in the storage dtype."""
        from .estimates import estimate_block

        want = getattr(torch, task.target.dtype)
        out: dict[str, torch.Tensor] = {}
        for name, (value, stderr) in estimate_block(fn, x, task.target.estimate, row_offset=task.start).items():
            out[name] = value.detach().to(want)
            out[f"{name}_stderr"] = stderr.detach().to(want)
        return {"reductions": out}

    @staticmethod
    def _stored(jac: torch.Tensor, target: PartTarget | None) -> dict[str, Any]:
        """What is stored of a shard's Jacobian, computed where it is (on a GPU, before
        anything crosses to the host) and cast there to the storage dtype: the job's
        reductions, or the Jacobian. A gather keeps the kernel's dtype."""
        if target is None:
            return {"jacobian": jac}
        from .reduce import reduce_block

        want = getattr(torch, target.dtype)
        if target.reductions:
            red = reduce_block(jac, target.reductions, target.in_ndim)
            return {"reductions": {k: v.to(want) for k, v in red.items()}}
        return {"jacobian": jac.to(want)}

    def _to_host(self, values: dict[str, Any], pinned: list | None) -> dict[str, Any]:
        """``values`` on the host: CPU tensors as they are; off a GPU one copy each, into
        a reused pinned buffer on the copy stream when ``pinned`` collects them (a job's
        part, whose buffers are free again once written), else a plain copy."""
        def host(t: torch.Tensor) -> torch.Tensor:
            if t.device.type == "cpu":
                return t
            t = t.contiguous()
            if pinned is None or self._buffers is None:
                return t.cpu()
            buf = self._buffers.take(t)
            pinned.append(buf)
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                t.record_stream(self._copy_stream)
                buf.copy_(t, non_blocking=True)
            self._copy_stream.synchronize()
            return buf

        return _each(values, host)


def _each(values: dict[str, Any], f: Callable) -> dict[str, Any]:
    """``f`` of every tensor of ``to_record_batch``'s values (a tensor or a dict of them)."""
    return {k: ({n: f(t) for n, t in v.items()} if isinstance(v, dict) else f(v)) for k, v in values.items()}


# --------------------------------------------------------------------------------------
# In process: the same runner, on a thread pool
# --------------------------------------------------------------------------------------


def rows_in_flight(progress: dict[int, float], rows_of: dict[int, int], last: dict[int, float]) -> float:
    """Rows done so far of the shards in flight: ``fraction x rows`` summed over the shards
    of ``rows_of`` (shard -> its rows). ``progress`` is a runner's report; ``last`` (updated
    here) keeps each shard's highest fraction reported, which stands for a shard the
    report no longer lists (it has just returned, its result not taken yet) or not yet."""
    total = 0.0
    for k, n in rows_of.items():
        f = max(progress.get(k, 0.0), last.get(k, 0.0))
        last[k] = f
        total += f * n
    return total


def local_executor(fn: Callable, runner: ShardRunner, tasks: Sequence[ShardTask], *,
                   depth: int = PIPELINE_DEPTH, call: str = "run_job(spec)",
                   on_progress: Callable[[float], None] | None = None) -> Iterator[ShardResult]:
    """Run ``tasks`` in this process on ``runner``, ``depth`` at a time so their stages
    overlap (NOTE [overlapped stages]); yield each ShardResult as it finishes.
    ``on_progress(rows)``, if given, hears about every PROGRESS_POLL_S the rows done so
    far of the shards still running (NOTE [progress within a shard]).

    On a failure no new shard starts; the shards already running finish (and are
    yielded), then the first failure is raised as a ShardError.
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    todo = deque(tasks)
    failure: ShardRunError | None = None
    running: dict = {}  # future -> its task
    pool = ThreadPoolExecutor(max_workers=max(1, depth), thread_name_prefix="distjac-shard")
    poll = PROGRESS_POLL_S if on_progress is not None else None
    last: dict[int, float] = {}  # shard -> its highest fraction reported
    try:
        while todo or running:
            while todo and failure is None and len(running) < max(1, depth):
                task = todo.popleft()
                running[pool.submit(runner.run, fn, task)] = task
            if not running:
                break
            done, _ = wait(running, timeout=poll, return_when=FIRST_COMPLETED)
            for fut in done:
                running.pop(fut)
            for fut in sorted(done, key=lambda f: f.exception() is None, reverse=True):
                err = fut.exception()
                if err is None:
                    yield fut.result()
                elif isinstance(err, ShardRunError):
                    failure = failure or err
                else:  # pragma: no cover - run() wraps every failure
                    raise err
            if on_progress is not None:  # after the finished shards were taken: not counted twice
                on_progress(rows_in_flight(runner.progress(), {t.shard: t.stop - t.start for t in running.values()},
                                           last))
            if failure is not None and not running:
                break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failure is not None:
        error = failure.shard_error(call)
        raise error from error.__cause__
