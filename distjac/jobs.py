"""Jobs: the driver's side of a job (prepare, plan, resume, record, report) and the
per-shard function workers run.

::

    spec ──prepare_job──> PreparedJob (source opened, model probed, reductions checked, plan)
                              │ open_output: new, or resume (verify, adopt, clean)
                              v
             [ShardDescriptor for each unfinished shard] ──executor──> PartInfo, PartInfo, ...
                              │ manifest.record(part) as each finishes
                              v
                     _report.json, _SUCCESS, report dict

An *executor* is any callable ``executor(descriptors) -> Iterable[PartInfo | dict]`` that
runs :func:`compute_shard` on every descriptor (in any order, anywhere) and yields each
shard's PartInfo as it finishes (or ``PartInfo.to_dict()``, optionally with the shard's
``timing`` by stage, which the report keeps); it raises (a ShardError) when a shard fails
for good.
:func:`sequential_executor` runs them one by one in this process; the Ray engine runs
them remotely with at most ``engine.parallel_iterations`` in flight. A descriptor is a
small picklable value: the source (paths and metadata, never data), the model spec, the
Jacobian options and the output location. Workers read, compute and write their own
shard; the driver only records PartInfos.

NOTE [a job checks everything before any work]
``prepare_job`` first makes the checks that run no user code (:func:`check_job`): the
spec, that engine.device exists where the shards run in this process, the source (files,
columns, dtypes, nulls) and that the factory's module can be found. Then it builds the
model and runs it on one or two examples (so a model that does not fit the data, or
whose output is not a floating tensor (batch, *out), fails here, with the spec's key in
the message), learns the per-example output shape and checks the reductions against it.
Only then is the output directory touched, so a bad job leaves nothing on disk and its
error is a JobInputError (the CLI's exit status 2).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import arrow as arrow_mod
from .arrow import JACOBIAN_COLUMN, ROW_COLUMN
from .config import JacobianSpec, JobSpec, ModelSpec, build_model, find_factory_module
from .errors import ConfigError, DistjacError, ResultError, ShardError
from .io.sink import (
    REPORT_NAME,
    Manifest,
    PartInfo,
    _atomic_write,
    lock_output,
    open_output,
    part_name,
    write_part,
)
from .io.sources import Source, open_source
from .plan import DEFAULT_SHARD_BYTES, ShardPlan, format_bytes, make_plan
from .reduce import check_reductions, reduce_block
from .worker import peak_rss_bytes, values_to_host

__all__ = [
    "CastSource",
    "Executor",
    "PartSink",
    "PreparedJob",
    "ShardDescriptor",
    "check_job",
    "compute_shard",
    "get_model",
    "prepare_job",
    "resolve_device",
    "run_job",
    "sequential_executor",
    "shard_record_batch",
]

# Built models each process keeps (keyed by model spec, device and dtype): a worker runs
# one job's shards, so one entry would do; two let a driver alternate between jobs.
MODEL_CACHE_SIZE = 2
# Rows the model is probed on, on the driver, while preparing a job: its output shape and
# compute dtype only. Fewer than the kernels' PROBE_ROWS (which also measure connectivity
# and activation memory) on purpose: the driver may be a laptop running a large model.
JOB_PROBE_ROWS = 2


# -----------------------------------------------------------------------------------------
# the shard descriptor and the per-shard function
# -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardDescriptor:
    """Everything a worker needs for one shard; small and picklable (no data).

    Attributes:
        index: the shard's index in the plan.
        start, stop: its row range [start, stop) in the source.
        source: the opened source (see :mod:`distjac.io.sources`).
        model: the model spec (built once per worker process, see :func:`get_model`).
        jacobian: mode, chunk_size, reductions, storage and compute dtypes.
        compute_dtype: the resolved torch dtype name the model runs in.
        in_ndim: rank of one example (to split a Jacobian's out and in dimensions).
        out_dir: the output directory (absolute; shared by all workers on a cluster).
        format: "arrow" or "parquet".
        spec_hash: stored in each part's metadata, checked on resume.
        device: the engine's device setting ("auto", "cpu", "cuda", "cuda:N").
    """

    index: int
    start: int
    stop: int
    source: Source
    model: ModelSpec
    jacobian: JacobianSpec
    compute_dtype: str
    in_ndim: int
    out_dir: str
    format: str
    spec_hash: str
    device: str = "auto"

    @property
    def file(self) -> str:
        return part_name(self.index, self.format)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto" (or None): the first CUDA device this process sees, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_MODELS: OrderedDict[tuple, Any] = OrderedDict()


def get_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype):
    """The model of ``spec`` on ``device`` in ``dtype``, built once per process."""
    key = (spec.factory, json.dumps(dict(spec.kwargs), sort_keys=True, default=repr), spec.weights,
           spec.weights_key, str(device), str(dtype))
    model = _MODELS.get(key)
    if model is None:
        model = build_model(spec, device=device, dtype=dtype)
        _MODELS[key] = model
        while len(_MODELS) > MODEL_CACHE_SIZE:
            _MODELS.popitem(last=False)
    _MODELS.move_to_end(key)
    return model


# The stages of a shard's time on its worker, as they appear in a part's ``timing`` (the
# job report's per-shard breakdown); the driver adds ``wait_s`` (queueing and transfer).
WORKER_STAGES = ("read_s", "compute_s", "to_host_s", "arrow_s", "write_s")


def stored_values(jac: torch.Tensor, jacobian: JacobianSpec, in_ndim: int) -> dict[str, Any]:
    """``to_record_batch``'s values for a shard's Jacobian: the job's reductions, computed
    where ``jac`` is (on a GPU, before anything is copied to the host), or the Jacobian."""
    if jacobian.reduce:
        return {"reductions": reduce_block(jac, jacobian.reduce, in_ndim)}
    return {"jacobian": jac}


def _shard_record_batch_timed(desc: ShardDescriptor, model: Any, device: Any) -> tuple[Any, dict[str, float]]:
    from .kernels import batch_jacobian

    dev = resolve_device(device if device is not None else desc.device)
    fn = model if model is not None else get_model(desc.model, dev, getattr(torch, desc.compute_dtype))
    t0 = time.perf_counter()
    x = desc.source.read(desc.start, desc.stop).to(device=dev, dtype=getattr(torch, desc.compute_dtype))
    t1 = time.perf_counter()
    jac = batch_jacobian(fn, x, mode=desc.jacobian.mode, parallel_iterations=desc.jacobian.chunk_size,
                         unconnected_gradients="zero")
    values = stored_values(jac, desc.jacobian, desc.in_ndim)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t2 = time.perf_counter()
    values = values_to_host(values)
    t3 = time.perf_counter()
    batch = arrow_mod.to_record_batch(range(desc.start, desc.stop), dtype=desc.jacobian.dtype, **values)
    t4 = time.perf_counter()
    to_host = t3 - t2 if dev.type != "cpu" else 0.0
    return batch, {"read_s": t1 - t0, "compute_s": t2 - t1, "to_host_s": to_host, "arrow_s": t4 - t3}


def shard_record_batch(desc: ShardDescriptor, *, model: Any = None, device: Any = None):
    """One shard's result as an Arrow record batch (``row`` + ``jacobian`` or reductions),
    without writing it. ``model``/``device`` default to the descriptor's (built once per
    process)."""
    return _shard_record_batch_timed(desc, model, device)[0]


def compute_shard(desc: ShardDescriptor, *, model: Any = None, device: Any = None) -> PartInfo:
    """Compute one shard and write its part file: what a worker runs for a job.

    Reads rows [start, stop) from the descriptor's source, computes their Jacobians with
    the kernels on ``device`` (default: the descriptor's, "auto" = this process's GPU if
    any), reduces them if asked, and writes ``part-NNNNN.<format>`` atomically.

    Args:
        desc: the shard.
        model: an already built model (a worker that holds one); None builds the
            descriptor's model spec once per process.
        device: overrides the descriptor's device.

    Returns:
        The part's PartInfo (file, rows, sha256, bytes, seconds, worker).

    Raises:
        ShardError: anything failed; names the shard, its rows and host, chained from
            the original error.
    """
    part, _ = _compute_shard_timed(desc, model, device)
    return part


def _compute_shard_timed(desc: ShardDescriptor, model: Any, device: Any) -> tuple[PartInfo, dict[str, Any]]:
    """compute_shard, and the shard's time per stage (WORKER_STAGES, plus the process's
    peak resident memory)."""
    t0 = time.perf_counter()
    try:
        batch, timing = _shard_record_batch_timed(desc, model, device)
        t1 = time.perf_counter()
        part = write_part(desc.out_dir, desc.index, desc.start, desc.stop, batch, desc.format,
                          metadata=part_metadata(desc.spec_hash, desc.source.num_rows, desc.in_ndim))
        timing["write_s"] = time.perf_counter() - t1
        timing["peak_rss_bytes"] = peak_rss_bytes()
    except ShardError:
        raise
    except Exception as e:
        host = socket.gethostname()
        raise ShardError(
            f"shard {desc.index} (rows [{desc.start}, {desc.stop})) failed on {host}: {type(e).__name__}: {e}",
            shard=desc.index, start=desc.start, stop=desc.stop, node=host,
        ) from e
    return replace(part, seconds=time.perf_counter() - t0), timing


def part_metadata(spec_hash: str, rows: int | None, in_ndim: int) -> dict[str, str]:
    """What a part's schema records of its job besides its shard: the spec hash, and the
    job's rows and input rank, from which ``distjac repair`` rebuilds a lost manifest."""
    meta = {"spec_hash": spec_hash, "in_ndim": str(in_ndim)}
    if rows is not None and rows >= 0:
        meta["rows"] = str(rows)
    return meta


