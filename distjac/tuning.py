"""The on-disk tuning cache: auto's measured choices, kept across runs and machines.

NOTE [the tuning cache]
Like cuDNN's benchmark cache or Triton's autotune cache, a measured choice of
``mode="auto"`` (:func:`distjac.kernels.choose_strategy`) is stored in one JSON file,
``$DISTJAC_CACHE_DIR/tuning.json`` (default ``~/.cache/distjac/tuning.json``), so the
next process (the next run, every Ray worker on a node that shares the folder) reads
it instead of measuring again. An entry is keyed by a hash of:

- a fingerprint of the function: for an ``nn.Module``, the classes of all its
  submodules (and their ``forward`` code), the names, shapes and dtypes of its
  parameters and buffers and the training flags; for a function, its code object
  (bytecode, constants, names; nested code objects too) and the shapes and dtypes of
  tensors it closes over. Values (the weights) are not part of it: they do not change
  which strategy is fastest. A callable with no code to hash is not cached on disk;
- the per-example input shape, the dtype, the device type and name (CPU model or GPU
  name) and torch's intra-op thread count;
- what the choice was asked for: the modes considered, the power-of-two bucket of the
  batch size, whether compiling was asked for, whether the result must be
  differentiable, and ``max_memory``;
- the versions of torch and distjac, and TUNER_REVISION (an upgrade, or a change to how
  auto chooses, measures afresh).

Writes are atomic (a temporary file in the same folder, fsynced, renamed over the old
one); two processes writing at once may lose one of their entries, never the file. A
file that cannot be read or parsed is ignored with a warning (and replaced at the next
write); a distjac-written entry that does not parse is skipped. ``DISTJAC_TUNING_CACHE=0``
turns the cache off (nothing is read or written); :func:`clear` deletes the file.

The same module holds :func:`tune_job`, behind ``distjac tune CONFIG``: it builds a
job's model, reads a few rows of its source, chooses (measuring if needed), stores the
choice here and returns the decision record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
import threading
import time
import types
import warnings
from pathlib import Path
from typing import Any

from .compiled import cache_root

__all__ = ["cache_path", "clear", "enabled", "fingerprint", "lookup", "store", "tune_job"]

FILE_NAME = "tuning.json"
FORMAT = 1
# Entries kept in the file; the oldest go first beyond it.
MAX_ENTRIES = 2048
# Rows of a job's source `tune_job` reads and chooses on, at most (and at most a shard).
TUNE_ROWS = 4096

_lock = threading.Lock()
_warned: set[str] = set()


def enabled() -> bool:
    """False when ``DISTJAC_TUNING_CACHE`` is 0/false/no/off."""
    return os.environ.get("DISTJAC_TUNING_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_path() -> Path:
    """The tuning cache file: ``$DISTJAC_CACHE_DIR/tuning.json`` (default under
    ``~/.cache/distjac``)."""
    return cache_root() / FILE_NAME


def clear() -> bool:
    """Delete the tuning cache file; True if there was one."""
    try:
        cache_path().unlink()
        return True
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------------------
# Fingerprints and keys
# --------------------------------------------------------------------------------------


def _code_parts(code: types.CodeType, out: list, depth: int = 0) -> None:
    out += [code.co_name, code.co_code.hex(), repr(code.co_names), repr(code.co_varnames)]
    for c in code.co_consts:
        if isinstance(c, types.CodeType) and depth < 8:
            _code_parts(c, out, depth + 1)
        else:
            out.append(repr(c)[:200])


def _tensor_desc(t) -> str:
    return f"tensor{tuple(t.shape)}:{t.dtype}"


def _value_parts(v, out: list) -> None:
    import torch

    if isinstance(v, torch.Tensor):
        out.append(_tensor_desc(v))
    elif isinstance(v, torch.nn.Module):  # a model the function closes over
        _module_parts(v, out)
    elif isinstance(v, (int, float, str, bool, type(None))):
        out.append(repr(v)[:200])
    elif isinstance(v, (tuple, list)) and len(v) <= 16:
        for item in v:
            _value_parts(item, out)
    else:
        out.append(type(v).__qualname__)


def _module_parts(module, out: list) -> None:
    for name, m in module.named_modules():
        cls = type(m)
        out.append(f"{name}:{cls.__module__}.{cls.__qualname__}:{m.training}")
        fwd = getattr(cls, "forward", None)
        if isinstance(fwd, types.FunctionType) and cls.__module__.split(".")[0] != "torch":
            _code_parts(fwd.__code__, out)
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if t is not None:
            out.append(f"{name}:{_tensor_desc(t)}")


def fingerprint(fn) -> str | None:
    """A hash of what decides how fast fn's Jacobian runs (NOTE [the tuning cache]), or
    None when fn has nothing stable to hash (a builtin, a C extension callable)."""
    import functools

    import torch

    parts: list = []
    target = fn
    if isinstance(target, functools.partial):
        parts.append("partial")
        _value_parts(list(target.args) + sorted(target.keywords.items()), parts)
        target = target.func
    owner = getattr(target, "__self__", None)
    if isinstance(target, torch.nn.Module):
        _module_parts(target, parts)
    elif isinstance(owner, torch.nn.Module):
        _module_parts(owner, parts)
        parts.append(getattr(target, "__name__", "?"))
        if hasattr(target, "__func__"):
            _code_parts(target.__func__.__code__, parts)
    else:
        func = getattr(target, "__func__", target)
        if not isinstance(func, types.FunctionType):
            call = type(target).__dict__.get("__call__") or getattr(type(target), "__call__", None)  # noqa: B004
            if not isinstance(call, types.FunctionType):
                return None
            parts.append(f"{type(target).__module__}.{type(target).__qualname__}")
            func = call
        parts.append(f"{func.__module__}.{func.__qualname__}")
        _code_parts(func.__code__, parts)
        for cell in func.__closure__ or ():
            try:
                _value_parts(cell.cell_contents, parts)
            except ValueError:  # an empty cell
                parts.append("<empty>")
        _value_parts(func.__defaults__ or (), parts)
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:32]


def device_name(device) -> str:
    """The device's type and model (the CPU's from /proc/cpuinfo where there is one)."""
    import torch

    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{device.type}:{model}"


# Bumped whenever auto's candidates or their implementations change in a way that can
# change the fastest choice, so that choices stored by an older tree (at the same
# version number) are not reused. 2: the chain's CPU block cap, direct writes, the
# flipped reverse convolution and the corrected meet cost (W4's best went from the row
# loop to the chain).
TUNER_REVISION = 2


def make_key(fn, x, extra: tuple) -> tuple[str, dict] | None:
    """The cache key of a choice for fn on batches like x (and what it was made of), or
    None when fn cannot be fingerprinted."""
    import torch

    from . import __version__

    fp = fingerprint(fn)
    if fp is None:
        return None
    parts = {
        "fn": fp, "shape": list(x.shape[1:]), "dtype": str(x.dtype).replace("torch.", ""),
        "device": device_name(x.device), "threads": torch.get_num_threads(), "choice": repr(extra),
        "torch": torch.__version__, "distjac": __version__, "tuner": TUNER_REVISION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40], parts


# --------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------


def _warn_once(path: Path, message: str) -> None:
    if str(path) + message not in _warned:
        _warned.add(str(path) + message)
        warnings.warn(f"distjac: ignoring the tuning cache {path}: {message}; it is rewritten at the next "
                      "measured choice (DISTJAC_TUNING_CACHE=0 turns it off).", RuntimeWarning, stacklevel=3)


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as err:
        _warn_once(path, f"cannot be read ({type(err).__name__}: {err})")
        return {}
    try:
        doc = json.loads(text)
    except ValueError as err:
        _warn_once(path, f"not valid JSON ({err})")
        return {}
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("entries"), dict):
        _warn_once(path, f"not a distjac tuning cache of format {FORMAT}")
        return {}
    return doc["entries"]


def lookup(key: str) -> dict | None:
    """The stored entry for ``key`` ({"strategy": ..., "record": ..., ...}), or None."""
    if not enabled():
        return None
    entry = _read(cache_path()).get(key)
    return entry if isinstance(entry, dict) and isinstance(entry.get("strategy"), dict) else None


def store(key: str, entry: dict[str, Any]) -> bool:
    """Add or replace one entry, atomically; False (with a warning) when the folder
    cannot be written. Never raises."""
    if not enabled():
        return False
    path = cache_path()
    with _lock:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            entries = _read(path)
            entries[key] = {**entry, "stored": time.time()}
            if len(entries) > MAX_ENTRIES:
                keep = sorted(entries.items(), key=lambda kv: kv[1].get("stored", 0))[-MAX_ENTRIES:]
                entries = dict(keep)
            fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as err:
            _warn_once(path, f"cannot be written ({type(err).__name__}: {err})")
            return False
    return True


# --------------------------------------------------------------------------------------
# distjac tune CONFIG
# --------------------------------------------------------------------------------------


def tune_job(spec, *, device: str | None = None, rows: int | None = None):
    """Choose the kernel strategy for a job (``distjac tune CONFIG``): build its model
    (``distjac.config.build_model``), read the first rows of its source
    (``distjac.io.sources.open_source``), choose as a worker would (``mode`` from the
    spec; the measuring weighed against the job's whole row count; torch with the
    worker's thread count, DEFAULT_CPUS_PER_WORKER, or this process's for an in-process
    job), store the choice in the tuning cache and return its
    :class:`~distjac.kernels.Decision`.

    ``device``: where to tune (default: the spec's engine.device, "auto" meaning a GPU
    if there is one); ``rows``: rows to tune on (default: one shard, at most
    :data:`TUNE_ROWS`).
    """
    import torch

    from .config import build_model
    from .io.sources import open_source
    from .kernels import choose_strategy
    from .plan import DEFAULT_CPUS_PER_WORKER

    dev = device or spec.engine.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, spec.jacobian.compute_dtype) if spec.jacobian.compute_dtype else None
    model = build_model(spec.model, device=dev, dtype=dtype)
    source = open_source(spec.data)
    total = source.num_rows
    take = rows or min(TUNE_ROWS, spec.engine.shard_size or TUNE_ROWS)
    x = source.read(0, min(total, take)).to(dev)
    if dtype is not None:
        x = x.to(dtype)
    elif x.is_floating_point():
        params = [p for p in getattr(model, "parameters", lambda: [])()]
        if params:
            x = x.to(params[0].dtype)
    # Chosen with the thread count the job's workers run torch with (part of the key: a
    # choice made with this process's threads was measured again by every worker).
    threads = torch.get_num_threads() if spec.engine.num_workers == 0 else DEFAULT_CPUS_PER_WORKER
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        s = choose_strategy(model, x, mode=spec.jacobian.mode, work_rows=total,
                            parallel_iterations=spec.jacobian.chunk_size)
    finally:
        torch.set_num_threads(before)
    return s.record
