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

import numpy as np
import pyarrow as pa
import torch

__all__ = [
    "JACOBIAN_COLUMN",
    "ROW_COLUMN",
    "arrow_dtype",
    "from_record_batch",
    "to_record_batch",
]

ROW_COLUMN = "row"
JACOBIAN_COLUMN = "jacobian"

_NUMPY_DTYPES = {
    "float16": np.float16,
    "float32": np.float32,
    "float64": np.float64,
}


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
) -> pa.RecordBatch:
    """One shard's result as a record batch.

    Args:
        rows: the examples' row indices (length B).
        jacobian: (B, *shape) per-example values, stored as ``fixed_shape_tensor(shape)``.
        reductions: name -> (B,) values, one float column each (instead of ``jacobian``).
        dtype: value dtype in Arrow ("float32" by default; None keeps the tensor's).
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
