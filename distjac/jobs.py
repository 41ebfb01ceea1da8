"""Jobs: the driver's side of a job (check, probe, plan, open or resume, record, report).

::

    spec ──check_job──> source opened (no user code)
         ──probe──────> the model's output shape and compute dtype, measured where the
                        shards run (a worker; in process for engine.num_workers: 0)
         ──prepare_job> PreparedJob (reductions checked, plan)
                              │ open_output: new, or resume (verify, adopt, clean)
                              v
             [ShardTask for each unfinished shard] ──executor──> ShardResult, ...
                              │ manifest.record(result.part) as each finishes
                              v
                     _report.json, _SUCCESS, report dict

An *executor* is any callable ``executor(job, tasks, on_progress) -> Iterable[ShardResult]``
that runs every task (in any order, anywhere) with a :class:`distjac.shard.ShardRunner`
and yields each shard's result as it finishes; it raises (a ShardError) when a shard fails
for good. ``on_progress`` is None, or a callable the executor calls now and then with the
rows done so far of its unfinished shards (NOTE [progress within a shard] in
distjac.shard), which moves the progress display between finished shards; an executor
that takes only ``(job, tasks)`` is called with those two.
:func:`local_executor` runs them in this process, their stages overlapped; the Ray engine
runs them on its workers with at most ``engine.parallel_iterations`` in flight. A task is
small and picklable: the source descriptor (paths and metadata, never data), the kernel's
options and the part target. Runners read, compute and write their own shard; the driver
only records parts. What a shard does is in :mod:`distjac.shard`, for both paths.

NOTE [a job checks everything before any work]
``prepare_job`` first makes the checks that run no user code (:func:`check_job`): the
spec, that engine.device exists where the shards run in this process, the source (files,
columns, dtypes, nulls) and that the factory's module can be found. Then the probe
builds the model where the shards run (a worker; this process for engine.num_workers: 0)
and runs it on :data:`JOB_PROBE_ROWS` examples (so a model that does not fit the data, or
whose output is not a floating tensor (batch, *out), fails here, with the spec's key in
the message), learns the per-example output shape and checks the reductions against it.
Only then is the output directory touched, so a bad job leaves nothing on disk and its
error is a JobInputError (the CLI's exit status 2).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import arrow as arrow_mod
from .config import JobSpec, find_factory_module, resolve_factory
from .errors import ConfigError, DistjacError, ResultError
from .io.sink import (
    REPORT_NAME,
    Manifest,
    PartInfo,
    lock_output,
    open_output,
    output_is_complete,
    resolve_output_path,
    write_report,
)
from .io.sources import Source, check_keep_columns, open_source
from .plan import DEFAULT_SHARD_BYTES, ShardPlan, format_bytes, make_plan
from .progress import Progress
from .reduce import check_reductions
from .shard import (
    PIPELINE_DEPTH,
    STAGES,
    KernelOptions,
    ModelRecipe,
    PartTarget,
    ShardResult,
    ShardRunner,
    ShardTask,
    local_executor,
    peak_rss_bytes,
    probe_model,
)

__all__ = [
    "JOB_PROBE_ROWS",
    "Executor",
    "PreparedJob",
    "check_job",
    "in_process_executor",
    "model_recipe",
    "prepare_job",
    "resolve_device",
    "run_job",
]

# Rows a job's model is probed on: its output shape and compute dtype only. Fewer than
# the kernels' PROBE_ROWS (which also measure connectivity and activation memory) on
# purpose: a probe is a start-up cost, paid before the first shard.
JOB_PROBE_ROWS = 2

Executor = Callable[["PreparedJob", Sequence[ShardTask], "Callable[[float], None] | None"], Iterable[ShardResult]]
Probe = Callable[[ModelRecipe, Source], dict]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto" (or None): the first CUDA device this process sees, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_recipe(spec: JobSpec) -> ModelRecipe:
    """The job's model as shipped to where it runs: its spec and its factory, imported
    here (never called here), and the compute dtype the job asks for (None: the
    model's own)."""
    m = spec.model
    factory = resolve_factory(m.factory, m.base_dir) if m.module is None else None  # a live model travels itself
    return ModelRecipe(m, factory, spec.jacobian.compute_dtype)


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
        recipe: the model as shipped to where the shards run (built there; its dtype
            None: the model's own, which is ``compute_dtype``).
        options: the kernel's options for every shard.
        path: which path the shards take, exact or matrix-free, and why (:func:`job_path`).
    """

    spec: JobSpec
    source: Source
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    compute_dtype: str
    plan: ShardPlan
    spec_hash: str
    out_dir: str
    recipe: ModelRecipe
    options: KernelOptions
    path: dict

    @property
    def columns(self) -> list[str]:
        return [arrow_mod.ROW_COLUMN, *self.value_columns, *(self.spec.output.keep_columns or ())]

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The per-example shape of a kept Jacobian: (*out, *in), or (*in) for its diagonal."""
        return self.in_shape if self.spec.jacobian.structure == "diagonal" else self.out_shape + self.in_shape

    @property
    def value_columns(self) -> list[str]:
        """The columns of values: the Jacobian, one per reduction, or two per estimate."""
        if self.spec.estimates:
            from .estimates import estimate_columns

            return estimate_columns(self.spec.estimates)
        return list(self.spec.reductions) or [arrow_mod.JACOBIAN_COLUMN]

    @property
    def stored_row_bytes(self) -> int:
        """Bytes one example takes in the output (its row id included)."""
        item = torch.empty((), dtype=getattr(torch, self.spec.jacobian.dtype)).element_size()
        values = math.prod(self.stored_shape) if self.value_columns == [arrow_mod.JACOBIAN_COLUMN] \
            else len(self.value_columns)
        return 8 + values * item

    def info(self) -> dict[str, Any]:
        """What the manifest keeps for readers."""
        from . import __version__

        spec = self.spec.to_dict()
        if self.spec.data.kind in ("tensor", "ray_dataset"):  # a digest stands for the data
            spec["data"][self.spec.data.kind.removeprefix("ray_")] = \
                self.spec.normalized()["data"][self.spec.data.kind.removeprefix("ray_")]
        return {
            "rows": self.plan.rows,
            "input_shape": list(self.in_shape),
            "output_shape": list(self.out_shape),
            "format": self.spec.output.format,
            "dtype": self.spec.jacobian.dtype,
            "compute_dtype": self.compute_dtype,
            "reduce": list(self.spec.reductions) or None,
            **({"estimate": self.spec.estimates, "estimate_columns": self.value_columns}
               if self.spec.estimates else {}),
            **({"structure": self.spec.jacobian.structure} if self.spec.jacobian.structure else {}),
            "columns": self.columns,
            "shard_size": self.plan.shard_size,
            "source": self.source.describe(),
            "distjac_version": __version__,
            "spec": json.loads(json.dumps(spec, default=repr)),
        }

    @property
    def target(self) -> PartTarget:
        """Where each shard's result goes: a part of the output directory."""
        return PartTarget(out_dir=self.out_dir, format=self.spec.output.format, spec_hash=self.spec_hash,
                          dtype=self.spec.jacobian.dtype, reductions=tuple(self.spec.reductions),
                          in_ndim=len(self.in_shape), rows=self.plan.rows,
                          keep_columns=tuple(self.spec.output.keep_columns or ()),
                          estimate=self.spec.estimates or None)

    def task(self, index: int, start: int, stop: int, *, rows: Any = None) -> ShardTask:
        """Shard ``index`` as a runner's task: rows [start, stop) read from the job's
        source by the runner (or ``rows`` shipped with it), and its part target."""
        return ShardTask(index, start, stop, dtype=self.compute_dtype, rows=rows,
                         source=None if rows is not None else self.source.for_rows(start, stop), options=self.options,
                         target=self.target)

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
            "estimate": self.spec.estimates or None,
            "path": {k: v for k, v in self.path.items() if k != "plan_out_shape"},
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
            ("keeps", ", ".join(self.value_columns) if self.value_columns != ["jacobian"]
             else f"jacobian {self.stored_shape} per row"
             + (" (its diagonal: jacobian.structure)" if self.spec.jacobian.structure else "")),
            ("path", f"{self.path['path']}: {self.path['why']}"),
            ("output", f"{s['output']} ({s['format']}, {self.spec.jacobian.dtype})"),
            ("stored", f"{b(s['stored_bytes_total'])} total, {b(s['stored_bytes_per_shard'])} per shard"),
            ("driver", "holds no shard data: workers read their rows and write their parts"),
        ]
        width = max(len(k) for k, _ in lines)
        head = "\n".join(f"  {k:<{width}}  {v}" for k, v in lines)
        plan = str(self.plan).replace("ShardPlan\n", "")
        return f"Job\n{head}\nShardPlan (worker peak: one shard's Jacobian before it is reduced)\n{plan}"


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
    check_keep_columns(source, spec.output.keep_columns)
    find_factory_module(spec.model)
    return source


def finished_info(spec: JobSpec) -> dict | None:
    """What a probe learns (``out_shape``, ``compute_dtype``), from the job's output when
    it is finished: a valid, complete manifest of this spec, with ``_SUCCESS``. None
    otherwise (no output, another spec, unfinished, unreadable).

    NOTE [a finished job runs nothing]
    Running a finished job again verifies its parts and reports; it needs neither the
    model nor Ray. ``prepare_job`` then takes the output shape and compute dtype from the
    manifest instead of probing, ``distjac run`` does it in process before starting Ray
    (:func:`run_job` with ``finished_only``), and if a part fails its check (it is
    deleted, as on any resume) the run goes on as usual to recompute it. The first run's
    ``_report.json`` is kept when a run reuses every shard.
    """
    out_dir = resolve_output_path(spec.output.path)
    if not output_is_complete(out_dir, spec.spec_hash()):
        return None
    try:
        info = Manifest.load(out_dir).info
    except Exception:  # unreadable or not distjac's: open_output says what is wrong
        return None
    if not isinstance(info.get("output_shape"), list) or not isinstance(info.get("compute_dtype"), str):
        return None
    return {"out_shape": info["output_shape"], "compute_dtype": info["compute_dtype"]}


def job_path(spec: JobSpec, out_shape: tuple[int, ...], in_shape: tuple[int, ...], itemsize: int,
             budget: int | None = None) -> dict[str, Any]:
    """Which path a job's shards take, and why: ``exact`` (the per-example Jacobian is
    built, then kept or reduced) or ``matrix-free`` (``jacobian.estimate``: JVPs and VJPs
    only). ``plan_out_shape`` is what the shard plan sizes shards by: the Jacobian's
    output shape, or for estimates the probes (each a vector the size of an input).

    Raises:
        ConfigError: the exact path, and one example's Jacobian does not fit the memory
            budget (``budget``, default: half of this machine's available memory, the
            kernels' default on a CPU worker); the message points to the estimates.
    """
    m, n = math.prod(out_shape), math.prod(in_shape)
    jac_bytes = m * n * itemsize
    if spec.estimates:
        from .estimates import check_estimates, estimate_products

        check_estimates(spec.estimates, out_shape, in_shape, call="config: jacobian.estimate")
        products = estimate_products(spec.estimates, out_shape, in_shape)
        probes = max(1, sum(products.values()))
        return {"path": "matrix-free", "products_per_example": products, "exact_products": min(m, n),
                "jacobian_bytes_per_example": jac_bytes, "plan_out_shape": (probes,),
                "why": f"jacobian.estimate: {sum(products.values())} JVP/VJP products per example instead of "
                       f"the {min(m, n):,} of the exact {m:,} x {n:,} Jacobian ({format_bytes(jac_bytes)}), "
                       f"which is never built"}
    if spec.jacobian.structure == "diagonal":
        if tuple(out_shape) != tuple(in_shape):
            raise ConfigError(
                f"config: jacobian.structure: diagonal needs the model's per-example output shape to equal its "
                f"input's, but it maps {tuple(in_shape)} to {tuple(out_shape)}: its Jacobian is not square. "
                f"Leave jacobian.structure null (the dense Jacobian)."
            )
        return {"path": "exact", "jacobian_bytes_per_example": n * itemsize, "plan_out_shape": (1,),
                "why": f"jacobian.structure: diagonal: {n:,} values per example (one forward-mode pass), "
                       f"not the {m:,} x {n:,} dense Jacobian; refused at the first shard unless the model "
                       f"is provably elementwise"}
    if budget is None:
        from .kernels import _host_available_bytes

        budget = _host_available_bytes() // 2
    if jac_bytes > budget:
        kept = f"reduce: [{', '.join(spec.reductions)}]" if spec.reductions else "the whole Jacobian"
        raise ConfigError(
            f"config: one example's Jacobian is {m:,} x {n:,} ({format_bytes(jac_bytes)}), more than the "
            f"memory budget of {format_bytes(budget)}, so {kept} cannot be computed exactly. Estimate "
            f"the per-example numbers without building it: jacobian.estimate: {{frobenius: {{probes: 8}}}} "
            f"(also spectral, trace; docs/estimates.md), or a sketch with distjac.sketch."
        )
    return {"path": "exact", "jacobian_bytes_per_example": jac_bytes, "plan_out_shape": tuple(out_shape),
            "why": f"the {m:,} x {n:,} Jacobian of each example ({format_bytes(jac_bytes)}) is built"
                   + (f" and reduced ({', '.join(spec.reductions)})" if spec.reductions else "")}


def local_probe(spec: JobSpec) -> Probe:
    """The probe of a job whose model runs in this process: built on the job's device
    when its shards run here (engine.num_workers: 0), else on the CPU (``distjac plan
    --probe`` of a cluster job: the one case where the driver runs the model)."""
    device = resolve_device(spec.engine.device) if spec.engine.num_workers == 0 else torch.device("cpu")

    def probe(recipe: ModelRecipe, source: Source) -> dict:
        model = recipe.build(device)
        return probe_model(model, source, JOB_PROBE_ROWS, device, factory=recipe.spec.factory, dtype=recipe.dtype)

    return probe


def prepare_job(spec: JobSpec, *, num_workers: int | None = None, device_here: bool | None = None,
                shard_size: int | None = None, parallel_iterations: int | None = None,
                chunk_size: int | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                probe: Probe | None = None, source: Source | None = None) -> PreparedJob:
    """Check a job against its inputs and plan it; see NOTE [a job checks everything before any work].

    Args:
        spec: the job.
        num_workers: workers to size the default shard for (default: the spec's, or 1).
        device_here: see :func:`check_job`.
        shard_size, parallel_iterations, chunk_size: an Engine's settings; where not
            None they win over the spec's (NOTE [the Engine's settings and the job's] in
            distjac.engine).
        shard_bytes: Jacobian bytes per shard when no shard size is set.
        probe: ``probe(recipe, source) -> {"out_shape", "compute_dtype"}``, run where the
            shards run (the engine probes on a worker); None: :func:`local_probe`.
        source: the job's source, opened by :func:`check_job` already (None opens it).

    Raises:
        ConfigError, SourceError, SourceNotFoundError, SourceDtypeError: the job cannot
            run; nothing was written.
    """
    if not isinstance(spec, JobSpec):
        raise TypeError(f"prepare_job(spec): spec must be a distjac.JobSpec, got {type(spec).__name__}.")
    if source is None:
        source = check_job(spec, device_here=device_here)
    recipe = model_recipe(spec)
    # NOTE [a finished job runs nothing]: its manifest holds what a probe would learn.
    probed = finished_info(spec) or (probe or local_probe(spec))(recipe, source)
    out_shape, compute_dtype = tuple(probed["out_shape"]), probed["compute_dtype"]
    if spec.reductions:
        check_reductions(spec.reductions, out_shape, source.shape)
    itemsize = torch.empty((), dtype=getattr(torch, compute_dtype)).element_size()
    path = job_path(spec, out_shape, tuple(source.shape), itemsize)
    workers = num_workers if num_workers is not None else spec.engine.num_workers
    if workers is None:
        # The Engine's default: one worker per CPU of the local Ray instance it starts (a
        # cluster's size is known only once joined; its Engine passes num_workers).
        workers = (os.cpu_count() or 1) if spec.engine.address is None else 1
    try:
        plan = make_plan(
            source.num_rows, source.shape, path["plan_out_shape"], in_itemsize=itemsize, out_itemsize=itemsize,
            shard_size=shard_size if shard_size is not None else spec.engine.shard_size,
            parallel_iterations=parallel_iterations or spec.engine.max_in_flight,
            num_workers=max(1, workers), shard_bytes=shard_bytes, gather=False,
        )
    except DistjacError as e:
        raise ConfigError(f"config: cannot plan the job: {e}") from e
    options = KernelOptions(mode=spec.jacobian.mode, structure=spec.jacobian.structure,
                            chunk_size=chunk_size if chunk_size is not None else spec.jacobian.chunk_size,
                            call="Engine.run(spec)" if probe is not None else "run_job(spec)")
    return PreparedJob(
        spec=spec, source=source, in_shape=tuple(source.shape), out_shape=out_shape, compute_dtype=compute_dtype,
        plan=plan, spec_hash=spec.spec_hash(), out_dir=resolve_output_path(spec.output.path),
        recipe=recipe, options=options, path=path,
    )


def _local_depth(job: PreparedJob) -> int:
    """Shards in flight in process: the pipeline's depth, at most the job's shards in
    flight (engine.parallel_iterations: 1 runs one shard at a time, stages in turn)."""
    return max(1, min(PIPELINE_DEPTH, job.plan.in_flight))


def estimate_run_time(job: PreparedJob, rows: int = 256) -> dict[str, Any]:
    """A rough run time for ``distjac plan --probe``: the job's kernel (or estimates),
    timed here on its first ``rows`` rows after one warm-up call, scaled to the job's
    rows and workers (each worker runs one CPU thread's share of this process's rate, or
    this device's rate per GPU worker). Writing, transfer and start-up are left out, so it
    is a lower bound of the shards' time; the report of a run says what it took."""
    device = resolve_device(job.spec.engine.device) if job.spec.engine.num_workers == 0 else torch.device("cpu")
    model = job.recipe.build(device)
    n = max(1, min(rows, job.plan.rows, job.plan.shard_size or rows))
    task = job.task(0, 0, n)
    x = task.read(device)
    runner = ShardRunner(device)
    call = ((lambda: _estimate_once(model, x, job)) if job.spec.estimates else
            (lambda: runner._kernel(model, x, job.options)))
    call()  # warm-up: the first call chooses (auto) and pays one-off costs
    t0 = time.perf_counter()
    call()
    dt = max(time.perf_counter() - t0, 1e-9)
    here = n / dt
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    workers = max(1, job.plan.num_workers)
    rate = here / threads * workers if device.type == "cpu" else here * workers
    return {"rows_timed": n, "rows_per_s_here": here, "threads_here": threads, "workers": workers,
            "rows_per_s": rate, "seconds": job.plan.rows / rate if rate > 0 else None}


def _estimate_once(model, x, job):
    from .estimates import estimate_block

    return estimate_block(model, x, job.spec.estimates)


def in_process_executor(job: PreparedJob, tasks: Sequence[ShardTask],
                        on_progress: Callable[[float], None] | None = None) -> Iterable[ShardResult]:
    """Run a job's shards in this process (engine.num_workers: 0) on one ShardRunner,
    up to :data:`distjac.shard.PIPELINE_DEPTH` at a time so that their stages overlap;
    the model the probe built is the one the shards run."""
    if not tasks:
        return iter(())
    device = resolve_device(job.spec.engine.device)
    model = job.recipe.build(device)
    runner = ShardRunner(device)
    return local_executor(model, runner, tasks, depth=_local_depth(job), call=job.options.call,
                          on_progress=on_progress)


# -----------------------------------------------------------------------------------------
# running a job
# -----------------------------------------------------------------------------------------


def run_job(
    spec: JobSpec,
    executor: Executor | None = None,
    *,
    progress: bool | None = None,
    num_workers: int | None = None,
    prepared: PreparedJob | None = None,
    finished_only: bool = False,
    started: float | None = None,
) -> dict[str, Any] | None:
    """Run a job: prepare, open or resume the output, compute the missing shards, record.

    Args:
        spec: the job.
        executor: ``executor(job, tasks, on_progress) -> Iterable[ShardResult]``, yielding each
            shard's result as it finishes (see the module docstring); None runs the
            shards in this process with :func:`in_process_executor`.
        progress: show progress (:class:`distjac.progress.Progress`: a bar on a terminal,
            else a line on stderr every few seconds: rows, rows/s, ETA, shards, retries);
            None uses ``spec.engine.progress``, else a bar on a terminal and nothing
            elsewhere (``distjac run`` passes True).
        num_workers: workers to size default shards for (the engine knows; default:
            the spec's, or 1).
        prepared: a PreparedJob of this spec already made (by ``distjac plan`` or the
            engine), to skip preparing again.
        finished_only: run only if the job is finished (NOTE [a finished job runs
            nothing]): verify and report it, or return None, having computed nothing,
            when a shard is left to compute.
        started: when the run began (``time.perf_counter()``), if before this call: an
            Engine's first job counts starting Ray and its workers in the report's
            ``seconds`` (``startup_seconds`` says how much of it that was).

    Returns:
        The job report (also written to ``_report.json``): rows, shards, computed,
        reused, adopted and recomputed shards, seconds, rows/s, bytes written,
        per-worker figures and ``timing``: each computed shard's seconds per stage
        (read, compute, to host, Arrow, write and the wait for a stage behind other
        shards on its runner; the wait on the driver), their totals, each runner's busy
        share per stage and peak resident memory; and the driver's own peak resident
        memory.

    Raises:
        JobInputError (ConfigError, SourceError, OutputExistsError, ...): the job cannot
            start; nothing was written.
        ShardError: a shard failed; every finished shard stays recorded, a rerun resumes.
    """
    t_call = time.perf_counter()
    t0 = min(started, t_call) if started is not None else t_call
    if finished_only and prepared is None and finished_info(spec) is None:
        return None
    job = prepared if prepared is not None else prepare_job(spec, num_workers=num_workers)
    # NOTE [the output lock] (io/sink.py): one run at a time, from opening the output to _SUCCESS.
    with lock_output(job.out_dir):
        return _run_locked(spec, job, executor, progress, t0, finished_only)


def _run_locked(spec: JobSpec, job: PreparedJob, executor: Executor | None, progress: bool | None,
                t0: float, finished_only: bool = False) -> dict[str, Any] | None:
    manifest, events = open_output(
        job.out_dir, job.spec_hash, list(job.plan), job.info(),
        resume=spec.output.resume, overwrite=spec.output.overwrite,
    )
    todo = manifest.missing()
    tasks = [job.task(i, *manifest.shards[i]) for i in todo]
    if finished_only and tasks:
        manifest.flush()
        return None
    done_rows = manifest.num_rows - sum(t.stop - t.start for t in tasks)
    show = spec.engine.progress if progress is None else progress
    t_run = time.perf_counter()
    computed: dict[int, PartInfo] = {}
    timings: dict[int, dict[str, Any]] = {}
    strategies: dict[str, int] = events.setdefault("strategies", {})  # shipped strategy -> shards run
    # The shards an executor may run at once: the plan's (an engine), or the pipeline's.
    events["in_flight"] = job.plan.in_flight if executor is not None else _local_depth(job)
    if events["read_only"]:
        # A finished, verified output that cannot be written: report it, write nothing.
        return _report(job, manifest, events, computed, timings, t0, t_run, status="succeeded")
    bar = Progress(manifest.num_rows, done_rows, show, shards=len(manifest.shards),
                   shards_done=len(manifest.shards) - len(tasks))
    try:
        for result in _start(executor or in_process_executor, job, tasks, bar.set_in_flight if bar.enabled else None):
            part = result.part
            manifest.record(part)
            if part.shard not in computed:
                bar.update(part.rows, shards=1)
            if result.retries:
                bar.set_retries(result.retries)
            computed[part.shard] = part
            if result.strategy is not None:
                strategies[result.strategy] = strategies.get(result.strategy, 0) + 1
            timings[part.shard] = {**result.timing.to_dict(), "node": result.node, "pid": result.pid,
                                   **({"wait_s": result.wait_s} if result.wait_s is not None else {})}
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
    if not computed and not events["adopted"] and events["reused"] == len(manifest.shards) and \
            _succeeded_before(job.out_dir):
        # Every shard reused as it was: the first run's report stays (it says how the
        # results were made); this run's is returned.
        report = _report(job, manifest, events, computed, timings, t0, t_run, status="succeeded")
        report["report_kept"] = True
    else:
        report = _write_report(job, manifest, events, computed, timings, t0, t_run, status="succeeded")
    manifest.mark_success()
    return report


def _start(executor: Executor, job: PreparedJob, tasks: list[ShardTask], on_progress) -> Iterable[ShardResult]:
    """``executor(job, tasks, on_progress)``; an executor written for the two-argument
    protocol (before progress within a shard) is called with two."""
    import inspect

    try:
        params = list(inspect.signature(executor).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable: assume the current protocol
        return executor(job, tasks, on_progress)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params):
        return executor(job, tasks, on_progress)
    if any(p.name == "on_progress" or p.kind == p.VAR_KEYWORD for p in params):
        return executor(job, tasks, on_progress=on_progress)
    return executor(job, tasks)


def _succeeded_before(out_dir: str) -> bool:
    from .io import fs

    try:
        return json.loads(bytes(fs.read_buffer(os.path.join(out_dir, REPORT_NAME)))).get("status") == "succeeded"
    except (OSError, ValueError, AttributeError):
        return False


def _timing_summary(computed: dict[int, PartInfo], timings: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The report's ``timing``: each computed shard's seconds per stage, their totals,
    and per runner (a worker process) its busy share of each stage and its peak memory.

    A runner's busy share of a stage is that stage's seconds over the runner's span (its
    first shard's start to its last one's end): with the stages overlapped (NOTE
    [overlapped stages] in distjac.shard) the shares add up to more than 1, and the
    stage whose share is near 1 is the bottleneck."""
    stages = (*STAGES, "queued_s", "wait_s")
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
    runners: dict[str, dict[str, Any]] = {}
    by_runner: dict[str, list[dict[str, Any]]] = {}
    for index, t in timings.items():
        p = computed.get(index)
        if p is not None and t.get("ended"):
            by_runner.setdefault(p.worker or "?", []).append(t)
    for worker, ts in sorted(by_runner.items()):
        span = max(t["ended"] for t in ts) - min(t["started"] for t in ts)
        runners[worker] = {"shards": len(ts), "span_s": span,
                           "busy": {k: (sum(float(t.get(k, 0.0)) for t in ts) / span if span > 0 else None)
                                    for k in STAGES}}
    return {"stages": list(stages), "totals_s": totals, "worker_peak_rss_bytes": peaks, "runners": runners,
            "shards": shards}


def _write_report(job, manifest: Manifest, events, computed: dict[int, PartInfo],
                  timings: dict[int, dict[str, Any]], t0: float, t_run: float,
                  *, status: str, error: BaseException | None = None) -> dict[str, Any]:
    report = _report(job, manifest, events, computed, timings, t0, t_run, status=status, error=error)
    try:
        write_report(job.out_dir, report)
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
        "seconds": now - t0,  # wall time from the run's start (an Engine's first job: Ray's start-up too)
        "startup_seconds": t_run - t0,  # before the first shard: starting Ray, probing, opening the output
        "run_seconds": run_s,
        "rows_per_s": rows / run_s if run_s > 0 and rows else None,
        "bytes_written": sum(p.bytes for p in computed.values()),
        "workers": workers,
        "strategies": dict(events.get("strategies") or {}),
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

