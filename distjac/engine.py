"""The driver: Ray's lifecycle, the shard schedule, retries, the gather and progress.

``Engine`` computes exactly what :func:`distjac.batch_jacobian` computes, with the batch
cut into shards (:mod:`distjac.plan`) that Ray actors (:mod:`distjac.worker`) compute
with the same kernels and hand back as Arrow record batches. The engine itself never
differentiates.

NOTE [one Ray connection per process]
Ray allows one connection per process. The first Engine makes it (``address=None``
starts a private local instance; "auto" joins a running cluster; "ray://host:port" a
remote one) unless the user already called ``ray.init``; later Engines share it whatever
address they name. Only a Ray instance that distjac started is shut down, when the last
Engine using it closes.

NOTE [loopback listeners]
Ray 2.60 resolves a local node's address to the machine's outward IP and binds its
agents there and its gRPC servers on every interface. Its own switch for machines that
should not form clusters (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, honoured on Linux too)
makes it use 127.0.0.1 as the node address instead; every process then listens on
loopback only (measured: 0 listeners off loopback, against 12 for a plain ``ray.init()``).
The engine turns it on while it starts a local instance (``address=None``) and never
when it joins a cluster. See the README's security notes.

NOTE [token file]
A local ``ray.init()`` turns token authentication on and writes ``~/.ray/auth_token``
with the default umask (0644: readable by every local user, who could then drive the
instance). The engine creates the token itself with mode 0600 when there is none (so it
is never readable by others, not even briefly), tightens an existing one it owns, and
otherwise lets Ray do what it always does. It never sets ``RAY_AUTH_MODE`` (doing so after
Ray has read its settings breaks the driver's own authentication).

NOTE [retries, never twice]
Workers are actors without Ray's own restarts or task replays (``max_restarts=0``,
``max_task_retries=0``): the driver alone decides what runs again, so that it can count.
When a worker dies (its process or node is gone, or the stall watchdog killed it, see
NOTE [stalled shards]) the driver sees it once, by the actor's identity, however many of
its shards were in flight: it kills the actor for good (``ray.kill(no_restart=True)``, so
its CPU or GPU is free), starts one replacement in its slot (Ray places it on a live node)
and resubmits every shard the worker held that had not come back. Which of them killed it
is not certain: actor calls run in order, but a shard that finished just before the death
may have lost its reply with the process (seen with a shard that SIGKILLs its worker). So
every shard lost with a dead worker is charged a failure and becomes a *suspect*: it runs
alone on a worker until it finishes, so a later death is charged to it alone, and an
innocent shard is charged at most once. For a stall the oldest shard in flight is the one
that ran, and it alone is charged. After ``max_retries`` failures the call ends with a
ShardError naming the shard. A finished result lost with its node is
resubmitted and charged the same way. Every result carries its row ids and the driver
places a shard exactly once (a bitmap of finished shards); a late duplicate is dropped and
counted in ``last_stats.duplicates``. (Ray's restarts with ``max_task_retries=-1`` replay
a task that kills its worker until the restarts run out, out of the driver's sight, and
left one "failure" per in-flight task to replace: issue 9, item 8.)

NOTE [stalled shards]
A worker that stops (SIGSTOP, a hung device, fn looping forever) raises nothing. The
scheduling loop knows when each worker started its current shard (when the shard before
it on that worker came back) and kills a worker whose shard has run longer than the stall
timeout: ``shard_timeout_s`` when given, else ``DEFAULT_SHARD_TIMEOUT_FACTOR`` times the
median time of the call's finished shards, at least ``MIN_SHARD_TIMEOUT_S``; a worker's
first shard (which also loads fn) and every shard before any finished get
``FIRST_SHARD_TIMEOUT_S``. The shard is then handled as if its worker had died. A shard
running ``SLOW_SHARD_FACTOR`` times longer than the median is named in a warning first.

NOTE [address resolution]
``ray.init(address="auto")`` reads RAY_ADDRESS, else the address file of the latest
``ray start`` on this machine, else looks for a GCS process; given a stale address it
retries for minutes, ignoring Ctrl-C. The engine resolves the address the same way
(:func:`_resolve_address`) and checks with a TCP connection (``connect_timeout``
seconds) that something listens there before calling ``ray.init``, naming the address
and where it came from when nothing does.

NOTE [the Engine's settings and the job's]
``Engine(...).run(spec)``: for each setting both carry (``shard_size``,
``parallel_iterations``, ``chunk_size``, ``shard_timeout_s``), an Engine argument given
(not None) wins over the job's value, which wins over the default. As in Ray, where an
explicit ``.options(...)`` wins over what the code was declared with: the code that built
the Engine said what it wants; a config file says what a job wants when nobody says
otherwise. The Engine's defaults are None for that reason (None: "not set here"), and
``distjac run`` builds its Engine from the spec, so there the spec's values apply. What
only the Engine can decide (address, workers, device, retries) is the Engine's. None of
these settings is in the spec hash: they change how a job runs, not what it writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import stat
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _alloc, arrow
from ._compat import gcs_cluster_id, ray_address_file, ray_cluster_mode_off, running_gcs_addresses
from .errors import DistjacError, OptionError, ShardError
from .kernels import Decision, Strategy
from .options import DEVICES, UnconnectedGradients, check_functional_call, check_int, check_positive_int, is_device
from .plan import (
    DEFAULT_CPUS_PER_WORKER,
    DEFAULT_PARALLEL_ITERATIONS,
    DEFAULT_SHARD_BYTES,
    ShardPlan,
    format_bytes,
    make_plan,
)
from .shard import PIPELINE_DEPTH, PROGRESS_POLL_S, KernelOptions, ShardRunError, ShardTask, rows_in_flight, to_wire
from .worker import PROBE_ROWS, PROGRESS_GROUP, JacobianWorker, function_key, serialize_function

__all__ = ["Engine", "EngineStats", "ShardStats", "WorkerStats", "local_cluster", "ray_connection"]

log = logging.getLogger("distjac")

# Seconds to wait for the workers to start (torch import, model placement) before
# reporting that the cluster cannot place them; a GPU or autoscaling cluster may need more.
DEFAULT_STARTUP_TIMEOUT = 180.0
# How often the scheduling loop wakes to refresh the progress bar when nothing finished.
_WAIT_TICK_S = 0.5
# Seconds a cluster's GCS has to accept a TCP connection before ray.init is called (a
# live GCS answers in milliseconds; see NOTE [address resolution]).
DEFAULT_CONNECT_TIMEOUT = 10.0
# The stall timeout (NOTE [stalled shards]): when shard_timeout_s is not given, 10x the
# median finished shard, at least a minute; a worker's first shard (it also loads fn, which
# may mean reading a model's weights onto a GPU) and every shard before any finished get
# ten minutes.
DEFAULT_SHARD_TIMEOUT_FACTOR = 10.0
MIN_SHARD_TIMEOUT_S = 60.0
FIRST_SHARD_TIMEOUT_S = 600.0
# A shard running this many times longer than the median (and at least SLOW_SHARD_MIN_S,
# or half the stall timeout if that is shorter) is named in a warning.
SLOW_SHARD_FACTOR = 3.0
SLOW_SHARD_MIN_S = 5.0
# NOTE [a failed job's shards in flight]: how long a failed job waits, at most, for the
# shards already sent to its workers before it raises.
FAILED_JOB_SETTLE_S = 60.0


# --------------------------------------------------------------------------------------
# Ray lifecycle: one shared connection (NOTE [one Ray connection per process])
# --------------------------------------------------------------------------------------


class _Session:
    lock = threading.Lock()
    users = 0
    owned = False


def _token_path() -> Path:
    custom = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(custom).expanduser() if custom else Path.home() / ".ray" / "auth_token"


def _secure_token_file(create: bool) -> Path | None:
    """See NOTE [token file]. Returns the token file's path, or None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None  # the token lives in the environment, not in a file
    path = _token_path()
    if not path.exists() and create:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))  # 256 bits, as Ray's own generator
    if not path.exists():
        return None
    st = path.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    return path


def _auth_hint() -> str:
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    return (
        f"The driver has RAY_AUTH_MODE={mode}. A cluster and a driver must agree: with token "
        "authentication on the cluster, set RAY_AUTH_MODE=token and give the driver the "
        "cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); with it "
        "off, set RAY_AUTH_MODE=disabled on the driver too."
    )


