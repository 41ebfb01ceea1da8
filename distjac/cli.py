"""The ``distjac`` command: parses, calls the API, prints.

::

    distjac run CONFIG [--set key.path=value ...] [--address ADDR] [--workers N]
                       [--progress | --no-progress] [--overwrite]
    distjac plan CONFIG [--set ...] [--json] [--probe]
                                                   dry run: checks, shapes, shard plan, bytes
    distjac inspect PATH [--json] [--quick]        rows, shapes, finished/missing shards, checksums
    distjac repair PATH [--json]                   rebuild a lost or damaged manifest from the parts
    distjac tune CONFIG [--set ...] [--device D]   choose the job's kernel strategy, cache it, print why
    distjac bench [SUITE ...] [--size tiny|full] [--out DIR] ...
                                                   kernels, scaling, memory, estimates: JSON, Markdown, plots
    distjac --version

Exit status: 0 on success; 2 for a usage or config error (the job never started: bad
arguments, unknown keys, bad values, missing files or columns, an output of another
spec without --overwrite); 1 when a job fails while it runs (or ``inspect`` finds
missing or corrupted parts). Errors are one or two plain lines on stderr; ``--debug``
adds the traceback.

``--workers 0`` (``engine.num_workers: 0``) runs the job in this process without Ray.

Progress: ``run`` shows a tqdm bar when stderr is a terminal and otherwise writes a
progress line to stderr every 10 s (``DISTJAC_PROGRESS_INTERVAL``), for nohup, cluster
scripts and ``ray job submit`` logs; ``--no-progress`` (or ``engine.progress: false``)
turns both off (see :mod:`distjac.progress`).

``distjac --version`` and ``--help`` import neither torch nor Ray: every command imports
what it needs when it runs.

A config is code: ``model.factory`` names a Python callable that ``run`` (and ``plan
--probe``) imports and calls, so trust a config like a script (NOTE [a config is code] in
distjac.config). ``plan`` without ``--probe`` imports and calls nothing of it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


# Said by `run --help` and `plan --help`; see NOTE [a config is code] in distjac.config.
_TRUST = ("A config is code: model.factory names a Python callable that is imported and called "
          "(on this machine and on every worker), so trust a config like a script; "
          "distjac refuses builtins, standard-library callables and objects that are not a "
          "Python function or a torch.nn.Module class, but it is no sandbox.")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2 (not a usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _parser(bench_arguments: bool = True) -> argparse.ArgumentParser:
    """The parser; ``bench_arguments=False`` leaves out the bench suites' own options
    (their modules import torch), for every command but ``bench``."""
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p = _Parser(prog="distjac", description="Per-example Jacobians of a model over a dataset, "
                "from one process to a Ray cluster.", parents=[common])
    p.add_argument("--version", action="version", version=f"distjac {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{run,plan,inspect,repair,tune,bench}", parser_class=_Parser)

    run = sub.add_parser("run", parents=[common], help="run a job (resumes an unfinished one)",
                         description="Run a job from a YAML config; an unfinished output of the same "
                         "spec is resumed. Every check that needs no shard (config, data, nulls, device, "
                         "the model's output on two rows, weights) is made before anything is written; "
                         "a job refused there exits with status 2. " + _TRUST)
    run.add_argument("config", metavar="CONFIG", help="the job's YAML file")
    _add_set(run)
    run.add_argument("--address", help='Ray address: "auto" joins a running cluster, "ray://host:port" a '
                     "remote one (default: the config's; none starts a local instance)")
    run.add_argument("--workers", type=int, metavar="N", help="Ray workers (0: run in this process without Ray)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress on stderr: a bar on a terminal, else a line every 10 s (default: on, or the "
                     "config's engine.progress); --no-progress: none")
    run.add_argument("--overwrite", action="store_true", help="replace an output written by another spec")
    run.add_argument("--json", action="store_true", help="print the job report as JSON")

    plan = sub.add_parser("plan", parents=[common], help="dry run: shapes, shard plan, bytes, memory",
                          description="Check a job and print its shard plan without running it. Without "
                          "--probe nothing of the config runs: the data are opened and checked and the "
                          "factory's module is looked up, not imported. " + _TRUST)
    plan.add_argument("config", metavar="CONFIG", help="the job's YAML file")
    _add_set(plan)
    plan.add_argument("--probe", action="store_true", help="import and call model.factory, load the "
                      "weights and run the model on two rows: output shape, shard plan and bytes (runs "
                      "the config's code)")
    plan.add_argument("--workers", type=int, metavar="N", help="plan for N workers")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    insp = sub.add_parser("inspect", parents=[common], help="summarize and verify an output directory",
                          description="Rows, shapes, finished and missing shards of an output, with "
                          "every part's checksum checked. Exit 1 when parts are missing or corrupted.")
    insp.add_argument("path", metavar="PATH", help="an output directory (a job's output.path)")
    insp.add_argument("--json", action="store_true", help="print the summary as JSON")
    insp.add_argument("--quick", action="store_true", help="check sizes only, not SHA-256 checksums")

    rep = sub.add_parser("repair", parents=[common], help="rebuild an output's manifest from its parts",
                         description="Rebuild a lost, unreadable or inconsistent _manifest.json from the "
                         "parts' own checksummed metadata (or re-check a valid one). Parts that fail their "
                         "checks are reported, never deleted. Exit 1 when a part failed.")
    rep.add_argument("path", metavar="PATH", help="an output directory (a job's output.path)")
    rep.add_argument("--json", action="store_true", help="print the summary as JSON")

    tune = sub.add_parser("tune", parents=[common], help="choose a job's kernel strategy, cache it, print why",
                          description="Build the job's model, read a few rows of its source, choose the kernel "
                          "strategy by the job's jacobian.mode (auto: measuring if needed, weighed against "
                          "the job's rows), store it in the tuning cache "
                          "(docs/architecture.md, \"The tuning cache\") and print the decision record. " + _TRUST)
    tune.add_argument("config", metavar="CONFIG", help="the job's YAML file")
    _add_set(tune)
    tune.add_argument("--device", default=None, help="where to tune (default: the config's engine.device)")

    bench = sub.add_parser("bench", parents=[common], help="benchmark suites: kernels, scaling, memory, estimates",
                           description="Run benchmark suites side by side and write <out>/<suite>.json, "
                           ".md and .png (plots need matplotlib: pip install 'distjac[plot]'). "
                           "See docs/benchmarks.md.")
    if bench_arguments:
        _add_bench(bench)
    return p


def _add_bench(p: argparse.ArgumentParser) -> None:
    from .bench import SIZES, SUITES, estimates, kernels, memory, scaling

    p.add_argument("suites", nargs="*", metavar="SUITE", help=f"any of {', '.join(SUITES)} (default: all)")
    p.add_argument("--size", choices=SIZES, default="full", help="tiny: a smoke run in seconds; full: the "
                   "sizes of docs/benchmarks.md (default)")
    p.add_argument("--out", default="bench_out", help="output folder (default: bench_out)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (every suite)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    for module in (kernels, scaling, memory, estimates):
        module.add_arguments(p)


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (parsed as YAML), e.g. --set jacobian.mode=fwd; repeatable")


def _load_spec(args: argparse.Namespace):
    from .config import JobSpec

    overrides = list(args.overrides)
    if getattr(args, "address", None) is not None:
        overrides.append(f"engine.address={args.address}")
    if getattr(args, "workers", None) is not None:
        if args.workers < 0:
            raise _UsageError(f"distjac {args.command}: --workers {args.workers}: use 0 (no Ray) or more.")
        overrides.append(f"engine.num_workers={args.workers}")
        if args.workers == 0:
            overrides.append("engine.address=")
    if getattr(args, "progress", None) is not None:
        overrides.append(f"engine.progress={'true' if args.progress else 'false'}")
    if getattr(args, "overwrite", False):
        overrides.append("output.overwrite=true")
    return JobSpec.from_yaml(args.config, overrides)


def _engine_kwargs(spec) -> dict[str, Any]:
    e = spec.engine
    return {"address": e.address, "num_workers": e.num_workers, "device": e.device, "shard_size": e.shard_size,
            "parallel_iterations": e.max_in_flight, "chunk_size": spec.jacobian.chunk_size,
            "max_retries": e.max_retries, "progress": e.progress}


def _disconnect_ray() -> None:
    """Close this process's Ray connection, if any (a cluster it joined keeps running)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        with contextlib.suppress(Exception):
            ray.shutdown()


