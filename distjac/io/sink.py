"""The output dataset: part files, the manifest, resume, and reading results back.

An output directory holds::

    part-00000.arrow      one file per shard (or .parquet): columns ``row`` (int64) and
    part-00001.arrow      ``jacobian`` (arrow.fixed_shape_tensor), or one float column per
    ...                   reduction; written by the worker that computed the shard
    _manifest.json        spec hash, shard plan, and every finished part's file, row range,
                          size and SHA-256
    _report.json          the last run's report (rows, shards, times, per-worker figures)
    _SUCCESS              present once every shard is finished and recorded

Names starting with ``_`` or ``.`` are what Arrow, Spark and Hive readers skip, so
``pyarrow.dataset.dataset(path, format="arrow")`` (or ``"parquet"``), pandas, polars and
DuckDB read the directory as it is (``read_parquet('path/*.parquet')``,
``scan_ipc('path/*.arrow')``). Parquet parts keep the tensor type through the Arrow
schema stored in their metadata.

NOTE [a part is finished or absent]
A worker serializes its part in memory, hashes the bytes, writes them to a temporary
file (``.part-00003.arrow.tmp-<pid>-<random>``), fsyncs it, renames it to its final name
and fsyncs the directory. A part file under its final name is therefore complete; a
crash leaves at most a temporary, which the next run deletes. The driver records each
finished part in the manifest (itself replaced atomically, at most once per
``MANIFEST_SAVE_INTERVAL_S`` and at the end); a part that finished after the last save
is found on resume, checked (spec hash and rows in its schema metadata, SHA-256 of its
bytes) and adopted rather than recomputed. Resume also re-hashes every recorded part:
a truncated or corrupted file is deleted and its shard computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from .. import arrow as arrow_mod
from ..errors import OutputExistsError, ResultError

__all__ = [
    "MANIFEST_NAME",
    "REPORT_NAME",
    "SUCCESS_NAME",
    "Manifest",
    "PartInfo",
    "clean_temporaries",
    "file_checksum",
    "inspect_output",
    "iter_result",
    "open_output",
    "part_name",
    "read_result",
    "write_part",
]

MANIFEST_NAME = "_manifest.json"
SUCCESS_NAME = "_SUCCESS"
REPORT_NAME = "_report.json"
PART_EXTENSIONS = {"arrow": ".arrow", "parquet": ".parquet"}
MANIFEST_VERSION = 1
# The driver rewrites the manifest at most this often while shards finish: a rewrite is
# O(shards), and parts finished since the last save are adopted on resume anyway.
MANIFEST_SAVE_INTERVAL_S = 1.0
# Parquet compression of parts: Jacobians are dense floats that compress little, and
# snappy costs little; readers everywhere support it.
PARQUET_COMPRESSION = "snappy"
# Schema metadata keys a part carries, so that a part file is self-describing.
META_PREFIX = "distjac."

_PART_RE = re.compile(r"^part-(\d+)\.(arrow|parquet)$")
_TEMP_RE = re.compile(r"^\.(part-\d+\.(arrow|parquet)|_manifest\.json|_SUCCESS|_report\.json)\.tmp-")
_HASH_BLOCK = 8 << 20


# -----------------------------------------------------------------------------------------
# parts
# -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartInfo:
    """A finished part: what the worker wrote and the driver records in the manifest.

    Attributes:
        shard: the shard's index in the plan.
        file: the part's file name inside the output directory.
        start, stop: the shard's row range [start, stop).
        rows: rows in the file (stop - start).
        sha256: SHA-256 of the file's bytes (hex).
        bytes: the file's size.
        seconds: time the worker spent on the shard (read, compute, write).
        worker: "host:pid" of the process that wrote it.
    """

    shard: int
    file: str
    start: int
    stop: int
    rows: int
    sha256: str
    bytes: int
    seconds: float = 0.0
    worker: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PartInfo:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def part_name(shard_index: int, format: str = "arrow") -> str:
    """The file name of a shard's part, e.g. ``part-00003.arrow``."""
    return f"part-{shard_index:05d}{PART_EXTENSIONS[_check_format(format)]}"


