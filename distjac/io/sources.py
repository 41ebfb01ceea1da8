"""Input sources: where a shard's examples come from.

A source is a small picklable value (a path, a column name, a seed, the metadata read
when it was opened), never the data: the driver opens it once to check it and learn its
rows, per-example shape and dtype, then ships it inside each shard descriptor; every
worker reads only its own rows with ``read(start, stop)``.

===========  ================================================================================
synthetic    seeded normal values; see NOTE [synthetic data does not depend on the plan]
npy          a ``.npy`` file, memory-mapped (``np.load(mmap_mode="r")``)
parquet      Parquet files with a tensor column; only the row groups that overlap are read
arrow        Arrow IPC files (Feather v2) with a tensor column, memory-mapped; only the
             record batches that overlap are touched
tensor       a tensor in memory (for the engine's in-memory jobs)
ray_dataset  a Ray Data ``Dataset`` (:class:`distjac.ray_data.DatasetSource`: its blocks stay
             in Ray's object store; each worker fetches the blocks its rows overlap)
===========  ================================================================================

A tensor column is an ``arrow.fixed_shape_tensor`` or a (nested) fixed-size list of
floats, or a (nested) variable-size list of floats whose rows all hold the same number
of values (what pandas writes for a column of arrays): the per-row shape is
``data.shape`` when given (e.g. [3, 4] for rows of 12 values), else the first row's
list lengths, and a row of another length is refused, naming it. A path may name one
file or a directory, whose files with the format's extension are read in name order as
one table. A path may be a URI that pyarrow's file systems open (``s3://bucket/data``;
see :mod:`distjac.io.fs`): files are read through the file system, Parquet by row group
and Arrow IPC by record batch, only what a shard needs.

NOTE [tensor columns hold no nulls]
A null row, or a null value inside a tensor, has no Jacobian (and would silently read as
NaN). Opening a Parquet or Arrow source refuses them, naming the first such row, before
any work: Parquet from the column chunks' statistics (``null_count``, which counts null
rows and null values alike; written by default), decoding only a row group whose
statistics report nulls or that has none (``write_statistics=False``: then the check
reads the column once); Arrow IPC from each record batch's null counts, which the file
records (memory-mapped, nothing decoded). Only the first ``data.rows`` rows are checked.
Reading a shard checks again (a file changed after the job started) and names the row.

NOTE [synthetic data does not depend on the plan]
Row r of a synthetic source is row ``r % block`` of the block ``r // block``, drawn by
``numpy.random.default_rng([seed, r // block])``. The block size (1024 rows, fewer for
large examples) depends only on the per-example shape, so every row's values depend only
on (seed, shape, dtype, r): not on the shard size, the number of workers or which worker
reads it.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from .. import arrow as arrow_mod
from ..errors import SourceDtypeError, SourceError, SourceNotFoundError
from . import fs as _fs

__all__ = [
    "ArrowSource",
    "NpySource",
    "ParquetSource",
    "Source",
    "SyntheticSource",
    "TensorSource",
    "check_keep_columns",
    "open_source",
    "read_columns",
]

EXTENSIONS = {"parquet": (".parquet", ".pq"), "arrow": (".arrow", ".feather", ".ipc"), "npy": (".npy",)}
# Rows per synthetic block: large enough to amortise the generator, small enough that
# reading a small shard does not generate much more than it needs.
SYNTHETIC_BLOCK_ROWS = 1024
# Elements per synthetic block at most (4 MiB of float32): large examples get smaller blocks.
SYNTHETIC_BLOCK_ELEMENTS = 1 << 20
# Entries of the per-process caches, so that consecutive shards of one file do not open
# it (or decode its Parquet row group) again. One decoded row group only: it may be large.
_CACHE_SIZES = {"ipc": 4, "ipc_rows": 16, "pq_groups": 16, "pq_values": 1}


class Source:
    """Base of every source. Attributes: ``kind``, ``num_rows``, ``shape`` (one example's),
    ``dtype`` (a numpy dtype name)."""

    kind: str = ""
    num_rows: int
    shape: tuple[int, ...]
    dtype: str

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start..stop-1`` as a CPU tensor (stop - start, *shape) of ``dtype``."""
        self._check_range(start, stop)
        if start == stop:
            return torch.empty((0, *self.shape), dtype=getattr(torch, self.dtype))
        return self._read(start, stop)

    def _read(self, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError

    def _check_range(self, start: int, stop: int) -> None:
        if not (0 <= start <= stop <= self.num_rows):
            raise IndexError(
                f"{self.kind} source: rows [{start}, {stop}) are outside [0, {self.num_rows})."
            )

    def describe(self) -> str:
        return f"{self.kind}: {self.num_rows} rows of shape {self.shape}, {self.dtype}"

    def for_rows(self, start: int, stop: int) -> Source:
        """What a shard's task carries to read rows [start, stop): the source itself (a
        Ray Data source keeps only the blocks those rows overlap)."""
        return self


def _to_tensor(values: np.ndarray) -> torch.Tensor:
    """A writable, owned tensor of ``values`` (which may be a read-only memory map)."""
    return torch.from_numpy(np.array(values, copy=True, order="C"))


# -----------------------------------------------------------------------------------------
# synthetic
# -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSource(Source):
    """Standard-normal values seeded by row; see NOTE [synthetic data does not depend on the plan].

    Example:
        >>> s = SyntheticSource(rows=3000, shape=(4,), seed=0)
        >>> bool((s.read(1000, 1100) == s.read(0, 3000)[1000:1100]).all())
        True
    """

    rows: int
    shape: tuple[int, ...]
    seed: int = 0
    dtype: str = "float32"
    kind = "synthetic"

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        return self.rows

    @property
    def block_rows(self) -> int:
        numel = max(1, math.prod(self.shape))
        block = SYNTHETIC_BLOCK_ROWS
        while block > 1 and block * numel > SYNTHETIC_BLOCK_ELEMENTS:
            block //= 2
        return block

    def _block(self, b: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, b])
        gen_dtype = np.float64 if self.dtype == "float64" else np.float32
        return rng.standard_normal((self.block_rows, *self.shape), dtype=gen_dtype).astype(self.dtype, copy=False)

    def _read(self, start: int, stop: int) -> torch.Tensor:
        br = self.block_rows
        out = np.empty((stop - start, *self.shape), dtype=self.dtype)
        for b in range(start // br, (stop - 1) // br + 1):
            lo, hi = max(start, b * br), min(stop, (b + 1) * br)
            out[lo - start : hi - start] = self._block(b)[lo - b * br : hi - b * br]
        return torch.from_numpy(out)


# -----------------------------------------------------------------------------------------
# npy
# -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NpySource(Source):
    """A ``.npy`` file of shape (N, *shape), memory-mapped, or a directory of them read in
    name order as one array (every file (n_i, *shape), the same shape and dtype); ``rows``
    limits it to its first rows."""

    path: str
    rows: int
    shape: tuple[int, ...]
    dtype: str
    files: tuple[tuple[str, int], ...] = ()  # (file, rows) in order; () where path is the one file
    kind = "npy"

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        return self.rows

    @classmethod
    def open(cls, path: str, rows: int | None = None) -> NpySource:
        files = _list_files(path, "npy")
        found: tuple | None = None
        counts = []
        for f in files:
            shape, dtype = cls._header(f)
            if found is None:
                found = (tuple(shape[1:]), dtype)
            elif (tuple(shape[1:]), dtype) != found:
                raise SourceError(
                    f"data: {f!r} holds rows of shape {tuple(shape[1:])} and dtype {dtype}, but {files[0]!r} "
                    f"holds {found[0]} and {found[1]}; all files of a source must agree."
                )
            counts.append(int(shape[0]))
        assert found is not None
        limit = _limit(rows, sum(counts), path)
        parts = tuple(zip(files, counts)) if len(files) > 1 or files[0] != _existing(path) else ()
        return cls(path=files[0] if not parts else _existing(path), rows=limit, shape=found[0],
                   dtype=found[1].name, files=parts)

    @staticmethod
    def _header(path: str) -> tuple[tuple[int, ...], np.dtype]:
        """One file's (shape, dtype), checked: a .npy array, floating, rank >= 2."""
        _sniff_npy(path)
        if _fs.is_remote(path):
            shape, dtype, _ = _npy_header(path)
        else:
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                raise SourceError(f"data: {path!r} cannot be memory-mapped as a .npy array ({e}).") from None
            if not isinstance(arr, np.ndarray):
                raise SourceError(f"data: {path!r} is not a single .npy array (an .npz archive?); save one with "
                                  f"np.save.")
            shape, dtype = arr.shape, arr.dtype
        _check_dtype(dtype, f"{path!r}")
        if len(shape) < 2:
            raise SourceError(
                f"data: {path!r} has shape {shape}; distjac needs (rows, *example_shape) with rank >= 2. "
                f"Reshape to {tuple(shape) + (1,)} and save again."
            )
        return tuple(shape), dtype

    def _read(self, start: int, stop: int) -> torch.Tensor:
        if not self.files:
            return self._read_file(self.path, start, stop)
        pieces, base = [], 0
        for f, n in self.files:
            lo, hi = max(start, base), min(stop, base + n)
            if lo < hi:
                pieces.append(self._read_file(f, lo - base, hi - base))
            base += n
            if base >= stop:
                break
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)

    @staticmethod
    def _read_file(path: str, start: int, stop: int) -> torch.Tensor:
        if _fs.is_remote(path):
            shape, dtype, offset = _npy_header(path)
            row_bytes = dtype.itemsize * math.prod(shape[1:])
            with _fs.open_input(path) as f:
                buf = f.read_at(row_bytes * (stop - start), offset + row_bytes * start)
            return torch.from_numpy(np.frombuffer(buf, dtype=dtype).reshape(stop - start, *shape[1:]).copy())
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        return _to_tensor(arr[start:stop])


# Magic bytes of files given as data.kind npy by mistake (numpy reports them as pickles).
_MAGIC_KINDS = ((b"PAR1", "Parquet", "parquet"), (b"ARROW1", "an Arrow IPC file", "arrow"))


def _sniff_npy(path: str) -> None:
    """SourceError naming the right data.kind for a Parquet or Arrow file given as npy."""
    with _fs.open_input(path) as f:
        head = f.read(8)
    if head.startswith(b"\x93NUMPY"):
        return
    for magic, what, kind in _MAGIC_KINDS:
        if head.startswith(magic):
            raise SourceError(f"data: {path!r} looks like {what}, not a .npy array; set data.kind: {kind} "
                              f"(and data.column if it has several tensor columns).")
    raise SourceError(f"data: {path!r} is not a .npy file (it does not start with numpy's magic bytes); save the "
                      f"array with numpy.save, or set data.kind to parquet or arrow for those formats.")


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a C-ordered .npy file, read through the file system."""
    from numpy.lib import format as npf

    with _fs.open_input(path) as f:
        try:
            version = npf.read_magic(f)
            read = npf.read_array_header_1_0 if version == (1, 0) else npf.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except ValueError as e:
            raise SourceError(f"data: {path!r} is not a readable .npy file ({e}).") from None
        offset = f.tell()
    if fortran and len(shape) > 1:
        raise SourceError(f"data: {path!r} holds a Fortran-ordered array; save np.ascontiguousarray(a) instead.")
    if dtype.hasobject:
        raise SourceError(f"data: {path!r} holds Python objects; distjac reads numeric .npy arrays only.")
    return tuple(shape), dtype, offset


# -----------------------------------------------------------------------------------------
# parquet and arrow files
# -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FileTable(Source):
    """Files read as one table: ``files`` are (path, rows in that file)."""

    files: tuple[tuple[str, int], ...]
    column: str
    rows: int
    shape: tuple[int, ...]
    dtype: str
    lists: bool = False  # the column holds variable-size lists (NOTE in the module docstring)
    columns: tuple[str, ...] = ()  # every column of the first file

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        return self.rows

    @classmethod
    def open(cls, path: str, column: str | None, rows: int | None = None,
             shape: tuple[int, ...] | None = None) -> _FileTable:
        files = _list_files(path, cls.kind)
        found_column, found_shape, dtype, counts, lists, names = None, None, None, [], False, ()
        for f in files:
            schema, nrows = cls._schema_and_rows(f)
            name, typ = _pick_column(schema, column, f)
            info = arrow_mod.tensor_info(typ)
            if info is None:  # a list column (checked by _pick_column)
                lists = True
                info = (shape or cls._first_row_shape(f, name), _list_dtype(typ))
            elif shape is not None and tuple(shape) != tuple(info[0]):
                raise SourceError(f"data.shape={list(shape)} but column {name!r} of {f!r} is a tensor of shape "
                                  f"{list(info[0])}; remove data.shape (it is for list columns).")
            if not names:
                names = tuple(schema.names)
            shape_here = info[0]
            if found_column is None:
                found_column, found_shape, dtype = name, shape_here, info[1]
            elif (name, info[0], info[1]) != (found_column, found_shape, dtype):
                raise SourceError(
                    f"data: {f!r} has column {name!r} of shape {info[0]} and dtype {info[1]}, but "
                    f"{files[0]!r} has {found_column!r} of shape {found_shape} and dtype {dtype}; "
                    f"all files of a source must agree."
                )
            counts.append(nrows)
        total = sum(counts)
        limit = _limit(rows, total, path)
        offset = 0
        for f, n in zip(files, counts):  # NOTE [tensor columns hold no nulls]
            if offset >= limit:
                break
            cls._check_nulls(f, found_column, offset, min(n, limit - offset))
            offset += n
        return cls(
            files=tuple(zip(files, counts)),
            column=found_column,
            rows=limit,
            shape=tuple(int(s) for s in found_shape),
            dtype=np.dtype(dtype).name,
            lists=lists,
            columns=names,
        )

    @classmethod
    def _first_row_shape(cls, path: str, column: str) -> tuple[int, ...]:
        """The per-row shape of a list column from its first row's (nested) list lengths."""
        first = cls._first_value(path, column)
        if first is None:
            raise SourceError(f"data: column {column!r} of {path!r} is a list column with no rows to learn its "
                              f"shape from; set data.shape.")
        shape = []
        value = first
        while isinstance(value, (list, tuple)):
            shape.append(len(value))
            value = value[0] if value else None
        if not shape or 0 in shape:
            raise SourceError(f"data: column {column!r} of {path!r}: its first row holds an empty list; set "
                              f"data.shape, or drop empty rows.")
        return tuple(shape)

    @staticmethod
    def _first_value(path: str, column: str) -> Any:
        raise NotImplementedError

    def _values(self, col: pa.Array | pa.ChunkedArray, path: str, base: int) -> np.ndarray:
        """A column slice's values (rows, *shape), list columns checked and reshaped."""
        if not self.lists:
            return arrow_mod.column_values(col)
        return _list_values(col, self.shape, self.dtype, path, self.column, base)

    @staticmethod
    def _check_nulls(path: str, column: str, base: int, rows: int) -> None:
        """Refuse nulls in the first ``rows`` rows of ``column`` in ``path`` (its rows are the
        source's rows ``base...``); see NOTE [tensor columns hold no nulls]."""
        raise NotImplementedError

    @staticmethod
    def _schema_and_rows(path: str) -> tuple[pa.Schema, int]:
        raise NotImplementedError

    def _pieces(self, start: int, stop: int):
        """(file index, path, local start, local stop) of the files overlapping [start, stop)."""
        offset = 0
        for i, (path, n) in enumerate(self.files):
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                yield i, path, lo - offset, hi - offset
            offset += n
            if offset >= stop:
                break

    def read_columns(self, names: Sequence[str], start: int, stop: int) -> dict[str, pa.Array]:
        """Columns ``names`` of rows [start, stop), as Arrow arrays (any type, copied from
        the files' pieces): what ``output.keep_columns`` carries to the output."""
        self._check_range(start, stop)
        pieces: dict[str, list] = {n: [] for n in names}
        for _, path, lo, hi in self._pieces(start, stop):
            table = self._read_file_columns(path, list(names), lo, hi)
            for n in names:
                pieces[n].extend(table.column(n).chunks)
        out = {}
        for n in names:
            chunks = [c for c in pieces[n] if len(c)]
            out[n] = pa.concat_arrays(chunks) if chunks else pa.array([], type=self._column_type(n))
        return out

    def _read_file_columns(self, path: str, names: list[str], lo: int, hi: int) -> pa.Table:
        raise NotImplementedError

    def _column_type(self, name: str) -> pa.DataType:
        schema, _ = self._schema_and_rows(self.files[0][0])
        return schema.field(name).type

    def _read(self, start: int, stop: int) -> torch.Tensor:
        out = np.empty((stop - start, *self.shape), dtype=self.dtype)
        pos = 0
        for _, path, lo, hi in self._pieces(start, stop):
            for values in self._read_file(path, lo, hi, start + pos - lo):
                out[pos : pos + len(values)] = values
                pos += len(values)
        assert pos == stop - start, (pos, start, stop)
        return torch.from_numpy(out)

    def _read_file(self, path: str, lo: int, hi: int, base: int):
        """The values of rows [lo, hi) of ``path``, whose row 0 is the source's row ``base``."""
        raise NotImplementedError


@dataclass(frozen=True)
class ParquetSource(_FileTable):
    """Parquet files with a tensor column; a read decodes only the row groups it overlaps.

    Note:
        Row groups are Parquet's unit of reading: a shard that touches one decodes all of
        it. Files written with row groups no larger than a shard read fastest.
    """

    kind = "parquet"

    @staticmethod
    def _schema_and_rows(path: str) -> tuple[pa.Schema, int]:

        try:
            meta = _pq_metadata(path)
            return meta.schema.to_arrow_schema(), meta.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise SourceError(f"data: {path!r} is not a readable Parquet file ({e}).") from None

    @staticmethod
    def _first_value(path: str, column: str) -> Any:
        for batch in _pq_file(path).iter_batches(batch_size=1, columns=[column]):
            if batch.num_rows:
                return batch.column(0)[0].as_py()
        return None

    def _read_file_columns(self, path: str, names: list[str], lo: int, hi: int) -> pa.Table:
        starts = _parquet_row_group_starts(path)
        groups = [g for g in range(len(starts) - 1) if starts[g + 1] > lo and starts[g] < hi]
        table = _pq_file(path).read_row_groups(groups, columns=names)
        return table.slice(lo - starts[groups[0]], hi - lo) if groups else table.slice(0, 0)

    @staticmethod
    def _check_nulls(path: str, column: str, base: int, rows: int) -> None:
        meta = _pq_metadata(path)
        leaves = [i for i in range(meta.num_columns)
                  if meta.schema.column(i).path.split(".")[0] == column]
        g_lo = 0
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            if g_lo >= rows:
                break
            stats = [group.column(i).statistics for i in leaves]
            if not all(st is not None and st.has_null_count and st.null_count == 0 for st in stats):
                table = _pq_file(path).read_row_group(g, columns=[column])
                _refuse_nulls(table.column(0), path, column, base + g_lo, stop=rows - g_lo)
            g_lo += group.num_rows

    def _read_file(self, path: str, lo: int, hi: int, base: int):
        starts = _parquet_row_group_starts(path)
        for g in range(len(starts) - 1):
            g_lo, g_hi = starts[g], starts[g + 1]
            if g_hi <= lo or g_lo >= hi:
                continue
            values = _parquet_row_group(path, g, self.column, base + g_lo, self)
            yield values[max(lo, g_lo) - g_lo : min(hi, g_hi) - g_lo]


@dataclass(frozen=True)
class ArrowSource(_FileTable):
    """Arrow IPC files (the file format, Feather v2) with a tensor column, memory-mapped."""

    kind = "arrow"

    @staticmethod
    def _schema_and_rows(path: str) -> tuple[pa.Schema, int]:
        reader = _ipc_reader(path)
        return reader.schema, sum(_ipc_batch_rows(path))

    @staticmethod
    def _first_value(path: str, column: str) -> Any:
        reader = _ipc_reader(path)
        for b in range(reader.num_record_batches):
            batch = reader.get_batch(b)
            if batch.num_rows:
                return batch.column(batch.schema.get_field_index(column))[0].as_py()
        return None

    def _read_file_columns(self, path: str, names: list[str], lo: int, hi: int) -> pa.Table:
        reader = _ipc_reader(path)
        offsets = np.concatenate([[0], np.cumsum(_ipc_batch_rows(path))])
        batches = []
        for b in range(len(offsets) - 1):
            b_lo, b_hi = int(offsets[b]), int(offsets[b + 1])
            if b_hi <= lo or b_lo >= hi:
                continue
            batch = reader.get_batch(b).select(names)
            batches.append(batch.slice(max(lo, b_lo) - b_lo, min(hi, b_hi) - max(lo, b_lo)))
        schema = pa.schema([reader.schema.field(name) for name in names])  # (a Schema has no select)
        return pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()

    @staticmethod
    def _check_nulls(path: str, column: str, base: int, rows: int) -> None:
        reader = _ipc_reader(path)
        b_lo = 0
        for b, n in enumerate(_ipc_batch_rows(path)):
            if b_lo >= rows:
                break
            batch = reader.get_batch(b)  # a view of the memory map; null counts are in its metadata
            col = batch.column(batch.schema.get_field_index(column))
            _refuse_nulls(col, path, column, base + b_lo, stop=rows - b_lo)
            b_lo += n

    def _read_file(self, path: str, lo: int, hi: int, base: int):
        reader = _ipc_reader(path)
        offsets = np.concatenate([[0], np.cumsum(_ipc_batch_rows(path))])
        first = int(np.searchsorted(offsets, lo, side="right")) - 1
        for b in range(first, len(offsets) - 1):
            b_lo, b_hi = int(offsets[b]), int(offsets[b + 1])
            if b_lo >= hi:
                break
            if b_hi <= lo:
                continue
            batch = reader.get_batch(b)  # zero-copy: a view of the memory map
            col = batch.column(batch.schema.get_field_index(self.column))
            col = col.slice(max(lo, b_lo) - b_lo, min(hi, b_hi) - max(lo, b_lo))
            _refuse_nulls(col, path, self.column, base + max(lo, b_lo))
            yield self._values(col, path, base + max(lo, b_lo))


# Per-process caches, keyed by (path, size, mtime) so a rewritten file is read afresh.
_CACHES: dict[str, OrderedDict] = {"ipc": OrderedDict(), "ipc_rows": OrderedDict(), "pq_groups": OrderedDict(),
                                   "pq_values": OrderedDict()}


def _stat(path: str) -> tuple[int, int]:
    """(size, mtime in ns) of a file, local or through its file system."""
    if not _fs.is_remote(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    fs, p = _fs.file_system(path)
    info = fs.get_file_info(p)
    return int(info.size or 0), int(info.mtime_ns or 0)


def _cached(cache: str, key: tuple, make):
    full = (*key, *_stat(key[0]))
    c = _CACHES[cache]
    if full in c:
        c.move_to_end(full)
        return c[full]
    value = make()
    c[full] = value
    while len(c) > _CACHE_SIZES[cache]:
        c.popitem(last=False)
    return value


def _ipc_reader(path: str):
    import pyarrow.ipc as ipc

    def make():
        try:
            return ipc.open_file(_fs.open_input(path))
        except (pa.ArrowInvalid, OSError) as e:
            raise SourceError(
                f"data: {path!r} is not an Arrow IPC file ({e}). distjac reads the IPC file format "
                f"(Feather v2), as written by pyarrow.ipc.new_file or pyarrow.feather.write_feather."
            ) from None

    return _cached("ipc", (path,), make)


def _ipc_batch_rows(path: str) -> list[int]:
    reader = _ipc_reader(path)
    return _cached("ipc_rows", (path,),
                   lambda: [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)])


def _pq_file(path: str):
    """A pyarrow.parquet.ParquetFile of a local file or a URI (through its file system)."""
    import pyarrow.parquet as pq

    if not _fs.is_remote(path):
        return pq.ParquetFile(path)
    fs, p = _fs.file_system(path)
    return pq.ParquetFile(p, filesystem=fs)


def _pq_metadata(path: str):
    return _pq_file(path).metadata


def _parquet_row_group_starts(path: str) -> list[int]:
    def make():
        meta = _pq_metadata(path)
        return [0, *np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)]).tolist()]

    return _cached("pq_groups", (path,), make)


