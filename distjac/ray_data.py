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
from typing import Any

import numpy as np
import torch

from .errors import OptionError, ShapeError
from .estimates import check_estimates, estimate_block, estimate_columns
from .kernels import batch_jacobian
from .options import check_positive_int, is_device, parse_mode
from .reduce import check_reductions, reduce_block

__all__ = ["Jacobians", "stack_column"]

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
        return torch.as_tensor(np.ascontiguousarray(arr)).to(device=self.device, dtype=dtype)

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
