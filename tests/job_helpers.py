"""Helpers for the job tests (config, io, jobs, cli): tiny specs, input files, test models.

Models here are named by import path in specs (``job_helpers:nan_guard``): the tests
folder is on sys.path (tests/conftest.py), and CLI subprocesses get it via PYTHONPATH.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import torch
from torch import nn

import distjac
from distjac.models import mlp

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def tiny_dict(out, **sections) -> dict:
    """A small job as nested dicts: mlp 3 -> 5 -> 2 over 50 synthetic rows, shards of 16."""
    d = {
        "model": {"factory": "distjac.models:mlp", "kwargs": {"sizes": [3, 5, 2]}},
        "data": {"kind": "synthetic", "rows": 50, "shape": [3], "seed": 0},
        "jacobian": {"mode": "rev"},
        "engine": {"shard_size": 16, "num_workers": 0, "progress": False},
        "output": {"path": str(out)},
    }
    for name, values in sections.items():
        d[name] = {**d.get(name, {}), **values}
    return d


def tiny_spec(out, **sections) -> distjac.JobSpec:
    return distjac.JobSpec.from_dict(tiny_dict(out, **sections))


def reference(spec: distjac.JobSpec) -> np.ndarray:
    """distjac.batch_jacobian of the spec's model over all of its data, in one call."""
    from distjac.config import build_model
    from distjac.io.sources import open_source

    x = open_source(spec.data).read(0, open_source(spec.data).num_rows)
    model = build_model(spec.model)
    return distjac.batch_jacobian(model, x.to(next(model.parameters()).dtype), mode="rev").numpy()


def write_parquet(path, values: np.ndarray, column: str = "x", *, row_group_size=None, as_list=False,
                  extra: dict | None = None) -> str:
    arr = _tensor_array(values, as_list)
    cols = {"id": pa.array(np.arange(len(values))), column: arr, **(extra or {})}
    pq.write_table(pa.table(cols), str(path), row_group_size=row_group_size)
    return str(path)


def write_arrow(path, values: np.ndarray, column: str = "x", *, batch_rows=None, as_list=False,
                extra: dict | None = None) -> str:
    table = pa.table({"id": pa.array(np.arange(len(values))), column: _tensor_array(values, as_list),
                      **(extra or {})})
    with ipc.new_file(str(path), table.schema) as w:
        for batch in table.to_batches(max_chunksize=batch_rows or max(1, len(values))):
            w.write_batch(batch)
    return str(path)


def _tensor_array(values: np.ndarray, as_list: bool):
    if not as_list:
        return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values))
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    arr = flat
    for size in reversed(values.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


class NanGuard(nn.Module):
    """An MLP that raises on a batch holding NaN (Python control flow on the batch's values)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if torch.isnan(x).any():
            raise ValueError("NaN in the batch")
        return self.inner(x)


def nan_guard(sizes=(3, 5, 2), seed=0) -> nn.Module:
    return NanGuard(mlp(list(sizes), seed=seed))


def not_a_model():
    return 42


class Slow(nn.Module):
    """An MLP that sleeps on every call, so a job lasts long enough to be killed mid-way."""

    def __init__(self, inner: nn.Module, delay: float):
        super().__init__()
        self.inner, self.delay = inner, delay

    def forward(self, x):
        import time

        time.sleep(self.delay)
        return self.inner(x)


class StallsOnce(nn.Module):
    """An MLP that, the first time anywhere it is called on more than ``rows`` rows while
    the file ``marker`` exists, removes the marker and sleeps an hour: a stall in whatever
    step calls it first (the job's probe, the choice of strategy, a shard)."""

    def __init__(self, inner: nn.Module, marker: str, rows: int):
        super().__init__()
        self.inner, self.marker, self.rows = inner, marker, rows

    def forward(self, x):
        if x.shape[0] > self.rows:
            try:
                os.remove(self.marker)
            except FileNotFoundError:
                pass
            else:
                import time

                time.sleep(3600)
        return self.inner(x)


def stalls_once(marker: str, rows: int, sizes=(3, 5, 2), seed=0) -> nn.Module:
    return StallsOnce(mlp(list(sizes), seed=seed), marker, rows)


def slow_mlp(sizes=(3, 5, 2), delay=0.05, seed=0) -> nn.Module:
    return Slow(mlp(list(sizes), seed=seed), delay)


def counting_mlp(log: str, sizes=(3, 5, 2), seed: int = 0):
    """distjac.models.mlp, appending this process's pid to the file ``log`` each time it
    is built: which processes build a job's model, and how often."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    return mlp(list(sizes), seed=seed)