def run_progress(spec) -> bool:
    """The ``progress`` that ``distjac run`` passes on: the flag or ``engine.progress``
    when set, else True (a bar on a terminal, lines elsewhere; see distjac.progress)."""
    return True if spec.engine.progress is None else bool(spec.engine.progress)


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import check_address
    from .jobs import check_job, run_job

    spec = _load_spec(args)
    progress = run_progress(spec)
    report = None
    if spec.engine.num_workers == 0:
        report = run_job(spec, progress=progress)
    else:
        # What needs no model, before Ray starts (seconds); Engine.run probes the model.
        # A local Ray instance (no address) runs its workers here: engine.device must exist.
        check_address(spec.engine.address)
        check_job(spec, device_here=spec.engine.address is None)
        # A finished job is verified and reported here, without Ray (NOTE [a finished job
        # runs nothing] in distjac.jobs); None: shards are left, the engine runs them.
        if not spec.output.overwrite:
            report = run_job(spec, finished_only=True, progress=progress)
    if report is None:
        from . import Engine

        # --json: stdout is the report alone. Ray prints its raylet's messages ("(raylet)
        # Task ... failed") and the workers' stdout to sys.stdout on the driver: during the
        # run that is stderr, and the connection is closed (flushing Ray's last lines)
        # before the report is printed.
        quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
        with quiet:
            try:
                with Engine(**_engine_kwargs(spec)) as engine:
                    report = engine.run(spec, progress=progress)
            finally:
                if args.json:
                    _disconnect_ray()
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        rate = f", {report['rows_per_s']:,.0f} rows/s" if report.get("rows_per_s") else ""
        print(f"distjac: {report['rows']:,} rows in {report['shards']} shards -> {report['path']} "
              f"({report['computed_shards']} computed, {report['reused_shards'] + report['adopted_shards']} "
              f"reused{rate}, {report['seconds']:.1f} s{_startup(report)})")
    return EXIT_OK