def _is_auth_failure(err: BaseException | None) -> bool:
    """Whether an error (or one it was raised from) says the cluster refused our token."""
    seen = 0
    while err is not None and seen < 8:
        text = f"{type(err).__name__} {err}".lower()
        if any(s in text for s in ("authenticat", "invalidauthtoken", "auth token")):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _preflight_auth(address: str) -> None:
    """Ask the cluster's GCS for its id once: a driver whose authentication the cluster
    refuses learns it in milliseconds (ray.init would retry for ~20 s, then report a
    generic connection failure). Any other outcome is left to ray.init."""
    if address.startswith("ray://"):
        return
    try:
        gcs_cluster_id(address)
    except Exception as err:
        if _is_auth_failure(err):
            raise ConnectionError(
                f"distjac.Engine(address={address!r}): the cluster refused this driver's "
                f"authentication ({type(err).__name__}: {str(err)[:160]}). {_auth_hint()}"
            ) from err


def _resolve_address(address: str) -> tuple[str, str]:
    """The ``host:port`` that ``ray.init(address)`` would connect to, and where it came
    from (NOTE [address resolution]).

    Raises:
        ConnectionError: "auto" and no cluster is recorded or running on this machine.
    """
    if address.startswith("ray://"):
        return address[len("ray://"):].split("/", 1)[0], "the address given"
    if address != "auto":
        return address, "the address given"
    env = os.environ.get("RAY_ADDRESS", "")
    if env:
        if env.startswith("ray://"):
            return env[len("ray://"):].split("/", 1)[0], "RAY_ADDRESS"
        return env, "RAY_ADDRESS"
    path = ray_address_file()
    try:
        with open(path) as f:
            recorded = f.read().strip()
    except OSError:
        recorded = ""
    if recorded:
        return recorded, path
    found = running_gcs_addresses()
    if found:
        return found[0], "a Ray GCS process running on this machine"
    raise ConnectionError(
        "distjac.Engine(address='auto'): found no Ray cluster to join: RAY_ADDRESS is not set, "
        f"{path} does not exist and no Ray GCS process runs on this machine. Start one "
        "(ray start --head), pass its address (--address HOST:PORT), or leave the address out "
        "to start a local instance."
    )


def _check_reachable(address: str, timeout: float) -> None:
    """Raise ConnectionError unless the cluster's address accepts a TCP connection within
    ``timeout`` seconds (NOTE [address resolution])."""
    import socket

    target, origin = _resolve_address(address)
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    hint = ("start it (ray start --head), or pass the address of a running cluster "
            "(--address HOST:PORT, engine.address, RAY_ADDRESS)")
    if not host or not port.isdigit():
        raise ConnectionError(f"distjac.Engine(address={address!r}): {target!r} (from {origin}) "
                              f"is not a host:port address; {hint}.")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ConnectionError(
            f"distjac.Engine(address={address!r}): could not reach the Ray cluster at {target} "
            f"(from {origin}) within {timeout:g} s ({type(err).__name__}: {err}); {hint}."
        ) from None


