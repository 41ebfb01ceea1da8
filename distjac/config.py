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

NOTE [model files]
``model.factory`` is ``"module:callable"`` or ``"path/to/file.py:callable"``. A file path
is relative to the config's folder (``JobSpec.from_yaml`` records it as ``base_dir``;
absolute paths and ``~`` work too) and is loaded with importlib as a module of its own,
``distjac_user_<stem>_<hash of its absolute path>``, registered in ``sys.modules``: loading
it twice gives the same objects, and the factory it returns pickles (by value, since no
worker can import that name) like any function of a script. A module name is looked up in
the config's folder first: ``resolve_factory`` puts that folder at the front of
``sys.path`` (as ``python script.py`` does for the script's folder), so ``mymodels:make``
beside the config imports ``mymodels.py``. Workers get the factory by value (the engine
ships what their Python path cannot import), so they need neither the file nor the folder.
A live model (``JobSpec.from_dict({"model": net, ...})``) needs no factory; its spec hash
covers its class and its state_dict's bytes (a function: its code), see
:func:`live_model_digest`.

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

DATA_KINDS = ("synthetic", "npy", "parquet", "arrow", "tensor", "ray_dataset")
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
# "path/to/file.py:callable" (NOTE [model files]); the path may hold anything but ends in .py.
_FILE_FACTORY_RE = re.compile(r"^(?P<file>.+\.py):(?P<attr>[A-Za-z_][\w.]*)$")
_FACTORY_HINT = ('give "module:callable" (e.g. "distjac.models:mlp") or "path/to/file.py:callable" '
                 '(relative to the config\'s folder)')
# Dataclass fields that are not config keys: set from Python or by from_yaml only.
_NOT_KEYS = {("model", "base_dir")}


@dataclass(frozen=True)
class ModelSpec:
    """``model``: a factory by import path, its keyword arguments, optional weights.

    Attributes:
        factory: ``"module:callable"`` or ``"path/to/file.py:callable"`` returning a
            torch.nn.Module (or any callable mapping a batch to a batch). A file path is
            relative to the config's folder (``base_dir``); a module is looked up there
            first, then on the Python path. See NOTE [model files].
        kwargs: keyword arguments of the factory.
        weights: a file for ``torch.load(weights_only=True)`` holding a state dict.
        weights_key: the key of the state dict in a checkpoint dict such as
            ``{"model": state_dict, "epoch": 3}`` (null: the file is the state dict, or
            holds one under ``"state_dict"``).
        output: null (the model returns one tensor), or the key (a string: a dict key
            or an attribute, e.g. ``logits`` of a Hugging Face output object) or the
            index (an integer, of a tuple or list) of the tensor to differentiate.
        module: Python only (``JobSpec.from_dict``): a live ``torch.nn.Module`` or a
            callable mapping a batch to a batch, used instead of a factory (a copy of a
            module is put in eval mode; the caller's is not changed).
        base_dir: the folder relative factory files are resolved against: the config's
            folder for ``JobSpec.from_yaml``, None (the working directory) otherwise.
            Not a YAML key, not in the spec hash.

    See NOTE [a config is code]: the factory is imported and called.
    """

    factory: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    weights: str | None = None
    weights_key: str | None = None
    output: str | int | None = None
    module: Any = None
    base_dir: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class DataSpec:
    """``data``: where the examples come from.

    Attributes:
        kind: "synthetic" (seeded normal values), "npy", "parquet", "arrow" (IPC file),
            "tensor" (in memory) or "ray_dataset" (a Ray Data Dataset); the last two
            from Python only.
        rows: synthetic: the number of rows; files: read only the first ``rows`` rows.
        shape: synthetic: the per-example shape, e.g. [64]; parquet/arrow: the per-row
            shape of a column of lists of numbers (null: the first row's list lengths).
        seed: synthetic only: values depend only on (seed, row).
        dtype: synthetic only: the values' dtype (float32 by default).
        path: npy/parquet/arrow: a file, or a directory of such files read in name order.
        column: parquet/arrow: the tensor column (a fixed_shape_tensor or a
            fixed-size list); null picks the only such column.
        tensor: kind "tensor": a torch.Tensor or numpy array (B, *shape).
        dataset: kind "ray_dataset": a ``ray.data.Dataset`` whose tensor column
            (``column``; null picks the only one) holds the examples (NOTE [a Dataset
            as a source] in distjac.ray_data).
    """

    kind: str = "synthetic"
    rows: int | None = None
    shape: tuple[int, ...] | None = None
    seed: int = 0
    dtype: str | None = None
    path: str | None = None
    column: str | None = None
    tensor: Any = None
    dataset: Any = None


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
        estimate: null, or matrix-free per-example estimates instead of the Jacobian,
            e.g. ``{frobenius: {probes: 8}, spectral: {iters: 20}}`` (docs/estimates.md):
            the parts hold the columns ``frobenius``, ``frobenius_stderr``, ... and the
            Jacobian is never built. Not with ``reduce``.
        structure: null (the dense Jacobian), or "diagonal": an elementwise model's
            Jacobian is diagonal, and the parts keep the diagonal alone, (*in) per
            example, 1/n of the bytes; refused unless distjac proves the model
            elementwise (distjac.batch_jacobian(..., structure="diagonal")).
    """

    mode: str = "auto"
    chunk_size: int | None = None
    reduce: tuple[str, ...] | None = None
    dtype: str = "float32"
    compute_dtype: str | None = None
    estimate: dict | None = None
    structure: str | None = None


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
        max_in_flight: shards in flight across the cluster (the deprecated name
            ``engine.parallel_iterations`` is still read, with a FutureWarning; it is
            not TF's ``parallel_iterations``, which is ``jacobian.chunk_size`` here).
        max_retries: retries of a shard whose worker or node died.
        progress: true: show progress (a bar on a terminal, a line on stderr every 10 s
            elsewhere), false: none; null: ``distjac run`` shows it, library calls only
            on a terminal (see :mod:`distjac.progress`).
        shard_timeout_s: seconds a shard may run before its worker is replaced and the
            shard retried elsewhere; null: 10x the median shard, at least 60 s (600 s
            for a worker's first shard). Not in the spec hash.
    """

    address: str | None = None
    num_workers: int | None = None
    device: str = "auto"
    shard_size: int | None = None
    max_in_flight: int = DEFAULT_PARALLEL_ITERATIONS
    max_retries: int = DEFAULT_MAX_RETRIES
    progress: bool | None = None
    shard_timeout_s: float | None = None

    @property
    def parallel_iterations(self) -> int:
        """Deprecated name of :attr:`max_in_flight` (read-only)."""
        return self.max_in_flight


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
        keep_columns: input columns carried to the output beside ``row`` (e.g. ``[id,
            label]``); Parquet and Arrow sources only.
    """

    path: str | None = None
    format: str = "arrow"
    resume: bool = True
    overwrite: bool = False
    keep_columns: tuple[str, ...] | None = None


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
        return cls.from_dict(raw, base_dir=os.path.dirname(os.path.abspath(path)))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, base_dir: str | os.PathLike | None = None) -> JobSpec:
        """Build and validate a spec from nested dicts (missing keys take their defaults).

        ``model`` may also be a live ``torch.nn.Module`` or callable (``{"model": net,
        ...}``, the same as ``{"model": {"module": net}}``); see :class:`ModelSpec`.
        ``base_dir``: the folder that relative factory files (and modules beside the
        config) are found in; None: the working directory.
        """
        if not isinstance(raw, Mapping):
            raise ConfigError(f"a job spec must be a mapping of sections, got {type(raw).__name__}.")
        _reject_unknown(raw, list(_SECTIONS), "")
        sections = {}
        for name, section_cls in _SECTIONS.items():
            values = raw.get(name)
            if values is None:
                values = {}
            if name == "model" and not isinstance(values, Mapping) and callable(values):
                values = {"module": values}
            if not isinstance(values, Mapping):
                raise ConfigError(
                    f"config: section {name!r} must be a mapping of keys, got {type(values).__name__} "
                    f"{values!r}."
                )
            if name == "engine":
                values = _engine_aliases(values)
            valid = [f.name for f in dataclasses.fields(section_cls) if (name, f.name) not in _NOT_KEYS]
            _reject_unknown(values, valid, name + ".")
            kwargs = {k: _normalize(name, k, v) for k, v in values.items()}
            if name == "model":
                kwargs["base_dir"] = None if base_dir is None else os.path.abspath(os.fspath(base_dir))
            sections[name] = section_cls(**kwargs)
        spec = cls(**sections)
        spec.validate()
        return spec

    @property
    def base_dir(self) -> str | None:
        """The config's folder (``JobSpec.from_yaml``), or None; see :class:`ModelSpec`."""
        return self.model.base_dir

    def with_overrides(self, items: Iterable[str]) -> JobSpec:
        """A copy with ``key.path=value`` overrides applied (values parsed as YAML scalars).

        ``model.kwargs.NAME=value`` sets a factory argument; everything else must name an
        existing key.
        """
        raw = self.to_dict()
        for item in items:
            _apply_override(raw, item)
        return JobSpec.from_dict(raw, base_dir=self.base_dir)

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
                if (name, f.name) in _NOT_KEYS:
                    continue
                v = getattr(section, f.name)
                if isinstance(v, tuple):
                    v = list(v)
                elif isinstance(v, Mapping):
                    v = dict(v)
                if (name, f.name) in (("data", "tensor"), ("data", "dataset"), ("model", "module")) and v is None:
                    continue  # not a YAML key (tensor, module: only from Python), or not set
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
            "path": _abspath_or_uri(self.data.path),
            "column": self.data.column,
        }
        if self.data.kind == "synthetic":
            data.update(shape=list(self.data.shape or ()), seed=self.data.seed, dtype=self.data.dtype or "float32")
        if self.data.kind == "tensor":
            data["tensor"] = _tensor_digest(self.data.tensor)
        if self.data.kind == "ray_dataset":  # the rows' values, in order: NOTE [a Dataset as a source]
            from .ray_data import DatasetSource

            data["dataset"] = DatasetSource.open(self.data.dataset, self.data.column, self.data.rows,
                                                 self.data.shape).digest
        if self.data.kind in ("parquet", "arrow", "ray_dataset") and self.data.shape is not None:
            data["shape"] = list(self.data.shape)
        model = {
            "factory": _normalized_factory(self.model.factory, self.model.base_dir),
            "kwargs": json.loads(json.dumps(dict(self.model.kwargs), sort_keys=True, default=repr)),
            "weights": _abspath(self.model.weights),
        }
        # Each only when set: outputs written before the key existed keep their hash.
        if self.model.weights_key is not None:
            model["weights_key"] = self.model.weights_key
        if self.model.output is not None:
            model["output"] = self.model.output
        if self.model.module is not None:
            model["module"] = live_model_digest(self.model.module)
        return {
            "version": SPEC_VERSION,
            "model": model,
            "data": data,
            "jacobian": {
                "mode": self.jacobian.mode,
                "reduce": list(self.jacobian.reduce) if self.jacobian.reduce else None,
                "dtype": self.jacobian.dtype,
                "compute_dtype": self.jacobian.compute_dtype,
                # only when set: outputs written before the key existed keep their hash
                **({"estimate": self.estimates} if self.jacobian.estimate is not None else {}),
                **({"structure": self.jacobian.structure} if self.jacobian.structure is not None else {}),
            },
            "output": {"format": self.output.format,
                       **({"keep_columns": list(self.output.keep_columns)} if self.output.keep_columns else {})},
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

    @property
    def estimates(self) -> dict[str, dict[str, Any]]:
        """The estimates asked for, every option filled in (empty when none)."""
        if self.jacobian.estimate is None:
            return {}
        from .estimates import check_estimates

        return check_estimates(self.jacobian.estimate, call="config: jacobian.estimate")


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
    if section == "output" and key == "keep_columns":
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list):
            return tuple(value)
    return value