def _parquet_row_group(path: str, group: int, column: str, base: int, source: Any = None) -> np.ndarray:
    """Row group ``group``'s values (its first row is the source's row ``base``)."""

    def make():
        table = _pq_file(path).read_row_group(group, columns=[column])
        _refuse_nulls(table.column(0), path, column, base)
        if source is not None:
            return source._values(table.column(0), path, base)
        return arrow_mod.column_values(table.column(0))

    shape = (source.shape, source.lists) if source is not None else None
    return _cached("pq_values", (path, group, column, shape), make)


# -----------------------------------------------------------------------------------------
# tensor
# -----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TensorSource(Source):
    """A tensor (or numpy array) in memory, (B, *shape); for the engine's in-memory jobs."""

    tensor: Any
    kind = "tensor"

    def __post_init__(self):
        t = self.tensor
        if isinstance(t, np.ndarray):
            _check_dtype(t.dtype, "data.tensor")
            t = torch.from_numpy(t)
        if not isinstance(t, torch.Tensor):
            raise SourceError(f"data.tensor must be a torch.Tensor or numpy array, got {type(t).__name__}.")
        if not t.is_floating_point():
            raise SourceDtypeError(
                f"data.tensor has dtype {t.dtype}; distjac differentiates floating values only "
                f"(float16, bfloat16, float32, float64). Convert it, e.g. tensor.float()."
            )
        if t.dim() < 2:
            raise SourceError(f"data.tensor has shape {tuple(t.shape)}; it needs (rows, *example_shape), rank >= 2.")
        object.__setattr__(self, "tensor", t.detach())

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        return self.tensor.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(self.tensor.shape[1:])

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return str(self.tensor.dtype).removeprefix("torch.")

    def _read(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[start:stop].cpu()


# -----------------------------------------------------------------------------------------
# opening and checking
# -----------------------------------------------------------------------------------------


def open_source(data) -> Source:
    """Open and check the source a ``DataSpec`` names, reading metadata only.

    Raises:
        SourceNotFoundError: a file or directory that does not exist (or holds no files).
        SourceError: a missing or non-tensor column, a file that cannot be read, too few rows.
        SourceDtypeError: values that are not floating point.
    """
    kind = data.kind
    if kind == "synthetic":
        return SyntheticSource(rows=data.rows, shape=tuple(data.shape), seed=data.seed, dtype=data.dtype or "float32")
    if kind == "npy":
        return NpySource.open(data.path, data.rows)
    shape = tuple(data.shape) if data.shape is not None else None
    if kind == "parquet":
        return ParquetSource.open(data.path, data.column, data.rows, shape)
    if kind == "arrow":
        return ArrowSource.open(data.path, data.column, data.rows, shape)
    if kind == "ray_dataset":
        from ..ray_data import DatasetSource  # imports Ray when the job runs on a Dataset

        return DatasetSource.open(data.dataset, data.column, data.rows, shape)
    if kind == "tensor":
        src = TensorSource(data.tensor)
        if data.rows is not None:
            src = TensorSource(src.tensor[: _limit(data.rows, src.num_rows, "data.tensor")])
        return src
    raise SourceError(f"data.kind={kind!r} is not a source; use one of synthetic, npy, parquet, arrow, tensor.")


def _existing(path: str) -> str:
    full = _fs.normalize(path)
    try:
        found = _fs.exists(full)
    except OSError as e:
        raise SourceError(f"data: cannot open {path!r} ({type(e).__name__}: {str(e).splitlines()[0]}); check the "
                          f"URI and the credentials (AWS_* environment variables, ~/.aws).") from None
    if not found:
        raise SourceNotFoundError(f"data: input file {path!r} does not exist (looked for {full}).")
    return full


def _list_files(path: str, kind: str) -> list[str]:
    full = _existing(path)
    if not _fs.isdir(full):
        return [full]
    exts = EXTENSIONS[kind]
    files = sorted(
        os.path.join(full, n) for n in _fs.listdir(full)
        if n.endswith(exts) and not n.startswith((".", "_")) and _fs.isfile(os.path.join(full, n))
    )
    if not files:
        raise SourceNotFoundError(f"data: directory {path!r} holds no {kind} files ({', '.join(exts)}).")
    return files


def _limit(rows: int | None, available: int, where: str) -> int:
    if rows is None:
        return available
    if rows > available:
        raise SourceError(f"data.rows={rows} but {where!r} has only {available} rows; lower data.rows or remove it.")
    return rows


def _check_dtype(dtype: np.dtype, where: str, column: str | None = None) -> None:
    if dtype.name not in arrow_mod.STORAGE_DTYPES:
        what = f"column {column!r} of {where}" if column else where
        raise SourceDtypeError(
            f"data: {what} holds {dtype} values; distjac differentiates floating values only "
            f"({', '.join(arrow_mod.STORAGE_DTYPES)}). Convert the data to float32."
        )


def _pick_column(schema: pa.Schema, column: str | None, path: str) -> tuple[str, pa.DataType]:
    """The tensor column to read: the named one (checked), or the only tensor-like one."""
    listing = ", ".join(f"{f.name} ({_type_name(f.type)})" for f in schema)
    if column is None:
        tensors = [f for f in schema if arrow_mod.tensor_info(f.type) is not None or _is_float_list(f.type)]
        if len(tensors) != 1:
            what = "no tensor column" if not tensors else f"{len(tensors)} tensor columns"
            raise SourceError(
                f"data: {path!r} has {what}; set data.column to one of its columns: {listing}."
            )
        field = tensors[0]
    else:
        idx = schema.get_field_index(column)
        if idx < 0:
            raise SourceError(f"data: {path!r} has no column {column!r}; its columns are: {listing}.")
        field = schema.field(idx)
    info = arrow_mod.tensor_info(field.type)
    if info is None and _is_float_list(field.type):
        _check_dtype(_list_dtype(field.type), repr(path), field.name)
        return field.name, field.type
    if info is None:
        raise SourceError(
            f"data: column {field.name!r} of {path!r} has type {_type_name(field.type)}, not a tensor; "
            f"distjac reads arrow.fixed_shape_tensor, fixed_size_list<float> and list<float> columns."
        )
    _check_dtype(np.dtype(info[1]), repr(path), field.name)
    return field.name, field.type


def _list_leaf(typ: pa.DataType) -> pa.DataType | None:
    """The value type under (nested) lists of any kind, None if ``typ`` is not a list."""
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)):
        return None
    while pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        typ = typ.value_type
    return typ


