"""Tensors <-> Arrow record batches: the only module that knows Arrow's types.

A shard's result is one ``pyarrow.RecordBatch`` with the columns ``row`` (int64, each
example's index in the source) and either ``jacobian`` (``arrow.fixed_shape_tensor`` of
the per-example Jacobian shape) or one float column per reduction. The same record batch
is what a worker returns to the driver for an in-memory gather and what it writes into a
part file, so both paths share one representation.

NOTE [why shards carry row ids]
Shards may finish in any order, be retried, or be written by different workers. Carrying
each example's row index with its values makes every part self-describing: the gather
places rows by id, and a reader can check that a dataset covers every row exactly once.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import torch

__all__ = [
    "JACOBIAN_COLUMN",
    "ROW_COLUMN",
    "STORAGE_DTYPES",
    "arrow_dtype",
    "column_values",
    "content_sha256",
    "from_record_batch",
    "schema_metadata",
    "tensor_info",
    "to_record_batch",
    "with_metadata",
]

ROW_COLUMN = "row"
JACOBIAN_COLUMN = "jacobian"
# Schema metadata key of a batch's provenance (shard, rows, worker, timings): JSON.
ANNOTATION_KEY = b"distjac"

_NUMPY_DTYPES = {
    "float16": np.float16,
    "float32": np.float32,
    "float64": np.float64,
}
# Dtypes values can be stored in (a Jacobian's, a source's): Arrow has no bfloat16. The
# one list of them; the config, the sources and the jobs import it.
STORAGE_DTYPES = tuple(_NUMPY_DTYPES)


def arrow_dtype(name: str) -> pa.DataType:
    """The Arrow value type for a dtype name ("float16", "float32", "float64")."""
    try:
        return pa.from_numpy_dtype(_NUMPY_DTYPES[name])
    except KeyError:
        raise ValueError(
            f"output dtype {name!r} is not supported; use one of {sorted(_NUMPY_DTYPES)}."
        ) from None


def _to_numpy(t: torch.Tensor, dtype: str | None) -> np.ndarray:
    """A contiguous host numpy copy of ``t`` (one device-to-host transfer for GPU tensors)."""
    t = t.detach()
    target = _NUMPY_DTYPES[dtype] if dtype is not None else None
    if t.dtype == torch.bfloat16 and target is None:
        target = np.float32  # numpy has no bfloat16
    if target is not None:
        t = t.to(dtype=getattr(torch, np.dtype(target).name))
    return np.ascontiguousarray(t.cpu().numpy())


def to_record_batch(
    rows: np.ndarray | range,
    jacobian: torch.Tensor | None = None,
    reductions: dict[str, torch.Tensor] | None = None,
    *,
    dtype: str | None = "float32",
    extra_columns: dict[str, pa.Array] | None = None,
) -> pa.RecordBatch:
    """One shard's result as a record batch.

    Args:
        rows: the examples' row indices (length B).
        jacobian: (B, *shape) per-example values, stored as ``fixed_shape_tensor(shape)``.
        reductions: name -> (B,) values, one float column each (instead of ``jacobian``).
        dtype: value dtype in Arrow ("float32" by default; None keeps the tensor's).
        extra_columns: name -> Arrow array of length B (any type): input columns carried
            to the output (``output.keep_columns``), after ``row`` and the values.
    """
    row_ids = pa.array(np.asarray(rows, dtype=np.int64), type=pa.int64())
    names, columns = [ROW_COLUMN], [row_ids]
    if jacobian is not None:
        values = _to_numpy(jacobian, dtype)
        if values.ndim == 1:
            values = values.reshape(-1, 1)
        columns.append(pa.FixedShapeTensorArray.from_numpy_ndarray(values))
        names.append(JACOBIAN_COLUMN)
    for name, red in (reductions or {}).items():
        columns.append(pa.array(_to_numpy(red, dtype).reshape(-1)))
        names.append(name)
    if len(columns) == 1:
        raise ValueError("to_record_batch: give a jacobian or at least one reduction.")
    for name, extra in (extra_columns or {}).items():
        if name in names:
            raise ValueError(f"to_record_batch: extra column {name!r} collides with an output column.")
        if isinstance(extra, pa.ChunkedArray):
            extra = extra.combine_chunks()
        columns.append(extra if isinstance(extra, pa.Array) else pa.array(extra))
        names.append(name)
    if len(columns) == 1:
        raise ValueError("to_record_batch: give a jacobian or at least one reduction.")
    if any(len(c) != len(row_ids) for c in columns):
        raise ValueError(
            f"to_record_batch: {len(row_ids)} row ids but columns of lengths {[len(c) for c in columns]}."
        )
    return pa.RecordBatch.from_arrays(columns, names=names)


def from_record_batch(batch: pa.RecordBatch | pa.Table, column: str = JACOBIAN_COLUMN) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, values) of a result batch as numpy, zero-copy where Arrow allows.

    Values of a ``fixed_shape_tensor`` column come back as (B, *shape); a plain column
    as (B,). Arrays backed by Arrow (or Ray's object store) are read-only.
    """
    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else None
        if batch is None:
            return np.empty(0, np.int64), np.empty(0)
    rows = batch.column(ROW_COLUMN).to_numpy(zero_copy_only=False)
    col = batch.column(column)
    if isinstance(col.type, pa.FixedShapeTensorType):
        return rows, col.to_numpy_ndarray()
    return rows, col.to_numpy(zero_copy_only=False)


def tensor_shape(batch: pa.RecordBatch | pa.Schema, column: str = JACOBIAN_COLUMN) -> tuple[int, ...] | None:
    """The per-example shape of a tensor column, or None for a plain column."""
    schema = batch if isinstance(batch, pa.Schema) else batch.schema
    typ = schema.field(column).type
    return tuple(typ.shape) if isinstance(typ, pa.FixedShapeTensorType) else None


# ---------------------------------------------------------------------------------------
# Tensor columns of input files, and metadata (used by distjac.io)
# ---------------------------------------------------------------------------------------


def tensor_info(typ: pa.DataType) -> tuple[tuple[int, ...], np.dtype] | None:
    """(per-example shape, numpy value dtype) of a tensor-like column type, else None.

    Tensor-like: ``arrow.fixed_shape_tensor`` (its shape) or a fixed-size list, possibly
    nested (``fixed_size_list<fixed_size_list<float, 4>, 3>`` is shape (3, 4)). Plain and
    variable-size list columns are not tensors.
    """
    if isinstance(typ, pa.FixedShapeTensorType):
        if list(typ.permutation or range(len(typ.shape))) != list(range(len(typ.shape))):
            return None  # a permuted layout would need a transpose; not produced by distjac
        return tuple(typ.shape), typ.value_type.to_pandas_dtype()
    shape: list[int] = []
    while pa.types.is_fixed_size_list(typ):
        shape.append(typ.list_size)
        typ = typ.value_type
    if not shape or pa.types.is_nested(typ):
        return None
    try:
        return tuple(shape), np.dtype(typ.to_pandas_dtype())
    except (NotImplementedError, TypeError):
        return None


def column_values(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The values of a tensor-like column as numpy (B, *shape); zero-copy for one chunk
    without nulls (then read-only)."""
    if isinstance(col, pa.ChunkedArray):
        if col.num_chunks == 1:
            col = col.chunk(0)
        else:
            info = tensor_info(col.type)
            if col.num_chunks == 0 and info is not None:
                return np.empty((0, *info[0]), dtype=info[1])
            return np.concatenate([column_values(c) for c in col.chunks], axis=0)
    info = tensor_info(col.type)
    if info is None:
        raise TypeError(f"column_values: {col.type} is not a tensor column.")
    shape, _ = info
    if col.null_count:
        raise ValueError(f"column_values: row {first_null_row(col)} is null (the column has {col.null_count} "
                         f"null rows); tensors cannot be null.")
    flat = _flat_values(col)
    if flat.null_count:
        raise ValueError(f"column_values: row {first_null_row(col)} holds a null value inside its tensor "
                         f"({flat.null_count} null values in the column); tensors cannot hold nulls.")
    return flat.to_numpy(zero_copy_only=False).reshape(len(col), *shape)


def _flat_values(col: pa.Array) -> pa.Array:
    """The primitive values of a tensor-like array, in row-major order (offset honoured)."""
    flat = col.storage if isinstance(col, pa.ExtensionArray) else col
    while pa.types.is_fixed_size_list(flat.type):
        flat = flat.flatten()  # honours the array's offset; null rows' values are kept
    return flat


def first_null_row(col: pa.Array | pa.ChunkedArray) -> int | None:
    """Index of the first row that is null or (for a tensor column) holds a null value."""
    offset = 0
    for chunk in col.chunks if isinstance(col, pa.ChunkedArray) else [col]:
        rows = []
        if chunk.null_count:
            rows.append(int(np.argmax(chunk.is_null().to_numpy(zero_copy_only=False))))
        if tensor_info(chunk.type) is not None:
            flat = _flat_values(chunk)
            if flat.null_count and len(chunk):
                at = int(np.argmax(flat.is_null().to_numpy(zero_copy_only=False)))
                rows.append(at // max(1, len(flat) // len(chunk)))
        if rows:
            return offset + min(rows)
        offset += len(chunk)
    return None


# The content digest's version: bump it when what is hashed changes (old digests then no
# longer verify, and their parts are recomputed rather than trusted).
CONTENT_DIGEST_VERSION = b"distjac-content-v1"


def content_sha256(batch: pa.RecordBatch | pa.Table, header: bytes = b"") -> str:
    """SHA-256 of a batch's content: ``header``, then every column's name, value type,
    null count and values, in order. Independent of the file format (Arrow IPC and Parquet
    round trips give the same digest) and of how a Table is chunked.

    One pass over the bytes: numeric and tensor columns are hashed from their numpy view
    (zero-copy for one chunk without nulls); other columns (strings, kept ids) from their
    Python values.
    """
    h = hashlib.sha256(CONTENT_DIGEST_VERSION)
    h.update(len(header).to_bytes(8, "little") + header)
    for name, col in zip(batch.schema.names, batch.columns):
        info = tensor_info(col.type)
        typ = f"tensor{info[0]}:{np.dtype(info[1]).name}" if info is not None else str(col.type)
        h.update(f"\0{name}\0{typ}\0".encode())
        chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
        nulls = 0
        for chunk in chunks:
            flat = _flat_values(chunk) if info is not None else chunk
            nulls += chunk.null_count + (flat.null_count if info is not None else 0)
            if pa.types.is_integer(flat.type) or pa.types.is_floating(flat.type):
                values = np.ascontiguousarray(flat.to_numpy(zero_copy_only=False))
                h.update(memoryview(values).cast("B"))
            else:
                h.update(json.dumps(flat.to_pylist(), default=str).encode())
        h.update(f"\0nulls={nulls}\0rows={len(col)}".encode())
    return h.hexdigest()


def with_metadata(batch: pa.RecordBatch, metadata: dict[str, str]) -> pa.RecordBatch:
    """The same batch with ``metadata`` merged into its schema's metadata (no data copied)."""
    merged = dict(batch.schema.metadata or {})
    merged.update({k.encode(): str(v).encode() for k, v in metadata.items()})
    return batch.replace_schema_metadata(merged)


def schema_metadata(schema: pa.Schema) -> dict[str, str]:
    """A schema's metadata as str -> str."""
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}


def annotate(batch: pa.RecordBatch, info: dict) -> pa.RecordBatch:
    """``batch`` with ``info`` (JSON-ready) stored in its schema metadata; no data copied.

    Workers record where and how a shard was computed (shard, rows, node, pid, seconds);
    the same metadata travels into the part files a job writes.
    """
    meta = dict(batch.schema.metadata or {})
    meta[ANNOTATION_KEY] = json.dumps(info, sort_keys=True).encode()
    return batch.replace_schema_metadata(meta)


def annotation(batch: pa.RecordBatch | pa.Schema) -> dict:
    """The dict :func:`annotate` stored in a batch (or schema); {} when there is none."""
    schema = batch if isinstance(batch, pa.Schema) else batch.schema
    raw = (schema.metadata or {}).get(ANNOTATION_KEY)
    return json.loads(raw) if raw else {}