# engine.parallel_iterations (deprecated) -> engine.max_in_flight (NOTE in EngineSpec).
_ENGINE_ALIASES = {"parallel_iterations": "max_in_flight"}


def _engine_aliases(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """Map deprecated engine keys to their names, with a FutureWarning; both: ConfigError."""
    if not any(k in values for k in _ENGINE_ALIASES):
        return values
    import warnings

    out = dict(values)
    for old, new in _ENGINE_ALIASES.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(
                f"config: engine.{old} and engine.{new} are both set; engine.{old} is the deprecated name of "
                f"engine.{new} (shards in flight). Keep engine.{new} only."
            )
        warnings.warn(
            f"config: engine.{old} is deprecated: it is the number of shards in flight, not TF's "
            f"parallel_iterations (which is jacobian.chunk_size here); rename it to engine.{new}.",
            FutureWarning, stacklevel=4,
        )
        out[new] = out.pop(old)
    return out


def _apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in nested dicts; the value is parsed as a YAML scalar.

    A value that starts like a YAML list, mapping or quoted string (``[``, ``{``, ``"``,
    ``'``) must parse as one (``--set 'model.kwargs.sizes=[64, 256'`` is a ConfigError, not
    the string); other values that are not valid YAML are kept as strings. An override of
    ``engine.max_in_flight`` or its deprecated name replaces either in the config.
    """
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
    except yaml.YAMLError as e:
        if text.strip()[:1] in ("[", "{", '"', "'"):
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(
                f"--set {item!r}: the value {text.strip()!r} is not valid YAML ({problem}); close its "
                f"brackets or quotes, e.g. --set 'model.kwargs.sizes=[64, 256]'."
            ) from None
        value = text
    if len(parts) == 2 and parts[0] == "engine" and isinstance(raw.get("engine"), dict):
        names = {parts[1], _ENGINE_ALIASES.get(parts[1], parts[1])}
        names |= {old for old, new in _ENGINE_ALIASES.items() if new in names}
        if len(names) > 1:
            for name in names:
                raw["engine"].pop(name, None)
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


def _abspath_or_uri(path: str | None) -> str | None:
    """A local path made absolute; a URI (``s3://...``) as it is (``file://`` made local)."""
    if path is None:
        return None
    from .io.fs import normalize

    return normalize(path)


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
    if m.module is not None:
        if isinstance(m.module, (str, bytes)) or not callable(m.module):
            raise _bad("model.module", m.module, "give a live torch.nn.Module or callable (from Python), or use "
                       "model.factory")
        if m.factory is not None:
            raise ConfigError("config: model.module and model.factory are both set; give one: the live model, "
                              "or the factory that builds it.")
        if m.weights is not None or m.kwargs:
            raise ConfigError("config: model.weights and model.kwargs are for model.factory; a live model "
                              "(model.module) is used as it is: load its weights before passing it.")
    elif m.factory is None:
        raise ConfigError(
            f"config: model.factory is required: {_FACTORY_HINT.removeprefix('give ')}."
        )
    else:
        _check_factory_syntax(m.factory)
    out = m.output
    if out is not None and (isinstance(out, bool) or not isinstance(out, (str, int)) or
                            (isinstance(out, str) and not out.strip())):
        raise _bad("model.output", out, "use null, a key or attribute name (e.g. logits), or an index (e.g. 0)")
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
        if d.shape is not None and d.kind in ("parquet", "arrow", "ray_dataset"):
            shape = d.shape
            if not isinstance(shape, (tuple, list)) or not shape or not all(is_int(s) and s >= 1 for s in shape):
                raise _bad("data.shape", list(shape) if isinstance(shape, tuple) else shape,
                           "give null or a non-empty list of integers >= 1, e.g. [3, 4] (for a column of lists)")
        for key in ("shape", "dtype"):
            if key == "shape" and d.kind in ("parquet", "arrow", "ray_dataset"):
                continue
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
    if d.kind == "ray_dataset":
        if d.dataset is None:
            raise ConfigError(
                "config: data.kind 'ray_dataset' needs data.dataset, a ray.data.Dataset given from Python "
                "(JobSpec.from_dict), e.g. {'kind': 'ray_dataset', 'dataset': ds, 'column': 'x'}."
            )
        if not (type(d.dataset).__module__.startswith("ray.data") and hasattr(d.dataset, "to_arrow_refs")):
            raise ConfigError(f"config: data.dataset must be a ray.data.Dataset, got {type(d.dataset).__name__}.")
        if d.path is not None:
            raise ConfigError("config: data.path conflicts with data.kind 'ray_dataset' (the dataset is the data).")
    elif d.dataset is not None:
        raise ConfigError(f"config: data.dataset is only for data.kind 'ray_dataset', not {d.kind!r}.")


def _validate_jacobian(j: JacobianSpec) -> None:
    _check_choice("jacobian.mode", j.mode, MODES)
    _check_int("jacobian.chunk_size", j.chunk_size, minimum=1, allow_none=True)
    _check_choice("jacobian.dtype", j.dtype, STORAGE_DTYPES)
    _check_choice("jacobian.compute_dtype", j.compute_dtype, COMPUTE_DTYPES, allow_none=True)
    _check_choice("jacobian.structure", j.structure, ("diagonal",), allow_none=True)
    if j.structure is not None and (j.reduce is not None or j.estimate is not None):
        raise ConfigError(
            "config: jacobian.structure: diagonal keeps the Jacobian's diagonal itself; it cannot be combined "
            "with jacobian.reduce or jacobian.estimate. Keep one of them."
        )
    if j.estimate is not None:
        from .estimates import check_estimates

        check_estimates(j.estimate, call="config: jacobian.estimate")
        if j.reduce is not None:
            raise ConfigError(
                "config: jacobian.reduce and jacobian.estimate are both set; a job keeps either exact "
                "reductions (computed from the whole Jacobian) or matrix-free estimates (which never build "
                "it). Keep one of them (for large Jacobians, estimate)."
            )
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
    _check_int("engine.max_in_flight", e.max_in_flight, minimum=1, allow_none=False)
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
    if o.path is not None and isinstance(o.path, str):
        from .io.fs import normalize

        normalize(o.path)  # refuses "s3:/bucket" (a URI that lost a slash)
    k = o.keep_columns
    if k is not None:
        if not isinstance(k, tuple) or not k or not all(isinstance(c, str) and c for c in k):
            raise _bad("output.keep_columns", list(k) if isinstance(k, tuple) else k,
                       "give null or a list of input column names, e.g. [id, label]")
        taken = sorted({c for c in k if c in ("row", "jacobian", *REDUCTIONS) or c.endswith("_stderr")})
        if taken:
            raise ConfigError(f"config: output.keep_columns: {', '.join(map(repr, taken))} would collide with an "
                              f"output column (row, jacobian, reductions); rename it in the data.")
        dup = sorted({c for c in k if k.count(c) > 1})
        if dup:
            raise ConfigError(f"config: output.keep_columns lists {', '.join(dup)} more than once.")


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


def find_factory_module(factory: str | ModelSpec | None, base_dir: str | None = None) -> None:
    """Check that the factory's module (or file) can be imported, without importing it
    (no module code runs: its spec is looked up along sys.path, and the config's folder
    ``base_dir``, as ``import`` would); ConfigError if not.

    ``factory`` may be a ModelSpec (its factory and base_dir; a live model passes). A
    package that is not imported yet is not imported either: its submodules are looked
    up in the package's folders.
    """
    if isinstance(factory, ModelSpec):
        if factory.module is not None:
            return
        factory, base_dir = factory.factory, factory.base_dir
    _check_factory_syntax(factory)
    if _FILE_FACTORY_RE.match(factory):
        _factory_file(factory, base_dir)
        return
    module_name = factory.partition(":")[0]
    if base_dir is not None and _beside_config(module_name, base_dir):
        return
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


def _check_factory_syntax(factory: Any) -> None:
    if not isinstance(factory, str) or not (_FACTORY_RE.match(factory) or _FILE_FACTORY_RE.match(factory)):
        raise _bad("model.factory", factory, _FACTORY_HINT)
    if not _FILE_FACTORY_RE.match(factory):
        _refuse_stdlib(factory, factory.partition(":")[0])


def _factory_file(factory: str, base_dir: str | None) -> str:
    """The absolute path of a ``file.py:callable`` factory's file; ConfigError if absent."""
    m = _FILE_FACTORY_RE.match(factory)
    assert m is not None
    path = os.path.expanduser(m.group("file"))
    if not os.path.isabs(path):
        path = os.path.join(base_dir or os.getcwd(), path)
    path = os.path.normpath(os.path.abspath(path))
    if not os.path.isfile(path):
        where = f"the config's folder {base_dir}" if base_dir else "the working directory"
        raise ConfigError(
            f"config: model.factory={factory!r}: the file {path} does not exist (a relative path is relative "
            f"to {where}). Check the path."
        )
    return path


def _beside_config(module_name: str, base_dir: str) -> bool:
    """Whether ``module_name``'s top level is a module or package in ``base_dir``."""
    top = module_name.split(".")[0]
    return os.path.isfile(os.path.join(base_dir, top + ".py")) or \
        os.path.isfile(os.path.join(base_dir, top, "__init__.py"))


def _normalized_factory(factory: str | None, base_dir: str | None) -> str | None:
    """The factory as the spec hash sees it: a file's path made absolute."""
    if factory is None or not isinstance(factory, str) or not _FILE_FACTORY_RE.match(factory):
        return factory
    m = _FILE_FACTORY_RE.match(factory)
    path = os.path.expanduser(m.group("file"))
    if not os.path.isabs(path):
        path = os.path.join(base_dir or os.getcwd(), path)
    return f"{os.path.normpath(os.path.abspath(path))}:{m.group('attr')}"


def load_model_file(path: str) -> Any:
    """Load a Python file as a module under a stable unique name (NOTE [model files]).

    The module is registered in ``sys.modules`` as ``distjac_user_<stem>_<hash>``; a
    second call for the same file returns the module already loaded.
    """
    path = os.path.normpath(os.path.abspath(path))
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0]) or "model"
    name = f"distjac_user_{stem}_{hashlib.sha256(path.encode()).hexdigest()[:10]}"
    mod = sys.modules.get(name)
    if mod is not None and getattr(mod, "__file__", None) == path:
        return mod
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def resolve_factory(factory: str, base_dir: str | None = None) -> Any:
    """The callable named by ``"module:attr.path"`` or ``"path/to/file.py:attr.path"``,
    checked to be a model builder (NOTE [model files]).

    The module or file is imported (which runs its code); nothing is called. A file
    path is relative to ``base_dir`` (the config's folder; None: the working directory);
    a module is looked up in ``base_dir`` first, which is put at the front of
    ``sys.path``. See NOTE [a config is code] for what is refused.

    Raises:
        ConfigError: the module or file cannot be imported, has no such attribute, or the
            object is not a Python function, method, partial or torch.nn.Module class, or
            comes from the Python standard library.
    """
    _check_factory_syntax(factory)
    file_match = _FILE_FACTORY_RE.match(factory)
    if file_match:
        path = _factory_file(factory, base_dir)
        module_name, attr_path = path, file_match.group("attr")
        try:
            obj: Any = load_model_file(path)
        except Exception as e:
            raise ConfigError(
                f"config: model.factory={factory!r}: importing {path} failed ({type(e).__name__}: {e})."
            ) from e
    else:
        module_name, _, attr_path = factory.partition(":")
        if base_dir is not None and _beside_config(module_name, base_dir):
            base = os.path.abspath(base_dir)
            if base not in sys.path:
                sys.path.insert(0, base)
                importlib.invalidate_caches()
        try:
            obj = importlib.import_module(module_name)
        except ImportError as e:
            beside = f"; a module beside the config ({base_dir}) is found too" if base_dir else ""
            raise ConfigError(
                f"config: model.factory={factory!r}: cannot import module {module_name!r} "
                f"({type(e).__name__}: {e}). Check the name, or install the package that defines it{beside}; "
                f"a file works too: model.factory: path/to/file.py:callable."
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


def live_model_digest(model: Any) -> str:
    """What the spec hash records of a live model (NOTE [model files]): a torch.nn.Module's
    class and its state_dict's names, dtypes, shapes and bytes; a function's qualified
    name and code (source if available, else bytecode and constants); another callable's
    class and, if it is picklable, its pickle."""
    import torch

    h = hashlib.sha256()
    target = model
    while isinstance(target, functools.partial):
        h.update(repr((target.args, sorted(target.keywords.items()))).encode())
        target = target.func
    if isinstance(target, torch.nn.Module):
        cls = type(target)
        h.update(f"module:{cls.__module__}.{cls.__qualname__}".encode())
        for name, t in target.state_dict().items():
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        return h.hexdigest()[:16]
    func = target.__func__ if inspect.ismethod(target) else target
    code = getattr(func, "__code__", None)
    if code is not None:
        h.update(f"function:{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', '')}".encode())
        try:
            h.update(inspect.getsource(func).encode())
        except (OSError, TypeError):
            h.update(code.co_code)
            h.update(repr(code.co_consts).encode())
        return h.hexdigest()[:16]
    h.update(f"callable:{type(target).__module__}.{type(target).__qualname__}".encode())
    try:
        import cloudpickle

        h.update(cloudpickle.dumps(target))
    except Exception:
        h.update(repr(target).encode())
    return h.hexdigest()[:16]


def model_cache_key(spec: ModelSpec) -> tuple:
    """A key naming the model ``build_model(spec)`` builds: for a per-process cache of
    built models (two specs with equal keys build equal models)."""
    return (
        _normalized_factory(spec.factory, spec.base_dir),
        json.dumps(dict(spec.kwargs), sort_keys=True, default=repr),
        spec.weights, spec.weights_key, spec.output,
        live_model_digest(spec.module) if spec.module is not None else None,
    )


def _output_keys(y: Any) -> list[str]:
    if isinstance(y, Mapping):
        return [repr(k) for k in y.keys()]
    if isinstance(y, (tuple, list)):
        return [f"{i} ({type(v).__name__})" for i, v in enumerate(y)]
    names = [n for n, v in vars(y).items() if not n.startswith("_")] if hasattr(y, "__dict__") else []
    return [repr(n) for n in names]


def select_output(y: Any, key: str | int, where: str = "model.output") -> Any:
    """The tensor ``key`` picks from a model's output: a dict key, an attribute (a Hugging
    Face-style output object), or an index (of a tuple, list, or a dict's values in order);
    ConfigError listing what the output holds when there is no such tensor."""
    import torch

    what = type(y).__name__
    if isinstance(key, str):
        if isinstance(y, Mapping) and key in y:
            out = y[key]
        elif not isinstance(y, (Mapping, tuple, list, torch.Tensor)) and hasattr(y, key):
            out = getattr(y, key)
        else:
            keys = _output_keys(y) if not isinstance(y, torch.Tensor) else []
            held = f"it holds {', '.join(keys)}" if keys else "it has no keys or attributes to pick from"
            raise ConfigError(f"config: {where}={key!r}: the model returns a {what} without {key!r}; {held}. "
                              f"Set {where} to one of those (an index for a tuple), or null for one tensor.")
    else:
        if isinstance(y, Mapping):
            values = list(y.values())
        elif isinstance(y, (tuple, list)):
            values = list(y)
        else:
            raise ConfigError(f"config: {where}={key!r}: an index picks from a tuple, list or dict, but the "
                              f"model returns a {what}; set {where} to null, or to a key or attribute name.")
        if not -len(values) <= key < len(values):
            raise ConfigError(f"config: {where}={key!r}: the model returns a {what} of {len(values)} values "
                              f"({', '.join(_output_keys(y))}); use an index in [0, {len(values)}).")
        out = values[key]
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"config: {where}={key!r} picks a {type(out).__name__} from the model's {what}, not a "
                          f"tensor; pick the tensor to differentiate.")
    return out


def _select_output_class() -> type:
    """``SelectOutput``, a torch.nn.Module defined on first use (this module imports torch
    lazily) and found as ``distjac.config.SelectOutput`` by pickle (see ``__getattr__``)."""
    cls = globals().get("SelectOutput")
    if cls is not None:
        return cls
    import torch

    class SelectOutput(torch.nn.Module):
        """Returns the tensor ``output`` (``model.output``) picks from the wrapped model's
        output; parameters, ``.to`` and ``eval`` reach the wrapped model."""

        def __init__(self, inner, output):
            super().__init__()
            if isinstance(inner, torch.nn.Module):
                self.inner = inner
            else:
                self.fn = inner
            self.output = output

        def forward(self, x):
            fn = self.inner if "inner" in self._modules else self.fn
            return select_output(fn(x), self.output)

    SelectOutput.__module__ = __name__
    SelectOutput.__qualname__ = "SelectOutput"
    globals()["SelectOutput"] = SelectOutput
    return SelectOutput


def __getattr__(name: str) -> Any:
    if name == "SelectOutput":
        return _select_output_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_model(spec: ModelSpec, *, factory: Any = None, device: Any = None, dtype: Any = None):
    """Call the factory with its kwargs, load the weights, move to ``device`` / ``dtype``.

    ``factory`` is the spec's factory already resolved (:func:`resolve_factory`; the
    engine resolves it on the driver and ships it to the workers); None resolves it here.

    The model is put in eval mode and its parameters stop requiring gradients (only the
    Jacobian with respect to the inputs is computed). A live model (``spec.module``) is
    used instead of a factory: a torch.nn.Module is copied first (the caller's keeps its
    mode, device and gradients). With ``spec.output`` set the result is a module that
    returns the one tensor it picks (:func:`select_output`).

    Args:
        spec: the model section.
        factory: the factory already resolved (:func:`resolve_factory`), e.g. shipped to
            a worker by value; None resolves ``spec.factory``.
        device, dtype: where and in what dtype the model runs (None: as built).

    Raises:
        ConfigError: the factory cannot be imported, is not a model builder (NOTE [a
            config is code]), fails with these kwargs or returns something that is not a
            model; or the weights cannot be read or do not fit the model.
        SourceNotFoundError: the weights file does not exist.
    """
    import copy

    import torch

    if spec.module is not None:
        model = spec.module
        if isinstance(model, torch.nn.Module):
            model = copy.deepcopy(model)
    else:
        if factory is None:
            factory = resolve_factory(spec.factory, spec.base_dir)
        call = f"config: model.factory={spec.factory!r} called with model.kwargs {dict(spec.kwargs)!r}"
        try:
            model = factory(**dict(spec.kwargs))
        except TypeError as e:
            raise ConfigError(f"config: model.factory={spec.factory!r} rejected model.kwargs: {e}") from e
        except ValueError as e:
            raise ConfigError(f"config: model.factory={spec.factory!r} failed: {e}") from e
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise ConfigError(f"{call} raised {type(e).__name__}: {first}. Fix the factory or its kwargs.") from e
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
    if spec.output is not None:
        model = _select_output_class()(model, spec.output)
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


# -------------------------------------------------------------------------------------
# the environment a job needs (checked before Ray starts; not by validate())
# -------------------------------------------------------------------------------------


def check_address(address: str | None, *, where: str = "config: engine.address",
                  error: type[Exception] = ConfigError) -> None:
    """``error`` (a ConfigError: exit status 2) when ``address`` is a ``ray://`` address and
    Ray Client's dependencies (``pip install 'distjac[cluster]'``, which installs
    ``ray[client]``) are missing; nothing is imported but module specs. ``where`` names
    the setting in the message (the Engine passes its own call and OptionError).

    ``RAY_ADDRESS=ray://...`` with ``address: auto`` is checked the same way.
    """
    target = address
    if address == "auto":
        target = os.environ.get("RAY_ADDRESS", "")
    if not isinstance(target, str) or not target.startswith("ray://"):
        return
    missing = [m for m in ("grpc", "ray.util.client") if _spec_missing(m)]
    if missing:
        raise error(
            f"{where}={address!r} connects through Ray Client, which needs ray[client] "
            f"({', '.join(missing)} cannot be imported here); install it with pip install 'distjac[cluster]' "
            f"(or 'ray[client]'), or use an address of the form host:port on a cluster node."
        )


def _spec_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True