def _is_float_list(typ: pa.DataType) -> bool:
    """A (nested) list column of numbers that is not already a tensor type."""
    leaf = _list_leaf(typ)
    return leaf is not None and arrow_mod.tensor_info(typ) is None and (
        pa.types.is_floating(leaf) or pa.types.is_integer(leaf))


def _list_dtype(typ: pa.DataType) -> np.dtype:
    return np.dtype(_list_leaf(typ).to_pandas_dtype())


def _list_values(col: pa.Array | pa.ChunkedArray, shape: tuple[int, ...], dtype: str, path: str, column: str,
                 base: int) -> np.ndarray:
    """The values of a (nested) list column as (rows, *shape), every row checked to hold
    prod(shape) values (SourceError naming the first row that does not)."""
    import pyarrow.compute as pc

    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    n = math.prod(shape)
    out = []
    offset = 0
    for chunk in chunks:
        flat = chunk
        counts = None
        while pa.types.is_list(flat.type) or pa.types.is_large_list(flat.type) or \
                pa.types.is_fixed_size_list(flat.type):
            lengths = pc.list_value_length(flat).to_numpy(zero_copy_only=False)
            if counts is None:
                counts = lengths.astype(np.int64)
            else:  # per row: the sum of its sub-lists' lengths
                idx = np.repeat(np.arange(len(counts)), counts)
                counts = np.bincount(idx, weights=lengths, minlength=len(counts)).astype(np.int64)
            flat = flat.flatten()
        bad = np.flatnonzero(counts != n) if counts is not None else np.arange(0)
        if bad.size:
            r = int(bad[0])
            raise SourceError(
                f"data: column {column!r} of {path!r}: row {base + offset + r} holds {int(counts[r])} values, but "
                f"rows of shape {list(shape)} hold {n}; set data.shape to the rows' shape, or fix that row."
            )
        if flat.null_count:
            r = int(np.searchsorted(np.cumsum(counts), int(np.flatnonzero(flat.is_null().to_numpy(
                zero_copy_only=False))[0]), side="right"))
            raise SourceError(
                f"data: column {column!r} of {path!r} has a null value at row {base + offset + r}; a tensor cannot "
                f"hold nulls. Drop or fill those rows and write the file again, or set data.rows below that row."
            )
        values = flat.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
        out.append(values.reshape(len(chunk), *shape))
        offset += len(chunk)
    if not out:
        return np.empty((0, *shape), dtype=dtype)
    return out[0] if len(out) == 1 else np.concatenate(out, axis=0)