def _startup(report: dict) -> str:
    """", of which 9.5 s starting up" when the start-up (Ray, workers, the probe) took a
    noticeable share of the run's wall time; rows/s counts the shards' time only."""
    start = report.get("startup_seconds") or 0.0
    return f", of which {start:.1f} s starting up" if start >= 1.0 and start >= 0.1 * report["seconds"] else ""


def _output_state(out_dir: str, spec_hash: str) -> str:
    import os

    from .io import fs
    from .io.sink import MANIFEST_NAME, Manifest

    if not fs.exists(os.path.join(out_dir, MANIFEST_NAME)):
        return "new"
    try:
        m = Manifest.load(out_dir)
    except Exception:
        return "holds an unreadable or inconsistent manifest; run `distjac repair` (or --overwrite)"
    if m.spec_hash != spec_hash:
        return f"holds another spec's results (hash {m.spec_hash}); run needs --overwrite"
    if m.complete:
        return f"complete: all {len(m.shards)} shards finished (run verifies them and stops)"
    return f"resumes: {len(m.parts)} of {len(m.shards)} shards finished"


def _cmd_plan(args: argparse.Namespace) -> int:

    from .jobs import JOB_PROBE_ROWS, check_job, prepare_job

    spec = _load_spec(args)
    if args.probe:
        from .jobs import estimate_run_time
        from .progress import format_duration

        job = prepare_job(spec)
        state = _output_state(job.out_dir, job.spec_hash)
        eta = estimate_run_time(job) if job.plan.rows else None
        if args.json:
            print(json.dumps({**job.summary(), "probed": True, "output_state": state, "estimated_run": eta},
                             indent=1))
        else:
            print(job)
            print(f"  {'output now':<15}  {state}")
            if eta and eta["seconds"] is not None:
                print(f"  {'estimated run':<15}  ~{format_duration(eta['seconds'])} of shards over {eta['workers']} "
                      f"worker(s) ({eta['rows_per_s']:,.0f} rows/s: the kernel timed here on {eta['rows_timed']} "
                      f"rows, {eta['rows_per_s_here']:,.0f} rows/s on {eta['threads_here']} thread(s); writing "
                      f"and start-up not included)")
        return EXIT_OK
    # Imports and calls nothing of the config (NOTE [a config is code]); a local run's
    # engine.device must exist here.
    source = check_job(spec, device_here=spec.engine.num_workers == 0 or spec.engine.address is None)
    from .io.sink import resolve_output_path

    out_dir = resolve_output_path(spec.output.path)
    spec_hash = spec.spec_hash()
    state = _output_state(out_dir, spec_hash)
    not_built = (f"not built (plan --probe imports and calls it and runs the model on {JOB_PROBE_ROWS} rows, "
                 f"for the output shape, the shard plan and the bytes)")
    if spec.estimates:
        path = (f"matrix-free: jacobian.estimate ({', '.join(spec.estimates)}), JVP/VJP products only, the "
                f"Jacobian is never built")
    else:
        path = "exact: each example's Jacobian is built" + (
            f" and reduced ({', '.join(spec.reductions)})" if spec.reductions else "") + " (--probe sizes it)"
    if args.json:
        print(json.dumps({"spec_hash": spec_hash, "model": spec.model.factory, "probed": False,
                          "source": source.describe(), "output": out_dir, "format": spec.output.format,
                          "path": path.split(":")[0], "output_state": state}, indent=1))
        return EXIT_OK
    lines = [("spec hash", spec_hash), ("model", f"{spec.model.factory}: {not_built}"),
             ("data", source.describe()), ("path", path),
             ("output", f"{out_dir} ({spec.output.format}, {spec.jacobian.dtype})"),
             ("output now", state)]
    print("Job (checked; the model was not built: distjac plan --probe)")
    print("\n".join(f"  {k:<15}  {v}" for k, v in lines))
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .errors import ResultError
    from .io.sink import inspect_output
    from .plan import format_bytes

    try:
        s = inspect_output(args.path, verify=not args.quick)
    except ResultError as e:
        raise _UsageError(f"distjac inspect: {e}") from e
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        keeps = ", ".join(s["reduce"]) if s["reduce"] else (
            f"jacobian {tuple(s['output_shape'] + s['input_shape'])} per row "
            f"(output {tuple(s['output_shape'])}, input {tuple(s['input_shape'])})")
        missing = s["missing"]
        lines = [
            ("path", s["path"]),
            ("rows", f"{s['rows']:,}"),
            ("keeps", f"{keeps}, {s['dtype']}"),
            ("format", f"{s['format']}, {format_bytes(s['bytes'])} in {s['finished']} part(s)"),
            ("shards", f"{s['finished']} of {s['shards']} finished"
             + (f"; missing: {_ranges(missing)}" if missing else "")),
            ("checksums", _bad_parts(s["bad"]) if s["bad"] else f"all {s['finished']} ok ({s['checked']})"),
            ("complete", "yes" if s["complete"] else "no (run the job again to finish it)"),
            ("spec hash", s["spec_hash"]),
        ]
        width = max(len(k) for k, _ in lines)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in lines))
    return EXIT_OK if s["complete"] else EXIT_FAILED


