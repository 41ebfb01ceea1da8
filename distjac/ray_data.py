"""distjac inside a Ray Data pipeline: a callable class for ``Dataset.map_batches``.

    import ray, distjac.ray_data
    ds = ray.data.read_parquet("images/")                       # a column "x" of tensors
    out = ds.map_batches(distjac.ray_data.Jacobians, fn_constructor_args=(model, "x"),
                         concurrency=2, batch_format="numpy")   # + column "jacobian"
    out.write_parquet("jacobians/")

Ray Data runs an actor pool (``concurrency`` actors; ``num_gpus=1`` gives each a GPU),
builds one :class:`Jacobians` per actor (the model is moved to the actor's device once)
and calls it on each batch. The batch's other columns are kept. Pass options as
``fn_constructor_kwargs``: ``reduce=["frobenius"]`` replaces the ``jacobian`` column by one
column per reduction; ``estimate={"frobenius": {"probes": 8}}`` by the matrix-free
estimates (columns ``frobenius``, ``frobenius_stderr``; docs/estimates.md), which never
build the Jacobian.

When to use this instead of a distjac job: docs/estimates.md ("Ray Data or a distjac job").
Only this module, engine.py and worker.py import Ray, lazily; this one only to learn the
GPUs Ray assigned to the actor.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .errors import OptionError, ShapeError, SourceError
from .estimates import check_estimates, estimate_block, estimate_columns
from .io.sources import Source
from .kernels import batch_jacobian
from .options import check_positive_int, is_device, parse_mode
from .reduce import check_reductions, reduce_block

__all__ = ["DatasetSource", "Jacobians", "stack_column"]

_CALL = "distjac.ray_data.Jacobians"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64}


def stack_column(values: Any, column: str = "x") -> np.ndarray:
    """A batch's tensor column as one array (n, *shape): an ndarray as it is, or a numpy
    object array of per-row arrays or lists (what Parquet list columns become) stacked."""
    if not isinstance(values, np.ndarray):
        values = values.to_numpy() if hasattr(values, "to_numpy") else np.asarray(values)
    if values.dtype != object:
        return values
    if len(values) == 0:
        raise ShapeError(f"{_CALL}: column {column!r} is an empty object column; its row shape is unknown.")
    rows = []
    for i, v in enumerate(values):
        if v is None:
            raise ShapeError(f"{_CALL}: row {i} of the batch's column {column!r} is null; every row needs a tensor "
                             f"(filter the nulls out before map_batches).")
        if not isinstance(v, np.ndarray):
            try:
                v = np.asarray(v)
            except ValueError as err:  # ragged nested lists
                raise ShapeError(f"{_CALL}: row {i} of column {column!r} is not a rectangular tensor "
                                 f"({err}).") from None
        rows.append(stack_column(v, column) if v.dtype == object and v.ndim > 0 else v)
    shapes = {r.shape for r in rows}
    if len(shapes) != 1:
        raise ShapeError(f"{_CALL}: the rows of column {column!r} have different shapes "
                         f"{sorted(shapes)[:4]}; every example must have the same shape.")
    return np.stack(rows)


def _ray_gpu_ids() -> list:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return []
    if not ray.is_initialized():
        return []
    try:
        return list(ray.get_gpu_ids())
    except Exception:  # outside a worker or task
        return []


class Jacobians:
    """A ``Dataset.map_batches`` transform: per-example Jacobians (or their reductions or
    matrix-free estimates) of ``fn_or_model`` on the batch's tensor column ``column``.

    Args:
        fn_or_model: an ``nn.Module`` or a function mapping (B, *in) to (B, *out), row i
            depending only on row i (as for :func:`distjac.batch_jacobian`).
        column: the batch's column of input tensors: (n, *in) arrays, or a column of
            per-row arrays or (nested) lists, stacked.
        mode, parallel_iterations: as :func:`distjac.batch_jacobian` (exact Jacobians).
        reduce: None, or reductions of :mod:`distjac.reduce` (frobenius, spectral, trace,
            logabsdet): one column each instead of the Jacobian.
        estimate: None, or a mapping as a job's ``jacobian.estimate`` (e.g.
            ``{"frobenius": {"probes": 8}}``): columns ``name`` and ``name_stderr`` each,
            J never built.
        row_column: a column of global row ids that seeds the estimates' probes (so a
            row's estimate does not depend on the batch it lands in); None: the row's
            position in its batch (the same bits only for the same batching).
        output_column: the Jacobian's column (default "jacobian").
        shape: the per-example input shape when the column holds flat rows (e.g.
            (3, 224, 224) for rows of 150,528 values).
        device: "auto" (the GPU Ray Data assigned this actor via ``num_gpus``, else CPU),
            "cpu", "cuda" or "cuda:N".
        dtype: "float32", "float64", ... the model and inputs are cast to; None: the
            model's parameter dtype (or the column's if floating, else float32).
        keep_input: False drops ``column`` from the output batch.

    Returns (from ``__call__``): the batch, as a dict of numpy arrays (or a pandas
    DataFrame for ``batch_format="pandas"``), with the new columns appended.
    """

    def __init__(self, fn_or_model: Callable, column: str, *, mode: str = "auto", reduce: Sequence[str] | None = None,
                 estimate: Mapping[str, Any] | None = None, row_column: str | None = None,
                 output_column: str = "jacobian", shape: Sequence[int] | None = None, device: str = "auto",
                 dtype: str | None = None, parallel_iterations: int | None = None, keep_input: bool = True):
        if not callable(fn_or_model):
            raise TypeError(f"{_CALL}: fn_or_model must be an nn.Module or a function, got "
                            f"{type(fn_or_model).__name__}.")
        if not isinstance(column, str) or not column:
            raise OptionError(f"{_CALL}: column={column!r}: give the name of the batch's tensor column, e.g. 'x'.")
        self.mode = parse_mode(mode, _CALL)
        check_positive_int(parallel_iterations, "parallel_iterations", _CALL)
        if reduce is not None and estimate is not None:
            raise OptionError(f"{_CALL}: give reduce= (from the exact Jacobian) or estimate= (matrix-free), not "
                              f"both: their columns would have the same names.")
        if isinstance(reduce, str):
            reduce = [reduce]
        self.reduce = tuple(reduce) if reduce is not None else None
        if self.reduce is not None and not self.reduce:
            raise OptionError(f"{_CALL}: reduce=[] names no reduction; use None for the whole Jacobian.")
        self.estimate = check_estimates(estimate, call=f"{_CALL}(estimate=...)") if estimate is not None else None
        if device != "auto" and not is_device(device):
            raise OptionError(f"{_CALL}: device={device!r} is not valid; use 'auto', 'cpu', 'cuda' or 'cuda:N'.")
        if dtype is not None and dtype not in _DTYPES:
            raise OptionError(f"{_CALL}: dtype={dtype!r} is not valid; use None or one of {', '.join(_DTYPES)}.")
        self.column, self.row_column, self.output_column = column, row_column, output_column
        self.shape = tuple(int(s) for s in shape) if shape is not None else None
        self.parallel_iterations, self.keep_input = parallel_iterations, bool(keep_input)
        if device == "auto":
            device = "cuda" if (_ray_gpu_ids() and torch.cuda.is_available()) else "cpu"
        self.device = torch.device(device)
        params = [p for p in fn_or_model.parameters()] if isinstance(fn_or_model, torch.nn.Module) else []
        floating = [p.dtype for p in params if p.is_floating_point()]
        self.dtype = _DTYPES[dtype] if dtype is not None else (floating[0] if floating else None)
        if isinstance(fn_or_model, torch.nn.Module):
            moves = any(t.device != self.device or (self.dtype and t.is_floating_point() and t.dtype != self.dtype)
                        for t in [*params, *fn_or_model.buffers()])
            if moves:  # Module.to works in place: never change the caller's model (in-process use)
                fn_or_model = copy.deepcopy(fn_or_model)
                fn_or_model.to(device=self.device, dtype=self.dtype) if self.dtype else fn_or_model.to(self.device)
        self.fn = fn_or_model

    # ----------------------------------------------------------------------------------

    def _inputs(self, values: Any) -> torch.Tensor:
        arr = stack_column(values, self.column)
        if arr.dtype.kind not in "fiub":
            raise ShapeError(f"{_CALL}: column {self.column!r} holds {arr.dtype} values, not numbers.")
        if self.shape is not None:
            if math.prod(arr.shape[1:]) != math.prod(self.shape):
                raise ShapeError(f"{_CALL}: rows of column {self.column!r} have shape {arr.shape[1:]}, which "
                                 f"cannot be reshaped to shape={self.shape}.")
            arr = arr.reshape(len(arr), *self.shape)
        if arr.ndim < 2:
            raise ShapeError(f"{_CALL}: column {self.column!r} holds scalars (batch shape {arr.shape}); each row "
                             f"must be a tensor. Pass shape=(1,) to treat each value as a vector of one.")
        dtype = self.dtype or (torch.from_numpy(np.empty(0, arr.dtype)).dtype if arr.dtype.kind == "f"
                               else torch.float32)
        # A batch's arrays may be read-only views of the object store, and fn may write
        # into its input: such a batch is copied once (as a shard's rows are).
        arr = np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy(order="C")
        return torch.from_numpy(arr).to(device=self.device, dtype=dtype)

    def _rows(self, batch: Any, n: int):
        if self.row_column is None:
            return None
        if self.row_column not in batch:
            raise ShapeError(f"{_CALL}: row_column={self.row_column!r} is not a column of the batch; it has "
                             f"{', '.join(map(repr, list(batch.keys())))}.")
        return torch.as_tensor(np.asarray(batch[self.row_column]).astype(np.int64))

    def compute(self, x: torch.Tensor, rows=None) -> dict[str, np.ndarray]:
        """The new columns for one batch of inputs (n, *in), as numpy arrays."""
        if self.estimate is not None:
            got = estimate_block(self.fn, x, self.estimate, rows=rows)
            cols = estimate_columns(self.estimate)
            flat = [t for name in self.estimate for t in got[name]]
            return {c: t.detach().cpu().numpy() for c, t in zip(cols, flat)}
        jac = batch_jacobian(self.fn, x, mode=self.mode, parallel_iterations=self.parallel_iterations,
                             unconnected_gradients="zero")
        if self.reduce is None:
            return {self.output_column: jac.detach().cpu().numpy()}
        check_reductions(self.reduce, jac.shape[1:jac.dim() - (x.dim() - 1)], x.shape[1:], call=f"{_CALL}(reduce=...)")
        return {k: v.detach().cpu().numpy() for k, v in reduce_block(jac, self.reduce, x.dim() - 1).items()}

    def __call__(self, batch: Any) -> Any:
        pandas = type(batch).__name__ == "DataFrame"
        if self.column not in batch:
            have = list(batch.columns) if pandas else list(batch)
            raise ShapeError(f"{_CALL}: the batch has no column {self.column!r}; it has "
                             f"{', '.join(map(repr, have))}. Name the tensor column as fn_constructor_args' second "
                             f"value.")
        x = self._inputs(batch[self.column])
        new = self.compute(x, self._rows(batch, len(x)))
        have = set(batch.columns if pandas else batch)
        if clash := sorted(set(new) & have):
            raise ShapeError(f"{_CALL}: the batch already has column(s) {', '.join(map(repr, clash))}; pass "
                             f"output_column= (or rename them) so nothing is overwritten.")
        if pandas:
            out = batch.copy() if self.keep_input else batch.drop(columns=[self.column])
            for k, v in new.items():
                out[k] = list(v) if v.ndim > 1 else v
            return out
        out = {k: v for k, v in batch.items() if self.keep_input or k != self.column}
        out.update(new)
        return out


# --------------------------------------------------------------------------------------
# A Ray Data Dataset as a job's source and as Engine.batch_jacobian's input
# --------------------------------------------------------------------------------------

# NOTE [a Dataset as a source]
# ``DatasetSource.open(ds, column)`` executes the dataset once (``Dataset.to_arrow_refs``:
# its blocks stay in Ray's object store, zero-copy where they already are Arrow) and runs
# one small task per block, where the block lives, that reads the block's row count, its
# tensor column's per-row shape and dtype, refuses nulls and ragged rows, and hashes the
# column's values. The source is then a picklable list of (block reference, rows): a shard
# task carries it, and each worker fetches only the blocks its rows overlap, so the driver
# never holds the data. The row order is the order of the blocks Ray Data returns; the
# hash of the blocks' values, in that order, is the job's data identity (spec hash), so a
# job resumes on the same rows and refuses an output made from other ones
# (OutputExistsError; ``output.overwrite`` starts again). Ray Data keeps its order across
# runs only with ``DataContext.execution_options.preserve_order = True``, and the hash is
# of blocks: the same rows cut into other blocks (another read parallelism) are another
# job too. Carry an id column with ``output.keep_columns`` to join results back.
#
# Ray Data executes a dataset with tasks that each need a CPU. An Engine's workers hold
# CPUs for their lifetime, and on a cluster with no CPU left Ray Data waits forever; so
# when none is free the source refuses to start (saying how to make room) instead of
# hanging. A MaterializedDataset with Arrow blocks needs no CPU: it is read as it is.

_SOURCE = "data.dataset"
_OPENED: Any = None  # weakref.WeakKeyDictionary: Dataset -> {(column, rows, shape): DatasetSource}


def _is_dataset(obj: Any) -> bool:
    return type(obj).__module__.startswith("ray.data") and hasattr(obj, "to_arrow_refs")


def _tensor_like(typ) -> bool:
    """A column type that holds one tensor per row: arrow's fixed_shape_tensor and fixed-size
    lists, a list of numbers (what pandas writes), or Ray Data's own tensor extension types."""
    import pyarrow as pa

    from . import arrow
    from .io.sources import _is_float_list

    if arrow.tensor_info(typ) is not None or _is_float_list(typ):
        return True
    return isinstance(typ, pa.ExtensionType) and type(typ).__module__.startswith("ray.")


