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

NOTE [a config is code]
``model.factory`` names a Python callable that the driver and every worker import and
call with ``model.kwargs``: running a config runs code, so a config must be trusted like
a script. What distjac refuses, before it calls anything (see :func:`resolve_factory`):
a factory that is not a Python function, method or ``functools.partial`` of one, or a
``torch.nn.Module`` subclass (``os:system`` and other builtins are C functions), and any
factory defined in the Python standard library (``subprocess:run``); after the call, a
result that is a class or not callable. This keeps a typo or a pasted config from running
a shell command; it is not a sandbox: a Python function of any installed package runs
with the user's rights. ``distjac plan`` imports and calls nothing unless ``--probe``.

NOTE [YAML aliases are bounded]
A YAML alias (``*name``) makes a node appear again without copying it, so 740 bytes of
nested aliases (a "billion laughs") describe 10^9 values that anything walking the
config (the spec hash, a copy, a worker's pickle) expands. ``_load_yaml`` composes the
node graph, counts its aliases (at most :data:`MAX_YAML_ALIASES`) and the values the
aliases add when expanded (at most :data:`MAX_YAML_EXPANSION`, counted over the shared
graph without expanding it), and refuses a recursive alias, before any Python object is
constructed. A config written out in full is never refused by these limits.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import pickle
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .arrow import STORAGE_DTYPES
from .errors import ConfigError, SourceNotFoundError
from .options import DEVICES, MODES, is_device, is_int
from .plan import DEFAULT_PARALLEL_ITERATIONS
from .reduce import REDUCTIONS

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
OUTPUT_FORMATS = ("arrow", "parquet")
# Dtypes a model can be evaluated in (stored ones: distjac.arrow.STORAGE_DTYPES).
COMPUTE_DTYPES = ("float16", "bfloat16", "float32", "float64")
# Ray retries a shard whose worker or node died this many times before the job fails.
DEFAULT_MAX_RETRIES = 3
SPEC_VERSION = 1

# See NOTE [YAML aliases are bounded]. A config uses a handful of anchors at most
# (shared kwargs); 100 aliases and 100,000 values added by them are far above that and
# far below what costs memory (100,000 small values: a few MiB, milliseconds to hash).
MAX_YAML_ALIASES = 100
MAX_YAML_EXPANSION = 100_000

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class ModelSpec:
    """``model``: a factory by import path, its keyword arguments, optional weights.

    Attributes:
        factory: ``"module:callable"`` returning a torch.nn.Module (or any callable
            mapping a batch to a batch).
        kwargs: keyword arguments of the factory.
        weights: a file for ``torch.load(weights_only=True)`` holding a state dict.
        weights_key: the key of the state dict in a checkpoint dict such as
            ``{"model": state_dict, "epoch": 3}`` (null: the file is the state dict, or
            holds one under ``"state_dict"``).

    See NOTE [a config is code]: the factory is imported and called.
    """

    factory: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    weights: str | None = None
    weights_key: str | None = None


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
            ConfigError: the YAML does not parse, holds too many aliases (see NOTE [YAML
                aliases are bounded]), or the spec is invalid.
        """
        import yaml

        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                raw = _load_yaml(f, f"config {path!r}")
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
        model = {
            "factory": self.model.factory,
            "kwargs": json.loads(json.dumps(dict(self.model.kwargs), sort_keys=True, default=repr)),
            "weights": _abspath(self.model.weights),
        }
        if self.model.weights_key is not None:  # only when set: outputs written before it keep their hash
            model["weights_key"] = self.model.weights_key
        return {
            "version": SPEC_VERSION,
            "model": model,
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
        value = _load_yaml(text, f"--set {item!r}") if text.strip() else None
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


@functools.cache
def _bounded_loader() -> type:
    """yaml.SafeLoader that counts aliases while composing; see NOTE [YAML aliases are bounded]."""
    import yaml

    class BoundedSafeLoader(yaml.SafeLoader):
        where = "config"
        aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_YAML_ALIASES:
                    raise ConfigError(
                        f"{self.where} has {self.aliases} aliases; at most {MAX_YAML_ALIASES} are read "
                        f"(a guard against YAML alias bombs). Write the values out instead of *aliases."
                    )
            return super().compose_node(parent, index)

    return BoundedSafeLoader


def _load_yaml(stream: Any, where: str) -> Any:
    """``yaml.safe_load`` with aliases bounded (NOTE [YAML aliases are bounded])."""
    loader = _bounded_loader()(stream)
    loader.where = where
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, where)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_expansion(root: Any, where: str) -> None:
    """Refuse a composed YAML graph whose aliases add more than MAX_YAML_EXPANSION values
    once expanded, or that refers to itself. Each distinct node is visited once."""
    import yaml

    sizes: dict[int, int] = {}  # id(node) -> its expanded size (nodes, itself included)
    on_path: set[int] = set()

    def children(node):
        if isinstance(node, yaml.SequenceNode):
            return node.value
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return ()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:
            raise ConfigError(
                f"{where}: an alias refers to itself (a node that contains its own anchor), which "
                f"a config cannot hold. Remove the recursive *alias."
            )
        on_path.add(key)
        total = 1 + sum(size(child) for child in children(node))
        on_path.discard(key)
        sizes[key] = total
        if total - len(sizes) > MAX_YAML_EXPANSION:
            raise ConfigError(
                f"{where}: its aliases (*name) expand to more than {MAX_YAML_EXPANSION:,} values "
                f"({total:,} at least, from {len(sizes):,} written); a job config needs a handful "
                f"(a guard against YAML alias bombs). Write the values out, or use fewer aliases."
            )
        return total

    size(root)


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


def _check_int(key: str, value: Any, *, minimum: int, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not is_int(value) or value < minimum:
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
    _refuse_stdlib(m.factory, m.factory.partition(":")[0])
    if not isinstance(m.kwargs, Mapping) or not all(isinstance(k, str) for k in m.kwargs):
        raise _bad("model.kwargs", m.kwargs, "give a mapping of keyword arguments")
    _check_str("model.weights", m.weights, allow_none=True)
    _check_str("model.weights_key", m.weights_key, allow_none=True)
    if m.weights_key is not None and m.weights is None:
        raise ConfigError(
            f"config: model.weights_key needs model.weights (the checkpoint file whose key "
            f"{m.weights_key!r} holds the state dict); set model.weights or remove model.weights_key."
        )


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
        if not isinstance(shape, (tuple, list)) or not shape or not all(is_int(s) and s >= 1 for s in shape):
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
    if not is_device(e.device):
        raise _bad("engine.device", e.device, _choices(DEVICES[:-1]) + f" or {DEVICES[-1]!r}")
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


def _refuse_stdlib(factory: str, module_name: str | None, defined_in: bool = False) -> None:
    """A factory of the Python standard library (``os:system``, ``subprocess:run``) is
    never a model: refuse it (NOTE [a config is code])."""
    top = (module_name or "").split(".")[0]
    if top == "builtins" or top in sys.stdlib_module_names:
        where = f"is defined in {module_name!r}" if defined_in else f"names {module_name!r}"
        raise ConfigError(
            f"config: model.factory={factory!r} {where}, the Python standard library, not a model "
            f"builder; name a function or torch.nn.Module class of your code or of a package such as "
            f"distjac.models. A config is code: trust it like a script."
        )


def find_factory_module(factory: str) -> None:
    """Check that the factory's module can be imported, without importing it (no module
    code runs: its spec is looked up along sys.path, as ``import`` would); ConfigError if not.

    A package that is not imported yet is not imported either: its submodules are looked
    up in the package's folders.
    """
    module_name = factory.partition(":")[0]
    parts = module_name.split(".")
    search: Any = None
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        if name in sys.modules:
            found = getattr(sys.modules[name], "__spec__", None) or True
        elif i == 0:
            try:
                found = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                found = None
        else:
            found = None
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                spec = find(name, search) if find is not None else None
                if spec is not None:
                    found = spec
                    break
        if found is None:
            raise ConfigError(
                f"config: model.factory={factory!r}: cannot import module {name!r}: it is not on this "
                f"machine's Python path. Check the name, or install the package that defines it."
            )
        mod = sys.modules.get(name)
        if mod is not None:
            search = getattr(mod, "__path__", None)
        else:
            search = getattr(found, "submodule_search_locations", None)
        if i < len(parts) - 1 and search is None:
            raise ConfigError(f"config: model.factory={factory!r}: {name!r} is a module, not a package of "
                              f"{module_name!r}.")


def _check_factory(factory: str, obj: Any) -> None:
    """Refuse what is not a model builder, before calling it (NOTE [a config is code]).

    Accepted: a Python function (or lambda), a method (a classmethod such as
    ``Net.from_config``), a ``functools.partial`` of one, or a torch.nn.Module subclass;
    none defined in the standard library.
    """
    import torch

    target = obj
    while isinstance(target, functools.partial):
        target = target.func
    func = target.__func__ if inspect.ismethod(target) else target
    if inspect.isclass(func):
        if not issubclass(func, torch.nn.Module):
            raise ConfigError(
                f"config: model.factory={factory!r} is the class {func.__name__!r}, which is not a "
                f"torch.nn.Module; name a torch.nn.Module subclass or a function that returns a model."
            )
    elif isinstance(func, torch.nn.Module):
        raise ConfigError(
            f"config: model.factory={factory!r} is a {type(func).__name__} instance (a model already "
            f"built); name the function or class that builds it, e.g. {type(func).__name__}."
        )
    elif not inspect.isfunction(func):
        raise ConfigError(
            f"config: model.factory={factory!r} is a {type(func).__name__} ({func!r:.60}), not a Python "
            f"function or a torch.nn.Module class; a factory must be one of those (builtins and C "
            f"functions such as os.system are refused). A config is code: trust it like a script."
        )
    _refuse_stdlib(factory, getattr(func, "__module__", None), defined_in=True)


def resolve_factory(factory: str) -> Any:
    """The callable named by ``"module:attr.path"``, checked to be a model builder.

    The module is imported (which runs its code); nothing is called. See NOTE [a config
    is code] for what is refused.

    Raises:
        ConfigError: the module cannot be imported, has no such attribute, or the object
            is not a Python function, method, partial or torch.nn.Module class, or comes
            from the Python standard library.
    """
    if not isinstance(factory, str) or not _FACTORY_RE.match(factory):
        raise _bad("model.factory", factory, 'give an import path "module:callable", e.g. "distjac.models:mlp"')
    module_name, _, attr_path = factory.partition(":")
    _refuse_stdlib(factory, module_name)
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
    _check_factory(factory, obj)
    return obj


def build_model(spec: ModelSpec, *, factory: Any = None, device: Any = None, dtype: Any = None):
    """Call the factory with its kwargs, load the weights, move to ``device`` / ``dtype``.

    ``factory`` is the spec's factory already resolved (:func:`resolve_factory`; the
    engine resolves it on the driver and ships it to the workers); None resolves it here.

    The model is put in eval mode and its parameters stop requiring gradients (only the
    Jacobian with respect to the inputs is computed).

    Raises:
        ConfigError: the factory cannot be imported, is not a model builder (NOTE [a
            config is code]), fails with these kwargs or returns something that is not a
            model; or the weights cannot be read or do not fit the model.
        SourceNotFoundError: the weights file does not exist.
    """
    import torch

    if factory is None:
        factory = resolve_factory(spec.factory)
    try:
        model = factory(**dict(spec.kwargs))
    except TypeError as e:
        raise ConfigError(f"config: model.factory={spec.factory!r} rejected model.kwargs: {e}") from e
    except ValueError as e:
        raise ConfigError(f"config: model.factory={spec.factory!r} failed: {e}") from e
    if inspect.isclass(model):
        raise ConfigError(
            f"config: model.factory={spec.factory!r} returned the class {model.__name__!r}, not a model; "
            f"return an instance ({model.__name__}(...)), or name the class itself as the factory."
        )
    if not callable(model):
        raise ConfigError(
            f"config: model.factory={spec.factory!r} returned a {type(model).__name__}, not a callable model."
        )
    if spec.weights is not None:
        _load_weights(spec, model)
    if isinstance(model, torch.nn.Module):
        model.eval()
        model.requires_grad_(False)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
    return model


def _names(keys: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _is_state_dict(value: Any) -> bool:
    import torch

    return isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in value.items())


def _load_weights(spec: ModelSpec, model: Any) -> None:
    """Load ``model.weights`` (``model.weights_key`` of it) into ``model``; ConfigError
    naming what to change when the file, its keys or its shapes do not fit."""
    import torch

    key = f"config: model.weights={spec.weights!r}"
    path = os.path.expanduser(spec.weights)
    if not os.path.exists(path):
        raise SourceNotFoundError(f"{key}: the file does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        import zipfile

        # torch.save writes a zip archive; anything else failed to unpickle as junk would
        if "weights only" not in str(e).lower() or not zipfile.is_zipfile(path):
            raise ConfigError(f"{key} cannot be read by torch.load (UnpicklingError: "
                              f"{str(e).strip().splitlines()[0]}); give a file saved with "
                              f"torch.save(model.state_dict(), path).") from e
        raise ConfigError(
            f"{key} holds pickled Python objects that torch.load(weights_only=True) refuses (a whole model "
            f"saved with torch.save(model)?); save model.state_dict() instead: "
            f"torch.save(model.state_dict(), path)."
        ) from e
    except Exception as e:  # a truncated or foreign file: RuntimeError, EOFError, OSError
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"{key} cannot be read by torch.load ({type(e).__name__}: {first}); give a file "
                          f"saved with torch.save(model.state_dict(), path).") from e
    if spec.weights_key is not None:
        if not isinstance(state, Mapping) or spec.weights_key not in state:
            keys = f"its keys are: {_names(list(state), 10)}" if isinstance(state, Mapping) else \
                f"it holds a {type(state).__name__}, not a checkpoint dict"
            raise ConfigError(f"config: model.weights_key={spec.weights_key!r} is not in {spec.weights!r}; "
                              f"{keys}.")
        state = state[spec.weights_key]
        if not _is_state_dict(state):
            raise ConfigError(
                f"config: model.weights_key={spec.weights_key!r} picks a {type(state).__name__} from "
                f"{spec.weights!r}, not a state dict (a mapping of names to tensors); pick the key that "
                f"holds model.state_dict()."
            )
    elif isinstance(state, Mapping) and _is_state_dict(state.get("state_dict")):
        state = state["state_dict"]
    if not isinstance(model, torch.nn.Module) or not isinstance(state, Mapping):
        raise ConfigError(
            f"{key} must hold a state dict for a torch.nn.Module; "
            f"got {type(state).__name__} for a {type(model).__name__}."
        )
    if not _is_state_dict(state):
        inner = [k for k, v in state.items() if _is_state_dict(v)]
        pick = f"model.weights_key: {inner[0]}" if inner else "model.weights_key: <key>"
        raise ConfigError(
            f"{key} holds a checkpoint with keys {_names(list(state))}, not a state dict of tensors; set "
            f"{pick} to the key that holds model.state_dict()."
        )
    expected, given = list(model.state_dict()), list(state)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in given if k not in set(expected)]
    if missing or unexpected:
        parts = ([f"missing keys {_names(missing)}"] if missing else []) + \
            ([f"unexpected keys {_names(unexpected)}"] if unexpected else [])
        prefix = given[0].split(".")[0] + "." if given and "." in given[0] else None
        if prefix and all(k.startswith(prefix) for k in given) and \
                {k[len(prefix):] for k in given} == set(expected):
            hint = (f"the weights' keys carry the prefix {prefix!r} (saved from a wrapper such as "
                    f"DistributedDataParallel): save {{k.removeprefix({prefix!r}): v for k, v in "
                    f"state.items()}} instead.")
        else:
            hint = "check model.factory and model.kwargs against the model the weights were saved from."
        raise ConfigError(f"{key} do not fit the model: {'; '.join(parts)}; {hint}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ConfigError(
            f"{key} do not fit the model: {' '.join(line.strip() for line in first[:3])}"
        ) from e