def _cmd_repair(args: argparse.Namespace) -> int:
    from .errors import ResultError
    from .io.sink import repair_output

    try:
        s = repair_output(args.path)
    except ResultError as e:
        raise _UsageError(str(e)) from e
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        what = "rebuilt from the parts" if s["rebuilt"] else "checked"
        print(f"distjac repair: {s['path']}: manifest {what}; {s['finished']} of {s['shards']} shards recorded"
              + (f", missing: {_ranges(s['missing'])} (run the job again to compute them)" if s["missing"] else ""))
        if s["set_aside"]:
            print(f"  the unreadable manifest was kept as {s['set_aside']}")
        for r in s["rejected"]:
            print(f"  not recorded: {r['file']}: {r['problem']}")
    return EXIT_FAILED if s["rejected"] else EXIT_OK


def _cmd_tune(args: argparse.Namespace) -> int:
    from .tuning import cache_path, enabled, tune_job

    record = tune_job(_load_spec(args), device=args.device)
    print(record)
    print(f"tuning cache: {cache_path() if enabled() else 'off (DISTJAC_TUNING_CACHE=0)'}")
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import SUITES, estimates, kernels, memory, scaling

    suites = list(dict.fromkeys(args.suites)) or list(SUITES)
    if bad := [s for s in suites if s not in SUITES]:
        raise _UsageError(f"distjac bench: unknown suite(s) {', '.join(bad)}; choose from {', '.join(SUITES)}")
    if args.repeats is not None and args.repeats < 1:
        raise _UsageError("distjac bench: --repeats must be >= 1")
    modules = {"kernels": kernels, "scaling": scaling, "memory": memory, "estimates": estimates}
    for name in suites:  # every suite's arguments first: a bad one runs and writes nothing
        try:
            modules[name].check_args(args)
        except ValueError as e:
            raise _UsageError(f"distjac bench {name}: {e}") from e
    for name in suites:
        result = modules[name].run_from_args(args)
        print((Path(args.out) / result["files"]["markdown"]).read_text())
        written = [result["files"]["json"], result["files"]["markdown"], *result["files"]["plots"]]
        note = f" ({result['plots_skipped']})" if result.get("plots_skipped") else ""
        print(f"wrote {', '.join(str(Path(args.out) / f) for f in written)}{note}", file=sys.stderr)
    return EXIT_OK