def _pick(schema, column: str | None, where: str) -> str:
    from .io.sources import _type_name

    listing = ", ".join(f"{f.name} ({_type_name(f.type)})" for f in schema)
    if column is None:
        tensors = [f.name for f in schema if _tensor_like(f.type)]
        if len(tensors) != 1:
            what = "no tensor column" if not tensors else f"{len(tensors)} tensor columns"
            raise ShapeError(f"{where}: the dataset has {what}; name its tensor column (column=...) among: "
                             f"{listing}.")
        return tensors[0]
    if column not in schema.names:
        raise ShapeError(f"{where}: the dataset has no column {column!r}; its columns are: {listing}.")
    if not _tensor_like(schema.field(column).type):
        raise ShapeError(f"{where}: column {column!r} has type {_type_name(schema.field(column).type)}, not a "
                         f"tensor; distjac reads tensor columns (numpy arrays in Ray Data, fixed_shape_tensor, "
                         f"lists of numbers).")
    return column


def _block_values(table, column: str, shape: tuple[int, ...] | None, where: str, base: int) -> np.ndarray:
    """One block's (or slice's) tensor column as (rows, *shape), every row checked."""
    from . import arrow
    from .io.sources import _first_null, _is_float_list, _list_dtype, _list_values

    col = table.column(column)
    typ = col.type
    offset = 0
    for chunk in col.chunks:
        found = _first_null(chunk) if arrow.tensor_info(typ) is not None else None
        if chunk.null_count:
            found = ("a null row", int(np.flatnonzero(chunk.is_null().to_numpy(zero_copy_only=False))[0]))
        if found is not None:
            raise ShapeError(f"{where}: column {column!r} has {found[0]} at row {base + offset + found[1]}; a tensor "
                             f"cannot hold nulls. Filter those rows out (ds.filter(...)) first.")
        offset += len(chunk)
    if arrow.tensor_info(typ) is not None:
        values = arrow.column_values(col)
    elif _is_float_list(typ):
        if shape is None:
            first = col.chunk(0)[0].as_py() if len(col) else None
            shape = []
            while isinstance(first, list):
                shape.append(len(first))
                first = first[0] if first else None
            shape = tuple(shape)
        values = _list_values(col, tuple(shape), np.dtype(_list_dtype(typ)).name, where, column, base)
    else:  # Ray Data's tensor extension: its own to_numpy
        parts = [c.to_numpy(zero_copy_only=False) for c in col.chunks]
        parts = [stack_column(p, column) if p.dtype == object else p for p in parts if len(p)]
        if len({p.shape[1:] for p in parts}) > 1:
            raise ShapeError(f"{where}: the rows of column {column!r} have different shapes "
                             f"{sorted({p.shape[1:] for p in parts})[:4]}; every example must have the same shape.")
        values = np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else np.empty((0,)))
    if shape is not None and values.ndim >= 1 and len(values):
        if math.prod(values.shape[1:]) != math.prod(shape):
            raise ShapeError(f"{where}: rows of column {column!r} have shape {values.shape[1:]}, which cannot be "
                             f"reshaped to shape={tuple(shape)}.")
        values = values.reshape(len(values), *shape)
    return values