Executor = Callable[[Sequence[ShardDescriptor]], Iterable["PartInfo | dict[str, Any]"]]


def sequential_executor(descriptors: Sequence[ShardDescriptor]) -> Iterable[dict[str, Any]]:
    """Run every shard in this process, one after the other (engine.num_workers: 0).
    Yields each part as a dict with its ``timing`` (see :data:`WORKER_STAGES`)."""
    for desc in descriptors:
        part, timing = _compute_shard_timed(desc, None, None)
        yield {**part.to_dict(), "timing": timing}


@dataclass(frozen=True)
class CastSource:
    """A source whose rows come out in the job's compute dtype (for the engine's workers,
    which call ``read(start, stop)`` and move the result to their device)."""

    source: Source
    dtype: str

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.source.read(start, stop).to(getattr(torch, self.dtype))


@dataclass(frozen=True)
class PartSink:
    """Writes a worker's Jacobian record batch as a job's part: the ``sink`` of the
    engine's ``JacobianWorker.compute(..., sink=)`` seam.

    ``prepare(jac)`` (called by the worker right after the kernel, on its device) turns a
    shard's Jacobian into the values to store: the reductions if the job asks for them.
    ``write(batch, task)`` takes the worker's record batch (reduced already, or a full
    Jacobian that it reduces), converts to the job's storage dtype, writes the part and
    returns ``PartInfo.to_dict()`` with the shard's ``timing``. ``task`` needs
    ``shard``, ``start`` and ``stop``.
    """

    out_dir: str
    format: str
    spec_hash: str
    jacobian: JacobianSpec
    in_ndim: int
    rows: int = -1  # the job's rows (for part_metadata); -1: unknown

    def prepare(self, jac: torch.Tensor) -> dict[str, Any]:
        """What the worker stores of a shard's Jacobian (:func:`stored_values`)."""
        return stored_values(jac, self.jacobian, self.in_ndim)

    def write(self, batch, task) -> dict[str, Any]:
        t0 = time.perf_counter()
        if JACOBIAN_COLUMN in batch.schema.names:
            rows, values = arrow_mod.from_record_batch(batch)
            jac = torch.from_numpy(values.copy() if not values.flags.writeable else values)
            out = arrow_mod.to_record_batch(rows, dtype=self.jacobian.dtype, **self.prepare(jac))
        else:  # reduced by the worker (prepare): only the storage dtype is left to apply
            rows = batch.column(ROW_COLUMN).to_numpy(zero_copy_only=False)
            reductions = {name: torch.from_numpy(batch.column(name).to_numpy(zero_copy_only=False).copy())
                          for name in self.jacobian.reduce}
            out = arrow_mod.to_record_batch(rows, reductions=reductions, dtype=self.jacobian.dtype)
        out = arrow_mod.with_metadata(out, arrow_mod.schema_metadata(batch.schema))  # the worker's annotation
        part = write_part(self.out_dir, task.shard, task.start, task.stop, out, self.format,
                          metadata=part_metadata(self.spec_hash, self.rows, self.in_ndim))
        # PartInfo.seconds is the worker's whole time on the shard: its read, compute,
        # to-host and Arrow times (the batch's annotation) plus this reduce and write.
        info = arrow_mod.annotation(batch)
        timing = {"read_s": float(info.get("load_s", 0.0)), "compute_s": float(info.get("compute_s", 0.0)),
                  "to_host_s": float(info.get("to_host_s", 0.0)), "arrow_s": float(info.get("arrow_s", 0.0)),
                  "write_s": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes()}
        seconds = sum(timing[k] for k in WORKER_STAGES)
        return {**replace(part, seconds=seconds).to_dict(), "timing": timing}