def _bad_parts(bad: Sequence[dict]) -> str:
    shown = "; ".join(f"shard {b['shard']}: {b['problem']}" for b in bad[:5])
    return f"{len(bad)} bad: {shown}{'; ...' if len(bad) > 5 else ''}"


def _ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out, i = [], 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        out.append(str(indices[i]) if i == j else f"{indices[i]}-{indices[j]}")
        i = j + 1
    return ", ".join(out)


def _one_or_two_lines(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return "\n".join(lines[:2]) if lines else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = _parser(bench_arguments="bench" in argv)
        args = parser.parse_args(argv)
        if args.command is None:
            raise _UsageError("distjac: give a command: run, plan, inspect or bench (see distjac --help)")
        command = {"run": _cmd_run, "plan": _cmd_plan, "inspect": _cmd_inspect, "repair": _cmd_repair,
                   "tune": _cmd_tune, "bench": _cmd_bench}[args.command]
        return command(args)
    except SystemExit as e:  # --help and --version
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    except _UsageError as e:
        _report_error(str(e), e, debug)
        return EXIT_USAGE
    except BrokenPipeError:  # the reader went away (`distjac ... | head`): stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except KeyboardInterrupt as e:
        _report_error("distjac: interrupted; finished shards are kept, run the job again to resume.", e, debug)
        return 130
    except Exception as e:
        from .errors import JobInputError

        usage = isinstance(e, JobInputError)
        prefix = f"distjac {argv_command(argv)}: error: " if not usage else f"distjac {argv_command(argv)}: "
        _report_error(prefix + _one_or_two_lines(_describe(e)), e, debug)
        return EXIT_USAGE if usage else EXIT_FAILED


def argv_command(argv: Sequence[str]) -> str:
    for a in argv:
        if a in ("run", "plan", "inspect", "repair", "tune", "bench"):
            return a
    return ""


def _describe(e: BaseException) -> str:
    from .errors import DistjacError

    if isinstance(e, DistjacError):
        return str(e)
    return f"{type(e).__name__}: {e}"


def _report_error(message: str, err: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