def _block_info(table, column: str | None, shape: tuple[int, ...] | None, where: str = "data.dataset") -> dict:
    """A block's row count, column names, tensor column, per-row shape, dtype and content
    hash: run where the block lives (NOTE [a Dataset as a source])."""
    import hashlib

    rows = table.num_rows
    info = {"rows": rows, "columns": tuple(table.schema.names)}
    if rows == 0:
        return info
    name = _pick(table.schema, column, where)
    values = _block_values(table, name, shape, where, 0)
    h = hashlib.sha256(f"{values.dtype}{values.shape}".encode())
    h.update(memoryview(np.ascontiguousarray(values).reshape(-1).view(np.uint8)))
    return {**info, "column": name, "shape": tuple(int(s) for s in values.shape[1:]), "dtype": values.dtype.name,
            "digest": h.hexdigest()}


def _check_with_tasks(refs: list, column: str | None, shape: tuple[int, ...] | None, where: str) -> list[dict]:
    """:func:`_block_info` of each block, one task each, where the block lives."""
    import ray

    # No CPU asked: it runs beside workers that hold every CPU.
    task = ray.remote(num_cpus=0, max_retries=3)(_block_info)
    return ray.get([task.remote(ref, column, shape, where) for ref in refs])


@dataclass(frozen=True, eq=False)
class DatasetSource(Source):
    """A Ray Data ``Dataset``'s rows as a distjac source (NOTE [a Dataset as a source]):
    ``blocks`` are (object reference of an Arrow table, its rows), in the dataset's order."""

    blocks: tuple
    column: str
    rows: int
    shape: tuple[int, ...]
    dtype: str
    digest: str
    columns: tuple[str, ...] = ()
    list_shape: tuple[int, ...] | None = None  # data.shape, given for a column of flat rows
    first_row: int = 0  # the global row of blocks[0] (a task's source holds only its blocks)
    kind = "ray_dataset"

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        return self.rows

    @classmethod
    def open(cls, ds: Any, column: str | None = None, rows: int | None = None,
             shape: Sequence[int] | None = None, *, where: str = _SOURCE,
             check: Callable | None = None) -> DatasetSource:
        """Execute ``ds`` and check its blocks (NOTE [a Dataset as a source]), once per
        dataset object, column and shape in this Ray session, so that a job's checks,
        hash and run (and a later ``rows=``) execute and check it once. ``where`` names
        the dataset in messages. ``check(refs, column, shape, where)`` returns the
        blocks' infos (:func:`_block_info` of each); the default runs one task per
        block, and an Engine passes its workers, whose processes have torch loaded
        already (a fresh task process spends seconds importing it)."""
        import weakref

        import ray

        global _OPENED
        if not _is_dataset(ds):
            raise SourceError(f"{where} must be a ray.data.Dataset, got {type(ds).__name__}.")
        shape = tuple(int(s) for s in shape) if shape is not None else None
        key = (ray.get_runtime_context().get_job_id(), column, shape)  # block refs die with their session
        if _OPENED is None:
            _OPENED = weakref.WeakKeyDictionary()
        blocks = _OPENED.get(ds, {}).get(key)
        if blocks is None:
            _refuse_without_cpus(ds, where)
            refs = ds.to_arrow_refs()
            try:
                infos = (check or _check_with_tasks)(refs, column, shape, where)
            except ray.exceptions.RayTaskError as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, (ShapeError, SourceError)):  # the block's data, checked where it lives
                    raise SourceError(str(cause)) from None
                raise
            blocks = list(zip(refs, infos))
            _OPENED.setdefault(ds, {})[key] = blocks
        return cls._from_infos(blocks, rows, shape, where)

    @classmethod
    def _from_infos(cls, blocks, rows, shape, where) -> DatasetSource:
        import hashlib

        from .io.sources import _check_dtype

        full = [(r, i) for r, i in blocks if i["rows"]]
        if not full:
            raise SourceError(f"{where}: the dataset has no rows.")
        first = full[0][1]
        for _, i in full[1:]:
            if (i["column"], i["shape"], i["dtype"]) != (first["column"], first["shape"], first["dtype"]):
                raise SourceError(f"{where}: the dataset's blocks disagree: column {first['column']!r} of shape "
                                  f"{list(first['shape'])} and dtype {first['dtype']} in one, {i['column']!r} of "
                                  f"shape {list(i['shape'])} and dtype {i['dtype']} in another; every example must "
                                  f"have the same shape and dtype.")
        _check_dtype(np.dtype(first["dtype"]), where, first["column"])
        total = sum(i["rows"] for _, i in full)
        if rows is not None and rows > total:
            raise SourceError(f"data.rows={rows} but the dataset has only {total} rows; lower data.rows or remove it.")
        limit = total if rows is None else rows
        h = hashlib.sha256(f"{limit}".encode())
        kept, seen = [], 0
        for ref, i in full:
            if seen >= limit:
                break
            n = min(i["rows"], limit - seen)
            kept.append((ref, n))
            # A block cut by data.rows: its digest covers all its rows (a conservative identity).
            h.update(f"{i['digest']}:{n}".encode())
            seen += n
        return cls(blocks=tuple(kept), column=first["column"], rows=limit, shape=first["shape"], dtype=first["dtype"],
                   digest=h.hexdigest()[:16], columns=first["columns"], list_shape=shape)

    def for_rows(self, start: int, stop: int) -> DatasetSource:
        """This source with only the blocks rows [start, stop) overlap: what a shard's
        task carries (not every block's reference)."""
        keep, offset, first = [], self.first_row, None
        for ref, n in self.blocks:
            if offset < stop and offset + n > start:
                first = offset if first is None else first
                keep.append((ref, n))
            offset += n
        if first is None:
            return self
        return replace(self, blocks=tuple(keep), first_row=first)

    # -- reading (on a worker, or in process) -------------------------------------------

    def _pieces(self, start: int, stop: int):
        offset = self.first_row
        if start < offset or stop > offset + sum(n for _, n in self.blocks):
            raise IndexError(f"ray_dataset source: rows [{start}, {stop}) are not in this task's blocks.")
        for ref, n in self.blocks:
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                yield ref, lo - offset, hi - offset, lo
            offset += n
            if offset >= stop:
                break

    def _read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start..stop-1``, fetching only the blocks they overlap (zero-copy from a
        local object store)."""
        import ray

        out = np.empty((stop - start, *self.shape), dtype=self.dtype)
        pos = 0
        for ref, lo, hi, base in self._pieces(start, stop):
            table = ray.get(ref).slice(lo, hi - lo)
            values = _block_values(table, self.column, self.list_shape, _SOURCE, base)
            out[pos:pos + len(values)] = values.reshape(len(values), *self.shape)
            pos += len(values)
        return torch.from_numpy(out)

    def read_columns(self, names: Sequence[str], start: int, stop: int) -> dict:
        """Columns ``names`` of rows [start, stop) as Arrow arrays (``output.keep_columns``)."""
        import pyarrow as pa
        import ray

        self._check_range(start, stop)
        pieces: dict[str, list] = {n: [] for n in names}
        for ref, lo, hi, _ in self._pieces(start, stop):
            table = ray.get(ref).slice(lo, hi - lo)
            for n in names:
                pieces[n].extend(c for c in table.column(n).chunks if len(c))
        return {n: (pa.concat_arrays(p) if p else pa.array([])) for n, p in pieces.items()}

    def describe(self) -> str:
        return (f"ray_dataset: {self.rows} rows of shape {self.shape}, {self.dtype}, column {self.column!r}, "
                f"in {len(self.blocks)} blocks")


def _refuse_without_cpus(ds: Any, where: str) -> None:
    """SourceError when executing ``ds`` would need a CPU and no node of the cluster has a
    whole one free (NOTE [a Dataset as a source]): Ray Data would wait for one forever."""
    import pyarrow as pa
    import ray
    from ray.data.dataset import MaterializedDataset

    from ._compat import most_free_cpus_on_a_node

    if isinstance(ds, MaterializedDataset):
        schema = ds.schema()
        if isinstance(getattr(schema, "base_schema", schema), pa.Schema):
            return  # Arrow blocks already in the object store: nothing to execute or convert
    free = most_free_cpus_on_a_node()
    if free is None:  # pragma: no cover - another Ray version: the cluster's sum
        free = float(ray.available_resources().get("CPU", 0.0))
    if free >= 1.0:
        return
    total = float(ray.cluster_resources().get("CPU", 0.0))
    raise SourceError(
        f"{where}: Ray Data needs a free CPU to execute the dataset, and no node of the cluster ({total:g} CPUs) "
        f"has one free (the Engine's workers hold them). Execute it before the Engine starts "
        f"(ds = ds.materialize()), or leave CPUs to Ray Data (distjac.Engine(num_workers=...) with fewer workers)."
    )
