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
is found on resume and adopted only if its content checksum verifies (see NOTE [content
checksums]), rather than recomputed. Resume also re-hashes every recorded part: a
truncated or corrupted file is deleted and its shard computed again.

NOTE [content checksums]
A part cannot hold the hash of its own bytes, so the worker hashes its *content* (the
part's provenance keys -- spec hash, shard, rows -- then every column's name, type and
values, :func:`distjac.arrow.content_sha256`) and stores it in the schema metadata
(``distjac.content_sha256``) of the file it writes. Adoption and ``distjac repair`` decode
the part and recompute it: a flipped or zeroed byte that leaves the file readable is
caught. Recorded parts are checked faster, against the file SHA-256 in the manifest.

NOTE [what distjac may delete]
distjac deletes only files that it can show it wrote: the files a *valid* manifest of the
directory records (the manifest itself, ``_SUCCESS``, ``_report.json``, the part names of
its shard plan and their temporaries), and, without a valid manifest, parts whose schema
carries a verified content checksum and markers (``_SUCCESS``, ``_report.json``) whose JSON
names distjac. Anything else that a reader would see (names not starting with ``.``) is
foreign: the run is refused with the list, and nothing is deleted -- ``--overwrite``
included. A manifest that cannot be read is never deleted: ``repair`` (or a resume that
rebuilds the manifest from the parts) renames it to a hidden ``._manifest.json.invalid-*``.

NOTE [the output lock]
One run at a time: :func:`lock_output` takes an exclusive ``flock`` on ``.distjac.lock`` in
the directory and writes its holder (``host pid time``) into it; a second run is refused
with an :class:`~distjac.errors.OutputLockedError` naming the holder. The kernel drops the
lock when its process dies (SIGKILL included), so a dead holder's lock is taken over with
no clean-up. On NFS, Linux maps ``flock`` to the server's byte-range locks (NFSv4 leases:
a dead client's lock expires after the lease, ~90 s); where the file system has no locks
at all (ENOLCK) the lock is advisory only: the holder recorded in the file is honoured
while that process is alive on this host, and taken over otherwise. A directory that
cannot be written at all (read-only mount) takes no lock: it can be read, and a run of a
finished job verifies it and writes nothing.
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
from . import fs as _fs
from . import lock as _lock
from .lock import LOCK_NAME, OutputLock

