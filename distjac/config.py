"""Job specs: YAML files, defaults, validation, overrides, the spec hash, and the model factory.

A job is five sections, each a frozen dataclass::

    model:    {factory: "distjac.models:mlp", kwargs: {sizes: [64, 256, 32]}, weights: null}
    data:     {kind: synthetic, rows: 100000, shape: [64], seed: 0}   # or npy | parquet | arrow
    jacobian: {mode: auto, chunk_size: null, reduce: null, dtype: float32}
    engine:   {address: null, num_workers: null, device: auto, shard_size: null,
               parallel_iterations: 8, max_retries: 3}
    output:   {path: results/NAME, format: arrow, resume: true}

``JobSpec.from_yaml`` / ``from_dict`` reject unknown keys (listing the valid ones) and
``validate()`` rejects bad values (listing the valid choices) and conflicting settings;
both run before any work. Checks that need the inputs themselves (files, columns,
dtypes, the Jacobian's shape for a reduction) are made by :func:`distjac.jobs.prepare_job`,
also before any work. Relative paths are relative to the working directory.

NOTE [what the spec hash covers]
``spec_hash()`` identifies the *results* a job produces; resume refuses an output written
under another hash. It covers the model, the data, the Jacobian's mode, reductions and
dtypes, and the output format. It leaves out what only changes how or where the work
runs: the engine section (address, workers, device, shard size, retries, progress),
``jacobian.chunk_size`` (a memory knob: lowering it after a worker ran out of memory must
not throw away finished shards) and the output's path, ``resume`` and ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, SourceNotFoundError
from .options import MODES

__all__ = [
    "DataSpec",
    "EngineSpec",
    "JacobianSpec",
    "JobSpec",
    "ModelSpec",
    "OutputSpec",
    "build_model",
]

DATA_KINDS = ("synthetic", "npy", "parquet", "arrow", "tensor")
REDUCTIONS = ("frobenius", "spectral", "trace", "logabsdet")
OUTPUT_FORMATS = ("arrow", "parquet")
# Dtypes a Jacobian can be stored in (Arrow has no bfloat16).
STORAGE_DTYPES = ("float16", "float32", "float64")
# Dtypes a model can be evaluated in.
COMPUTE_DTYPES = ("float16", "bfloat16", "float32", "float64")
DEVICES = ("auto", "cpu", "cuda")
# 8 shards in flight: with shards of 8-64 MiB of output this is ~2 per worker on a
# 4-worker machine, what issue 3 measured as the best gather throughput.
DEFAULT_PARALLEL_ITERATIONS = 8
# Ray retries a shard whose worker or node died this many times before the job fails.
DEFAULT_MAX_RETRIES = 3
SPEC_VERSION = 1

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_CUDA_RE = re.compile(r"^cuda(:\d+)?$")


@dataclass(frozen=True)
class ModelSpec:
    """``model``: a factory by import path, its keyword arguments, optional weights.

    Attributes:
        factory: ``"module:callable"`` returning a torch.nn.Module (or any callable
            mapping a batch to a batch).
        kwargs: keyword arguments of the factory.
        weights: a file for ``torch.load(weights_only=True)`` holding a state dict.
    """

    factory: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    weights: str | None = None


@dataclass(frozen=True)
class DataSpec:
    """``data``: where the examples come from.

    Attributes:
        kind: "synthetic" (seeded normal values), "npy", "parquet", "arrow" (IPC file),
            or "tensor" (in memory, from Python only).
        rows: synthetic: the number of rows; files: read only the first ``rows`` rows.
        shape: synthetic only: the per-example shape, e.g. [64].
        seed: synthetic only: values depend only on (seed, row).
        dtype: synthetic only: the values' dtype (float32 by default).
        path: npy/parquet/arrow: a file, or a directory of such files read in name order.
        column: parquet/arrow: the tensor column (a fixed_shape_tensor or a
            fixed-size list); null picks the only such column.
        tensor: kind "tensor": a torch.Tensor or numpy array (B, *shape).
    """

    kind: str = "synthetic"
    rows: int | None = None
    shape: tuple[int, ...] | None = None
    seed: int = 0
    dtype: str | None = None
    path: str | None = None
    column: str | None = None
    tensor: Any = None


@dataclass(frozen=True)
class JacobianSpec:
    """``jacobian``: how each shard's Jacobian is computed and what is kept of it.

    Attributes:
        mode: "auto", "rev" or "fwd" (see distjac.batch_jacobian).
        chunk_size: Jacobian rows per vectorized pass on a worker (the kernel's
            parallel_iterations); null lets the kernel fit its memory budget.
        reduce: null keeps the whole Jacobian; a list of frobenius, spectral, trace,
            logabsdet keeps one number per example and reduction instead.
        dtype: the stored values' dtype: float32 (default), float16 or float64.
        compute_dtype: the dtype the model and its inputs are evaluated in; null uses
            the model's parameter dtype (the source's dtype for a model without any).
    """

    mode: str = "auto"
    chunk_size: int | None = None
    reduce: tuple[str, ...] | None = None
    dtype: str = "float32"
    compute_dtype: str | None = None


@dataclass(frozen=True)
class EngineSpec:
    """``engine``: where and how the shards run (none of it changes the results).

    Attributes:
        address: null starts a local Ray instance, "auto" joins a running cluster,
            "ray://host:port" a remote one.
        num_workers: null uses what the cluster offers; 0 runs the job in this process
            without Ray (one shard at a time).
        device: "auto" (the GPU Ray assigns a worker, else CPU), "cpu", "cuda" or "cuda:N".
        shard_size: rows per shard; null sizes shards from a memory budget.
        parallel_iterations: shards in flight across the cluster.
        max_retries: retries of a shard whose worker or node died.
        progress: show a progress bar; null shows one when stderr is a terminal.
        shard_timeout_s: seconds a shard may run before its worker is replaced and the
            shard retried elsewhere; null: 10x the median shard, at least 60 s (600 s
            for a worker's first shard). Not in the spec hash.
    """

    address: str | None = None
    num_workers: int | None = None
    device: str = "auto"
    shard_size: int | None = None
    parallel_iterations: int = DEFAULT_PARALLEL_ITERATIONS
    max_retries: int = DEFAULT_MAX_RETRIES
    progress: bool | None = None
    shard_timeout_s: float | None = None


@dataclass(frozen=True)
class OutputSpec:
    """``output``: the result dataset.

    Attributes:
        path: the output directory (one part file per shard, a manifest, a marker).
        format: "arrow" (Arrow IPC files, memory-mapped reads) or "parquet".
        resume: true continues a job whose output exists with the same spec hash;
            false refuses any existing output unless overwrite.
        overwrite: replace an existing output written by another spec (the CLI's
            ``--overwrite``).
    """

    path: str | None = None
    format: str = "arrow"
    resume: bool = True
    overwrite: bool = False


_SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "data": DataSpec,
    "jacobian": JacobianSpec,
    "engine": EngineSpec,
    "output": OutputSpec,
}


@dataclass(frozen=True)
class JobSpec:
    """A whole job: model, data, jacobian, engine and output sections.

    Example:
        >>> spec = JobSpec.from_dict({
        ...     "model": {"factory": "distjac.models:cube"},
        ...     "data": {"kind": "synthetic", "rows": 10, "shape": [3]},
        ...     "output": {"path": "results/cube"}})
        >>> spec.jacobian.mode, spec.data.shape
        ('auto', (3,))
        >>> spec.with_overrides(["jacobian.mode=fwd"]).jacobian.mode
        'fwd'
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    jacobian: JacobianSpec = field(default_factory=JacobianSpec)
    engine: EngineSpec = field(default_factory=EngineSpec)
    output: OutputSpec = field(default_factory=OutputSpec)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Iterable[str] = ()) -> JobSpec:
        """Read a job from a YAML file, apply ``--set``-style overrides, validate.

        Raises:
            SourceNotFoundError: the file does not exist.
            ConfigError: the YAML does not parse, or the spec is invalid.
        """
        import yaml

        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except FileNotFoundError:
            raise SourceNotFoundError(f"config file {path!r} does not exist.") from None
        except IsADirectoryError:
            raise ConfigError(f"config {path!r} is a directory; give a YAML file.") from None
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"config {path!r} is not valid YAML{at}: {problem}.") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(
                f"config {path!r} must be a mapping of sections ({', '.join(_SECTIONS)}), "
                f"got a {type(raw).__name__}."
            )
        for item in overrides:
            _apply_override(raw, item)
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> JobSpec:
        """Build and validate a spec from nested dicts (missing keys take their defaults)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"a job spec must be a mapping of sections, got {type(raw).__name__}.")
        _reject_unknown(raw, list(_SECTIONS), "")
        sections = {}
        for name, section_cls in _SECTIONS.items():
            values = raw.get(name)
            if values is None:
                values = {}
            if not isinstance(values, Mapping):
                raise ConfigError(
                    f"config: section {name!r} must be a mapping of keys, got {type(values).__name__} "
                    f"{values!r}."
                )
            valid = [f.name for f in dataclasses.fields(section_cls)]
            _reject_unknown(values, valid, name + ".")
            sections[name] = section_cls(**{k: _normalize(name, k, v) for k, v in values.items()})
        spec = cls(**sections)
        spec.validate()
        return spec

    def with_overrides(self, items: Iterable[str]) -> JobSpec:
        """A copy with ``key.path=value`` overrides applied (values parsed as YAML scalars).

        ``model.kwargs.NAME=value`` sets a factory argument; everything else must name an
        existing key.
        """
        raw = self.to_dict()
        for item in items:
            _apply_override(raw, item)
        return JobSpec.from_dict(raw)

    # ---------------------------------------------------------------- checks

    def validate(self) -> JobSpec:
        """Reject bad values and conflicting settings; returns self.

        Only the spec itself is checked (no files are opened); see
        :func:`distjac.jobs.prepare_job` for the checks against the inputs.
        """
        _validate_model(self.model)
        _validate_data(self.data)
        _validate_jacobian(self.jacobian)
        _validate_engine(self.engine)
        _validate_output(self.output)
        return self

    # ---------------------------------------------------------------- views

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts (lists for shapes), the form ``from_dict`` and YAML take."""
        out: dict[str, Any] = {}
        for name in _SECTIONS:
            section = getattr(self, name)
            values = {}
            for f in dataclasses.fields(section):
                v = getattr(section, f.name)
                if isinstance(v, tuple):
                    v = list(v)
                elif isinstance(v, Mapping):
                    v = dict(v)
                if name == "data" and f.name == "tensor" and v is None:
                    continue  # not a YAML key; only in-memory jobs carry it
                values[f.name] = v
            out[name] = values
        return out

    def normalized(self) -> dict[str, Any]:
        """What :meth:`spec_hash` hashes: the result-defining keys, paths made absolute.

        See NOTE [what the spec hash covers].
        """
        data = {
            "kind": self.data.kind,
            "rows": self.data.rows,
            "path": _abspath(self.data.path),
            "column": self.data.column,
        }
        if self.data.kind == "synthetic":
            data.update(shape=list(self.data.shape or ()), seed=self.data.seed, dtype=self.data.dtype or "float32")
        if self.data.kind == "tensor":
            data["tensor"] = _tensor_digest(self.data.tensor)
        return {
            "version": SPEC_VERSION,
            "model": {
                "factory": self.model.factory,
                "kwargs": json.loads(json.dumps(dict(self.model.kwargs), sort_keys=True, default=repr)),
                "weights": _abspath(self.model.weights),
            },
            "data": data,
            "jacobian": {
                "mode": self.jacobian.mode,
                "reduce": list(self.jacobian.reduce) if self.jacobian.reduce else None,
                "dtype": self.jacobian.dtype,
                "compute_dtype": self.jacobian.compute_dtype,
            },
            "output": {"format": self.output.format},
        }

    def spec_hash(self) -> str:
        """A stable hex digest of :meth:`normalized` (16 hex digits of its SHA-256).

        Example:
            >>> a = JobSpec.from_dict({"model": {"factory": "distjac.models:cube"},
            ...     "data": {"rows": 4, "shape": [2]}, "output": {"path": "out"}})
            >>> a.spec_hash() == a.with_overrides(["engine.num_workers=4"]).spec_hash()
            True
            >>> a.spec_hash() == a.with_overrides(["data.seed=1"]).spec_hash()
            False
        """
        text = json.dumps(self.normalized(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def reductions(self) -> tuple[str, ...]:
        """The reductions asked for (empty when the whole Jacobian is kept)."""
        return tuple(self.jacobian.reduce or ())


# -------------------------------------------------------------------------------------
# parsing helpers
# -------------------------------------------------------------------------------------


def _reject_unknown(values: Mapping[str, Any], valid: Sequence[str], prefix: str) -> None:
    for key in values:
        if key not in valid:
            where = f"section {prefix[:-1]!r}" if prefix else "the top level"
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(
                f"config: unknown key {prefix}{key!r} in {where}; valid keys are: "
                f"{', '.join(valid)}.{hint}"
            )


def _normalize(section: str, key: str, value: Any) -> Any:
    """Lists to tuples for shapes and reductions; a single reduction name to a 1-tuple."""
    if section == "data" and key == "shape" and isinstance(value, list):
        return tuple(value)
    if section == "jacobian" and key == "reduce":
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list):
            return tuple(value)
    if section == "model" and key == "kwargs" and value is None:
        return {}
    return value


def _apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in nested dicts; the value is parsed as a YAML scalar."""
    import yaml

    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"--set expects key.path=value (e.g. jacobian.mode=fwd), got {item!r}.")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(
            f"--set {item!r}: name a key inside a section, e.g. jacobian.mode=fwd; "
            f"sections are: {', '.join(_SECTIONS)}."
        )
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a section or mapping.")
        node = child
    node[parts[-1]] = value


def _abspath(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def _tensor_digest(t: Any) -> str | None:
    import numpy as np

    if t is None:
        return None
    arr = t.detach().cpu().contiguous().numpy() if hasattr(t, "detach") else np.ascontiguousarray(t)
    h = hashlib.sha256(f"{arr.dtype}{arr.shape}".encode())
    h.update(memoryview(arr.reshape(-1).view(np.uint8)))
    return h.hexdigest()[:16]


# -------------------------------------------------------------------------------------
# validation
# -------------------------------------------------------------------------------------


def _bad(key: str, value: Any, want: str) -> ConfigError:
    return ConfigError(f"config: {key}={value!r} is not valid; {want}.")


def _choices(values: Sequence[str]) -> str:
    return "use one of " + ", ".join(repr(v) for v in values)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(key: str, value: Any, *, minimum: int, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or value < minimum:
        none = "null or " if allow_none else ""
        raise _bad(key, value, f"use {none}an integer >= {minimum}")


def _check_choice(key: str, value: Any, valid: Sequence[str], *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str) or value not in valid:
        extra = " or null" if allow_none else ""
        raise _bad(key, value, _choices(valid) + extra)


def _check_str(key: str, value: Any, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str) or not value.strip():
        raise _bad(key, value, "give a non-empty string" + (" or null" if allow_none else ""))


def _validate_model(m: ModelSpec) -> None:
    if m.factory is None:
        raise ConfigError(
            'config: model.factory is required: an import path "module:callable", '
            'e.g. "distjac.models:mlp".'
        )
    if not isinstance(m.factory, str) or not _FACTORY_RE.match(m.factory):
        raise _bad("model.factory", m.factory, 'give an import path "module:callable", e.g. "distjac.models:mlp"')
    if not isinstance(m.kwargs, Mapping) or not all(isinstance(k, str) for k in m.kwargs):
        raise _bad("model.kwargs", m.kwargs, "give a mapping of keyword arguments")
    _check_str("model.weights", m.weights, allow_none=True)


def _validate_data(d: DataSpec) -> None:
    _check_choice("data.kind", d.kind, DATA_KINDS)
    _check_int("data.rows", d.rows, minimum=0, allow_none=True)
    _check_int("data.seed", d.seed, minimum=0, allow_none=False)
    _check_str("data.path", d.path, allow_none=True)
    _check_str("data.column", d.column, allow_none=True)
    if d.kind == "synthetic":
        if d.rows is None:
            raise ConfigError("config: data.rows is required for data.kind 'synthetic' (the number of examples).")
        shape = d.shape
        if shape is None:
            raise ConfigError("config: data.shape is required for data.kind 'synthetic', e.g. shape: [64].")
        if not isinstance(shape, (tuple, list)) or not shape or not all(_is_int(s) and s >= 1 for s in shape):
            raise _bad("data.shape", list(shape) if isinstance(shape, tuple) else shape,
                       "give a non-empty list of integers >= 1, e.g. [64]")
        _check_choice("data.dtype", d.dtype, STORAGE_DTYPES, allow_none=True)
        for key in ("path", "column"):
            if getattr(d, key) is not None:
                raise ConfigError(f"config: data.{key} conflicts with data.kind 'synthetic'; remove it, "
                                  f"or set data.kind to npy, parquet or arrow.")
    else:
        for key in ("shape", "dtype"):
            if getattr(d, key) is not None:
                raise ConfigError(
                    f"config: data.{key} is only for data.kind 'synthetic'; a {d.kind} source has its "
                    f"own {key}. Remove data.{key}."
                )
        if d.seed != 0:
            raise ConfigError(f"config: data.seed is only for data.kind 'synthetic'; remove it for kind {d.kind!r}.")
    if d.kind in ("npy", "parquet", "arrow") and d.path is None:
        raise ConfigError(f"config: data.path is required for data.kind {d.kind!r}.")
    if d.kind == "npy" and d.column is not None:
        raise ConfigError("config: data.column conflicts with data.kind 'npy' (a .npy file has no columns).")
    if d.kind == "tensor":
        if d.tensor is None:
            raise ConfigError(
                "config: data.kind 'tensor' needs data.tensor, a torch.Tensor or numpy array given from "
                "Python (JobSpec.from_dict); YAML jobs read npy, parquet, arrow or synthetic data."
            )
        if d.path is not None or d.column is not None:
            raise ConfigError("config: data.path and data.column conflict with data.kind 'tensor'.")
    elif d.tensor is not None:
        raise ConfigError(f"config: data.tensor is only for data.kind 'tensor', not {d.kind!r}.")


def _validate_jacobian(j: JacobianSpec) -> None:
    _check_choice("jacobian.mode", j.mode, MODES)
    _check_int("jacobian.chunk_size", j.chunk_size, minimum=1, allow_none=True)
    _check_choice("jacobian.dtype", j.dtype, STORAGE_DTYPES)
    _check_choice("jacobian.compute_dtype", j.compute_dtype, COMPUTE_DTYPES, allow_none=True)
    if j.reduce is None:
        return
    if not isinstance(j.reduce, tuple) or not j.reduce:
        raise _bad("jacobian.reduce", j.reduce, f"use null or a list of {', '.join(REDUCTIONS)}")
    for name in j.reduce:
        if name not in REDUCTIONS:
            raise ConfigError(
                f"config: jacobian.reduce: unknown reduction {name!r}; use null or a list of "
                f"{', '.join(repr(r) for r in REDUCTIONS)}."
            )
    dup = sorted({n for n in j.reduce if j.reduce.count(n) > 1})
    if dup:
        raise ConfigError(f"config: jacobian.reduce lists {', '.join(dup)} more than once.")


def _validate_engine(e: EngineSpec) -> None:
    _check_str("engine.address", e.address, allow_none=True)
    _check_int("engine.num_workers", e.num_workers, minimum=0, allow_none=True)
    if not isinstance(e.device, str) or not (e.device in DEVICES or _CUDA_RE.match(e.device)):
        raise _bad("engine.device", e.device, _choices(DEVICES) + " or 'cuda:N'")
    _check_int("engine.shard_size", e.shard_size, minimum=1, allow_none=True)
    _check_int("engine.parallel_iterations", e.parallel_iterations, minimum=1, allow_none=False)
    _check_int("engine.max_retries", e.max_retries, minimum=0, allow_none=False)
    if e.progress is not None and not isinstance(e.progress, bool):
        raise _bad("engine.progress", e.progress, "use true, false or null")
    t = e.shard_timeout_s
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or t == float("inf")):
        raise _bad("engine.shard_timeout_s", t, "use null or a number of seconds > 0")
    if e.num_workers == 0 and e.address is not None:
        raise ConfigError(
            f"config: engine.num_workers=0 runs the job in this process without Ray, which conflicts "
            f"with engine.address={e.address!r}; set num_workers to null or >= 1, or remove the address."
        )


def _validate_output(o: OutputSpec) -> None:
    if o.path is None:
        raise ConfigError("config: output.path is required: the directory the results go to, e.g. results/NAME.")
    _check_str("output.path", o.path, allow_none=False)
    _check_choice("output.format", o.format, OUTPUT_FORMATS)
    for key in ("resume", "overwrite"):
        if not isinstance(getattr(o, key), bool):
            raise _bad(f"output.{key}", getattr(o, key), "use true or false")


# -------------------------------------------------------------------------------------
# the model factory
# -------------------------------------------------------------------------------------


def resolve_factory(factory: str) -> Any:
    """The callable named by ``"module:attr.path"``; ConfigError if it cannot be imported."""
    module_name, _, attr_path = factory.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"config: model.factory={factory!r}: cannot import module {module_name!r} "
            f"({type(e).__name__}: {e}). Check the name, or install the package that defines it."
        ) from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))
            raise ConfigError(
                f"config: model.factory={factory!r}: {module_name!r} has no attribute {attr_path!r}; "
                f"callables there: {', '.join(public[:20]) or 'none'}."
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"config: model.factory={factory!r} is a {type(obj).__name__}, not a callable.")
    return obj


def build_model(spec: ModelSpec, *, device: Any = None, dtype: Any = None):
    """Call the factory with its kwargs, load the weights, move to ``device`` / ``dtype``.

    The model is put in eval mode and its parameters stop requiring gradients (only the
    Jacobian with respect to the inputs is computed).

    Raises:
        ConfigError: the factory cannot be imported or fails with these kwargs, or the
            weights do not fit the model.
        SourceNotFoundError: the weights file does not exist.
    """
    import torch

    factory = resolve_factory(spec.factory)
    try:
        model = factory(**dict(spec.kwargs))
    except TypeError as e:
        raise ConfigError(f"config: model.factory={spec.factory!r} rejected model.kwargs: {e}") from e
    except ValueError as e:
        raise ConfigError(f"config: model.factory={spec.factory!r} failed: {e}") from e
    if not callable(model):
        raise ConfigError(
            f"config: model.factory={spec.factory!r} returned a {type(model).__name__}, not a callable model."
        )
    if spec.weights is not None:
        path = os.path.expanduser(spec.weights)
        if not os.path.exists(path):
            raise SourceNotFoundError(f"config: model.weights={spec.weights!r}: the file does not exist.")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        if not isinstance(model, torch.nn.Module) or not isinstance(state, Mapping):
            raise ConfigError(
                f"config: model.weights={spec.weights!r} must hold a state dict for a torch.nn.Module; "
                f"got {type(state).__name__} for a {type(model).__name__}."
            )
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise ConfigError(
                f"config: model.weights={spec.weights!r} do not fit the model: "
                f"{' '.join(line.strip() for line in first[:3])}"
            ) from e
    if isinstance(model, torch.nn.Module):
        model.eval()
        model.requires_grad_(False)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
    return model
