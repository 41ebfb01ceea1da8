"""What every suite shares: the machine and versions, the result document, its files."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distjac._proc import proc_bytes

PACKAGES = ("distjac", "torch", "numpy", "pyarrow", "ray", "matplotlib")


def versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions (None where a package is absent), read without importing."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def meminfo(key: str) -> int | None:
    """A /proc/meminfo field in bytes (None off Linux)."""
    return proc_bytes("/proc/meminfo", key)


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """The machine a run measured: CPU, cores, memory, load, platform and the GPU if used."""
    info: dict[str, Any] = {
        "cpu_model": platform.processor() or None,
        "cpu_flags_avx512f": None,
        "logical_cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_bytes": meminfo("MemTotal"),
        "mem_available_bytes": meminfo("MemAvailable"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "device": device,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not info.get("_model"):
                    info["cpu_model"] = info["_model"] = line.split(":", 1)[1].strip()
                if line.startswith("flags") and info["cpu_flags_avx512f"] is None:
                    info["cpu_flags_avx512f"] = "avx512f" in line.split()
    except OSError:
        pass
    info.pop("_model", None)
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def new_result(suite: str, config: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """The result document of one suite: filled with ``records`` as it runs."""
    return {
        "suite": suite,
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None,
        "machine": machine_info(device),
        "versions": versions(),
        "config": config,
        "records": [],
    }


def check_device(device: str) -> str:
    """``device`` if torch can use it here; ValueError saying what is wrong otherwise."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a device torch knows ({err}); use cpu or cuda[:i]") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: the suites run on cpu or cuda[:i]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: torch sees no CUDA device here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def write_outputs(result: dict[str, Any], out_dir: Path, markdown: str,
                  plot: Callable[[dict[str, Any], Path], list[str]] | None, *, plots: bool = True) -> dict[str, Any]:
    """``<suite>.json``, ``<suite>.md`` and the suite's plots (where matplotlib is
    installed); records what was written under ``result["files"]``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    suite = result["suite"]
    result["files"] = {"json": f"{suite}.json", "markdown": f"{suite}.md", "plots": []}
    if plots and plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            result["plots_skipped"] = 'matplotlib is not installed: pip install "distjac[plot]"'
        else:
            result["files"]["plots"] = plot(result, out_dir)
    (out_dir / f"{suite}.md").write_text(markdown + "\n")
    write_json(out_dir / f"{suite}.json", result)
    return result


def machine_line(result: dict[str, Any]) -> str:
    """One line naming the machine and versions, for the top of a table."""
    m, v = result["machine"], result["versions"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    mem = f", {m['mem_total_bytes'] / 2**30:.0f} GiB" if m.get("mem_total_bytes") else ""
    load = m.get("load_average")
    load_s = f"; load average {load[0]:.1f} at the start" if load else ""
    soft = ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "ray", "pyarrow") if v.get(k))
    return f"Machine: {m.get('cpu_model')}, {m.get('logical_cores')} cores{mem}{gpu}; {soft}{load_s}."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