# -----------------------------------------------------------------------------------------
# preparing a job
# -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedJob:
    """A checked job: its source, shapes and plan. Printable (``distjac plan``).

    Attributes:
        spec: the job spec.
        source: the opened source.
        in_shape, out_shape: per-example input and model output shapes.
        compute_dtype: the torch dtype name the model runs in.
        plan: the shard plan (``distjac.plan.ShardPlan``).
        spec_hash: ``spec.spec_hash()``.
        out_dir: the absolute output directory.
    """

    spec: JobSpec
    source: Source
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    compute_dtype: str
    plan: ShardPlan
    spec_hash: str
    out_dir: str

    @property
    def columns(self) -> list[str]:
        return [arrow_mod.ROW_COLUMN, *(self.spec.reductions or [arrow_mod.JACOBIAN_COLUMN])]

    @property
    def stored_row_bytes(self) -> int:
        """Bytes one example takes in the output (its row id included)."""
        item = torch.empty((), dtype=getattr(torch, self.spec.jacobian.dtype)).element_size()
        values = len(self.spec.reductions) if self.spec.reductions else math.prod(self.out_shape + self.in_shape)
        return 8 + values * item

    def info(self) -> dict[str, Any]:
        """What the manifest keeps for readers."""
        from . import __version__

        spec = self.spec.to_dict()
        if self.spec.data.kind == "tensor":
            spec["data"]["tensor"] = self.spec.normalized()["data"]["tensor"]
        return {
            "rows": self.plan.rows,
            "input_shape": list(self.in_shape),
            "output_shape": list(self.out_shape),
            "format": self.spec.output.format,
            "dtype": self.spec.jacobian.dtype,
            "compute_dtype": self.compute_dtype,
            "reduce": list(self.spec.reductions) or None,
            "columns": self.columns,
            "shard_size": self.plan.shard_size,
            "source": self.source.describe(),
            "distjac_version": __version__,
            "spec": json.loads(json.dumps(spec, default=repr)),
        }

    def descriptor(self, index: int, start: int, stop: int) -> ShardDescriptor:
        return ShardDescriptor(
            index=index, start=start, stop=stop, source=self.source, model=self.spec.model,
            jacobian=self.spec.jacobian, compute_dtype=self.compute_dtype, in_ndim=len(self.in_shape),
            out_dir=self.out_dir, format=self.spec.output.format, spec_hash=self.spec_hash,
            device=self.spec.engine.device,
        )

    def part_sink(self) -> PartSink:
        """The sink for the engine's ``JacobianWorker.compute(..., sink=)`` seam."""
        return PartSink(self.out_dir, self.spec.output.format, self.spec_hash, self.spec.jacobian, len(self.in_shape),
                        rows=self.plan.rows)

    def reader(self) -> CastSource:
        """The source for the engine's ``ShardTask(source=)``: rows in the compute dtype."""
        return CastSource(self.source, self.compute_dtype)

    def summary(self) -> dict[str, Any]:
        plan = self.plan.summary()
        stored = self.stored_row_bytes
        return {
            "spec_hash": self.spec_hash,
            "model": self.spec.model.factory,
            "source": self.source.describe(),
            "compute_dtype": self.compute_dtype,
            "mode": self.spec.jacobian.mode,
            "reduce": list(self.spec.reductions) or None,
            "output": self.out_dir,
            "format": self.spec.output.format,
            "columns": self.columns,
            "stored_bytes_per_shard": stored * self.plan.shard_size if len(self.plan) else 0,
            "stored_bytes_total": stored * self.plan.rows,
            "plan": plan,
        }

    def __str__(self) -> str:
        s = self.summary()
        b = format_bytes
        lines = [
            ("spec hash", s["spec_hash"]),
            ("model", f"{s['model']} ({self.compute_dtype}, mode {s['mode']})"),
            ("data", s["source"]),
            ("keeps", ", ".join(s["reduce"]) if s["reduce"] else f"jacobian {self.out_shape + self.in_shape} per row"),
            ("output", f"{s['output']} ({s['format']}, {self.spec.jacobian.dtype})"),
            ("stored", f"{b(s['stored_bytes_total'])} total, {b(s['stored_bytes_per_shard'])} per shard"),
            ("driver", "holds no shard data: workers read their rows and write their parts"),
        ]
        width = max(len(k) for k, _ in lines)
        head = "\n".join(f"  {k:<{width}}  {v}" for k, v in lines)
        plan = str(self.plan).replace("ShardPlan\n", "")
        return f"Job\n{head}\nShardPlan (worker peak: one shard's Jacobian before it is reduced)\n{plan}"