def check_keep_columns(source: Source, columns: Sequence[str] | None) -> None:
    """SourceError unless every column of ``output.keep_columns`` exists in the source
    (a Parquet, Arrow or Ray Data source; the others have no columns). That none
    collides with an output column is the config's check."""
    if not columns:
        return
    if not hasattr(source, "read_columns"):
        raise SourceError(f"output.keep_columns={list(columns)}: a {source.kind} source has no columns to keep; "
                          f"keep_columns needs data.kind parquet, arrow or ray_dataset.")
    missing = [c for c in columns if c not in source.columns]
    where = source.files[0][0] if isinstance(source, _FileTable) else "the dataset"
    if missing:
        raise SourceError(f"output.keep_columns: {', '.join(map(repr, missing))} not in the data "
                          f"({where!r}); its columns are: {', '.join(source.columns)}.")


def read_columns(source: Source, columns: Sequence[str], start: int, stop: int) -> dict[str, pa.Array]:
    """The source's columns ``columns`` for rows [start, stop), as Arrow arrays in row
    order (for ``output.keep_columns``; pass them to ``arrow.to_record_batch(...,
    extra_columns=...)``). Only Parquet and Arrow sources have columns."""
    check_keep_columns(source, columns)
    return source.read_columns(list(columns), start, stop)


