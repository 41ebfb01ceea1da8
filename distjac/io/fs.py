"""Paths and URIs: local files through ``os``, everything else through pyarrow's file systems.

A job's input and output paths are local paths (relative to the working directory,
``~`` expanded), ``file://`` URIs (local), or URIs that ``pyarrow.fs.FileSystem.from_uri``
opens (``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``), with fsspec as a fallback
for other schemes when it is installed. Local paths keep every local guarantee (fsync,
rename, ``flock``); see NOTE [object stores] for what changes on an object store.

NOTE [object stores]
An object store has no rename and no directories: an object appears, whole, when its
upload completes (a single PUT, or the completion of a multipart upload, which pyarrow
uses for large objects; an interrupted upload leaves no object). distjac therefore
writes each object in one ``open_output_stream`` under its final name only once its
bytes are complete (no temporary, no rename): a reader or a resume sees a part, the
manifest, ``_report.json`` or ``_SUCCESS`` whole or not at all. A "directory" is a key
prefix: nothing is created for it, but the bucket must exist. The output lock is an
object (see :func:`distjac.io.lock.acquire_object_store`): best-effort, not a mutex.

NOTE [S3 credentials and endpoint]
Credentials come the standard way, from the AWS SDK's chain: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws``, instance
and container roles. The endpoint of an S3-compatible store (MinIO, Ceph, moto) comes from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``; Arrow reads these itself since Arrow 14/15,
but not from ``~/.aws/config`` and not in every path (apache/arrow#44119, #49643), so
distjac reads them and passes ``endpoint_override`` explicitly; the region comes from
``AWS_REGION`` / ``AWS_DEFAULT_REGION`` when set. A URI's own query (``s3://b/k?
endpoint_override=...&region=...``) wins: such a URI goes to ``FileSystem.from_uri`` as it is.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
from typing import Any

import pyarrow as pa

__all__ = [
    "exists",
    "file_system",
    "getsize",
    "is_remote",
    "is_uri",
    "isdir",
    "isfile",
    "listdir",
    "makedirs",
    "normalize",
    "open_input",
    "read_buffer",
    "read_bytes",
    "replace",
    "unlink",
    "writable",
    "write_atomic",
]

_URI_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+)://(?P<rest>.*)$")
# A local path whose components include "s3:" or "gs:": a URI that lost a slash
# (``s3:/bucket``) or was made absolute (``/work/s3:/bucket``). Never written to.
_MANGLED_RE = re.compile(r"(^|/)(s3|s3a|gs|gcs|hdfs|abfs|abfss|az|http|https|file):(/|$)")


def is_uri(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URI (``scheme://...``; a drive letter is not a scheme)."""
    return bool(_URI_RE.match(os.fspath(path)))


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` goes through a pyarrow file system (a URI other than ``file://``)."""
    m = _URI_RE.match(os.fspath(path))
    return bool(m) and m.group("scheme").lower() != "file"


def _check_not_mangled(path: str) -> None:
    if _MANGLED_RE.search(path):
        from ..errors import ConfigError

        raise ConfigError(
            f"path {path!r} looks like a URI that lost its '//' (e.g. 's3:/bucket' for 's3://bucket'); distjac "
            f"never writes to a local folder named like a URI scheme. Write the URI in full, e.g. s3://bucket/prefix."
        )


def normalize(path: str | os.PathLike) -> str:
    """A local path made absolute (``~`` expanded, ``file://`` removed); a URI as it is,
    without a trailing slash. Refuses a URI that lost its ``//`` (``s3:/bucket``)."""
    p = os.fspath(path)
    if p[:6].lower() == "file:/" and p[:7].lower() != "file://":
        p = p[5:]  # file:/abs/path, the one-slash form of a local file URI
    m = _URI_RE.match(p)
    if m and m.group("scheme").lower() == "file":
        p = "/" + m.group("rest").lstrip("/") if not m.group("rest").startswith("/") else m.group("rest")
    elif m:
        return p.rstrip("/") if len(m.group("rest").rstrip("/")) else p
    _check_not_mangled(p)
    return os.path.abspath(os.path.expanduser(p))


# -----------------------------------------------------------------------------------------
# file systems
# -----------------------------------------------------------------------------------------


def _s3_options() -> dict[str, Any]:
    """NOTE [S3 credentials and endpoint]: endpoint and region from the environment."""
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_override"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["region"] = region
    return opts


@functools.lru_cache(maxsize=16)
def _cached_fs(scheme: str, netloc: str, query: str, env: tuple) -> Any:
    import pyarrow.fs as pafs

    if scheme in ("s3", "s3a") and not query:
        return pafs.S3FileSystem(**dict(env))
    uri = f"{scheme}://{netloc}" + (f"?{query}" if query else "")
    try:
        return pafs.FileSystem.from_uri(uri)[0]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        try:
            import fsspec
        except ImportError:
            raise ValueError(f"{uri}: pyarrow has no file system for {scheme!r} ({e}) and fsspec is not "
                             f"installed") from None
        handler = pafs.FSSpecHandler(fsspec.filesystem(scheme))
        return pafs.PyFileSystem(handler)


def file_system(path: str) -> tuple[Any, str]:
    """(pyarrow FileSystem, its path) for a URI; (LocalFileSystem, absolute path) otherwise.

    Raises:
        ValueError: no file system opens the URI's scheme.
    """
    import pyarrow.fs as pafs

    if not is_remote(path):
        return pafs.LocalFileSystem(), normalize(path)
    m = _URI_RE.match(path)
    scheme, rest = m.group("scheme").lower(), m.group("rest")
    rest, _, query = rest.partition("?")
    netloc, _, key = rest.partition("/")
    env = tuple(sorted(_s3_options().items())) if scheme in ("s3", "s3a") else ()
    fs = _cached_fs(scheme, netloc, query, env)
    if isinstance(fs, pafs.S3FileSystem) or scheme in ("s3", "s3a", "gs", "gcs"):
        return fs, f"{netloc}/{key}".rstrip("/")
    if query:
        return pafs.FileSystem.from_uri(path)
    return fs, f"{netloc}/{key}".rstrip("/") if netloc else "/" + key


def _info(path: str):
    fs, p = file_system(path)
    return fs, p, fs.get_file_info(p)


# -----------------------------------------------------------------------------------------
# operations: os for local paths, the file system for URIs
# -----------------------------------------------------------------------------------------


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    import pyarrow.fs as pafs

    return _info(path)[2].type != pafs.FileType.NotFound


def isdir(path: str) -> bool:
    if not is_remote(path):
        return os.path.isdir(path)
    import pyarrow.fs as pafs

    fs, p, info = _info(path)
    if info.type == pafs.FileType.Directory:
        return True
    if info.type == pafs.FileType.NotFound:
        return False
    return False


def isfile(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(path)
    import pyarrow.fs as pafs

    return _info(path)[2].type == pafs.FileType.File


def getsize(path: str) -> int:
    """The file's size; FileNotFoundError if it does not exist."""
    if not is_remote(path):
        return os.path.getsize(path)
    import pyarrow.fs as pafs

    info = _info(path)[2]
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(path)
    return int(info.size)


def listdir(path: str) -> list[str]:
    """Names in a directory (a prefix's direct children); [] if it does not exist."""
    if not is_remote(path):
        try:
            return os.listdir(path)
        except FileNotFoundError:
            return []
    import pyarrow.fs as pafs

    fs, p = file_system(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=False))
    except FileNotFoundError:
        return []
    return [i.base_name for i in infos if i.base_name]


def makedirs(path: str) -> None:
    """Create a local directory (and parents); on an object store check that the bucket
    exists (a prefix needs no creating, NOTE [object stores])."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)
        return
    import pyarrow.fs as pafs

    fs, p = file_system(path)
    bucket = p.split("/", 1)[0]
    if isinstance(fs, pafs.S3FileSystem) and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{path}: the bucket {bucket!r} does not exist (or these credentials cannot see "
                                f"it); create it first (aws s3 mb s3://{bucket}).")
    if not isinstance(fs, pafs.S3FileSystem) and not path.startswith(("gs://", "gcs://")):
        fs.create_dir(p, recursive=True)


def writable(path: str) -> bool:
    """Whether distjac may write into the directory (an object store: assumed so)."""
    return os.access(path, os.W_OK) if not is_remote(path) else True


def read_bytes(path: str) -> bytes:
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = file_system(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_buffer(path: str) -> pa.Buffer:
    """The whole file as a pyarrow Buffer: memory-mapped for a local file (zero-copy),
    read into memory from a URI. FileNotFoundError if it does not exist."""
    if not is_remote(path):
        with pa.memory_map(path, "r") as f:
            return f.read_buffer()  # the mapping stays alive with the buffer
    fs, p = file_system(path)
    with fs.open_input_file(p) as f:
        return f.read_buffer()


def open_input(path: str):
    """A random-access file: a memory map locally, the file system's reader for a URI
    (reads only what is asked: a Parquet footer, an IPC footer and batches)."""
    if not is_remote(path):
        return pa.memory_map(path, "r")
    fs, p = file_system(path)
    return fs.open_input_file(p)


def unlink(path: str) -> None:
    """Delete a file; nothing if it does not exist."""
    if not is_remote(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    fs, p = file_system(path)
    try:
        fs.delete_file(p)
    except FileNotFoundError:
        pass


def replace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` (locally atomic; an object store: copy, then delete)."""
    if not is_remote(src):
        os.replace(src, dst)
        return
    fs, p = file_system(src)
    fs.copy_file(p, file_system(dst)[1])
    fs.delete_file(p)


def write_atomic(path: str, data: Any, *, fsync_dir: Any = None) -> None:
    """Write ``data`` (bytes-like) to ``path`` so that it is whole or absent.

    Local: an fsynced temporary ``.<name>.tmp-<pid>-<hex>`` renamed over ``path``, then
    the directory fsynced (``fsync_dir(directory)`` when given). URI: one
    ``open_output_stream`` under the final name, closed only when all bytes are in (NOTE
    [object stores]).
    """
    if is_remote(path):
        fs, p = file_system(path)
        # All bytes are in memory before the stream opens; an object of less than the
        # multipart size (5 MiB+) is one PUT at close(). A larger one that fails midway may
        # leave a short object (pyarrow's stream completes what it uploaded when it is
        # destroyed): the manifest's size and SHA-256, and the content checksum of an
        # unrecorded part, refuse it on resume (NOTE [object stores]).
        with fs.open_output_stream(p) as stream:
            stream.write(data)
        return
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
    if fsync_dir is not None:
        fsync_dir(directory)
