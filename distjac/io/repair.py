"""``distjac repair``: rebuild an output's manifest from its parts' own metadata.

Parts carry their spec hash, shard, row range, the job's rows and input rank, and a
content checksum (NOTE [content checksums] in :mod:`distjac.io.sink`), which is enough to
rebuild the plan and what readers need when ``_manifest.json`` is lost or damaged.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from .. import arrow as arrow_mod
from ..errors import ResultError
from . import fs as _fs
from .sink import (
    _PART_RE,
    MANIFEST_NAME,
    META_PREFIX,
    SUCCESS_NAME,
    Manifest,
    PartInfo,
    _listdir,
    _load_valid,
    _open_part,
    _set_aside,
    check_part,
    file_checksum,
    lock_output,
    part_name,
)

__all__ = ["repair_output"]


def repair_output(path: str | os.PathLike) -> dict[str, Any]:
    """Rebuild or check an output's manifest from its parts (``distjac repair``).

    With a valid manifest: recorded parts are re-hashed (a bad one is dropped from the
    manifest, its file kept) and unrecorded parts adopted once their content checksum
    verifies. Without one (missing, unreadable or inconsistent; an unreadable one is set
    aside under a hidden name): the plan and what readers need are read from the parts'
    own metadata, and each part is checked against its content checksum. Nothing is
    deleted; ``_SUCCESS`` is removed unless every shard is recorded.

    Returns:
        A summary: path, spec_hash, rebuilt, shards, finished, missing, rejected
        ([{file, problem}]), set_aside, complete.

    Raises:
        ResultError: no part verifies (nothing to rebuild from), the parts disagree on
            their spec or plan, or the directory cannot be written.
        OutputLockedError: a run holds the output.
    """
    out_dir = _fs.normalize(os.fspath(path))
    if not _fs.isdir(out_dir):
        what = "a file, not an output directory" if _fs.isfile(out_dir) else "not a directory"
        raise ResultError(f"distjac repair: {out_dir!r} is {what}; give a job's output.path.")
    with lock_output(out_dir) as lock:
        if lock.read_only or not _fs.writable(out_dir):
            raise ResultError(f"distjac repair: {out_dir!r} cannot be written.")
        manifest, problem = _load_valid(out_dir)
        rejected: list[tuple[str, str]] = []
        set_aside = None
        if manifest is not None:
            for shard, why in manifest.verify(full=True, drop=False):
                rejected.append((manifest.parts.pop(shard).file, why))
            adopted_bad: list[tuple[int, str]] = []
            manifest.adopt_orphans(delete=False, rejected=adopted_bad)
            rejected += [(part_name(s, manifest.format), why) for s, why in adopted_bad]
        else:
            manifest, rejected = _rebuild_from_parts(out_dir)
            if _fs.exists(os.path.join(out_dir, MANIFEST_NAME)):
                set_aside = _set_aside(out_dir, MANIFEST_NAME)
        manifest.save()
        if not manifest.complete:
            manifest.clear_success()
        elif not _fs.exists(os.path.join(out_dir, SUCCESS_NAME)):
            manifest.mark_success()
        return {"path": out_dir, "spec_hash": manifest.spec_hash, "rebuilt": problem is not None,
                "previous_problem": problem, "shards": len(manifest.shards), "finished": len(manifest.parts),
                "missing": manifest.missing(), "rejected": [{"file": f, "problem": w} for f, w in rejected],
                "set_aside": set_aside, "complete": manifest.complete}


def _rebuild_from_parts(out_dir: str) -> tuple[Manifest, list[tuple[str, str]]]:
    """A manifest from the parts' metadata (plan, shapes, dtype, columns) and their checks."""
    good: dict[str, tuple[dict[str, str], pa.Schema]] = {}
    rejected: list[tuple[str, str]] = []
    for name in sorted(_listdir(out_dir)):
        m = _PART_RE.match(name)
        if not m:
            continue
        meta, problem = check_part(os.path.join(out_dir, name), m.group(2))
        if problem is None and meta.get(META_PREFIX + "rows") is None:
            problem = "carries no plan (written by an older distjac)"
        if problem is not None:
            rejected.append((name, problem))
        else:
            good[name] = (meta, _part_schema(os.path.join(out_dir, name), m.group(2)))
    if not good:
        raise ResultError(f"distjac repair: no part in {out_dir!r} verifies against its content checksum, so "
                          f"there is nothing to rebuild the manifest from"
                          f"{' (' + '; '.join(f'{f}: {w}' for f, w in rejected[:3]) + ')' if rejected else ''}.")
    specs = {(meta[META_PREFIX + "spec_hash"], meta[META_PREFIX + "rows"]) for meta, _ in good.values()}
    exts = {os.path.splitext(n)[1] for n in good}
    if len(specs) > 1 or len(exts) > 1:
        raise ResultError(f"distjac repair: the parts of {out_dir!r} belong to several jobs or formats "
                          f"(spec hash and rows {sorted(specs)}, {sorted(exts)}); move the ones you do not "
                          f"want away first.")
    name0, (meta0, schema0) = next(iter(good.items()))
    fmt = _PART_RE.match(name0).group(2)
    spec_hash, rows = meta0[META_PREFIX + "spec_hash"], int(meta0[META_PREFIX + "rows"])
    i, a, b = (int(meta0[META_PREFIX + k]) for k in ("shard", "start", "stop"))
    shard_size = a // i if i else b - a
    shards = [(s, min(rows, s + shard_size)) for s in range(0, rows, shard_size)] if shard_size else []
    manifest = Manifest(out_dir=out_dir, spec_hash=spec_hash, shards=shards,
                        info=_info_from_part(schema0, meta0, fmt, rows, shard_size))
    for name, (meta, _) in good.items():
        shard = int(meta[META_PREFIX + "shard"])
        rng = (int(meta[META_PREFIX + "start"]), int(meta[META_PREFIX + "stop"]))
        if shard >= len(shards) or shards[shard] != rng or name != part_name(shard, fmt):
            rejected.append((name, f"its shard {shard} [{rng[0]}, {rng[1]}) is not in the parts' plan"))
            continue
        digest, size = file_checksum(os.path.join(out_dir, name))
        manifest.parts[shard] = PartInfo(shard, name, *rng, rng[1] - rng[0], digest, size, worker="repaired")
    return manifest, rejected


def _part_schema(path: str, fmt: str) -> pa.Schema:
    return _open_part(path, fmt).schema


def _info_from_part(schema: pa.Schema, meta: dict[str, str], fmt: str, rows: int, shard_size: int) -> dict:
    """What readers need, as far as a part's schema and metadata tell (``repaired``: the
    rest, such as the spec, is restored by the next run of the job)."""
    values = [n for n in schema.names if n != arrow_mod.ROW_COLUMN]
    info: dict[str, Any] = {"rows": rows, "format": fmt, "shard_size": shard_size, "repaired": True,
                            "columns": [arrow_mod.ROW_COLUMN, *values]}
    tinfo = arrow_mod.tensor_info(schema.field(values[0]).type) if values else None
    if values == [arrow_mod.JACOBIAN_COLUMN] and tinfo is not None:
        shape, dtype = tinfo
        in_ndim = int(meta.get(META_PREFIX + "in_ndim", 0))
        info.update(reduce=None, dtype=np.dtype(dtype).name, output_shape=list(shape[: len(shape) - in_ndim]),
                    input_shape=list(shape[len(shape) - in_ndim:]))
    else:
        info.update(reduce=values, dtype=np.dtype(schema.field(values[0]).type.to_pandas_dtype()).name,
                    output_shape=None, input_shape=None)
    return info