def _first_null(col: pa.Array) -> tuple[str, int] | None:
    """("a null row" | "a null value", its row) of the first null in a tensor column chunk.

    Null counts come from the array's metadata (or its validity bitmap); only a chunk that
    has nulls is searched.
    """
    arr = col.storage if isinstance(col, pa.ExtensionArray) else col
    per = 1  # values per row at this nesting level
    while True:
        if arr.null_count:
            index = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
            return ("a null row" if per == 1 else "a null value", index // per)
        if not pa.types.is_fixed_size_list(arr.type):
            return None
        per *= arr.type.list_size
        arr = arr.flatten()  # honours the offset; no null rows at this level, so rows stay aligned


def _refuse_nulls(col: pa.Array | pa.ChunkedArray, path: str, column: str, base: int,
                  stop: int | None = None) -> None:
    """SourceError naming the first null row or value of ``col`` (whose row 0 is the
    source's row ``base``) among its first ``stop`` rows; see NOTE [tensor columns hold no nulls]."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    offset = 0
    for chunk in chunks:
        if stop is not None and offset >= stop:
            return
        if stop is not None and offset + len(chunk) > stop:
            chunk = chunk.slice(0, stop - offset)
        found = _first_null(chunk)
        if found is not None:
            what, row = found
            raise SourceError(
                f"data: column {column!r} of {path!r} has {what} at row {base + offset + row}; a tensor "
                f"cannot hold nulls. Drop or fill those rows (pyarrow.compute.drop_null / fill_null) and "
                f"write the file again, or set data.rows below that row."
            )
        offset += len(chunk)


def _type_name(typ: pa.DataType) -> str:
    return "fixed_shape_tensor" if isinstance(typ, pa.FixedShapeTensorType) else str(typ)