__all__ = [
    "MANIFEST_NAME",
    "REPORT_NAME",
    "SUCCESS_NAME",
    "Manifest",
    "OutputLock",
    "PartInfo",
    "check_part",
    "clean_temporaries",
    "file_checksum",
    "inspect_output",
    "iter_result",
    "lock_output",
    "open_output",
    "output_is_complete",
    "part_name",
    "read_result",
    "repair_output",
    "resolve_output_path",
    "write_part",
    "write_report",
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

CONTENT_KEY = META_PREFIX + "content_sha256"

# part_name() writes at least five digits; pyarrow's own ``part-0.parquet`` never matches.
_PART_RE = re.compile(r"^part-(\d{5,})\.(arrow|parquet)$")
_TEMP_RE = re.compile(r"^\.(part-\d{5,}\.(?:arrow|parquet)|_manifest\.json|_SUCCESS|_report\.json)"
                      r"\.tmp-\d+-[0-9a-f]+$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
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
    and row range, whatever ``metadata`` adds (the spec hash, the job's rows), and the
    content checksum over both and the values (NOTE [content checksums]).

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
    # NOTE [content checksums]: over the provenance keys and the values, before serializing.
    digest_content = arrow_mod.content_sha256(batch, _provenance(arrow_mod.schema_metadata(batch.schema)))
    batch = arrow_mod.with_metadata(batch, {CONTENT_KEY: digest_content})
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
    """Write ``data`` (bytes-like) to ``path`` whole or not at all: locally through an
    fsynced temporary and a rename, on an object store in one upload under the final
    name (NOTE [object stores] in :mod:`distjac.io.fs`)."""
    _fs.write_atomic(path, data, fsync_dir=_fsync_dir)


def write_report(out_dir: str, report: dict[str, Any]) -> None:
    """Write ``_report.json`` into an output (a local directory or a URI), atomically."""
    _atomic_write(os.path.join(out_dir, REPORT_NAME), json.dumps(report, indent=1).encode())


def resolve_output_path(path: str | os.PathLike) -> str:
    """An output path as the job records it: a local path made absolute, a URI
    (``s3://bucket/prefix``) as it is. Refuses (ConfigError) a URI that lost its ``//``,
    which would otherwise become a local folder named ``s3:``."""
    return _fs.normalize(path)


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
    with (open(path, "rb") if not _fs.is_remote(path) else _fs.open_input(path)) as f:
        while chunk := f.read(_HASH_BLOCK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def clean_temporaries(out_dir: str, manifest: Manifest | None = None) -> list[str]:
    """Delete temporaries left by writers that died; returns their names.

    Only distjac's temporaries (``.<name>.tmp-<pid>-<hex>``) of the names ``manifest``
    records (its parts and metadata files; every part name when ``manifest`` is None).
    """
    planned = manifest.planned_names() if manifest is not None else None
    removed = []
    for name in _listdir(out_dir):
        m = _TEMP_RE.match(name)
        if m and (planned is None or m.group(1) in planned or not _PART_RE.match(m.group(1))):
            _fs.unlink(os.path.join(out_dir, name))
            removed.append(name)
    return sorted(removed)


def _listdir(path: str) -> list[str]:
    return _fs.listdir(path)


def _open_part(path: str, fmt: str) -> pa.RecordBatch | pa.Table:
    """A part's contents: memory-mapped (zero-copy) for Arrow IPC, decoded for Parquet."""
    if fmt == "arrow":
        import pyarrow.ipc as ipc

        reader = ipc.open_file(_fs.read_buffer(path))
        if reader.num_record_batches == 1:
            return reader.get_batch(0)
        return reader.read_all()
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(_fs.read_buffer(path)))


def _provenance(meta: dict[str, str]) -> bytes:
    """The ``distjac.*`` keys of a part's metadata (but its checksum), as the checksum's header."""
    keys = {k: v for k, v in meta.items() if k.startswith(META_PREFIX) and k != CONTENT_KEY}
    return json.dumps(keys, sort_keys=True).encode()


def _part_metadata(path: str, fmt: str) -> dict[str, str] | None:
    """A part file's schema metadata, read from its footer only; None if unreadable."""
    try:
        if fmt == "arrow":
            import pyarrow.ipc as ipc

            with _fs.open_input(path) as f:
                schema = ipc.open_file(f).schema
        else:
            import pyarrow.parquet as pq

            with _fs.open_input(path) as f:
                schema = pq.read_schema(f)
        return arrow_mod.schema_metadata(schema)
    except (pa.ArrowException, OSError, ValueError, UnicodeDecodeError):
        return None


def _is_distjac_part(path: str, fmt: str) -> bool:
    """Whether a file's schema carries distjac's keys and a content checksum (NOTE [what distjac may delete])."""
    meta = _part_metadata(path, fmt)
    return meta is not None and CONTENT_KEY in meta and META_PREFIX + "spec_hash" in meta


def check_part(
    path: str, fmt: str, *, shard: int | None = None, start: int | None = None, stop: int | None = None,
    spec_hash: str | None = None,
) -> tuple[dict[str, str] | None, str | None]:
    """(schema metadata, problem) of a part file: problem is None when the part is whole.

    Decodes the part and checks what is given (spec hash, shard, row range), its row ids
    against its range, nulls, and its content checksum (NOTE [content checksums]).
    """
    try:
        data = _open_part(path, fmt)
        meta = arrow_mod.schema_metadata(data.schema)
    except (pa.ArrowException, OSError, ValueError, UnicodeDecodeError) as e:
        return None, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    try:
        if CONTENT_KEY not in meta:
            return meta, "carries no content checksum (not written by this distjac)"
        if spec_hash is not None and meta.get(META_PREFIX + "spec_hash") != spec_hash:
            return meta, f"written under another spec hash ({meta.get(META_PREFIX + 'spec_hash')})"
        if shard is not None and meta.get(META_PREFIX + "shard") != str(shard):
            return meta, f"it is shard {meta.get(META_PREFIX + 'shard')}'s part, not shard {shard}'s"
        a, b = int(meta[META_PREFIX + "start"]), int(meta[META_PREFIX + "stop"])
        if start is not None and (a, b) != (start, stop):
            return meta, f"its row range [{a}, {b}) differs from the plan's [{start}, {stop})"
        rows = data.column(arrow_mod.ROW_COLUMN).to_numpy()
        if len(rows) != b - a or not np.array_equal(rows, np.arange(a, b, dtype=np.int64)):
            return meta, "its row ids differ from its row range"
        data.validate(full=True)
        for name in data.schema.names:
            r = arrow_mod.first_null_row(data.column(name))
            if r is not None:
                return meta, f"row {a + r} holds a null in column {name!r}"
        if arrow_mod.content_sha256(data, _provenance(meta)) != meta[CONTENT_KEY]:
            return meta, "its content does not match its checksum (corrupted)"
    except (pa.ArrowException, OSError, KeyError, ValueError, TypeError) as e:
        return meta, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return meta, None


def _plain_name(name: Any) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name
            and "/" not in name and "\\" not in name and not os.path.isabs(name))


def _part_path(out_dir: str, name: str) -> str:
    """The path of a part named in a manifest; refuses anything but a plain part name."""
    if not (_plain_name(name) and _PART_RE.match(name)):
        raise ResultError(f"{out_dir!r}: the part name {name!r} is not a plain part name inside the output "
                          f"directory; run `distjac repair {out_dir}` to rebuild the manifest from the parts.")
    return os.path.join(out_dir, name)


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
        """Read and validate ``out_dir/_manifest.json``; ResultError if absent, unreadable
        or inconsistent (the message names the entry)."""
        path = os.path.join(out_dir, MANIFEST_NAME)
        try:
            d = json.loads(_fs.read_bytes(path).decode("utf-8"))
        except FileNotFoundError:
            raise ResultError(
                f"{out_dir!r} is not a distjac output: it has no {MANIFEST_NAME}. Give the directory "
                f"that a job's output.path names (or run `distjac repair {out_dir}` if its manifest was lost)."
            ) from None
        except (OSError, ValueError) as e:
            raise ResultError(f"{path!r} is not a readable distjac manifest ({type(e).__name__}: {e}); run "
                              f"`distjac repair {out_dir}` to rebuild it from the parts.") from None
        return cls.from_dict(out_dir, d)

    @classmethod
    def from_dict(cls, out_dir: str, d: Any) -> Manifest:
        """A manifest from its JSON form, validated: shards are contiguous ranges from 0 of
        one size (the last may be smaller), counts agree, every part is its shard's plain
        part name with its shard's range."""
        path = os.path.join(out_dir, MANIFEST_NAME)

        def bad(entry: str, why: str) -> ResultError:
            return ResultError(f"{path!r}: {entry} {why}; the manifest was edited or damaged. Run `distjac "
                               f"repair {out_dir}` to rebuild it from the parts.")

        if not isinstance(d, dict):
            raise bad("the manifest", "is not a JSON object")
        if not isinstance(d.get("version", MANIFEST_VERSION), int) or d.get("version", 1) > MANIFEST_VERSION:
            raise bad("version", f"= {d.get('version')!r} is not one this distjac reads (<= {MANIFEST_VERSION})")
        if not isinstance(d.get("spec_hash"), str) or not d["spec_hash"]:
            raise bad("spec_hash", "is missing")
        info = d.get("info", {})
        if not isinstance(info, dict):
            raise bad("info", "is not an object")
        fmt = info.get("format", "arrow")
        if fmt not in PART_EXTENSIONS:
            raise bad("info.format", f"= {fmt!r} is not one of {sorted(PART_EXTENSIONS)}")
        raw = d.get("shards")
        if not isinstance(raw, list):
            raise bad("shards", "is missing")
        shards: list[tuple[int, int]] = []
        for i, sh in enumerate(raw):
            if not (isinstance(sh, list) and len(sh) == 2 and all(type(v) is int for v in sh)):
                raise bad(f"shards[{i}]", f"= {sh!r} is not a [start, stop) pair of integers")
            a, b = sh
            expected = shards[-1][1] if shards else 0
            if a != expected or b <= a:
                raise bad(f"shards[{i}]", f"= [{a}, {b}) does not continue the plan at row {expected}")
            shards.append((a, b))
        size = shards[0][1] if shards else 0
        for i, (a, b) in enumerate(shards):
            if (b - a != size and i < len(shards) - 1) or b - a > size:
                raise bad(f"shards[{i}]", f"= [{a}, {b}) is not of the plan's shard size {size}")
        for key, want in (("num_shards", len(shards)), ("rows", shards[-1][1] if shards else 0)):
            got = d.get(key) if key == "num_shards" else info.get(key)
            if got is not None and got != want:
                raise bad(key if key == "num_shards" else "info.rows", f"= {got!r} but the shards list gives {want}")
        raw_parts = d.get("parts", {})
        if not isinstance(raw_parts, dict):
            raise bad("parts", "is not an object")
        if d.get("finished") is not None and d["finished"] != len(raw_parts):
            raise bad("finished", f"= {d['finished']!r} but {len(raw_parts)} parts are recorded")
        parts: dict[int, PartInfo] = {}
        for key, v in raw_parts.items():
            entry = f"parts[{key!r}]"
            if not (isinstance(key, str) and key.isdigit() and int(key) < len(shards)):
                raise bad(entry, f"is not a shard of the plan (0..{len(shards) - 1})")
            if not isinstance(v, dict):
                raise bad(entry, "is not an object")
            shard = int(key)
            name = v.get("file")
            if not _plain_name(name):
                raise bad(f"{entry}.file", f"= {name!r} is not a plain file name inside the output directory")
            if name != part_name(shard, fmt):
                raise bad(f"{entry}.file", f"= {name!r} is not shard {shard}'s part ({part_name(shard, fmt)})")
            try:
                part = PartInfo.from_dict(v)
            except TypeError as e:
                raise bad(entry, f"lacks a field ({e})") from None
            a, b = shards[shard]
            if (part.shard, part.start, part.stop, part.rows) != (shard, a, b, b - a):
                raise bad(entry, f"covers shard {part.shard} [{part.start}, {part.stop}) ({part.rows} rows) but "
                          f"shard {shard} of the plan is [{a}, {b})")
            if not (isinstance(part.sha256, str) and _SHA_RE.match(part.sha256)):
                raise bad(f"{entry}.sha256", "is not a SHA-256")
            if type(part.bytes) is not int or part.bytes < 0:
                raise bad(f"{entry}.bytes", f"= {part.bytes!r} is not a size")
            parts[shard] = part
        return cls(out_dir=out_dir, spec_hash=d["spec_hash"], shards=shards, info=info, parts=parts,
                   created=d.get("created", 0.0))

    def check_plan(self, shards: Sequence[tuple[int, int]], info: dict[str, Any]) -> None:
        """Refuse (ResultError) a manifest whose plan does not cover the job's rows."""
        rows = info.get("rows", shards[-1][1] if shards else 0)
        if self.num_rows != rows:
            raise ResultError(
                f"{os.path.join(self.out_dir, MANIFEST_NAME)!r}: the manifest's plan covers {self.num_rows} rows "
                f"but the job has {rows}; the manifest was edited or damaged. Run `distjac repair "
                f"{self.out_dir}`, or pass --overwrite to start again."
            )

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
        if part.file != part_name(part.shard, self.format):
            raise ValueError(f"Manifest.record: part {part.file!r} is not shard {part.shard}'s part name "
                             f"({part_name(part.shard, self.format)}).")
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
            path = _part_path(self.out_dir, part.file)
            try:
                size = _fs.getsize(path)
            except FileNotFoundError:
                bad.append((shard, f"{part.file} is missing"))
                continue
            if size != part.bytes:
                bad.append((shard, f"{part.file} has {size} bytes, {part.bytes} were written (truncated?)"))
            elif full and file_checksum(path)[0] != part.sha256:
                bad.append((shard, f"{part.file} does not match its SHA-256 (corrupted)"))
        if drop and bad:
            for shard, _ in bad:
                _unlink(_part_path(self.out_dir, self.parts.pop(shard).file))
            self.clear_success()
            self.save()
        return bad

    def planned_names(self) -> set[str]:
        """The part names of the plan: the files this manifest records as distjac's."""
        return {part_name(i, self.format) for i in range(len(self.shards))}

    def adopt_orphans(self, *, delete: bool = True, rejected: list[tuple[int, str]] | None = None) -> list[int]:
        """Record part files of unfinished shards whose content checksum verifies.

        A part finished after the manifest's last save (the driver was killed) is checked
        (NOTE [content checksums]) and adopted; one that fails is deleted (``delete``: it
        has a planned part name, so it is distjac's) and listed in ``rejected`` as
        (shard, reason). Returns the adopted shards.
        """
        fmt = self.format
        adopted = []
        present = set(_listdir(self.out_dir))
        for shard in self.missing():
            name = part_name(shard, fmt)
            if name not in present:
                continue
            path = os.path.join(self.out_dir, name)
            start, stop = self.shards[shard]
            _, problem = check_part(path, fmt, shard=shard, start=start, stop=stop, spec_hash=self.spec_hash)
            if problem is not None:
                if rejected is not None:
                    rejected.append((shard, f"unrecorded {name}: {problem}"))
                if delete:
                    _unlink(path)
                continue
            digest, size = file_checksum(path)
            self.parts[shard] = PartInfo(shard, name, start, stop, stop - start, digest, size, worker="adopted")
            adopted.append(shard)
        if adopted:
            self.save()
        return adopted

    def mark_success(self) -> None:
        """Write ``_SUCCESS``: a JSON marker naming distjac, the spec hash and the plan."""
        from .. import __version__

        marker = {"distjac": __version__, "spec_hash": self.spec_hash, "rows": self.num_rows,
                  "shards": len(self.shards)}
        _atomic_write(os.path.join(self.out_dir, SUCCESS_NAME), json.dumps(marker).encode())

    def clear_success(self) -> None:
        _unlink(os.path.join(self.out_dir, SUCCESS_NAME))


def _unlink(path: str) -> None:
    _fs.unlink(path)


# -----------------------------------------------------------------------------------------
# the lock (NOTE [the output lock])
# -----------------------------------------------------------------------------------------


def lock_output(out_dir: str | os.PathLike) -> OutputLock:
    """Take the output directory's exclusive lock for one run (NOTE [the output lock]).

    A directory holding files distjac did not write is refused first, before anything
    (the lock file included) is written into it.

    Raises:
        OutputExistsError: the directory holds files distjac did not write.
        OutputLockedError: another run holds it; the message names its host and pid.
    """
    out_dir = resolve_output_path(out_dir)
    if _fs.isdir(out_dir):
        foreign = [n for n, k in _classify(out_dir, _listdir(out_dir), _load_valid(out_dir)[0]).items()
                   if k == "foreign"]
        if foreign:
            raise _foreign_error(out_dir, sorted(foreign))
    if _fs.is_remote(out_dir):
        _check_bucket(out_dir)
        return _lock.acquire_object_store(out_dir)
    return _lock.acquire(out_dir)


def _check_bucket(out_dir: str) -> None:
    """OutputExistsError naming the bucket when an object store's bucket does not exist."""
    try:
        _fs.makedirs(out_dir)
    except FileNotFoundError as e:
        raise OutputExistsError(f"output.path {out_dir!r}: {e}") from None


# -----------------------------------------------------------------------------------------
# what is ours (NOTE [what distjac may delete]), opening an output
# -----------------------------------------------------------------------------------------


def _marker_is_ours(path: str) -> bool:
    try:
        d = json.loads(_fs.read_bytes(path).decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "distjac" in d


def _load_valid(out_dir: str) -> tuple[Manifest | None, str | None]:
    """(manifest, None) if the directory holds a valid manifest, else (None, why not)."""
    if not _fs.exists(os.path.join(out_dir, MANIFEST_NAME)):
        return None, f"it has no {MANIFEST_NAME}"
    try:
        return Manifest.load(out_dir), None
    except ResultError as e:
        return None, str(e)


def _classify(out_dir: str, entries: Sequence[str], manifest: Manifest | None) -> dict[str, str]:
    """Each entry's kind: manifest, marker, part, temp, lock, invalid_manifest, foreign or
    hidden (not distjac's, skipped by readers, never touched)."""
    kinds: dict[str, str] = {}
    planned = manifest.planned_names() if manifest is not None else set()
    metadata_names = {MANIFEST_NAME, SUCCESS_NAME, REPORT_NAME}
    for name in entries:
        path = os.path.join(out_dir, name)
        m = _PART_RE.match(name)
        if name == LOCK_NAME:
            kind = "lock"
        elif manifest is not None and name == MANIFEST_NAME:
            kind = "manifest"
        elif manifest is not None and name in metadata_names:
            kind = "marker"
        elif name in planned:
            kind = "part"
        elif m and _fs.isfile(path) and _is_distjac_part(path, m.group(2)):
            kind = "part"
        elif manifest is not None and (t := _TEMP_RE.match(name)) and (t.group(1) in planned or
                                                                        t.group(1) in metadata_names):
            kind = "temp"
        elif manifest is None and name in (SUCCESS_NAME, REPORT_NAME) and _marker_is_ours(path):
            kind = "marker"
        elif name == MANIFEST_NAME:
            kind = "invalid_manifest"  # decided below
        else:
            kind = "hidden" if name.startswith(".") else "foreign"
        kinds[name] = kind
    if kinds.get(MANIFEST_NAME) == "invalid_manifest" and not any(k in ("part", "marker") for k in kinds.values()):
        kinds[MANIFEST_NAME] = "foreign"  # nothing else here shows that distjac wrote it
    return kinds


def _set_aside(out_dir: str, name: str) -> str:
    """Rename an unreadable manifest to a hidden name (never delete it); returns the new name."""
    new = f".{name}.invalid-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
    _fs.replace(os.path.join(out_dir, name), os.path.join(out_dir, new))
    return new


def _clear(out_dir: str, kinds: dict[str, str]) -> None:
    """Delete distjac's files (by ``kinds``); an unreadable manifest is set aside."""
    for name, kind in kinds.items():
        if kind in ("part", "temp", "marker"):
            _unlink(os.path.join(out_dir, name))
        elif kind == "invalid_manifest":
            _set_aside(out_dir, name)
    if kinds.get(MANIFEST_NAME) == "manifest":  # last: until it goes, the rest stays provably ours
        _unlink(os.path.join(out_dir, MANIFEST_NAME))


def _foreign_error(out_dir: str, foreign: Sequence[str]) -> OutputExistsError:
    shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
    return OutputExistsError(
        f"output.path {out_dir!r} holds files distjac did not write ({shown}); distjac deletes only files "
        f"that its manifest or markers record, --overwrite included. Move them away or choose another "
        f"output.path."
    )


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
    dropped) and complete unrecorded parts adopted once their content checksum verifies;
    the manifest's own shard plan is kept (shard_size may have changed; finished parts
    keep their ranges). Without a valid manifest, one is rebuilt from the parts of this
    spec (the invalid one is set aside, never deleted). A finished output in a directory
    that cannot be written is verified and returned with nothing written.

    The caller holds the directory's lock (:func:`lock_output`; ``run_job`` does).

    Returns:
        (manifest, events) with events ``resumed`` (bool), ``rebuilt`` (bool),
        ``read_only`` (bool), ``cleaned`` (temporaries), ``dropped`` ([(shard, reason)]),
        ``adopted`` (shards), ``reused`` (finished shards), ``set_aside`` (a renamed manifest).

    Raises:
        OutputExistsError: the directory holds files distjac did not write (``overwrite``
            included: it deletes only distjac's files), or another spec's results (unless
            ``overwrite``), or ``resume`` is off, or it cannot be written and the output
            is not finished.
        ResultError: the manifest disagrees with the job's plan.
    """
    out_dir = resolve_output_path(out_dir)
    if _fs.isfile(out_dir):
        raise OutputExistsError(f"output.path {out_dir!r} is a file, not a directory; choose another output.path.")
    if not _fs.isdir(out_dir):
        _fs.makedirs(out_dir)
    read_only = not _fs.writable(out_dir)
    entries = _listdir(out_dir)
    old, problem = _load_valid(out_dir)
    kinds = _classify(out_dir, entries, old)
    foreign = sorted(n for n, k in kinds.items() if k == "foreign")
    if foreign:
        raise _foreign_error(out_dir, foreign)
    if kinds.get(MANIFEST_NAME) == "invalid_manifest" and not overwrite:
        # An edited or damaged manifest is not guessed around: repair sets it aside and rebuilds.
        raise ResultError(f"{problem} (or pass --overwrite to start again)")
    events: dict[str, Any] = {"resumed": False, "rebuilt": False, "read_only": read_only, "cleaned": [],
                              "dropped": [], "adopted": [], "reused": 0, "set_aside": None}
    ours = [n for n, k in kinds.items() if k not in ("lock", "hidden")]
    if old is not None:
        other = old.spec_hash if old.spec_hash != spec_hash else None
    else:
        hashes = {(_part_metadata(os.path.join(out_dir, n), _PART_RE.match(n).group(2)) or {})
                  .get(META_PREFIX + "spec_hash") for n, k in kinds.items() if k == "part"}
        other = None if (spec_hash in hashes or not hashes) else sorted(h for h in hashes if h)[0]
    if ours and not overwrite:
        if other is not None:
            raise OutputExistsError(
                f"output.path {out_dir!r} holds results of a different job spec (hash {other}, this "
                f"job's is {spec_hash}); pass --overwrite (output.overwrite: true) to replace them, or choose "
                f"another output.path."
            )
        if not resume:
            raise OutputExistsError(
                f"output.path {out_dir!r} already holds this job's output and output.resume is false; "
                f"set output.resume: true to continue it, or pass --overwrite to start again."
            )
    if old is not None and not overwrite:
        old.check_plan(shards, info)
        return _resume(old, info, events, read_only)
    if read_only:
        raise OutputExistsError(
            f"output.path {out_dir!r} cannot be written and holds no finished output of this job; make it "
            f"writable or choose another output.path."
        )
    if ours and overwrite:
        _clear(out_dir, kinds)
        kinds = {}
    manifest = Manifest(out_dir=out_dir, spec_hash=spec_hash, shards=[tuple(s) for s in shards], info=info)
    if any(k == "part" for k in kinds.values()):
        # No manifest, parts of this spec: rebuild it (a lost manifest is not a lost output).
        events["rebuilt"] = events["resumed"] = True
        planned = manifest.planned_names()
        for name, kind in kinds.items():
            if kind == "part" and name not in planned:
                _unlink(os.path.join(out_dir, name))  # a distjac part of another plan (its schema says so)
        events["adopted"] = manifest.adopt_orphans(rejected=events["dropped"])
    manifest.save()
    if not manifest.complete:
        manifest.clear_success()  # a marker left by a run whose manifest was lost
    if not _fs.is_remote(out_dir):
        _fsync_dir(os.path.dirname(out_dir))
    return manifest, events


def _resume(manifest: Manifest, info: dict[str, Any], events: dict[str, Any], read_only: bool):
    events["resumed"] = True
    if read_only:
        # Nothing may be written: a finished, verified output is returned as it is.
        bad = manifest.verify(full=True, drop=False)
        if bad or not manifest.complete:
            why = "; ".join(w for _, w in bad[:3]) or f"{len(manifest.missing())} shard(s) unfinished"
            raise OutputExistsError(
                f"output.path {manifest.out_dir!r} cannot be written and its output is not finished ({why}); "
                f"make it writable to resume the job."
            )
        events["reused"] = len(manifest.parts)
        return manifest, events
    events["cleaned"] = clean_temporaries(manifest.out_dir, manifest)
    events["dropped"] = manifest.verify(full=True, drop=True)
    events["adopted"] = manifest.adopt_orphans(rejected=events["dropped"])
    events["reused"] = len(manifest.parts) - len(events["adopted"])
    planned = manifest.planned_names()
    for name in _listdir(manifest.out_dir):
        m = _PART_RE.match(name)
        if m and name not in planned and _is_distjac_part(os.path.join(manifest.out_dir, name), m.group(2)):
            _unlink(os.path.join(manifest.out_dir, name))  # a distjac part of another plan
    if manifest.info.get("repaired"):
        manifest.info = info  # the job knows what `distjac repair` had to infer
        manifest.save()
    if not manifest.complete:
        manifest.clear_success()
    return manifest, events


# -----------------------------------------------------------------------------------------
# reading results
# -----------------------------------------------------------------------------------------


def _value_columns(manifest: Manifest) -> list[str]:
    """The columns of values: one per reduction or estimate column, else the Jacobian."""
    cols = manifest.info.get("reduce") or manifest.info.get("estimate_columns")
    return list(cols) if cols else [arrow_mod.JACOBIAN_COLUMN]


def _by_column(manifest: Manifest) -> bool:
    """Whether a result reads as a dict of columns (reductions, estimates), not one array."""
    return _value_columns(manifest) != [arrow_mod.JACOBIAN_COLUMN]


def _part_values(manifest: Manifest, shard: int, columns: Sequence[str], verify: bool = True) -> dict[str, np.ndarray]:
    """A recorded part's columns as numpy, after checking its size (always) and SHA-256
    (``verify``). One memory mapping serves the check and the (zero-copy) read."""
    part = manifest.parts[shard]
    path = _part_path(manifest.out_dir, part.file)
    again = (f"run `distjac inspect {manifest.out_dir}` to check the output, and the job again to "
             f"recompute the part" + ("" if not verify else " (or read_result(..., verify=False) to read it as it is)"))
    try:
        buf = _fs.read_buffer(path)  # local: memory-mapped, the mapping stays alive with the buffer
    except (pa.ArrowException, OSError) as e:
        raise ResultError(f"read_result: part {part.file} cannot be read ({e}); {again}.") from None
    if buf.size != part.bytes:
        raise ResultError(f"read_result: part {part.file} has {buf.size} bytes, {part.bytes} were written "
                          f"(truncated?); {again}.")
    if verify and hashlib.sha256(memoryview(buf)).hexdigest() != part.sha256:
        raise ResultError(f"read_result: part {part.file} does not match its SHA-256 (corrupted); {again}.")
    try:
        if manifest.format == "arrow":
            import pyarrow.ipc as ipc

            reader = ipc.open_file(buf)
            data = reader.get_batch(0) if reader.num_record_batches == 1 else reader.read_all()
        else:
            import pyarrow.parquet as pq

            data = pq.read_table(pa.BufferReader(buf))
    except (pa.ArrowException, OSError) as e:
        raise ResultError(f"read_result: part {part.file} cannot be read ({e}); {again}.") from None
    out = {}
    for name in columns:
        col = data.column(name)
        bad = arrow_mod.first_null_row(col)
        if bad is not None:
            raise ResultError(
                f"read_result: part {part.file}: row {part.start + bad} (row {bad} of the part) holds a null in "
                f"column {name!r}; distjac never writes nulls, so the part was not written by this job: {again}."
            )
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


def read_result(
    path: str | os.PathLike, rows: Any = None, *, verify: bool = True, as_tensor: bool = False,
) -> Any:
    """Read a job's output as numpy (or torch, ``as_tensor=True``).

    Args:
        path: the output directory (a job's ``output.path``): a local path or a URI
            (``s3://bucket/prefix``, read through pyarrow's file systems).
        rows: None for all rows, or a slice, range or 1-D integer sequence of row indices
            (rows of the source, in the order given).
        verify: check the SHA-256 of every part read against the manifest (sizes are
            always checked). This reads each selected part once more (from the page
            cache that the read then uses); ``verify=False`` skips it for speed.
        as_tensor: return torch tensors (CPU) instead of numpy arrays: zero-copy where
            the array is already distjac's own copy, copied where it is a read-only view
            of a memory-mapped part (torch tensors are writable; this is what spares
            ``torch.from_numpy``'s "not writable" warning).

    Returns:
        For a Jacobian dataset, an array (len(rows), *out, *in) in the stored dtype. When
        the selection lies in one Arrow IPC part it is a read-only, zero-copy view of the
        memory-mapped file; otherwise the selected rows are copied into one new array (for
        outputs larger than memory, read by ``rows`` or part by part with
        :func:`iter_result`). For a reduced dataset, a dict ``{reduction: (len(rows),)}``
        in the job's reduction order.

    Raises:
        ResultError: ``path`` is not a distjac output, its manifest is inconsistent, a
            selected row's shard is not finished (the message names the shards; running
            the job again computes them), or a part read is truncated, corrupted or holds
            nulls (the message names it).
    """
    result = _read_result(path, rows, verify)
    return _as_tensors(result) if as_tensor else result


def _as_tensors(result: np.ndarray | dict[str, np.ndarray]) -> Any:
    import torch

    def one(a: np.ndarray):
        return torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else np.array(a, order="C"))

    return {k: one(v) for k, v in result.items()} if isinstance(result, dict) else one(result)


def _read_result(path: str | os.PathLike, rows: Any, verify: bool) -> np.ndarray | dict[str, np.ndarray]:
    manifest = Manifest.load(_result_path(path))
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
        values = _part_values(manifest, needed[0], columns, verify)
        views = {c: v[sel[0] - s0 : sel[1] - s0] for c, v in values.items()}
        return views if _by_column(manifest) else views[columns[0]]
    out = {c: np.empty((count, *shapes[c][0]), dtype=shapes[c][1]) for c in columns}
    if isinstance(sel, tuple):
        for s in needed:
            a, b = manifest.shards[s]
            lo, hi = max(a, sel[0]), min(b, sel[1])
            values = _part_values(manifest, s, columns, verify)
            for c in columns:
                out[c][lo - sel[0] : hi - sel[0]] = values[c][lo - a : hi - a]
    else:
        for s in needed:
            where = np.nonzero(owner == s)[0]
            values = _part_values(manifest, s, columns, verify)
            for c in columns:
                out[c][where] = values[c][sel[where] - manifest.shards[s][0]]
    return out if _by_column(manifest) else out[columns[0]]


def output_is_complete(out_dir: str | os.PathLike, spec_hash: str) -> bool:
    """Whether ``out_dir`` holds a finished output of ``spec_hash``: a valid manifest of
    that hash recording every shard, and ``_SUCCESS``. Reads the manifest only (no part is
    hashed): a run that finds this true can verify and report without starting Ray."""
    try:
        path = resolve_output_path(out_dir)
        if not _fs.exists(os.path.join(path, SUCCESS_NAME)):
            return False
        m = Manifest.load(path)
    except (ResultError, OSError, ValueError):
        return False
    return m.spec_hash == spec_hash and m.complete


def _result_path(path: str | os.PathLike) -> str:
    """An output to read: a URI as it is, a local path made absolute; ResultError for a
    file (not an output directory)."""
    p = _fs.normalize(os.fspath(path))
    if not _fs.is_remote(p):
        if os.path.isfile(p):
            raise ResultError(f"{os.fspath(path)!r} is a file, not a distjac output: give the output directory "
                              f"(a job's output.path), e.g. {os.path.dirname(p) or '.'!r}.")
    return p


def _column_shapes(manifest: Manifest, columns: Sequence[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    dtype = np.dtype(manifest.info.get("dtype", "float32"))
    if _by_column(manifest):
        return {c: ((), dtype) for c in columns}
    shape = tuple(manifest.info.get("output_shape", ())) + tuple(manifest.info.get("input_shape", ()))
    if manifest.info.get("structure") == "diagonal":  # the diagonal alone: (*in) per example
        shape = tuple(manifest.info.get("input_shape", ()))
    return {columns[0]: (shape, dtype)}


def iter_result(
    path: str | os.PathLike, *, verify: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray | dict[str, np.ndarray]]]:
    """(row ids, values) of every finished part in row order, memory-mapped for Arrow IPC:
    a way through outputs larger than memory. Each part is verified as by read_result."""
    manifest = Manifest.load(_result_path(path))
    columns = _value_columns(manifest)
    for shard in sorted(manifest.parts):
        values = _part_values(manifest, shard, [arrow_mod.ROW_COLUMN, *columns], verify)
        row_ids = values.pop(arrow_mod.ROW_COLUMN)
        yield row_ids, (values if _by_column(manifest) else values[columns[0]])


def inspect_output(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """A summary of an output: rows, shapes, columns, finished and missing shards, and
    (with ``verify``) every part's SHA-256 checked. Changes nothing on disk."""
    out_dir = _result_path(path)
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
        "success_marker": _fs.exists(os.path.join(out_dir, SUCCESS_NAME)),
    }


from .repair import repair_output  # noqa: E402 - repair builds on this module's internals