def _acquire_ray(address: str | None, min_cpus: int, init_kwargs: dict,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> bool:
    """Connect this process to Ray (or share its connection); True if distjac started it."""
    import ray

    with _Session.lock:
        if ray.is_initialized():
            if _Session.users == 0:
                _Session.owned = False  # the user's own ray.init, or one we no longer track
            _Session.users += 1
            return _Session.owned
        kwargs = dict(logging_level=logging.ERROR, include_dashboard=False)
        kwargs.update(init_kwargs)
        if address is not None:
            _check_reachable(address, connect_timeout)
            _preflight_auth(address)
        try:
            if address is None:
                kwargs.setdefault("num_cpus", max(os.cpu_count() or 1, min_cpus))
                if os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled":
                    _secure_token_file(create=True)
                else:
                    warnings.warn("distjac.Engine: RAY_AUTH_MODE=disabled, so the local Ray instance "
                                  "runs without token authentication.", stacklevel=4)
                with ray_cluster_mode_off():  # NOTE [loopback listeners]
                    ray.init(address="local", **kwargs)
                if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
                    _secure_token_file(create=False)
            else:
                kwargs.pop("include_dashboard", None)
                ray.init(address=address, **kwargs)
        except Exception as err:
            if _is_auth_failure(err):
                raise ConnectionError(
                    f"distjac.Engine(address={address!r}): the cluster refused this driver's "
                    f"authentication ({type(err).__name__}: {str(err)[:200]}). {_auth_hint()}"
                ) from err
            raise
        _Session.owned = True
        _Session.users = 1
        return True


def _release_ray() -> None:
    import ray

    with _Session.lock:
        _Session.users = max(0, _Session.users - 1)
        if _Session.users == 0 and _Session.owned:
            _Session.owned = False
            if ray.is_initialized():
                ray.shutdown()


@contextlib.contextmanager
def ray_connection(address: str | None = None, *, min_cpus: int = 1, ray_init_kwargs: dict | None = None,
                   connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Iterator[bool]:
    """Hold this process's Ray connection open across several Engines (benchmarks that
    build one Engine per measurement pay Ray's start-up once).

    Connects as ``Engine(address=...)`` does (a hardened local instance for None) and
    counts as one more user of the shared connection: the Ray instance distjac started
    stops when the last Engine or holder lets go.

    Args:
        address: as :class:`Engine`'s.
        min_cpus: CPUs a local instance gets at least.
        ray_init_kwargs: extra keyword arguments for ``ray.init``.
        connect_timeout: as :class:`Engine`'s.

    Yields:
        Whether distjac started the Ray instance (False: it joined one).
    """
    owned = _acquire_ray(address, min_cpus, dict(ray_init_kwargs or {}), float(connect_timeout))
    try:
        yield owned
    finally:
        _release_ray()


@contextlib.contextmanager
def local_cluster(nodes: int, *, cpus_per_node: int = 1) -> Iterator[str]:
    """A Ray cluster of several nodes on this machine (``ray.cluster_utils.Cluster``): a
    head with no CPUs, so that every worker lands on one of ``nodes`` nodes of
    ``cpus_per_node`` CPUs each. For benchmarks and tests of multi-node behaviour.

    Yields:
        The cluster's address, for ``Engine(address=...)`` or :func:`ray_connection`.

    Raises:
        RuntimeError: this process is already connected to Ray.
    """
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        raise RuntimeError("distjac.engine.local_cluster: this process is already connected to Ray; "
                           "start the cluster in a fresh process.")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=cpus_per_node)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


class _Lease:
    """The Engine's share of the Ray connection and its actors; released exactly once."""

    def __init__(self) -> None:
        self.actors: list = []
        self.active = False

    def release(self) -> None:
        if not self.active:
            return
        self.active = False
        try:
            import ray

            if ray.is_initialized():
                for actor in self.actors:
                    with contextlib.suppress(Exception):
                        ray.kill(actor, no_restart=True)
        finally:
            self.actors = []
            _release_ray()


# --------------------------------------------------------------------------------------
# Statistics of the last call
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardStats:
    """One shard of the last call: where it ran and what it cost (seconds).

    On the worker: ``read_s`` loads the shard's rows onto its device, ``compute_s`` is the
    kernel, ``to_host_s`` copies the result off a GPU (0 on CPU), ``arrow_s`` builds the
    record batch, ``queued_s`` waited on the worker for a stage behind other shards (NOTE
    [overlapped stages] in distjac.shard). On the driver: ``wait_s`` runs from submission
    to the result being ready (queueing, the worker's time, transfer), ``gather_s`` reads
    the record batch and copies it into place. ``worker_peak_rss_bytes`` is the worker
    process's peak resident memory when it finished the shard.
    """

    shard: int
    start: int
    stop: int
    worker: int
    node: str
    pid: int
    attempts: int
    compute_s: float
    wait_s: float
    gather_s: float
    read_s: float = 0.0
    to_host_s: float = 0.0
    arrow_s: float = 0.0
    queued_s: float = 0.0
    worker_peak_rss_bytes: int = 0

    @property
    def worker_s(self) -> float:
        """The worker's own time on the shard (read, compute, to host, Arrow)."""
        return self.read_s + self.compute_s + self.to_host_s + self.arrow_s


@dataclass(frozen=True)
class WorkerStats:
    """One worker's share of the last call."""

    worker: int
    node: str
    pid: int
    device: str
    shards: int
    rows: int
    compute_s: float
    rows_per_s: float


@dataclass(frozen=True)
class EngineStats:
    """What ``Engine.batch_jacobian`` did, available as ``engine.last_stats`` afterwards.

    Attributes:
        plan: the shard plan that ran.
        wall_s: seconds from the call to the result (probe, compute, gather).
        rows_per_s: rows / wall_s.
        gather_bytes: bytes copied into the output.
        gather_s: driver seconds spent reading results and copying them into place.
        retries: shards the driver resubmitted after a worker died or stalled or a
            result was lost (NOTE [retries, never twice]).
        duplicates: results that arrived for an already placed shard and were dropped.
        shards: per-shard figures, in shard order.
        workers: per-worker figures.
    """

    plan: ShardPlan
    wall_s: float
    rows_per_s: float
    gather_bytes: int
    gather_s: float
    retries: int
    duplicates: int
    shards: tuple[ShardStats, ...] = field(repr=False)
    workers: tuple[WorkerStats, ...] = field(repr=False)

    @property
    def gather_gbps(self) -> float:
        """Gather bandwidth in GB/s (1e9 bytes)."""
        return self.gather_bytes / self.gather_s / 1e9 if self.gather_s > 0 else float("inf")

    def __str__(self) -> str:
        lines = [
            f"EngineStats: {self.plan.rows:,} rows in {len(self.shards)} shards, {self.wall_s:.3f} s "
            f"({self.rows_per_s:,.0f} rows/s); gather {format_bytes(self.gather_bytes)} in "
            f"{self.gather_s:.3f} s ({self.gather_gbps:.2f} GB/s); retries {self.retries}, "
            f"duplicates dropped {self.duplicates}",
            f"  {'worker':>6}  {'pid':>7}  {'device':<7} {'shards':>6}  {'rows':>9}  {'compute s':>9}  {'rows/s':>9}",
        ]
        for w in self.workers:
            lines.append(f"  {w.worker:>6}  {w.pid:>7}  {w.device:<7} {w.shards:>6}  {w.rows:>9,}  "
                         f"{w.compute_s:>9.3f}  {w.rows_per_s:>9,.0f}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------


def _check_device(device: Any, call: str) -> str:
    if isinstance(device, torch.device):
        device = str(device)
    if is_device(device):
        return device
    raise OptionError(f"{call}: device={device!r} is not valid; use one of {', '.join(map(repr, DEVICES))}.")


def _check_seconds(value: Any, name: str, call: str, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and value > 0)
    if not ok:
        none = "None or " if allow_none else ""
        raise OptionError(f"{call}: {name}={value!r} is not valid; use {none}a number of seconds > 0.")


def _fmt_resources(res: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU")) + "}"


def _system_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors for a lost worker, node or object: the shard is run again."""
    from ray import exceptions as rex

    names = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError",
             "OwnerDiedError", "ObjectReconstructionFailedError", "ObjectFetchTimedOutError",
             "LocalRayletDiedError", "TaskCancelledError")
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


class Engine:
    """Per-example Jacobians on Ray workers; the same result as :func:`distjac.batch_jacobian`.

    The batch is cut into shards of rows (:class:`distjac.ShardPlan`); each worker, a Ray
    actor on one GPU or a slot of CPUs, computes its shards with distjac's kernels and
    returns them as Arrow record batches, which the driver copies into one preallocated
    output, at most ``parallel_iterations`` shards in flight.

    Args:
        address: None starts a private local Ray instance (loopback only, token
            authentication on, no dashboard, quiet; shut down when the last Engine
            closes); "auto" joins a running cluster; "ray://host:port" a remote one.
            See NOTE [one Ray connection per process].
        num_workers: Ray actors to start; None uses what the cluster offers (its GPUs
            over ``num_gpus_per_worker`` when workers use GPUs, else its CPUs over
            ``num_cpus_per_worker``).
        device: "auto" (each worker on the GPU Ray assigned it, else CPU), "cpu", "cuda".
        shard_size: rows per shard; None: the job's ``engine.shard_size`` in
            :meth:`run`, else sized from a memory budget (``shard_bytes`` of Jacobian
            each, see :mod:`distjac.plan`).
        parallel_iterations: shards in flight at once across the cluster; None: the
            job's ``engine.parallel_iterations`` in :meth:`run`, else 8. Not the
            kernels' knob: that is ``chunk_size``.
        chunk_size: Jacobian rows per vectorized pass on the workers (the kernels'
            ``parallel_iterations``); None: the job's ``jacobian.chunk_size`` in
            :meth:`run`, else the kernels fit their memory budget.
        max_retries: times a shard is run again after its worker or node died or it
            stalled (0: never). See NOTE [retries, never twice].
        num_cpus_per_worker: CPUs each worker reserves; torch uses that many threads.
        num_gpus_per_worker: GPUs each worker reserves; None: 1 when device is "auto" and
            the cluster has GPUs, or device is "cuda"; else 0.
        max_memory: the kernels' memory budget per shard on a worker, in bytes.
        shard_bytes: Jacobian bytes per shard when ``shard_size`` is None.
        progress: show a progress bar (None: when stderr is a terminal).
        startup_timeout: seconds to wait for the workers to start.
        shard_timeout_s: seconds a shard may run on a worker before the worker is
            killed and replaced and the shard retried elsewhere; None derives it from the
            call's finished shards (10x their median, at least 60 s; 600 s for a worker's
            first shard); in :meth:`run`, None takes the job's
            ``engine.shard_timeout_s``. See NOTE [stalled shards].
        connect_timeout: seconds the cluster at ``address`` has to accept a connection
            before the engine gives up with a ConnectionError (not for ``address=None``).
        ray_init_kwargs: extra keyword arguments for ``ray.init`` (runtime_env, ...).

    Raises:
        OptionError: an invalid option, before Ray is started.
        ConnectionError: the cluster is unreachable (the error names the address and
            where it came from) or refused the driver (authentication mismatch).

    Example:
        >>> import distjac, torch
        >>> with distjac.Engine(num_workers=2) as engine:                  # doctest: +SKIP
        ...     jac = engine.batch_jacobian(lambda x: x ** 3, torch.ones(8, 2))
        >>> jac.shape                                                       # doctest: +SKIP
        torch.Size([8, 2, 2])
    """

    def __init__(
        self,
        address: str | None = None,
        num_workers: int | None = None,
        device: str = "auto",
        shard_size: int | None = None,
        parallel_iterations: int | None = None,
        chunk_size: int | None = None,
        max_retries: int = 3,
        *,
        num_cpus_per_worker: float = DEFAULT_CPUS_PER_WORKER,
        num_gpus_per_worker: float | None = None,
        max_memory: int | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        progress: bool | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        ray_init_kwargs: dict | None = None,
        shard_timeout_s: float | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ):
        call = "distjac.Engine(...)"
        if address is not None and not isinstance(address, str):
            raise OptionError(f"{call}: address={address!r} is not valid; use None (a local Ray instance), "
                              "'auto' (a running cluster) or 'ray://host:port'.")
        from .config import check_address

        check_address(address, where=f"{call}: address", error=OptionError)  # before Ray starts
        if num_workers == 0 and not isinstance(num_workers, bool):
            raise OptionError(
                f"{call}: num_workers=0 is not valid: an Engine computes on Ray workers; use None (what the "
                "cluster offers) or an integer >= 1. To compute in this process, call distjac.batch_jacobian, "
                "or run a job with engine.num_workers: 0 (distjac run CONFIG --workers 0)."
            )
        check_int(num_workers, "num_workers", call, none="None (what the cluster offers)")
        self.device = _check_device(device, call)
        check_int(shard_size, "shard_size", call, none="None (the job's, else sized by shard_bytes)")
        check_int(parallel_iterations, "parallel_iterations", call, none="None (the job's, else 8)")
        check_positive_int(chunk_size, "chunk_size", call)
        check_positive_int(max_memory, "max_memory", call)
        check_positive_int(shard_bytes, "shard_bytes", call, allow_none=False)
        check_int(max_retries, "max_retries", call, minimum=0, allow_none=False)
        for name, value in (("num_cpus_per_worker", num_cpus_per_worker), ("num_gpus_per_worker", num_gpus_per_worker)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise OptionError(f"{call}: {name}={value!r} is not valid; use a number >= 0.")
        _check_seconds(shard_timeout_s, "shard_timeout_s", call, allow_none=True)
        _check_seconds(connect_timeout, "connect_timeout", call, allow_none=False)
        self.address = address
        self.shard_timeout_s = None if shard_timeout_s is None else float(shard_timeout_s)
        self.shard_size = shard_size
        self.parallel_iterations = parallel_iterations
        self.chunk_size = chunk_size
        self.max_retries = max_retries
        self.max_memory = max_memory
        self.shard_bytes = shard_bytes
        self.progress = progress
        self.startup_timeout = float(startup_timeout)
        self.num_cpus_per_worker = num_cpus_per_worker
        self.last_stats: EngineStats | None = None
        self.last_decision: dict | None = None  # the kernel strategy of the last job (NOTE [one choice per job])
        self._created = time.perf_counter()  # an Engine's first job counts its start-up in its seconds
        self._ran_job = False
        self._retries = self._duplicates = 0  # of the call in progress
        self.replacements = 0  # workers replaced since the engine started
        self._optional_failure = ""  # why the last optional call on worker 0 gave nothing

        self._lease = _Lease()
        self._finalizer = weakref.finalize(self, self._lease.release)
        min_cpus = math.ceil((num_workers or 1) * num_cpus_per_worker)
        self.owns_ray = _acquire_ray(address, min_cpus, dict(ray_init_kwargs or {}), float(connect_timeout))
        self.owns_local = self.owns_ray and address is None
        self._lease.active = True
        try:
            self._start_workers(num_workers, num_gpus_per_worker)
        except BaseException:
            self._lease.release()
            raise

    # -- lifecycle ---------------------------------------------------------------------

    def _start_workers(self, num_workers: int | None, num_gpus: float | None) -> None:
        import ray

        resources = ray.cluster_resources()
        cluster_gpus = float(resources.get("GPU", 0))
        if num_gpus is None:
            wants_gpu = (self.device == "auto" and cluster_gpus > 0) or self.device.startswith("cuda")
            num_gpus = 1 if wants_gpu else 0
            if wants_gpu and num_workers and num_workers > cluster_gpus > 0:
                # More workers than GPUs: they share them (Ray's fractional GPUs) rather
                # than wait for GPUs that do not exist.
                num_gpus = cluster_gpus / num_workers
        if self.device.startswith("cuda") and cluster_gpus <= 0:
            raise OptionError(f"distjac.Engine(device={self.device!r}): the Ray cluster has no GPUs; "
                              "use device='auto' or 'cpu'.")
        if num_workers is None:
            if num_gpus > 0:
                num_workers = max(1, int(cluster_gpus // num_gpus))
            else:
                cpus = float(resources.get("CPU", os.cpu_count() or 1))
                num_workers = max(1, int(cpus // max(self.num_cpus_per_worker, 1e-9)))
        self.num_gpus_per_worker = num_gpus
        worker_device = self.device if self.device != "cuda" else "auto"
        # A concurrency group of its own for progress polls: NOTE [progress within a shard].
        actor = ray.remote(concurrency_groups={PROGRESS_GROUP: 1})(JacobianWorker).options(
            num_cpus=self.num_cpus_per_worker, num_gpus=num_gpus,
            max_restarts=0, max_task_retries=0,  # NOTE [retries, never twice]
            max_concurrency=PIPELINE_DEPTH,  # NOTE [overlapped stages] in distjac.shard
            scheduling_strategy="SPREAD",
        )
        self._actor_cls = actor
        self._worker_args = (worker_device, None, self.max_memory)
        self._workers = [actor.remote(*self._worker_args) for _ in range(num_workers)]
        self._lease.actors = list(self._workers)
        self._infos: list[dict] | None = None

    def _ready(self) -> list[dict]:
        """Wait for every worker to start; their info (pid, node, device, threads)."""
        import ray

        if self._infos is not None:
            return self._infos
        refs = [w.info.remote() for w in self._workers]
        try:
            self._infos = ray.get(refs, timeout=self.startup_timeout)
        except ray.exceptions.GetTimeoutError:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            raise RuntimeError(
                f"distjac.Engine: only {len(ready)} of {len(refs)} workers started within "
                f"{self.startup_timeout:.0f} s (each needs {self.num_cpus_per_worker} CPU and "
                f"{self.num_gpus_per_worker} GPU; the cluster has {_fmt_resources(ray.cluster_resources())} "
                f"of which {_fmt_resources(ray.available_resources())} are free: other Engines or "
                "actors may hold the rest). Lower num_workers or num_cpus_per_worker / "
                "num_gpus_per_worker, close other Engines, or raise startup_timeout."
            ) from None
        except ray.exceptions.RayActorError as err:
            # A driver with token authentication on a cluster without it (or the reverse,
            # once connected) sees its workers die before they run, with no word of
            # authentication: say what it most likely is.
            if _is_auth_failure(err) or (not self.owns_local and "before" in str(err)):
                raise ConnectionError(
                    f"distjac.Engine(address={self.address!r}): the workers died before they started "
                    f"({type(err).__name__}). This is what a cluster and a driver that disagree on token "
                    f"authentication look like. {_auth_hint()}"
                ) from err
            raise
        return self._infos

    def workers(self) -> list[dict]:
        """The workers (waiting for them to start): pid, node, host, device, threads."""
        self._check_open("Engine.workers()")
        return [dict(info) for info in self._ready()]

    @property
    def num_workers(self) -> int:
        """Workers this engine runs."""
        return len(self._workers) if self._lease.active else 0

    def shutdown(self) -> None:
        """Stop this engine's workers; the Ray instance distjac started stops with the
        last Engine. Safe to call twice."""
        self._lease.release()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _replace_worker(self, w: int, dead, why: str) -> bool:
        """Kill the actor ``dead`` in slot ``w`` for good (freeing its resources) and start
        one fresh actor there; nothing if the slot holds another actor already (its
        death was handled). Returns whether it replaced it."""
        import ray

        if self._workers[w] is not dead:
            return False
        with contextlib.suppress(Exception):
            ray.kill(dead, no_restart=True)
        fresh = self._actor_cls.remote(*self._worker_args)
        self._workers[w] = fresh
        self._lease.actors = [a for a in self._lease.actors if a is not dead] + [fresh]
        self._infos = None  # asked again before the next call
        self.replacements += 1
        log.warning("distjac.Engine: worker %d %s; killed it and started a replacement.", w, why)
        return True

    def _check_open(self, call: str) -> None:
        if not self._lease.active:
            raise RuntimeError(f"{call}: this Engine was shut down; create a new distjac.Engine.")

    def __repr__(self) -> str:
        state = f"{self.num_workers} workers" if self._lease.active else "shut down"
        return (f"Engine(address={self.address!r}, device={self.device!r}, {state}, "
                f"parallel_iterations={self.parallel_iterations}, shard_size={self.shard_size})")

    # -- planning ----------------------------------------------------------------------

    def _on_first_worker(self, submit: Callable, call: str, what: str, start: int, stop: int, *,
                         limit: float | None = None, optional: bool = False):
        """``ray.get(submit(actor))`` on worker 0, bounded like a shard (NOTE [stalled
        shards]): ``limit`` (a job's shard_timeout_s), else the Engine's, else
        FIRST_SHARD_TIMEOUT_S. A worker that dies or stalls is replaced and the call made
        again, max_retries times; an ``optional`` call (one the caller can do without) is
        made once and gives None instead. A worker's own error is raised as the caller
        should see it."""
        import ray

        limit = limit or self.shard_timeout_s or FIRST_SHARD_TIMEOUT_S
        for _ in range(1 if optional else self.max_retries + 1):
            actor = self._workers[0]
            ref = submit(actor)
            try:
                return ray.get(ref, timeout=limit)
            except ray.exceptions.RayTaskError as err:
                error = _remote_error(err, call)
                raise error from error.__cause__
            except ray.exceptions.GetTimeoutError as err:
                reason, last = f"it did not finish within {limit:g} s", err
            except ray.exceptions.RayActorError as err:
                reason, last = f"its worker died ({type(err).__name__})", err
            if self._replace_worker(0, actor, reason):
                with contextlib.suppress(Exception):  # its start is not the probe's time
                    ray.get(self._workers[0].info.remote(), timeout=self.startup_timeout)
            if optional:
                self._optional_failure = f"{what} on rows [{start}, {stop}): {reason}"
                return None
        raise ShardError(
            f"{call}: {what} on rows [{start}, {stop}) failed {self.max_retries + 1} times ({reason}); "
            f"max_retries={self.max_retries}. Check the model or fn on these rows and the workers' logs, "
            "or raise max_retries or shard_timeout_s.",
            shard=0, start=start, stop=stop, node=None,
        ) from last

    def _choose_for_job(self, shipment: _Shipment, job, tasks: list, limit: float | None = None) -> list:
        """NOTE [one choice per job]: with ``jacobian.mode: auto``, worker 0 chooses the
        kernel's strategy once, on the first shard's rows and weighed against the job's
        rows; every task then carries it, so no other worker measures. The choice and
        its record are ``self.last_decision``; the report's ``strategies`` counts the shards that ran it.
        Choosing is bounded like a shard (``limit``: the job's shard timeout); where it
        does not finish, its worker is replaced and the shards run the choice by sizes
        (reverse mode where the output is no larger than the input, else forward mode),
        so a model that stalls on the first shard's rows stalls a shard, which is retried
        and reported as any shard is."""
        self.last_decision = None
        if not tasks or job.options.mode != "auto" or job.spec.estimates or job.options.structure is not None:
            return tasks  # nothing to choose: explicit, matrix-free, or the diagonal
        first = tasks[0]
        chosen = self._on_first_worker(
            lambda actor: actor.choose.remote(shipment.key, shipment.box, first, job.plan.rows),
            "Engine.run(spec)", "choosing the kernel's strategy", first.start, first.stop, limit=limit,
            optional=True)
        if chosen is None:
            m, n = math.prod(job.plan.out_shape), math.prod(job.plan.in_shape)
            note = (f"not measured: {self._optional_failure}; the choice by sizes (M={m:,}, N={n:,}) instead, "
                    "and the worker replaced")
            log.warning("distjac: %s", note)
            mode, chunk = ("rev" if m <= n else "fwd"), job.options.chunk_size  # the job's own chunk, if it set one
            chosen = (Strategy(mode, chunk=chunk, record=Decision(mode, "sizes", notes=(note,))),
                      {"pid": None, "node": None})
        strategy, where = chosen
        self.last_decision = {"strategy": str(strategy), "how": getattr(strategy.record, "how", None),
                              "chosen_on": {"pid": where["pid"], "node": where["node"]},
                              "record": str(strategy.record) if strategy.record is not None else None}
        return [replace(t, options=replace(t.options, strategy=strategy)) for t in tasks]

    def _probe_job(self, shipment: _Shipment, source, rows: int, limit: float | None = None) -> dict:
        """A job's model built and probed on a worker: its output shape and compute dtype
        (bounded by ``limit``, the job's shard timeout, like a shard)."""
        return self._on_first_worker(
            lambda actor: actor.probe_model.remote(shipment.key, shipment.box, source, rows),
            "Engine.run(spec)", "building and probing the model", 0, min(rows, source.num_rows), limit=limit)

    def plan(self, rows: int, in_shape, out_shape, *, itemsize: int = 4, gather: bool = True,
             parallel_iterations: int | None = None) -> ShardPlan:
        """The shard plan this engine would run for ``rows`` examples (no work is done);
        ``parallel_iterations``, where given, overrides the Engine's shards in flight."""
        workers = max(1, self.num_workers)
        return make_plan(
            rows, in_shape, out_shape, in_itemsize=itemsize, shard_size=self.shard_size,
            parallel_iterations=parallel_iterations or self.parallel_iterations or DEFAULT_PARALLEL_ITERATIONS,
            num_workers=workers, shard_bytes=self.shard_bytes, gather=gather,
        )

    # -- the distributed batch Jacobian -------------------------------------------------

    def _open_dataset(self, ds, column, rows, shape, where: str):
        """A Ray Data Dataset as a source (NOTE [a Dataset as a source] in distjac.ray_data):
        the workers start (and take their CPUs) first; they check the blocks."""
        import ray

        from .ray_data import DatasetSource

        self._ready()

        def check(refs, column_, shape_, where_):
            workers = self._workers
            return ray.get([workers[i % len(workers)].block_info.remote(ref, column_, shape_, where_)
                            for i, ref in enumerate(refs)])

        return DatasetSource.open(ds, column, rows, shape, where=where, check=check)

    def batch_jacobian(
        self,
        fn,
        x: torch.Tensor,
        *,
        mode: str = "auto",
        unconnected_gradients: str | UnconnectedGradients = "none",
        experimental_use_pfor: bool = True,
        parallel_iterations: int | None = None,
        chunk_size: int | None = None,
        progress: bool | None = None,
        column: str | None = None,
        shape: Sequence[int] | None = None,
    ) -> torch.Tensor | None:
        """Per-example Jacobians of ``fn`` over ``x``, computed on the workers.

        Same contract as :func:`distjac.batch_jacobian`: ``fn`` maps a batch (B, x1..xm)
        to (B, y1..yn), row i of its output depends only on row i of its input, and it
        is called on blocks of rows (whole shards, or the kernels' blocks), never on one
        example. ``fn`` (a function, or a torch.nn.Module, moved to each worker's device)
        is shipped to the workers once per call, by value when its module is not
        installed there. Every argument after ``x`` is keyword-only.

        Args:
            fn: the function or module.
            x: the batch, a floating tensor of rank >= 2 (any device; it is read once);
                or a ``ray.data.Dataset`` whose tensor column ``column`` holds the
                examples: its blocks stay in Ray's object store and each worker reads
                the rows of its shards (NOTE [a Dataset as a source] in
                distjac.ray_data), in the dataset's order.
            mode: "rev", "fwd" or "auto" (see :func:`distjac.batch_jacobian`).
            unconnected_gradients: "none" returns None when fn(x) does not depend on x,
                "zero" returns zeros.
            experimental_use_pfor: False runs one autograd pass per row on the workers.
            parallel_iterations: shards in flight for this call, as the Engine's argument
                of that name (None: the Engine's). Not TF's per-pass rows: on the Engine
                that knob is ``chunk_size``.
            chunk_size: Jacobian rows per vectorized pass on the workers for this call
                (the kernels' ``parallel_iterations``; None: the Engine's).
            progress: show a progress bar (None: the engine's setting).
            column: for a Dataset, its tensor column (None: the only one).
            shape: for a Dataset whose column holds flat rows, the per-example shape
                (e.g. (3, 32, 32) for rows of 3,072 values).

        Returns:
            A tensor (B, y1..yn, x1..xm) of x's dtype on x's device, or None (for a
            Dataset: on the CPU, its column's dtype). It does not carry autograd
            history (it was computed in other processes).

        Raises:
            ShapeError, DtypeError, OptionError, TypeError: bad input, before any shard
                is scheduled (the same errors as the in-process call).
            SourceError, SourceDtypeError: a Dataset without a usable tensor column
                (none, several without ``column=``, nulls, ragged or integer rows), or
                one Ray Data cannot execute because no CPU is free.
            ShardError: fn failed on a shard; names the shard, its rows and node, with
                the original exception chained (``__cause__``).
        """
        call = "Engine.batch_jacobian(fn, x)"
        self._check_open(call)
        check_int(parallel_iterations, "parallel_iterations", call, none="None (the Engine's)")
        check_int(chunk_size, "chunk_size", call, none="None (the Engine's)")
        source = None
        if type(x).__module__.startswith("ray.data") and hasattr(x, "to_arrow_refs"):
            # The cheap checks first; then the workers take their CPUs, and only then is
            # the dataset executed (NOTE [a Dataset as a source] in distjac.ray_data).
            check_functional_call(fn, torch.empty(0, 1), mode, unconnected_gradients, call)
            _check_pfor(experimental_use_pfor, call)
            source = self._open_dataset(x, column, None, shape, f"{call} on a ray.data.Dataset")
            x = torch.empty((0, *source.shape), dtype=getattr(torch, source.dtype))  # stands for its rows
        elif column is not None or shape is not None:
            raise OptionError(f"{call}: column= and shape= are for a ray.data.Dataset x; x is a "
                              f"{type(x).__name__}.")
        x, mode, unconnected = check_functional_call(fn, x, mode, unconnected_gradients, call)
        _check_pfor(experimental_use_pfor, call)
        return _Call(self, fn, x, mode, unconnected, experimental_use_pfor, call, progress, source,
                     in_flight=parallel_iterations, chunk_size=chunk_size).run()

    def run(self, spec, *, progress: bool | None = None) -> dict:
        """Run a job: a :class:`distjac.JobSpec` streamed to Arrow/Parquet part files.

        The driver checks and plans the job (:func:`distjac.jobs.prepare_job`), opens or
        resumes its output, and ships the model once; each worker reads its shard's rows
        itself from the shard's source descriptor (the driver sends no data), computes
        them with the kernels, reduces them if asked, and writes its own part file
        (temporary name, fsync, rename). The driver records each part in the manifest as
        it completes, so a job stopped at any point resumes with what was finished.

        The shard size, shards in flight, kernel chunk and shard timeout are this
        Engine's where it was given them, else the job's, else the defaults; see NOTE
        [the Engine's settings and the job's]. The report's ``shard_size`` and
        ``in_flight`` say what ran.

        Args:
            spec: the job.
            progress: show a progress bar; None follows the spec, then the terminal.

        Returns:
            The job report (also written to ``_report.json`` in the output).

        Raises:
            ConfigError, SourceError, SourceNotFoundError, SourceDtypeError,
                OutputExistsError: the job cannot start; nothing was written.
            ShardError: a shard failed; finished parts stay on disk for a resume.
        """
        from .jobs import JOB_PROBE_ROWS, check_job, prepare_job, run_job

        call = "Engine.run(spec)"
        self._check_open(call)
        data = getattr(spec, "data", None)
        if getattr(data, "kind", None) == "ray_dataset" and data.dataset is not None:
            # Opened (executed and checked on the workers) before check_job, which finds it opened.
            self._open_dataset(data.dataset, data.column, data.rows, data.shape, "data.dataset")
        # Checks that run no user code (the spec, the source, the factory's module) first.
        source = check_job(spec, device_here=False)
        # NOTE [the driver never runs the model] (distjac.shard): the factory is imported
        # here, never called; the recipe goes to the workers once, and each builds the
        # model on its own device once per process. The probe runs on a worker.
        shipment: list[_Shipment] = []
        # The Engine's shard timeout where it was given one, else the job's: for the probe,
        # the choice and every shard (NOTE [the Engine's settings and the job's]).
        timeout = self.shard_timeout_s if self.shard_timeout_s is not None else spec.engine.shard_timeout_s

        def probe(recipe_, source_) -> dict:
            self._ready()
            shipment.append(_ship(self, recipe_))
            if source_.kind == "tensor":  # ship the probe's rows, not the whole tensor
                source_ = type(source_)(source_.tensor[:JOB_PROBE_ROWS].clone())
            return self._probe_job(shipment[0], source_, JOB_PROBE_ROWS, limit=timeout)

        # NOTE [the Engine's settings and the job's]
        job = prepare_job(spec, num_workers=self.num_workers, shard_size=self.shard_size,
                          parallel_iterations=self.parallel_iterations, chunk_size=self.chunk_size,
                          shard_bytes=self.shard_bytes, probe=probe, source=source)
        in_flight = job.plan.in_flight

        def executor(job_, tasks, on_progress=None):
            if not tasks:
                return
            if not shipment:  # a finished job was not probed (a damaged part to redo)
                self._ready()
                shipment.append(_ship(self, job_.recipe))
            if job_.source.kind == "tensor":
                # A tensor in memory is its own data: as a task's source it would travel
                # whole with every shard. Each task carries its own rows instead (as in
                # batch_jacobian); the driver keeps the tensor alive until the job ends.
                wire = to_wire(job_.source.read(0, job_.source.num_rows).to(getattr(torch, job_.compute_dtype)))
                tasks = [job_.task(t.shard, t.start, t.stop, rows=wire[t.start:t.stop]) for t in tasks]
            tasks = self._choose_for_job(shipment[0], job_, tasks, limit=timeout)
            for _task, result, done in _map_shards(self, shipment[0], tasks, in_flight=in_flight, call=call,
                                                   shard_timeout_s=timeout, on_progress=on_progress,
                                                   settle_s=FAILED_JOB_SETTLE_S):
                # Submission to receipt, less the runner's own time: queueing and transfer.
                runner_s = result.timing.ended - result.timing.started
                yield replace(result, wait_s=max(0.0, done.wait_s - runner_s), retries=self._retries)

        started = None if self._ran_job else self._created
        self._ran_job = True
        return run_job(spec, executor, prepared=job, progress=progress, started=started)


# --------------------------------------------------------------------------------------
# Shipping fn, scheduling shards (shared by batch_jacobian and run)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shipment:
    """A function shipped for one call: its content key and its boxed object ref."""

    key: str
    box: list


@dataclass(frozen=True)
class _Done:
    """How a finished shard got done (for ShardStats)."""

    worker: int
    attempts: int
    wait_s: float


def _check_pfor(value, call: str) -> None:
    if not isinstance(value, bool):
        raise OptionError(f"{call}: experimental_use_pfor={value!r} is not valid; use True or False.")


def _ship(engine: Engine, fn) -> _Shipment:
    """Serialize fn once, put it into the object store once, and have every worker load
    it in the background (see NOTE [shipping user code by value] in distjac.worker)."""
    import ray

    blob = serialize_function(fn)
    key = function_key(blob)
    box = [ray.put(blob)]  # in a list, so Ray hands workers the ref, not a fresh copy per call
    for w in engine._workers:
        w.prepare.remote(key, box)
    return _Shipment(key, box)


def _remote_error(err: BaseException, call: str) -> BaseException:
    """The exception the caller should see for a worker's failure (raise it ``from`` its
    ``__cause__``)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, ShardRunError):
        return cause.shard_error(call)
    if isinstance(cause, (DistjacError, TypeError)) and not isinstance(cause, ShardError):
        cause.__cause__ = None
        return cause  # the core's own checks (output rank, dtype), a job's ConfigError: as raised
    return err


@dataclass
class _Flight:
    """One submission of a shard: to which worker (slot and actor), and when it started."""

    index: int
    worker: int
    actor: Any
    submitted: float
    started: float | None = None  # when it became its worker's oldest shard in flight
    first: bool = False  # the worker's first shard of the call (it also loads fn)
    warned: bool = False


def _stall_timeout(explicit: float | None, run_times: list[float], first: bool) -> float:
    """NOTE [stalled shards]."""
    if explicit is not None:
        return explicit
    if first or not run_times:
        return FIRST_SHARD_TIMEOUT_S
    return max(MIN_SHARD_TIMEOUT_S, DEFAULT_SHARD_TIMEOUT_FACTOR * float(np.median(run_times)))


def _map_shards(engine: Engine, shipment: _Shipment, tasks: list[ShardTask], *,
                in_flight: int, call: str, shard_timeout_s: float | None = None,
                on_progress: Callable[[float], None] | None = None, settle_s: float = 0.0):
    """Run every task on the workers; yield ``(task, result, _Done)`` once per shard.

    At most ``in_flight`` shards are out at once, each sent to the least busy worker.
    Results come back in completion order; ``result`` is the worker's
    :class:`distjac.shard.ShardResult` (a record batch, or a job's written part). See
    NOTE [retries, never twice] and NOTE [stalled shards]. Closing the generator early
    drops the shards still in flight (their workers finish them). ``on_progress(rows)``,
    if given, hears the rows done so far of the shards in flight, polled from the
    workers about every PROGRESS_POLL_S (NOTE [progress within a shard] in distjac.shard).
    ``settle_s``: when the call fails, how long to wait for the shards already sent, which
    are yielded as they finish before the error is raised (NOTE [a failed job's shards in
    flight]); 0 raises at once.

    NOTE [a failed job's shards in flight]
    A shard sent to a worker runs to its end whatever the driver does (calls are dropped,
    not cancelled: see the ``finally`` below), and a job's worker writes its part. When a
    job fails (fn raised on a shard, or a shard was lost max_retries times), the driver
    used to raise at once: the shards already sent wrote their parts a moment later, on
    disk but not in the manifest, so read_result refused rows whose part was there (a
    resume adopted them, by their checksums). Now no new shard is sent, the ones in
    flight are waited for (at most ``settle_s``: FAILED_JOB_SETTLE_S for jobs) and yielded
    as they finish, so the manifest records them, and then the error is raised. An
    in-memory batch_jacobian has nothing to record and raises at once.

    Raises:
        ShardError: fn failed on a shard, or a shard was lost (its worker died, its result
            was lost, or it stalled) more than max_retries times.
    """
    import ray

    workers = engine._workers  # the engine's list: replacements land in it
    timeout = engine.shard_timeout_s if shard_timeout_s is None else shard_timeout_s
    n = len(tasks)
    queue = deque(range(n))
    finished = np.zeros(n, dtype=bool)
    attempts = [0] * n  # submissions
    failures = [0] * n  # losses charged to the shard
    pending: dict = {}  # ref -> _Flight
    lanes = [deque() for _ in workers]  # per worker slot: its refs in flight, oldest first
    fresh = [True] * len(workers)  # the slot's actor has had no shard in this call yet
    suspects: set[int] = set()  # shards in flight on a worker when it died, not finished since
    booting: dict[int, tuple] = {}  # slot -> (info ref of its replacement, since)
    run_times: list[float] = []  # seconds each finished shard ran (as seen by the driver)
    system_errors = _system_errors()
    actor_errors = tuple(e for e in system_errors if issubclass(e, ray.exceptions.RayActorError))
    nxt = 0
    polls: dict[int, tuple] = {}  # slot -> (the actor polled, its progress poll in flight)
    answers: dict[int, dict] = {}  # slot -> its actor's last answer: {shard: fraction of compute done}
    last_poll = [0.0]
    last_fraction: dict[int, float] = {}  # shard -> its highest fraction reported (rows_in_flight)

    def poll_progress(now: float) -> None:
        for w, (actor, ref) in list(polls.items()):
            if ray.wait([ref], timeout=0)[0]:
                del polls[w]
                try:
                    answer = ray.get(ref)
                except Exception:  # a worker that died answers nothing; lose_worker handles it
                    answer = None
                if answer is not None and workers[w] is actor:  # not a replaced worker's
                    answers[w] = answer
        if now - last_poll[0] >= PROGRESS_POLL_S:
            last_poll[0] = now
            for w, lane in enumerate(lanes):
                if lane and w not in polls and w not in booting:
                    polls[w] = (workers[w], workers[w].progress.options(concurrency_group=PROGRESS_GROUP).remote())
        refs = [r for lane in lanes for r in lane if r in pending]
        done = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        rows = 0.0
        for w, lane in enumerate(lanes):
            running = {}
            for r in lane:
                if r not in pending:
                    continue
                t = tasks[pending[r].index]
                if r in done:  # finished, its result not taken yet: all its rows
                    rows += t.stop - t.start
                else:
                    running[t.shard] = t.stop - t.start
            rows += rows_in_flight(answers.get(w, {}), running, last_fraction)
        on_progress(rows)

    def start_head(w: int, now: float) -> None:
        if lanes[w] and w not in booting:  # a replacement's start is not its shard's time
            head = pending[lanes[w][0]]
            if head.started is None:
                head.started = now

    def charge(i: int, reason: str, err: BaseException | None) -> None:
        failures[i] += 1
        if failures[i] > engine.max_retries:
            task = tasks[i]
            raise ShardError(
                f"{call}: shard {task.shard} (rows [{task.start}, {task.stop})) was lost "
                f"{failures[i]} times ({reason}); max_retries={engine.max_retries}. Check fn on these "
                "rows and the workers' logs (memory, crashes), or raise max_retries"
                f"{' or shard_timeout_s' if 'did not finish' in reason else ''}.",
                shard=task.shard, start=task.start, stop=task.stop, node=None,
            ) from err

    def lose_worker(w: int, actor, reason: str, err: BaseException | None) -> None:
        """The worker in slot w is gone (or killed for a stall): replace it once, charge
        the shard it was running, resubmit everything it held."""
        if workers[w] is actor:
            # Shards it finished before it died stay pending: the loop below yields them.
            # The first one that did not finish is the one it was running.
            lost = [r for r in lanes[w] if not _finished_ok(r)]
            flights = [pending.pop(r) for r in lost]
            lanes[w].clear()
            answers.pop(w, None)  # the dead worker's progress is not its replacement's
            polls.pop(w, None)
            for f in flights:  # redone from the start
                last_fraction.pop(tasks[f.index].shard, None)
            engine._replace_worker(w, actor, reason.split(";")[0])
            fresh[w] = True
            booting[w] = (workers[w].info.remote(), time.perf_counter())
        else:  # pragma: no cover - its refs left with the first report of its death
            flights = []
        for f in reversed(flights):
            if not finished[f.index]:
                engine._retries += 1
                queue.appendleft(f.index)
        if not flights:
            return
        if err is None:  # a stall: the oldest shard in flight is the one that ran
            charge(flights[0].index, reason, err)
            return
        # A death: the shard that killed it is one of the unfinished ones (the one it ran,
        # or one that finished as it died, its reply lost with it). Each is charged and
        # from now on runs alone on a worker until it finishes, so the next death is
        # unambiguous; an innocent shard is charged at most once (NOTE [retries, never twice]).
        suspects.update(f.index for f in flights)
        for f in sorted(flights, key=lambda f: -failures[f.index]):
            charge(f.index, reason, err)

    def settle(failure: BaseException):
        """NOTE [a failed job's shards in flight]."""
        deadline = time.perf_counter() + settle_s
        if pending:
            log.info("distjac: %s failed (%s); waiting up to %g s for %d shard(s) already sent, so the manifest "
                     "records them", call, type(failure).__name__, settle_s, len(pending))
        while pending and (left := deadline - time.perf_counter()) > 0:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(left, _WAIT_TICK_S))
            for ref in ready:
                flight = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception:  # noqa: BLE001 - another failure: the first one is raised
                    continue
                if not finished[flight.index]:
                    finished[flight.index] = True
                    now = time.perf_counter()
                    yield tasks[flight.index], result, _Done(worker=flight.worker, attempts=attempts[flight.index],
                                                             wait_s=now - flight.submitted)

    try:
        while not finished.all():
            while queue and len(pending) < in_flight:
                i = queue[0]
                if finished[i]:
                    queue.popleft()
                    continue
                # A suspect shard runs alone on its worker, and nothing joins it there.
                free = [j for j in range(len(workers)) if not lanes[j] or (
                    i not in suspects and not any(pending[r].index in suspects for r in lanes[j]))]
                if not free:
                    break  # wait for a worker to be free
                queue.popleft()
                w = min(free, key=lambda j: (len(lanes[j]), (j - nxt) % len(workers)))
                nxt = (w + 1) % len(workers)
                actor = workers[w]
                ref = actor.run.remote(shipment.key, shipment.box, tasks[i])
                attempts[i] += 1
                now = time.perf_counter()
                pending[ref] = _Flight(i, w, actor, now, first=fresh[w])
                fresh[w] = False
                lanes[w].append(ref)
                start_head(w, now)
            if not pending:  # pragma: no cover - would be a bug in the loop above
                missing = int((~finished).sum())
                raise RuntimeError(f"{call}: internal error: nothing in flight, {missing} shards missing.")
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=_WAIT_TICK_S)
            now = time.perf_counter()
            for ref in ready:
                flight = pending.get(ref)
                if flight is None:  # dropped with a dead worker while we waited
                    continue
                i, w = flight.index, flight.worker
                task = tasks[i]
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    error = _remote_error(err, call)
                    raise error from error.__cause__
                except actor_errors as err:
                    lose_worker(w, flight.actor, f"its worker died: {type(err).__name__}", err)
                    continue
                except system_errors as err:
                    pending.pop(ref)
                    with contextlib.suppress(ValueError):
                        lanes[w].remove(ref)
                    start_head(w, now)
                    if not finished[i]:
                        engine._retries += 1
                        queue.appendleft(i)
                        charge(i, f"its result was lost: {type(err).__name__}", err)
                    continue
                pending.pop(ref)
                with contextlib.suppress(ValueError):
                    lanes[w].remove(ref)
                start_head(w, now)
                del ref
                if finished[i]:
                    engine._duplicates += 1  # a late copy of a shard already yielded
                    continue
                finished[i] = True
                suspects.discard(i)
                if flight.started is not None:
                    run_times.append(now - flight.started)
                yield task, result, _Done(worker=w, attempts=attempts[i], wait_s=now - flight.submitted)
                del result
            for w, (info_ref, since) in list(booting.items()):
                if ray.wait([info_ref], timeout=0)[0]:
                    del booting[w]
                    start_head(w, time.perf_counter())
                elif time.perf_counter() - since > engine.startup_timeout and lanes[w]:
                    del booting[w]
                    lose_worker(w, workers[w], f"its replacement did not start within "
                                f"{engine.startup_timeout:g} s (startup_timeout)", None)
            _watch(engine, tasks, pending, lanes, run_times, timeout, lose_worker)
            if on_progress is not None:
                poll_progress(time.perf_counter())
    except Exception as failure:
        if settle_s > 0:
            yield from settle(failure)
        raise
    finally:
        # Shards still in flight are dropped, not cancelled: their workers finish them and
        # the results are freed. (Cancelling a queued actor call can leave a gap in Ray's
        # per-caller sequence numbers, after which the actor refuses every later call for
        # 30 s with ActorUnavailableError: seen with Ray 2.60 after a failed call.)
        pending.clear()


def _finished_ok(ref) -> bool:
    """Whether the task behind ``ref`` already finished with a result (not an error)."""
    import ray

    if not ray.wait([ref], timeout=0)[0]:
        return False
    try:
        ray.get(ref, timeout=0)
    except Exception:
        return False
    return True


def _watch(engine: Engine, tasks, pending: dict, lanes, run_times, timeout, lose_worker) -> None:
    """The stall watchdog (NOTE [stalled shards]): warn about a slow shard, and replace a
    worker whose shard has run past the stall timeout."""
    now = time.perf_counter()
    median = float(np.median(run_times)) if run_times else None
    for w, lane in enumerate(lanes):
        if not lane:
            continue
        f = pending[lane[0]]
        if f.started is None:
            continue
        running = now - f.started
        limit = _stall_timeout(timeout, run_times, f.first)
        task = tasks[f.index]
        if running > limit:
            lose_worker(w, f.actor, f"shard {task.shard} did not finish within {limit:g} s; "
                        "its worker was stopped or fn does not return", None)
            continue
        slow = min(max(SLOW_SHARD_FACTOR * (median or 0.0), SLOW_SHARD_MIN_S), limit / 2)
        if not f.warned and running > slow and (median is not None or timeout is not None):
            f.warned = True
            infos = engine._infos or []
            info = infos[w] if w < len(infos) else {}
            than = f", {running / median:.0f}x the median shard ({median:.2f} s)" if median else ""
            log.warning(
                "distjac: shard %d (rows [%d, %d)) has been running for %.1f s on worker %d (pid %s)%s; "
                "it is retried elsewhere after %g s (shard_timeout_s).",
                task.shard, task.start, task.stop, running, w, info.get("pid", "?"), than, limit,
            )


# --------------------------------------------------------------------------------------
# One batch_jacobian call: probe, plan, schedule, gather
# --------------------------------------------------------------------------------------


def place_shard(out: torch.Tensor, batch, start: int, stop: int, *, call: str = "place_shard") -> int:
    """Copy one shard's record batch into rows [start, stop) of ``out``; returns bytes.

    A zero-copy read of the Arrow buffer (mapped from Ray's object store), a check of the
    row ids, then one copy into place (numpy for the dtypes it has, torch for bfloat16).
    """
    rows, values = arrow.from_record_batch(batch)
    if rows.shape[0] != stop - start or (rows.shape[0] and (rows[0] != start or rows[-1] != stop - 1)):
        raise RuntimeError(f"{call}: internal error: shard rows [{start}, {stop}) came back as "
                           f"{rows.shape[0]} rows starting at {rows[:1]}.")
    dst = out[start:stop]
    if out.dtype != torch.bfloat16:  # numpy has no bfloat16
        dst_np = dst.numpy()
        np.copyto(dst_np, values.reshape(dst_np.shape), casting="same_kind")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only buffer, only read
            dst.copy_(torch.from_numpy(values).reshape(dst.shape))
    return values.nbytes


class _Call:
    """One ``Engine.batch_jacobian`` call."""

    def __init__(self, engine: Engine, fn, x, mode, unconnected, use_pfor, call, progress, source=None, *,
                 in_flight: int | None = None, chunk_size: int | None = None):
        self.engine, self.fn, self.x, self.call = engine, fn, x, call
        self.source = source  # a Dataset's rows (x then stands for their shape and dtype)
        self.unconnected = unconnected
        self.in_flight = in_flight  # None: the Engine's parallel_iterations
        chunk = chunk_size if chunk_size is not None else engine.chunk_size
        self.options = KernelOptions(mode=mode, chunk_size=chunk, use_pfor=use_pfor, call=call)
        show = engine.progress if progress is None else progress
        self.show_progress = show  # None: a bar on a terminal, nothing elsewhere (distjac.progress)

    def _task(self, shard: int, start: int, stop: int) -> ShardTask:
        if self.source is not None:  # the worker reads its rows from the Dataset's blocks
            return ShardTask(shard, start, stop, dtype=self.dtype_name, source=self.source.for_rows(start, stop),
                             options=self.options)
        return ShardTask(shard, start, stop, dtype=self.dtype_name, rows=self.wire[start:stop], options=self.options)

    def run(self):

        t_start = time.perf_counter()
        eng, x = self.engine, self.x
        infos = eng._ready()
        self.dtype_name = str(x.dtype).removeprefix("torch.")
        # x read once; the driver keeps it (and fn) alive until the end
        self.wire = to_wire(x) if self.source is None else None
        shipment = _ship(eng, self.fn)

        # 1. Probe fn's output shape and whether it depends on x, on a worker (the driver
        #    may have no GPU, and never runs the user's model itself).
        b = x.shape[0] if self.source is None else self.source.num_rows
        probe_task = self._task(0, 0, min(b, PROBE_ROWS))
        probe = self._probe(shipment, probe_task)
        out_shape = tuple(probe["out_shape"])
        jac_shape = (b, *out_shape, *x.shape[1:])
        # The probe saw its rows only: where the batch has more, the shards say whether
        # any of them reaches fn's output (NOTE [connected somewhere] in distjac.kernels).
        if b == 0 or (not probe["connected"] and b <= probe_task.stop):
            if b > 0 and self.unconnected is UnconnectedGradients.NONE:
                return None
            return torch.zeros(jac_shape, dtype=x.dtype, device=x.device)

        # 2. Plan, and the output every shard is copied into.
        plan = eng.plan(b, tuple(x.shape[1:]), out_shape, itemsize=x.element_size(),
                        parallel_iterations=self.in_flight)
        self.out = _alloc.empty(jac_shape, dtype=x.dtype, device="cpu")

        # 3. Schedule and gather.
        tasks = [self._task(i, *plan.bounds(i)) for i in range(len(plan))]
        eng._retries = eng._duplicates = 0
        connected = False
        shard_stats: dict[int, ShardStats] = {}
        gather_s, gather_bytes = 0.0, 0
        bar = self._progress_bar(b)
        try:
            for task, result, done in _map_shards(eng, shipment, tasks, in_flight=plan.in_flight, call=self.call,
                                                  on_progress=bar.set_in_flight if bar.enabled else None):
                t0 = time.perf_counter()
                gather_bytes += self._place(result.batch, task.start, task.stop)
                connected = connected or result.connected
                t, node, pid = result.timing, result.node, result.pid
                del result  # frees the shard's object-store copy
                dt = time.perf_counter() - t0
                gather_s += dt
                shard_stats[task.shard] = ShardStats(
                    shard=task.shard, start=task.start, stop=task.stop, worker=done.worker,
                    node=node, pid=pid, attempts=done.attempts,
                    compute_s=t.compute_s, wait_s=done.wait_s, gather_s=dt, read_s=t.read_s,
                    to_host_s=t.to_host_s, arrow_s=t.arrow_s, queued_s=t.queued_s,
                    worker_peak_rss_bytes=t.peak_rss_bytes,
                )
                bar.update(task.stop - task.start, shards=1)
                if eng._retries:
                    bar.set_retries(eng._retries)
        finally:
            bar.close()

        wall = time.perf_counter() - t_start
        eng.last_stats = self._stats(plan, shard_stats, infos, wall, gather_s, gather_bytes)
        if not connected and self.unconnected is UnconnectedGradients.NONE:
            return None
        return self.out if x.device.type == "cpu" else self.out.to(x.device)

    def _probe(self, shipment: _Shipment, task: ShardTask) -> dict:
        """fn's output shape and connectivity, probed on a worker."""
        return self.engine._on_first_worker(
            lambda actor: actor.probe.remote(shipment.key, shipment.box, task),
            self.call, "probing fn's output shape", task.start, task.stop)

    def _place(self, batch, start: int, stop: int) -> int:
        return place_shard(self.out, batch, start, stop, call=self.call)

    def _progress_bar(self, total: int):
        from .progress import Progress

        return Progress(total, 0, self.show_progress)

    def _stats(self, plan, shard_stats, infos, wall, gather_s, gather_bytes) -> EngineStats:
        eng = self.engine
        shards = tuple(shard_stats[i] for i in sorted(shard_stats))
        per: dict[int, list[ShardStats]] = {}
        for s in shards:
            per.setdefault(s.worker, []).append(s)
        workers = []
        for w, info in enumerate(infos):
            mine = per.get(w, [])
            rows = sum(s.stop - s.start for s in mine)
            comp = sum(s.compute_s for s in mine)
            workers.append(WorkerStats(
                worker=w, node=info.get("node", ""), pid=info.get("pid", -1), device=info.get("device", ""),
                shards=len(mine), rows=rows, compute_s=comp, rows_per_s=rows / comp if comp > 0 else 0.0,
            ))
        return EngineStats(
            plan=plan, wall_s=wall, rows_per_s=plan.rows / wall if wall > 0 else 0.0,
            gather_bytes=gather_bytes, gather_s=gather_s, retries=eng._retries, duplicates=eng._duplicates,
            shards=shards, workers=tuple(workers),
        )