def _probe_shapes(spec: JobSpec, source: Source) -> tuple[tuple[int, ...], str]:
    """Build the model on the CPU and run it on one or two rows: (out_shape, compute dtype).

    The output must be one floating-point tensor (batch, *out) with the input's batch size.
    """
    model = build_model(spec.model)
    if spec.jacobian.compute_dtype is not None:
        dtype = spec.jacobian.compute_dtype
    else:
        params = [p for p in getattr(model, "parameters", lambda: [])() if p.is_floating_point()]
        dtype = str(params[0].dtype).removeprefix("torch.") if params else source.dtype
    tdtype = getattr(torch, dtype)
    if isinstance(model, torch.nn.Module):
        model.to(dtype=tdtype)
    n = min(JOB_PROBE_ROWS, source.num_rows)
    x = source.read(0, n).to(tdtype) if n else torch.zeros((1, *source.shape), dtype=tdtype)
    key = f"config: model.factory={spec.model.factory!r}"
    try:
        with torch.no_grad():
            y = model(x)
    except Exception as e:
        raise ConfigError(
            f"{key} fails on a batch of shape {tuple(x.shape)} "
            f"({dtype}) from the data: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if isinstance(y, (tuple, list, dict)):
        raise ConfigError(
            f"{key} returns a {type(y).__name__} of {len(y)} values on a batch {tuple(x.shape)}; distjac "
            f"differentiates one tensor (batch, *out). Wrap the model so that it returns one tensor."
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
    return tuple(y.shape[1:]), dtype


def _check_device_here(device: str) -> None:
    """ConfigError unless ``device`` (engine.device) exists on this machine."""
    if not device.startswith("cuda"):
        return
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    index = int(device.partition(":")[2] or 0)
    if index < count:
        return
    have = "no CUDA device" if count == 0 else f"{count} CUDA device(s) (cuda:0 to cuda:{count - 1})"
    raise ConfigError(
        f"config: engine.device={device!r}, but this machine has {have} (torch {torch.__version__}, "
        f"torch.cuda.is_available() is {available}); use engine.device 'auto' or 'cpu', or run the job "
        f"where the GPU is."
    )


def check_job(spec: JobSpec, *, device_here: bool | None = None) -> Source:
    """The checks of a job that run no user code; returns its opened source.

    Validates the spec, checks that engine.device exists on this machine when the shards
    run here, opens the source (files, columns, dtypes, nulls; metadata only, see
    NOTE [tensor columns hold no nulls] in :mod:`distjac.io.sources`) and finds the
    factory's module without importing it. The factory is neither imported nor called:
    this is all ``distjac plan`` does without ``--probe``.

    Args:
        spec: the job.
        device_here: the shards run on this machine (in this process, or on a local Ray
            instance), so engine.device must exist here; None: only when
            ``engine.num_workers`` is 0.

    Raises:
        ConfigError, SourceError, SourceNotFoundError, SourceDtypeError: the job cannot
            run; nothing was written.
    """
    if not isinstance(spec, JobSpec):
        raise TypeError(f"check_job(spec): spec must be a distjac.JobSpec, got {type(spec).__name__}.")
    spec.validate()
    if device_here if device_here is not None else spec.engine.num_workers == 0:
        _check_device_here(spec.engine.device)
    source = open_source(spec.data)
    find_factory_module(spec.model.factory)
    return source


def prepare_job(spec: JobSpec, *, num_workers: int | None = None, device_here: bool | None = None,
                shard_size: int | None = None, parallel_iterations: int | None = None,
                shard_bytes: int = DEFAULT_SHARD_BYTES) -> PreparedJob:
    """Check a job against its inputs and plan it; see NOTE [a job checks everything before any work].

    Args:
        spec: the job.
        num_workers: workers to size the default shard for (default: the spec's, or 1).
        device_here: see :func:`check_job`.
        shard_size, parallel_iterations: an Engine's settings; where not None they win
            over the spec's ``engine`` section (NOTE [the Engine's settings and the job's]
            in distjac.engine).
        shard_bytes: Jacobian bytes per shard when no shard size is set.

    Raises:
        ConfigError, SourceError, SourceNotFoundError, SourceDtypeError: the job cannot
            run; nothing was written.
    """
    if not isinstance(spec, JobSpec):
        raise TypeError(f"prepare_job(spec): spec must be a distjac.JobSpec, got {type(spec).__name__}.")
    source = check_job(spec, device_here=device_here)
    out_shape, compute_dtype = _probe_shapes(spec, source)
    if spec.reductions:
        check_reductions(spec.reductions, out_shape, source.shape)
    workers = num_workers if num_workers is not None else (spec.engine.num_workers or 1)
    itemsize = torch.empty((), dtype=getattr(torch, compute_dtype)).element_size()
    try:
        plan = make_plan(
            source.num_rows, source.shape, out_shape, in_itemsize=itemsize, out_itemsize=itemsize,
            shard_size=shard_size if shard_size is not None else spec.engine.shard_size,
            parallel_iterations=parallel_iterations or spec.engine.parallel_iterations,
            num_workers=max(1, workers), shard_bytes=shard_bytes, gather=False,
        )
    except DistjacError as e:
        raise ConfigError(f"config: cannot plan the job: {e}") from e
    return PreparedJob(
        spec=spec, source=source, in_shape=tuple(source.shape), out_shape=out_shape, compute_dtype=compute_dtype,
        plan=plan, spec_hash=spec.spec_hash(), out_dir=os.path.abspath(os.path.expanduser(spec.output.path)),
    )


# -----------------------------------------------------------------------------------------
# running a job
# -----------------------------------------------------------------------------------------


def _progress_bar(progress: bool | None, total: int, done: int):
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, initial=done, unit="rows", unit_scale=True, dynamic_ncols=True,
                disable=not show, file=sys.stderr, desc="distjac")


def run_job(
    spec: JobSpec,
    executor: Executor | None = None,
    *,
    progress: bool | None = None,
    num_workers: int | None = None,
    prepared: PreparedJob | None = None,
) -> dict[str, Any]:
    """Run a job: prepare, open or resume the output, compute the missing shards, record.

    Args:
        spec: the job.
        executor: ``executor(descriptors) -> Iterable[PartInfo]``, yielding each shard's
            PartInfo as it finishes (see the module docstring); None runs the shards in
            this process with :func:`sequential_executor`.
        progress: show a progress bar (rows/s, ETA); None uses ``spec.engine.progress``,
            else shows one when stderr is a terminal.
        num_workers: workers to size default shards for (the engine knows; default:
            the spec's, or 1).
        prepared: a PreparedJob of this spec already made (by ``distjac plan`` or the
            engine), to skip preparing again.

    Returns:
        The job report (also written to ``_report.json``): rows, shards, computed,
        reused, adopted and recomputed shards, seconds, rows/s, bytes written,
        per-worker figures and ``timing``: each computed shard's seconds per stage
        (read, compute, to host, Arrow, write on the worker; wait on the driver), their
        totals and the workers' peak resident memory; and the driver's own peak
        resident memory.

    Raises:
        JobInputError (ConfigError, SourceError, OutputExistsError, ...): the job cannot
            start; nothing was written.
        ShardError: a shard failed; every finished shard stays recorded, a rerun resumes.
    """
    t0 = time.perf_counter()
    job = prepared if prepared is not None else prepare_job(spec, num_workers=num_workers)
    # NOTE [the output lock] (io/sink.py): one run at a time, from opening the output to _SUCCESS.
    with lock_output(job.out_dir):
        return _run_locked(spec, job, executor, progress, t0)


def _run_locked(spec: JobSpec, job: PreparedJob, executor: Executor | None, progress: bool | None,
                t0: float) -> dict[str, Any]:
    manifest, events = open_output(
        job.out_dir, job.spec_hash, list(job.plan), job.info(),
        resume=spec.output.resume, overwrite=spec.output.overwrite,
    )
    todo = manifest.missing()
    descriptors = [job.descriptor(i, *manifest.shards[i]) for i in todo]
    done_rows = manifest.num_rows - sum(d.stop - d.start for d in descriptors)
    show = spec.engine.progress if progress is None else progress
    t_run = time.perf_counter()
    computed: dict[int, PartInfo] = {}
    timings: dict[int, dict[str, Any]] = {}
    # The shards an executor may run at once: the plan's (an engine), or one at a time.
    events["in_flight"] = job.plan.in_flight if executor is not None else min(1, len(job.plan))
    if events["read_only"]:
        # A finished, verified output that cannot be written: report it, write nothing.
        return _report(job, manifest, events, computed, timings, t0, t_run, status="succeeded")
    bar = _progress_bar(show, manifest.num_rows, done_rows)
    try:
        for part in (executor or sequential_executor)(descriptors):
            if not isinstance(part, PartInfo):
                timing = part.get("timing")
                part = PartInfo.from_dict(part)
                if isinstance(timing, dict):
                    timings[part.shard] = timing
            manifest.record(part)
            if part.shard not in computed:
                bar.update(part.rows)
            computed[part.shard] = part
    except BaseException as e:
        manifest.flush()
        _write_report(job, manifest, events, computed, timings, t0, t_run, status="failed", error=e)
        raise
    finally:
        bar.close()
    manifest.flush()
    if not manifest.complete:
        missing = manifest.missing()
        raise ResultError(
            f"run_job: the executor returned with {len(missing)} shard(s) unfinished (first: {missing[:5]}); "
            f"finished shards are kept, run the job again to resume."
        )
    report = _write_report(job, manifest, events, computed, timings, t0, t_run, status="succeeded")
    manifest.mark_success()
    return report


def _timing_summary(computed: dict[int, PartInfo], timings: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The report's ``timing``: each computed shard's seconds per stage, their totals, and
    the workers' peak resident memory."""
    stages = (*WORKER_STAGES, "wait_s")
    shards = []
    for index in sorted(timings):
        t, p = timings[index], computed.get(index)
        row = {"shard": index, "rows": p.rows if p else None, "worker": p.worker if p else None}
        row.update({k: float(t[k]) for k in stages if k in t})
        if "peak_rss_bytes" in t:
            row["worker_peak_rss_bytes"] = int(t["peak_rss_bytes"])
        shards.append(row)
    totals = {k: sum(r.get(k, 0.0) for r in shards) for k in stages}
    peaks: dict[str, int] = {}
    for r in shards:
        if r.get("worker") and "worker_peak_rss_bytes" in r:
            peaks[r["worker"]] = max(peaks.get(r["worker"], 0), r["worker_peak_rss_bytes"])
    return {"stages": list(stages), "totals_s": totals, "worker_peak_rss_bytes": peaks, "shards": shards}


def _write_report(job, manifest: Manifest, events, computed: dict[int, PartInfo],
                  timings: dict[int, dict[str, Any]], t0: float, t_run: float,
                  *, status: str, error: BaseException | None = None) -> dict[str, Any]:
    report = _report(job, manifest, events, computed, timings, t0, t_run, status=status, error=error)
    try:
        _atomic_write(os.path.join(job.out_dir, REPORT_NAME), json.dumps(report, indent=1).encode())
    except OSError:
        if error is None:
            raise
    return report


def _report(job, manifest: Manifest, events, computed: dict[int, PartInfo],
            timings: dict[int, dict[str, Any]], t0: float, t_run: float,
            *, status: str, error: BaseException | None = None) -> dict[str, Any]:
    from . import __version__

    now = time.perf_counter()
    run_s = now - t_run
    rows = sum(p.rows for p in computed.values())
    workers: dict[str, dict[str, float]] = {}
    for p in computed.values():
        w = workers.setdefault(p.worker or "?", {"shards": 0, "rows": 0, "seconds": 0.0})
        w["shards"] += 1
        w["rows"] += p.rows
        w["seconds"] += p.seconds
    for w in workers.values():
        w["rows_per_s"] = w["rows"] / w["seconds"] if w["seconds"] > 0 else None
    report = {
        "distjac": __version__,  # marks the file as distjac's (NOTE [what distjac may delete])
        "status": status,
        "path": job.out_dir,
        "spec_hash": job.spec_hash,
        "format": job.spec.output.format,
        "rows": manifest.num_rows,
        "shards": len(manifest.shards),
        "shard_size": manifest.info.get("shard_size"),
        "in_flight": events.get("in_flight"),
        "finished_shards": len(manifest.parts),
        "computed_shards": len(computed),
        "computed_rows": rows,
        "resumed": events["resumed"],
        "reused_shards": events["reused"],
        "adopted_shards": len(events["adopted"]),
        "recomputed_shards": [s for s, _ in events["dropped"]],
        "dropped": [{"shard": s, "problem": why} for s, why in events["dropped"]],
        "cleaned_temporaries": len(events["cleaned"]),
        "seconds": now - t0,
        "run_seconds": run_s,
        "rows_per_s": rows / run_s if run_s > 0 and rows else None,
        "bytes_written": sum(p.bytes for p in computed.values()),
        "workers": workers,
        "timing": _timing_summary(computed, timings),
        "driver_peak_rss_bytes": peak_rss_bytes(),  # this process only, not the Ray daemons it started
    }
    if events.get("rebuilt"):
        report["rebuilt_manifest"] = True
    if events.get("read_only"):
        report["read_only"] = True
    if error is not None:
        report["error"] = f"{type(error).__name__}: {error}"
    return report