def _check_format(fmt: str) -> str:
    if fmt not in PART_EXTENSIONS:
        raise ValueError(f"output format {fmt!r} is not valid; use one of {', '.join(map(repr, PART_EXTENSIONS))}.")
    return fmt


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def write_part(
    out_dir: str,
    shard_index: int,
    start: int,
    stop: int,
    record_batch: pa.RecordBatch,
    format: str = "arrow",
    *,
    metadata: dict[str, str] | None = None,
) -> PartInfo:
    """Write one shard's record batch as ``part-NNNNN.<format>``, atomically.

    See NOTE [a part is finished or absent]. The schema metadata gains the shard's index
    and row range (and whatever ``metadata`` adds, e.g. the spec hash).

    Returns:
        The part's PartInfo (file name, rows, SHA-256, bytes); ``seconds`` is left 0.
    """
    _check_format(format)
    if record_batch.num_rows != stop - start:
        raise ValueError(
            f"write_part: shard {shard_index} covers rows [{start}, {stop}) but the batch has "
            f"{record_batch.num_rows} rows."
        )
    meta = {f"{META_PREFIX}shard": str(shard_index), f"{META_PREFIX}start": str(start),
            f"{META_PREFIX}stop": str(stop)}
    meta.update({k if k.startswith(META_PREFIX) else META_PREFIX + k: v for k, v in (metadata or {}).items()})
    batch = arrow_mod.with_metadata(record_batch, meta)
    data = _serialize(batch, format)
    digest = hashlib.sha256(memoryview(data)).hexdigest()
    name = part_name(shard_index, format)
    _atomic_write(os.path.join(out_dir, name), data)
    return PartInfo(shard=shard_index, file=name, start=start, stop=stop, rows=stop - start,
                    sha256=digest, bytes=data.size, worker=worker_id())


def _serialize(batch: pa.RecordBatch, fmt: str) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    if fmt == "arrow":
        import pyarrow.ipc as ipc

        with ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
    else:
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_batches([batch]), sink, compression=PARQUET_COMPRESSION,
                       use_dictionary=False, store_schema=True)
    return sink.getvalue()


def _atomic_write(path: str, data) -> None:
    """Write ``data`` (bytes-like) to ``path`` through an fsynced temporary and a rename."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


def file_checksum(path: str) -> tuple[str, int]:
    """(SHA-256 hex, size in bytes) of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_BLOCK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def clean_temporaries(out_dir: str) -> list[str]:
    """Delete temporaries left by writers that died; returns their names."""
    removed = []
    for name in _listdir(out_dir):
        if _TEMP_RE.match(name):
            try:
                os.unlink(os.path.join(out_dir, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return sorted(removed)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _open_part(path: str, fmt: str) -> pa.RecordBatch | pa.Table:
    """A part's contents: memory-mapped (zero-copy) for Arrow IPC, decoded for Parquet."""
    if fmt == "arrow":
        import pyarrow.ipc as ipc

        reader = ipc.open_file(pa.memory_map(path, "r"))
        if reader.num_record_batches == 1:
            return reader.get_batch(0)
        return reader.read_all()
    import pyarrow.parquet as pq

    return pq.read_table(path, memory_map=True)


def _part_problem(path: str, shard: int, start: int, stop: int, fmt: str, spec_hash: str | None) -> str | None:
    """Why the part file at ``path`` is not shard ``shard``'s finished part, or None."""
    try:
        data = _open_part(path, fmt)
        meta = arrow_mod.schema_metadata(data.schema)
        if spec_hash is not None and meta.get(META_PREFIX + "spec_hash") != spec_hash:
            return "written under another spec hash"
        if (meta.get(META_PREFIX + "start"), meta.get(META_PREFIX + "stop")) != (str(start), str(stop)):
            return "its row range differs from the plan's"
        rows = data.column(arrow_mod.ROW_COLUMN).to_numpy()
        if len(rows) != stop - start or (len(rows) and (rows[0] != start or rows[-1] != stop - 1)):
            return "its row ids differ from the plan's"
        data.validate(full=True)
    except (pa.ArrowException, OSError, KeyError, ValueError) as e:
        return f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


# -----------------------------------------------------------------------------------------
# the manifest
# -----------------------------------------------------------------------------------------


@dataclass
class Manifest:
    """The driver's record of an output: spec hash, plan, finished parts.

    Attributes:
        out_dir: the output directory.
        spec_hash: the job's ``JobSpec.spec_hash()``.
        shards: the plan's row ranges [(start, stop), ...], shard i = shards[i].
        info: what readers need: rows, input_shape, output_shape, format, dtype, reduce,
            columns, and the normalized spec.
        parts: shard index -> PartInfo of every finished shard.
    """

    out_dir: str
    spec_hash: str
    shards: list[tuple[int, int]]
    info: dict[str, Any] = field(default_factory=dict)
    parts: dict[int, PartInfo] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    _last_save: float = field(default=0.0, repr=False)
    _dirty: bool = field(default=False, repr=False)

    # -------------------------------------------------------------- persistence

    @classmethod
    def load(cls, out_dir: str) -> Manifest:
        """Read ``out_dir/_manifest.json``; ResultError if absent or unreadable."""
        path = os.path.join(out_dir, MANIFEST_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            return cls(
                out_dir=out_dir,
                spec_hash=d["spec_hash"],
                shards=[(int(a), int(b)) for a, b in d["shards"]],
                info=d.get("info", {}),
                parts={int(k): PartInfo.from_dict(v) for k, v in d.get("parts", {}).items()},
                created=d.get("created", 0.0),
            )
        except FileNotFoundError:
            raise ResultError(
                f"{out_dir!r} is not a distjac output: it has no {MANIFEST_NAME}. Give the directory "
                f"that a job's output.path names."
            ) from None
        except (ValueError, KeyError, TypeError) as e:
            raise ResultError(f"{path!r} is not a readable distjac manifest ({type(e).__name__}: {e}).") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "spec_hash": self.spec_hash,
            "created": self.created,
            "updated": time.time(),
            "num_shards": len(self.shards),
            "finished": len(self.parts),
            "shards": [list(s) for s in self.shards],
            "info": self.info,
            "parts": {str(k): self.parts[k].to_dict() for k in sorted(self.parts)},
        }

    def save(self) -> None:
        """Replace the manifest file atomically."""
        text = json.dumps(self.to_dict(), indent=1, sort_keys=False)
        _atomic_write(os.path.join(self.out_dir, MANIFEST_NAME), text.encode())
        self._last_save = time.monotonic()
        self._dirty = False

    def record(self, part: PartInfo, *, save: bool | None = None) -> None:
        """Record a finished part; ``save=None`` saves at most every MANIFEST_SAVE_INTERVAL_S."""
        start, stop = self.shards[part.shard]
        if (part.start, part.stop) != (start, stop):
            raise ValueError(
                f"Manifest.record: part {part.file} covers [{part.start}, {part.stop}) but shard "
                f"{part.shard} of the plan is [{start}, {stop})."
            )
        self.parts[part.shard] = part
        self._dirty = True
        if save or (save is None and time.monotonic() - self._last_save >= MANIFEST_SAVE_INTERVAL_S):
            self.save()

    def flush(self) -> None:
        """Save if anything was recorded since the last save."""
        if self._dirty:
            self.save()

    # -------------------------------------------------------------- state

    @property
    def num_rows(self) -> int:
        return self.shards[-1][1] if self.shards else 0

    @property
    def format(self) -> str:
        return self.info.get("format", "arrow")

    def missing(self) -> list[int]:
        """Indices of the shards not finished."""
        return [i for i in range(len(self.shards)) if i not in self.parts]

    @property
    def complete(self) -> bool:
        return len(self.parts) == len(self.shards)

    def verify(self, *, full: bool = True, drop: bool = True) -> list[tuple[int, str]]:
        """Check every recorded part's file (size, and SHA-256 when ``full``).

        Returns (shard, reason) for each bad part; with ``drop`` they are removed from
        the manifest and their files deleted, so that the next run computes them again.
        """
        bad = []
        for shard, part in sorted(self.parts.items()):
            path = os.path.join(self.out_dir, part.file)
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                bad.append((shard, f"{part.file} is missing"))
                continue
            if size != part.bytes:
                bad.append((shard, f"{part.file} has {size} bytes, {part.bytes} were written (truncated?)"))
            elif full and file_checksum(path)[0] != part.sha256:
                bad.append((shard, f"{part.file} does not match its SHA-256 (corrupted)"))
        if drop and bad:
            for shard, _ in bad:
                _unlink(os.path.join(self.out_dir, self.parts.pop(shard).file))
            self.clear_success()
            self.save()
        return bad

    def adopt_orphans(self) -> list[int]:
        """Record part files of unfinished shards that are complete and belong to this spec.

        A part finished after the manifest's last save (the driver was killed) is
        checked and adopted; a part that does not belong is deleted. Returns the
        adopted shards.
        """
        fmt = self.format
        by_name = {part_name(i, fmt): i for i in self.missing()}
        adopted = []
        for name in sorted(_listdir(self.out_dir)):
            m = _PART_RE.match(name)
            if not m:
                continue
            path = os.path.join(self.out_dir, name)
            shard = by_name.get(name)
            if shard is None:
                if int(m.group(1)) in self.parts:
                    continue  # a recorded part
                _unlink(path)  # a part of another plan or format
                continue
            start, stop = self.shards[shard]
            if _part_problem(path, shard, start, stop, fmt, self.spec_hash) is not None:
                _unlink(path)
                continue
            digest, size = file_checksum(path)
            self.parts[shard] = PartInfo(shard, name, start, stop, stop - start, digest, size, worker="adopted")
            adopted.append(shard)
        if adopted:
            self.save()
        return adopted

    def mark_success(self) -> None:
        _atomic_write(os.path.join(self.out_dir, SUCCESS_NAME), b"")

    def clear_success(self) -> None:
        _unlink(os.path.join(self.out_dir, SUCCESS_NAME))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _is_ours(name: str) -> bool:
    return bool(_PART_RE.match(name) or _TEMP_RE.match(name)) or name in (MANIFEST_NAME, SUCCESS_NAME, REPORT_NAME)


def clear_output(out_dir: str) -> None:
    """Delete what distjac wrote in ``out_dir`` (parts, temporaries, manifest, report, marker)."""
    for name in _listdir(out_dir):
        if _is_ours(name):
            _unlink(os.path.join(out_dir, name))


def open_output(
    out_dir: str,
    spec_hash: str,
    shards: Sequence[tuple[int, int]],
    info: dict[str, Any],
    *,
    resume: bool = True,
    overwrite: bool = False,
) -> tuple[Manifest, dict[str, Any]]:
    """Create or resume the output at ``out_dir`` for a job with ``spec_hash``.

    A new (or empty) directory gets a fresh manifest. An existing output of the same spec
    hash is resumed: stale temporaries are deleted, finished parts re-hashed (bad ones
    dropped) and complete unrecorded parts adopted; the manifest's own shard plan is kept
    (shard_size may have changed; finished parts keep their ranges).

    Returns:
        (manifest, events) with events ``resumed`` (bool), ``cleaned`` (temporaries),
        ``dropped`` ([(shard, reason)]), ``adopted`` (shards), ``reused`` (finished shards).

    Raises:
        OutputExistsError: the output holds another spec's results, or ``resume`` is off,
            or the directory holds files distjac did not write (unless ``overwrite``, which
            replaces distjac's files but never deletes others).
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputExistsError(f"output.path {out_dir!r} is a file, not a directory; choose another output.path.")
    os.makedirs(out_dir, exist_ok=True)
    entries = _listdir(out_dir)
    # Hidden files that are not ours (.nfs* left by NFS, .DS_Store) are neither foreign nor touched.
    entries = [n for n in entries if _is_ours(n) or not n.startswith(".")]
    foreign = sorted(n for n in entries if not _is_ours(n))
    events: dict[str, Any] = {"resumed": False, "cleaned": [], "dropped": [], "adopted": [], "reused": 0}
    old = None
    if MANIFEST_NAME in entries:
        try:
            old = Manifest.load(out_dir)
        except ResultError:
            old = None
    if foreign:
        raise OutputExistsError(
            f"output.path {out_dir!r} holds files distjac did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new output.path."
        )
    if entries and not overwrite:
        if old is None:
            raise OutputExistsError(
                f"output.path {out_dir!r} holds parts but no readable {MANIFEST_NAME}; pass --overwrite "
                f"(output.overwrite: true) to replace them, or choose another output.path."
            )
        if old.spec_hash != spec_hash:
            raise OutputExistsError(
                f"output.path {out_dir!r} holds results of a different job spec (hash {old.spec_hash}, this "
                f"job's is {spec_hash}); pass --overwrite (output.overwrite: true) to replace them, or choose "
                f"another output.path."
            )
        if not resume:
            raise OutputExistsError(
                f"output.path {out_dir!r} already holds this job's output and output.resume is false; "
                f"set output.resume: true to continue it, or pass --overwrite to start again."
            )
    if entries and (overwrite or old is None):
        clear_output(out_dir)
        old = None
    if old is None:
        manifest = Manifest(out_dir=out_dir, spec_hash=spec_hash, shards=[tuple(s) for s in shards], info=info)
        manifest.save()
        _fsync_dir(os.path.dirname(out_dir))
        return manifest, events
    events["resumed"] = True
    manifest = old
    events["cleaned"] = clean_temporaries(out_dir)
    events["dropped"] = manifest.verify(full=True, drop=True)
    events["adopted"] = manifest.adopt_orphans()
    events["reused"] = len(manifest.parts) - len(events["adopted"])
    if not manifest.complete:
        manifest.clear_success()
    return manifest, events


# -----------------------------------------------------------------------------------------
# reading results
# -----------------------------------------------------------------------------------------


def _value_columns(manifest: Manifest) -> list[str]:
    reduce = manifest.info.get("reduce")
    return list(reduce) if reduce else [arrow_mod.JACOBIAN_COLUMN]


def _part_values(manifest: Manifest, shard: int, columns: Sequence[str]) -> dict[str, np.ndarray]:
    part = manifest.parts[shard]
    path = os.path.join(manifest.out_dir, part.file)
    try:
        data = _open_part(path, manifest.format)
    except (pa.ArrowException, OSError) as e:
        raise ResultError(
            f"read_result: part {part.file} cannot be read ({e}); run `distjac inspect "
            f"{manifest.out_dir}` to check the output, and the job again to recompute it."
        ) from None
    out = {}
    for name in columns:
        col = data.column(name)
        out[name] = arrow_mod.column_values(col) if arrow_mod.tensor_info(col.type) is not None else col.to_numpy()
    return out


def _selection(rows: Any, n: int) -> tuple[int, int] | np.ndarray:
    """(start, stop) for a contiguous selection, else an int64 index array."""
    if rows is None:
        return 0, n
    if isinstance(rows, slice):
        rows = range(*rows.indices(n))
    if isinstance(rows, range) and rows.step == 1:
        if rows.start < 0 or rows.stop > n:
            raise IndexError(f"read_result: rows {rows} are outside [0, {n}).")
        return rows.start, max(rows.start, rows.stop)
    idx = np.asarray(rows)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise TypeError("read_result: rows must be None, a slice, a range or a 1-D sequence of integers.")
    idx = idx.astype(np.int64)
    idx = np.where(idx < 0, idx + n, idx)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"read_result: row indices must lie in [-{n}, {n}).")
    return idx


def read_result(path: str | os.PathLike, rows: Any = None) -> np.ndarray | dict[str, np.ndarray]:
    """Read a job's output as numpy.

    Args:
        path: the output directory (a job's ``output.path``).
        rows: None for all rows, or a slice, range or 1-D integer sequence of row indices
            (rows of the source, in the order given).

    Returns:
        For a Jacobian dataset, an array (len(rows), *out, *in) in the stored dtype. When
        the selection lies in one Arrow IPC part it is a read-only, zero-copy view of the
        memory-mapped file; otherwise the selected rows are copied into one new array (for
        outputs larger than memory, read by ``rows`` or part by part with
        :func:`iter_result`). For a reduced dataset, a dict ``{reduction: (len(rows),)}``
        in the job's reduction order.

    Raises:
        ResultError: ``path`` is not a distjac output, or a selected row's shard is not
            finished (the message names the shards; running the job again computes them).
    """
    manifest = Manifest.load(os.fspath(path))
    columns = _value_columns(manifest)
    n = manifest.num_rows
    sel = _selection(rows, n)
    starts = np.array([s for s, _ in manifest.shards], dtype=np.int64)
    if isinstance(sel, tuple):
        lo, hi = sel
        first, last = (np.searchsorted(starts, [lo, hi - 1], side="right") - 1).tolist() if hi > lo else (0, -1)
        needed = list(range(first, last + 1))
    else:
        owner = np.searchsorted(starts, sel, side="right") - 1
        needed = sorted(set(owner.tolist()))
    missing = [s for s in needed if s not in manifest.parts]
    if missing:
        shown = ", ".join(f"{s} [{manifest.shards[s][0]}, {manifest.shards[s][1]})" for s in missing[:5])
        raise ResultError(
            f"read_result({os.fspath(path)!r}): {len(missing)} shard(s) holding the requested rows are not "
            f"finished: {shown}{', ...' if len(missing) > 5 else ''}. Run the job again to compute them."
        )
    shapes = _column_shapes(manifest, columns)
    count = (sel[1] - sel[0]) if isinstance(sel, tuple) else len(sel)
    if isinstance(sel, tuple) and len(needed) == 1:
        s0 = manifest.shards[needed[0]][0]
        values = _part_values(manifest, needed[0], columns)
        views = {c: v[sel[0] - s0 : sel[1] - s0] for c, v in values.items()}
        return views if manifest.info.get("reduce") else views[columns[0]]
    out = {c: np.empty((count, *shapes[c][0]), dtype=shapes[c][1]) for c in columns}
    if isinstance(sel, tuple):
        for s in needed:
            a, b = manifest.shards[s]
            lo, hi = max(a, sel[0]), min(b, sel[1])
            values = _part_values(manifest, s, columns)
            for c in columns:
                out[c][lo - sel[0] : hi - sel[0]] = values[c][lo - a : hi - a]
    else:
        for s in needed:
            where = np.nonzero(owner == s)[0]
            values = _part_values(manifest, s, columns)
            for c in columns:
                out[c][where] = values[c][sel[where] - manifest.shards[s][0]]
    return out if manifest.info.get("reduce") else out[columns[0]]


def _column_shapes(manifest: Manifest, columns: Sequence[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    dtype = np.dtype(manifest.info.get("dtype", "float32"))
    if manifest.info.get("reduce"):
        return {c: ((), dtype) for c in columns}
    shape = tuple(manifest.info.get("output_shape", ())) + tuple(manifest.info.get("input_shape", ()))
    return {columns[0]: (shape, dtype)}


def iter_result(path: str | os.PathLike) -> Iterator[tuple[np.ndarray, np.ndarray | dict[str, np.ndarray]]]:
    """(row ids, values) of every finished part in row order, memory-mapped for Arrow IPC:
    a way through outputs larger than memory."""
    manifest = Manifest.load(os.fspath(path))
    columns = _value_columns(manifest)
    for shard in sorted(manifest.parts):
        values = _part_values(manifest, shard, [arrow_mod.ROW_COLUMN, *columns])
        row_ids = values.pop(arrow_mod.ROW_COLUMN)
        yield row_ids, (values if manifest.info.get("reduce") else values[columns[0]])


def inspect_output(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """A summary of an output: rows, shapes, columns, finished and missing shards, and
    (with ``verify``) every part's SHA-256 checked. Changes nothing on disk."""
    out_dir = os.path.abspath(os.fspath(path))
    manifest = Manifest.load(out_dir)
    bad = manifest.verify(full=verify, drop=False)
    missing = manifest.missing()
    info = manifest.info
    return {
        "path": out_dir,
        "spec_hash": manifest.spec_hash,
        "format": manifest.format,
        "rows": manifest.num_rows,
        "input_shape": info.get("input_shape"),
        "output_shape": info.get("output_shape"),
        "reduce": info.get("reduce"),
        "columns": info.get("columns"),
        "dtype": info.get("dtype"),
        "shards": len(manifest.shards),
        "finished": len(manifest.parts),
        "missing": missing,
        "bad": [{"shard": s, "problem": why} for s, why in bad],
        "checked": "sha256" if verify else "size",
        "bytes": sum(p.bytes for p in manifest.parts.values()),
        "complete": manifest.complete and not bad,
        "success_marker": os.path.exists(os.path.join(out_dir, SUCCESS_NAME)),
    }
