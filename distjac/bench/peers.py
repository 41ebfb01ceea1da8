"""Time TensorFlow's and JAX's per-example Jacobians as peers of distjac's kernel benchmark.

This is a standalone script, not part of distjac's API. distjac's kernels suite runs it in
a separate interpreter (one that has TensorFlow and/or JAX; it need have neither torch nor
distjac)::

    <python> /path/to/distjac/bench/peers.py SPEC.json OUT.json

At module level it imports only the standard library and numpy; TensorFlow and JAX are
imported inside functions, once, and only when a requested peer needs them. A peer whose
framework is not importable (or, on ``"gpu"``, sees no GPU) is reported as skipped with
the reason; it never makes the run fail.

Peers
-----
``"tf.function pfor"``
    ``tf.function`` of ``with tf.GradientTape() as t: t.watch(x); y = f(x)`` followed by
    ``t.batch_jacobian(y, x)`` (``experimental_use_pfor=True``, TF's default).
``"tf.function loop"``
    The same with ``experimental_use_pfor=False`` (a ``tf.while_loop`` over output rows).
``"jax jit(vmap(jacrev))"``, ``"jax jit(vmap(jacfwd))"``
    ``jax.jit(jax.vmap(jax.jacrev(f_single, argnums=1), in_axes=(None, 0)))(params, x)``
    (resp. ``jacfwd``), ``f_single(params, xi)`` mapping one example (no batch axis). The
    weights are an argument, not closed over, so that they are runtime buffers as in a
    real model rather than constants baked into (and folded by) the compiled program.

In TensorFlow the weights are non-trainable ``tf.Variable`` objects (so the tape watches
only ``x``, as torch's side sets ``requires_grad=False`` on the parameters); in both
frameworks float32 matmuls and convolutions run at full float32 precision (TF32 off,
JAX ``default_matmul_precision="highest"``), as torch's matmuls do by default.

SPEC.json
---------
Written by the caller::

    {"device": "cpu" | "gpu", "threads": 2, "repeats": 5, "rtol": 1e-4, "atol_scale": 1e-5,
     "max_call_s": 60.0, "min_sample_s": 0.0, "warmup_s": 0.0,
     "peers": ["tf.function pfor", ...],        # optional subset of PEERS, default all four
     "workloads": [{"name": "W1", "kind": "mlp", "activation": "tanh", "npz": "/abs/W1.npz"}, ...]}

Every key but ``workloads`` is optional (defaults as shown above; ``repeats`` may be 0 to
only check); an unknown top-level key is an error (a misspelt setting must not be
ignored silently), extra keys in a workload (a description...) are ignored. Workload
kinds mirror ``distjac/models.py``; each npz holds ``x`` (B, *in) float32, ``reference``
(K, *out, *in) float32 (the Jacobian of the first K <= B rows, computed by distjac) and
the weights, in torch's layout:

* ``mlp``: ``w0, b0, w1, b1, ...`` (a Linear's weight is (out, in): ``y = x @ w.T + b``),
  ``activation`` (tanh, relu, gelu = torch's exact erf GELU, sigmoid, softplus) between
  layers, none after the last; ``activation`` is required for this kind.
* ``cube``: ``y = x * x * x`` elementwise, no weights.
* ``convnet``: ``conv_w`` (C_out, C_in, k, k), ``conv_b``, ``lin_w`` (out, C_out*H'*W'),
  ``lin_b``: Conv2d (stride 1, no padding, NCHW) -> ReLU -> Flatten in (C, H, W) order
  -> Linear; x is (B, C_in, H, W).

Shapes are checked when the spec is read. A malformed spec (or an unreadable npz, or an
OUT.json whose folder does not exist) exits with status 2 and one line on stderr saying
what is wrong; everything else exits 0, whatever happens to the peers.

Procedure, per workload (side by side, as torch's side does)
-------------------------------------------------------------
1. Each peer is built and called once on the full batch (trace/compile and warm-up; the
   wall time is ``first_call_s``). The first K rows of its result are compared with
   ``reference`` by ``np.allclose(rtol=rtol, atol=atol_scale * max|reference|)`` before
   anything is timed; a mismatch sets status ``"mismatch"`` with the largest absolute
   error in the reason, and the peer is still timed. A first call slower than
   ``max_call_s`` marks the peer ``"skipped"`` ("too slow: ..."); an exception marks it
   ``"error"`` (``"skipped"`` when it is an out-of-memory error) with ``Type: message``.
   A peer whose first call took less than ``warmup_s`` is called again, untimed, until
   ``warmup_s`` has passed since its first call began (``warmup_calls`` says how often).
2. Then ``repeats`` timed samples, round robin across the live peers, so drift from other
   load hits all of them alike. A sample is one call, or as many calls as fill
   ``min_sample_s`` seconds at the peer's fastest call (each waited for and released
   before the next), and
   counts as its mean call time (``calls_per_sample`` says how many: the same in every
   sample, set from the fastest call of the first call and warm-up). A timed call that
   fails, or a sample whose mean call is longer than ``max_call_s``, takes its peer out
   of the remaining rounds (it keeps the times it has).
3. ``median_s`` is the median of the samples, ``examples_per_s = B / median_s``.

Timing is wall clock (``time.perf_counter``) around one call *and its completion*: JAX
results are waited for with ``block_until_ready()``; for TensorFlow, whose tensors
returned by a ``tf.function`` may still be in flight on a GPU, one element of the result
is copied to the host (a one-element slice that runs after the Jacobian on the same
stream), which forces completion without copying the whole result. Python's cyclic
garbage collector is paused during a timed call. Each result is released before the next
call; results are converted to numpy for the check only, outside timing.

Threads: before TF or JAX is imported, the process (every thread it has so far) is pinned
to the first ``threads`` CPUs of its current affinity, the usual thread-count environment
variables are set, and TF's intra-/inter-op pools are sized to ``threads`` (XLA's CPU
pool follows the affinity). On ``"cpu"`` JAX is forced to its CPU backend
(``JAX_PLATFORMS=cpu``) and GPUs are hidden from TF; on ``"gpu"`` JAX uses its GPU
backend and TF its first GPU if they have one. ``XLA_PYTHON_CLIENT_PREALLOCATE=false``
(and TF's memory growth) keep both from grabbing GPU memory that torch may hold. All of
this is recorded in OUT.json (``affinity``, ``settings``).

OUT.json
--------
::

    {"python": sys.executable, "python_version": "3.11.9", "platform": ..., "complete": true,
     "versions": {"numpy": ..., "tensorflow": ... | null, "jax": ... | null, "jaxlib": ... | null},
     "device": "cpu" | "gpu", "threads": 2, "affinity": [0, 1], "cpu_count": ...,
     "devices": {"tensorflow": [...] | null, "jax": [...] | null},
     "settings": {...}, "import_s": {...}, "total_s": ..., "timing": "...", "spec": {...},
     "workloads": {"W1": {"batch": B, "kind": "mlp", "in_shape": [...], "out_shape": [...],
                          "check_rows": K, "atol": ..., "rtol": ...,
                          "peers": {"tf.function pfor": {
                              "status": "ok" | "mismatch" | "skipped" | "error",
                              "reason": null | str, "build_s": float, "first_call_s": float,
                              "max_abs_err": float,
                              "times_s": [...], "median_s": float, "examples_per_s": float}, ...}}}}

A version or device list is null where the framework was not imported (not importable,
or not needed by the requested peers). Fields that do not apply (the times of a skipped
peer...) are absent or empty. OUT.json is rewritten atomically (temporary file, then
``os.replace``) after every workload, with ``"complete": false`` until the last one, so
a caller that has to kill the process still gets the workloads already done.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ACTIVATIONS", "KINDS", "PEERS", "SpecError", "main", "parse_spec", "run"]

TF_PFOR = "tf.function pfor"
TF_LOOP = "tf.function loop"
JAX_REV = "jax jit(vmap(jacrev))"
JAX_FWD = "jax jit(vmap(jacfwd))"
PEERS = (TF_PFOR, TF_LOOP, JAX_REV, JAX_FWD)
FRAMEWORK_OF = {TF_PFOR: "tensorflow", TF_LOOP: "tensorflow", JAX_REV: "jax", JAX_FWD: "jax"}

KINDS = ("mlp", "cube", "convnet")
ACTIVATIONS = ("tanh", "relu", "gelu", "sigmoid", "softplus")
DEVICES = ("cpu", "gpu")

# Optional top-level settings and their defaults.
DEFAULTS: dict[str, Any] = {
    "device": "cpu",
    "threads": 2,
    "repeats": 5,
    "rtol": 1e-4,
    "atol_scale": 1e-5,
    "max_call_s": 60.0,
    "min_sample_s": 0.0,
    "warmup_s": 0.0,
    "peers": list(PEERS),
}
TOP_LEVEL_KEYS = set(DEFAULTS) | {"workloads"}

EXIT_OK = 0
EXIT_BAD_SPEC = 2
REASON_CHARS = 300  # error messages in reasons are cut to about this length

TIMING_NOTE = (
    "wall clock (time.perf_counter) per full-batch call including its completion "
    "(JAX: block_until_ready; TF: one element of the result copied to the host; Python's GC paused); "
    "a sample is the mean of as many calls as fill min_sample_s at the fastest call seen (at least one, "
    "the same in every sample); "
    "median of the round-robin samples; the first call (trace/compile) is not among them"
)


_T_START = time.perf_counter()


def _log(msg: str) -> None:
    print(f"[peers {time.perf_counter() - _T_START:6.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------


class SpecError(ValueError):
    """The spec (or a file it names) is malformed; the message says where and what."""


@dataclass
class Workload:
    """One workload of the spec, with its arrays loaded and checked."""

    name: str
    kind: str
    activation: str | None
    npz: str
    x: np.ndarray
    reference: np.ndarray
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def out_shape(self) -> tuple[int, ...]:
        n_in = len(self.in_shape)
        return tuple(int(s) for s in self.reference.shape[1 : self.reference.ndim - n_in])

    @property
    def n_layers(self) -> int:
        """Linear layers of an mlp workload (0 for the other kinds)."""
        return sum(1 for k in self.weights if k.startswith("w"))


@dataclass
class Spec:
    """A validated SPEC.json."""

    device: str
    threads: int
    repeats: int
    rtol: float
    atol_scale: float
    max_call_s: float
    peers: list[str]
    workloads: list[Workload]
    min_sample_s: float = 0.0
    warmup_s: float = 0.0

    def summary(self) -> dict:
        """The settings and workloads as read (for OUT.json)."""
        return {
            "device": self.device, "threads": self.threads, "repeats": self.repeats, "rtol": self.rtol,
            "atol_scale": self.atol_scale, "max_call_s": self.max_call_s, "min_sample_s": self.min_sample_s,
            "warmup_s": self.warmup_s,
            "peers": list(self.peers),
            "workloads": [{"name": w.name, "kind": w.kind, "activation": w.activation, "npz": w.npz}
                          for w in self.workloads],
        }


def _int_setting(raw: dict, key: str, minimum: int) -> int:
    value = raw.get(key, DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _float_setting(raw: dict, key: str, positive: bool) -> float:
    value = raw.get(key, DEFAULTS[key])
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0)
    if not ok:
        raise SpecError(f"{key}: expected a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def parse_spec(raw: Any) -> Spec:
    """Validate a decoded SPEC.json and load its workloads; raise SpecError if malformed."""
    if not isinstance(raw, dict):
        raise SpecError(f"the spec must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - TOP_LEVEL_KEYS)
    if unknown:
        raise SpecError(f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(TOP_LEVEL_KEYS))}")
    device = raw.get("device", DEFAULTS["device"])
    if device not in DEVICES:
        raise SpecError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
    peers = raw.get("peers", DEFAULTS["peers"])
    if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
        raise SpecError(f"peers: expected a list of peer names, got {peers!r}")
    for p in peers:
        if p not in PEERS:
            raise SpecError(f"peers: unknown peer {p!r}; known: {', '.join(map(repr, PEERS))}")
    if len(set(peers)) != len(peers):
        raise SpecError(f"peers: a peer is listed twice in {peers!r}")
    workloads = raw.get("workloads")
    if not isinstance(workloads, list) or not workloads:
        raise SpecError(f"workloads: expected a non-empty list of workloads, got {workloads!r}")
    loaded: list[Workload] = []
    for i, entry in enumerate(workloads):
        w = load_workload(entry, where=f"workloads[{i}]")
        if any(w.name == prev.name for prev in loaded):
            raise SpecError(f"workloads[{i}].name: {w.name!r} is used twice")
        loaded.append(w)
    return Spec(
        device=device,
        threads=_int_setting(raw, "threads", 1),
        repeats=_int_setting(raw, "repeats", 0),
        rtol=_float_setting(raw, "rtol", positive=False),
        atol_scale=_float_setting(raw, "atol_scale", positive=False),
        max_call_s=_float_setting(raw, "max_call_s", positive=True),
        peers=list(peers),
        workloads=loaded,
        min_sample_s=_float_setting(raw, "min_sample_s", positive=False),
        warmup_s=_float_setting(raw, "warmup_s", positive=False),
    )


def _need_shape(where: str, key: str, arr: np.ndarray, shape: tuple[int, ...]) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise SpecError(f"{where}: {key} has shape {tuple(arr.shape)}, expected {tuple(shape)}")


def load_workload(entry: Any, where: str) -> Workload:
    """Read one workload entry and its npz, checking keys, dtypes and shapes."""
    if not isinstance(entry, dict):
        raise SpecError(f"{where}: expected an object with name, kind and npz, got {entry!r}")
    for key in ("name", "kind", "npz"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise SpecError(f"{where}.{key}: expected a non-empty string, got {entry.get(key)!r}")
    name, kind, path = entry["name"], entry["kind"], entry["npz"]
    if kind not in KINDS:
        raise SpecError(f"{where}.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    activation = entry.get("activation")
    if kind == "mlp" and activation not in ACTIVATIONS:
        raise SpecError(f"{where}.activation: an mlp needs one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    where = f"{where} ({name}, {path})"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError) as err:
        raise SpecError(f"{where}: cannot read the npz: {type(err).__name__}: {err}") from None
    for key in ("x", "reference"):
        if key not in arrays:
            raise SpecError(f"{where}: the npz has no {key!r} (it has {sorted(arrays)})")
    x, ref = arrays.pop("x"), arrays.pop("reference")
    for key, arr in (("x", x), ("reference", ref), *arrays.items()):
        if arr.dtype != np.float32:
            raise SpecError(f"{where}: {key} has dtype {arr.dtype}, expected float32")
    if x.ndim < 2 or x.shape[0] < 1:
        raise SpecError(f"{where}: x has shape {x.shape}, expected (B, *in) with B >= 1")
    b, in_shape = x.shape[0], tuple(x.shape[1:])

    if kind == "mlp":
        n = sum(1 for k in arrays if k.startswith("w"))
        expected = {f"{p}{i}" for i in range(n) for p in "wb"}
        if n == 0 or set(arrays) != expected:
            raise SpecError(f"{where}: an mlp npz holds w0, b0, w1, b1, ... (besides x, reference); "
                            f"got {sorted(arrays)}")
        if x.ndim != 2:
            raise SpecError(f"{where}: an mlp takes x of shape (B, n_in), got {x.shape}")
        width = x.shape[1]
        for i in range(n):
            w, bias = arrays[f"w{i}"], arrays[f"b{i}"]
            if w.ndim != 2 or w.shape[1] != width:
                raise SpecError(f"{where}: w{i} has shape {w.shape}, expected (out, {width})")
            _need_shape(where, f"b{i}", bias, (w.shape[0],))
            width = w.shape[0]
        out_shape: tuple[int, ...] = (width,)
    elif kind == "cube":
        if arrays:
            raise SpecError(f"{where}: a cube npz holds only x and reference, got also {sorted(arrays)}")
        out_shape = in_shape
    else:  # convnet
        expected = {"conv_w", "conv_b", "lin_w", "lin_b"}
        if set(arrays) != expected:
            raise SpecError(f"{where}: a convnet npz holds {', '.join(sorted(expected))} (besides x, reference); "
                            f"got {sorted(arrays)}")
        if x.ndim != 4:
            raise SpecError(f"{where}: a convnet takes x of shape (B, C_in, H, W), got {x.shape}")
        cw = arrays["conv_w"]
        c_in, h, wd = in_shape
        if cw.ndim != 4 or cw.shape[1] != c_in or cw.shape[2] != cw.shape[3] or not 1 <= cw.shape[2] <= min(h, wd):
            raise SpecError(f"{where}: conv_w has shape {cw.shape}, expected (C_out, {c_in}, k, k) "
                            f"with k <= {min(h, wd)}")
        c_out, k = cw.shape[0], cw.shape[2]
        _need_shape(where, "conv_b", arrays["conv_b"], (c_out,))
        flat = c_out * (h - k + 1) * (wd - k + 1)
        lw = arrays["lin_w"]
        if lw.ndim != 2 or lw.shape[1] != flat:
            raise SpecError(f"{where}: lin_w has shape {lw.shape}, expected (out, {flat})")
        _need_shape(where, "lin_b", arrays["lin_b"], (lw.shape[0],))
        out_shape = (lw.shape[0],)

    k_rows = ref.shape[0] if ref.ndim else 0
    if ref.ndim != 1 + len(out_shape) + len(in_shape) or tuple(ref.shape[1:]) != out_shape + in_shape:
        dims = ", ".join(map(str, out_shape + in_shape))
        raise SpecError(f"{where}: reference has shape {ref.shape}, expected (K, {dims})")
    if not np.all(np.isfinite(ref)):
        raise SpecError(f"{where}: reference has non-finite values")
    if not 1 <= k_rows <= b:
        raise SpecError(f"{where}: reference has {k_rows} rows, expected 1 <= K <= B = {b}")
    return Workload(name=name, kind=kind, activation=activation if kind == "mlp" else None, npz=path,
                    x=x, reference=ref, weights=arrays)


# --------------------------------------------------------------------------------------
# Process setup: threads, devices, lazy framework imports
# --------------------------------------------------------------------------------------


def limit_process(threads: int, device: str) -> dict:
    """Pin the process to ``threads`` CPUs and set the environment; call before TF/JAX import.

    Returns what was set (for OUT.json).
    """
    settings: dict[str, Any] = {"affinity": None, "env": {}}
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[:threads]
        # Threads inherit their creator's affinity; pin the ones that exist already
        # (numpy's BLAS pool) as well as the main thread.
        try:
            tids = [int(t) for t in os.listdir("/proc/self/task")]
        except OSError:
            tids = [0]
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:  # a thread that has exited meanwhile
                pass
        settings["affinity"] = sorted(os.sched_getaffinity(0))
    else:
        settings["affinity_note"] = "os.sched_setaffinity is not available on this platform"

    env = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
        "TF_NUM_INTRAOP_THREADS": str(threads),
        "TF_NUM_INTEROP_THREADS": str(threads),
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    }
    if device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""  # hides GPUs from TF (and anything else CUDA)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ info/warning lines on stderr
    os.environ.update(env)
    settings["env"] = env
    return settings


@dataclass
class Framework:
    """A lazily imported framework: its module, or why it cannot be used."""

    name: str
    module: Any = None
    unavailable: str | None = None  # the skip reason for every peer of this framework
    version: str | None = None
    extra_versions: dict[str, str | None] = field(default_factory=dict)
    devices: list[str] | None = None
    device: Any = None  # TF device string or jax Device the peers run on
    settings: dict[str, Any] = field(default_factory=dict)
    import_s: float | None = None


def _not_importable(name: str, err: BaseException) -> str:
    return _cut(f"{name} is not importable in {sys.executable}: {type(err).__name__}: {err}")


def import_tensorflow(device: str, threads: int) -> Framework:
    fw = Framework("tensorflow")
    t0 = time.perf_counter()
    try:
        import tensorflow as tf
    except Exception as err:  # ImportError, or a broken install raising anything else
        fw.unavailable = _not_importable("tensorflow", err)
        return fw
    fw.import_s = time.perf_counter() - t0
    fw.module, fw.version = tf, tf.__version__
    # Every workload builds a new tf.function of the same Python function, which TF's
    # frequent-retracing detector mistakes for retracing; drop that warning (only).
    tf.get_logger().addFilter(lambda record: "triggered tf.function retracing" not in record.getMessage())
    try:
        # Before the runtime starts: thread pools, visible devices, memory growth.
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        gpus = tf.config.list_physical_devices("GPU")
        fw.settings = {"intra_op_threads": threads, "inter_op_threads": threads}
        if device == "cpu":
            if gpus:
                tf.config.set_visible_devices([], "GPU")
            fw.device = "/CPU:0"
        elif not gpus:
            fw.unavailable = f"tensorflow {tf.__version__} sees no GPU in {sys.executable}"
        else:
            for gpu in gpus:
                tf.config.experimental.set_memory_growth(gpu, True)
            tf.config.experimental.enable_tensor_float_32_execution(False)
            fw.device = "/GPU:0"
            fw.settings.update(memory_growth=True, tensor_float_32=False)
        fw.settings["device"] = fw.device
        fw.devices = [d.name for d in tf.config.list_logical_devices()]
    except Exception as err:
        fw.unavailable = _cut(f"tensorflow {tf.__version__} could not be set up: {type(err).__name__}: {err}")
    return fw


def import_jax(device: str) -> Framework:
    fw = Framework("jax")
    t0 = time.perf_counter()
    try:
        import jax
        import jaxlib
    except Exception as err:
        fw.unavailable = _not_importable("jax", err)
        return fw
    fw.import_s = time.perf_counter() - t0
    fw.module, fw.version = jax, jax.__version__
    fw.extra_versions["jaxlib"] = getattr(jaxlib, "__version__", None)
    try:
        jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 on GPUs, as torch
        devices = jax.devices()
        fw.devices = [str(d) for d in devices]
        if device == "cpu":
            fw.device = jax.devices("cpu")[0]
        else:
            gpus = [d for d in devices if d.platform in ("gpu", "cuda", "rocm")]
            if gpus:
                fw.device = gpus[0]
            else:
                fw.unavailable = (f"jax {jax.__version__} has no GPU backend in {sys.executable} "
                                  f"(devices: {', '.join(fw.devices)})")
        fw.settings = {"default_matmul_precision": "highest", "device": str(fw.device) if fw.device else None,
                       "platform": fw.device.platform if fw.device is not None else None}
    except Exception as err:
        fw.unavailable = _cut(f"jax {jax.__version__} could not be set up: {type(err).__name__}: {err}")
    return fw


class Frameworks:
    """Imports each framework the first time a peer needs it, then keeps it."""

    def __init__(self, device: str, threads: int):
        self.device, self.threads = device, threads
        self._loaded: dict[str, Framework] = {}

    def get(self, name: str) -> Framework:
        if name not in self._loaded:
            _log(f"importing {name} ...")
            fw = import_tensorflow(self.device, self.threads) if name == "tensorflow" else import_jax(self.device)
            if fw.unavailable:
                _log(f"{name}: {fw.unavailable}")
            else:
                _log(f"{name} {fw.version} imported in {fw.import_s:.1f} s; devices {fw.devices}")
            self._loaded[name] = fw
        return self._loaded[name]

    def loaded(self, name: str) -> Framework | None:
        return self._loaded.get(name)


# --------------------------------------------------------------------------------------
# Peers: each builds a Runner for one workload
# --------------------------------------------------------------------------------------


@dataclass
class Runner:
    """A built peer: ``call()`` computes the full batch's Jacobian (asynchronously, maybe)."""

    call: Callable[[], Any]
    wait: Callable[[Any], None]  # returns once the result is computed
    to_numpy: Callable[[Any], np.ndarray]


def _tf_forward(tf: Any, w: Workload) -> Callable:
    """The workload's batched function in TF ops, weights as non-trainable Variables."""
    var = {k: tf.Variable(v, trainable=False, name=k) for k, v in w.weights.items() if k != "conv_w"}
    if w.kind == "cube":
        return lambda x: x * x * x
    if w.kind == "mlp":
        act = {
            "tanh": tf.tanh,
            "relu": tf.nn.relu,
            "gelu": lambda h: tf.nn.gelu(h, approximate=False),
            "sigmoid": tf.sigmoid,
            "softplus": tf.nn.softplus,
        }[w.activation]
        layers = [(var[f"w{i}"], var[f"b{i}"]) for i in range(w.n_layers)]

        def mlp(x):
            h = x
            for i, (wi, bi) in enumerate(layers):
                h = tf.matmul(h, wi, transpose_b=True) + bi
                if i < len(layers) - 1:
                    h = act(h)
            return h

        return mlp
    # convnet. TF's CPU Conv2D wants NHWC: transpose x in, the kernel to (k, k, C_in, C_out)
    # once, and the activations back to NCHW before flattening, so the flattening order
    # (C, H, W) is torch's.
    kernel = tf.Variable(np.ascontiguousarray(w.weights["conv_w"].transpose(2, 3, 1, 0)), trainable=False)
    flat = int(w.weights["lin_w"].shape[1])

    def convnet(x):
        h = tf.nn.conv2d(tf.transpose(x, [0, 2, 3, 1]), kernel, strides=1, padding="VALID") + var["conv_b"]
        h = tf.transpose(tf.nn.relu(h), [0, 3, 1, 2])
        h = tf.reshape(h, [-1, flat])
        return tf.matmul(h, var["lin_w"], transpose_b=True) + var["lin_b"]

    return convnet


def build_tf(fw: Framework, w: Workload, use_pfor: bool) -> Runner:
    tf = fw.module
    with tf.device(fw.device):
        f = _tf_forward(tf, w)
        x = tf.identity(tf.constant(w.x))

        @tf.function
        def batch_jacobian(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = f(x)
            return tape.batch_jacobian(y, x, experimental_use_pfor=use_pfor)

    def call():
        with tf.device(fw.device):
            return batch_jacobian(x)

    def wait(y):
        # Copy one element to the host: on a GPU the slice runs after the Jacobian on the
        # same stream, so this returns once it is done, without copying the whole result.
        tf.reshape(y, [-1])[:1].numpy()

    return Runner(call=call, wait=wait, to_numpy=lambda y: y.numpy())


def _jax_single(fw: Framework, w: Workload) -> tuple[Callable, Any]:
    """The workload's function on one example (no batch axis), and its parameters."""
    jax = fw.module
    jnp = jax.numpy
    params = {k: jax.device_put(v, fw.device) for k, v in w.weights.items()}
    if w.kind == "cube":
        return (lambda p, x: x * x * x), params
    if w.kind == "mlp":
        act = {
            "tanh": jnp.tanh,
            "relu": jax.nn.relu,
            "gelu": lambda h: jax.nn.gelu(h, approximate=False),
            "sigmoid": jax.nn.sigmoid,
            "softplus": jax.nn.softplus,
        }[w.activation]
        n = w.n_layers

        def mlp(p, x):
            h = x
            for i in range(n):
                h = p[f"w{i}"] @ h + p[f"b{i}"]
                if i < n - 1:
                    h = act(h)
            return h

        return mlp, params

    def convnet(p, x):  # x: (C_in, H, W); NCHW/OIHW as torch, so the flattening order matches
        h = jax.lax.conv_general_dilated(x[None], p["conv_w"], window_strides=(1, 1), padding="VALID",
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))[0]
        h = jax.nn.relu(h + p["conv_b"][:, None, None])
        return p["lin_w"] @ h.reshape(-1) + p["lin_b"]

    return convnet, params


def build_jax(fw: Framework, w: Workload, forward_mode: bool) -> Runner:
    jax = fw.module
    f_single, params = _jax_single(fw, w)
    jac = jax.jacfwd if forward_mode else jax.jacrev
    fn = jax.jit(jax.vmap(jac(f_single, argnums=1), in_axes=(None, 0)))
    x = jax.device_put(w.x, fw.device)
    return Runner(call=lambda: fn(params, x), wait=lambda y: y.block_until_ready(), to_numpy=np.asarray)


def build_peer(peer: str, fw: Framework, w: Workload) -> Runner:
    if peer == TF_PFOR:
        return build_tf(fw, w, use_pfor=True)
    if peer == TF_LOOP:
        return build_tf(fw, w, use_pfor=False)
    if peer == JAX_REV:
        return build_jax(fw, w, forward_mode=False)
    if peer == JAX_FWD:
        return build_jax(fw, w, forward_mode=True)
    raise ValueError(f"unknown peer {peer!r}")  # parse_spec lets none through


# --------------------------------------------------------------------------------------
# One workload, side by side
# --------------------------------------------------------------------------------------


def _cut(text: str, limit: int = REASON_CHARS) -> str:
    text = " ".join(text.split())  # TF/XLA messages span many lines
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError) or type(err).__name__ == "ResourceExhaustedError":
        return True
    text = str(err).lower()
    return any(s in text for s in ("resource_exhausted", "out of memory", "oom when allocating", "can't allocate"))


def _failure(err: BaseException) -> tuple[str, str]:
    """(status, reason) for an exception raised by a peer."""
    text = f"{type(err).__name__}: {err}"
    if _is_oom(err):
        return "skipped", _cut("out of memory: " + text)
    return "error", _cut(text)


def _timed(runner: Runner) -> tuple[Any, float]:
    """One call and its completion, with Python's cyclic GC paused (with TF loaded a full
    collection takes about 0.2 s, which must not land inside a timed call)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        y = runner.call()
        runner.wait(y)
        return y, time.perf_counter() - t0
    finally:
        if enabled:
            gc.enable()


def _timed_sample(runner: Runner, min_s: float, calls: int | None = None) -> tuple[float, int, float]:
    """One sample: ``calls`` calls, or with ``calls=None`` as many as fill ``min_s``
    seconds (at least one), each waited for and released before the next; the mean time
    of a call, the number of calls and the fastest. A call of a millisecond, timed
    alone, is mostly timer and scheduler noise; a sample of many such calls is not."""
    total, n, fastest = 0.0, 0, math.inf
    while True:
        y, t = _timed(runner)
        del y
        total, n, fastest = total + t, n + 1, min(fastest, t)
        if (n >= calls) if calls is not None else (total >= min_s):
            return total / n, n, fastest


MAX_CALLS_PER_SAMPLE = 10_000


def _calls_per_sample(fastest_s: float, min_s: float) -> int:
    """The same number of calls in every sample of a peer: enough to fill ``min_s`` at
    its fastest call so far (a sample cut short by one slow call would count it alone)."""
    if fastest_s <= 0 or not math.isfinite(fastest_s):
        return 1
    return max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(min_s / fastest_s)))


def _check(res: np.ndarray, w: Workload, rtol: float, atol: float, rec: dict) -> None:
    """Compare the first K rows with the reference; set status/reason on a mismatch."""
    expected = (w.batch, *w.out_shape, *w.in_shape)
    if tuple(res.shape) != expected:
        rec.update(status="mismatch", reason=f"result has shape {tuple(res.shape)}, expected {expected}")
        return
    got = res[: w.reference.shape[0]].astype(np.float64)
    ref = w.reference.astype(np.float64)
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    rec["max_abs_err"] = err if math.isfinite(err) else None  # JSON has no NaN
    if not np.allclose(got, ref, rtol=rtol, atol=atol):
        rec.update(status="mismatch", reason=f"not allclose to the reference (first {ref.shape[0]} rows): "
                                             f"max abs err {err:.3g} (rtol {rtol:g}, atol {atol:.3g})")


def bench_workload(w: Workload, spec: Spec, frameworks: Frameworks) -> dict:
    """Build, check and time every requested peer on one workload; the OUT.json record."""
    scale = float(np.max(np.abs(w.reference))) if w.reference.size else 0.0
    atol = spec.atol_scale * max(scale, 1e-30)
    rec: dict[str, Any] = {
        "batch": w.batch, "kind": w.kind, "activation": w.activation, "in_shape": list(w.in_shape),
        "out_shape": list(w.out_shape), "check_rows": int(w.reference.shape[0]), "rtol": spec.rtol,
        "atol": atol, "peers": {},
    }
    _log(f"== {w.name}: {w.kind}{f' ({w.activation})' if w.activation else ''}, B={w.batch}, "
         f"in {list(w.in_shape)} -> out {list(w.out_shape)}")

    # Build, first call, check ----------------------------------------------------------
    live: list[tuple[str, Runner]] = []
    n_calls: dict[str, int] = {}  # calls per timed sample, from the fastest call so far
    for peer in spec.peers:
        r: dict[str, Any] = {"status": "ok", "reason": None, "times_s": []}
        rec["peers"][peer] = r
        fw = frameworks.get(FRAMEWORK_OF[peer])
        if fw.unavailable:
            r.update(status="skipped", reason=fw.unavailable)
            _log(f"   {peer:<24} skipped: {fw.unavailable}")
            continue
        runner = None
        try:
            t0 = time.perf_counter()
            runner = build_peer(peer, fw, w)
            r["build_s"] = time.perf_counter() - t0
            y, t_first = _timed(runner)
            r["first_call_s"] = t_first
            res = runner.to_numpy(y)
            del y
            _check(res, w, spec.rtol, atol, r)
            del res
        except Exception as err:  # any failure is reported, never raised
            runner = None
            status, reason = _failure(err)
            r.update(status=status, reason=reason)
            _log(f"   {peer:<24} {status}: {reason}")
            gc.collect()
            continue
        if t_first > spec.max_call_s:
            r.update(status="skipped", reason=f"too slow: one call took {t_first:.3g} s > max_call_s "
                                              f"({spec.max_call_s:g} s)")
        _log(f"   {peer:<24} build {r['build_s']:.3f} s, first call {t_first:.3f} s"
             + (f", max abs err {r['max_abs_err']:.3g}" if r.get("max_abs_err") is not None else "")
             + ("" if r["status"] == "ok" else f"  [{r['status'].upper()}: {r['reason']}]"))
        if r["status"] in ("ok", "mismatch"):
            fastest = t_first
            if t_first < spec.warmup_s:
                try:
                    _, r["warmup_calls"], fastest = _timed_sample(runner, spec.warmup_s - t_first)
                except Exception as err:  # reported like a timed call's failure
                    status, reason = _failure(err)
                    r.update(status=status, reason=f"warm-up: {reason}")
                    _log(f"   {peer:<24} {status} in warm-up: {reason}")
                    gc.collect()
                    continue
            n_calls[peer] = _calls_per_sample(min(t_first, fastest), spec.min_sample_s)
            live.append((peer, runner))
        # Results were released by del (reference counting); a gc.collect() here would
        # cost about 0.2 s per peer once TF is loaded, so it runs only after errors.

    # Timed repeats, round robin ---------------------------------------------------------
    for rep in range(spec.repeats):
        for peer, runner in list(live):
            r = rec["peers"][peer]
            try:
                t, n, _ = _timed_sample(runner, spec.min_sample_s, n_calls[peer])
            except Exception as err:
                status, reason = _failure(err)
                r.update(status=status, reason=f"timed call {rep + 1}: {reason}")
                live.remove((peer, runner))
                _log(f"   {peer:<24} {status} in timed call {rep + 1}: {reason}")
                gc.collect()
                continue
            r["times_s"].append(t)
            r.setdefault("calls_per_sample", []).append(n)
            if t > spec.max_call_s:
                r.update(status="skipped", reason=f"too slow: one call took {t:.3g} s > max_call_s "
                                                  f"({spec.max_call_s:g} s)")
                live.remove((peer, runner))
        if live:
            _log(f"   repeat {rep + 1}/{spec.repeats}: "
                 + ", ".join(f"{p} {rec['peers'][p]['times_s'][-1]:.4f} s" for p, _ in live))
    live.clear()
    gc.collect()

    # Summary ----------------------------------------------------------------------------
    for r in rec["peers"].values():
        if r["times_s"]:
            r["median_s"] = statistics.median(r["times_s"])
            r["examples_per_s"] = w.batch / r["median_s"] if r["median_s"] > 0 else None
    return rec


# --------------------------------------------------------------------------------------
# Whole run
# --------------------------------------------------------------------------------------


def _finite(obj: Any) -> Any:
    """obj with NaN/inf floats replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_json_atomic(path: str, data: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".peers-", suffix=".json.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_finite(data), f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _header(spec: Spec, setup: dict, frameworks: Frameworks) -> dict:
    tf, jx = frameworks.loaded("tensorflow"), frameworks.loaded("jax")
    return {
        "python": sys.executable,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "numpy": np.__version__,
            "tensorflow": tf.version if tf else None,
            "jax": jx.version if jx else None,
            "jaxlib": jx.extra_versions.get("jaxlib") if jx else None,
        },
        "device": spec.device,
        "threads": spec.threads,
        "affinity": setup.get("affinity"),
        "cpu_count": os.cpu_count(),
        "devices": {"tensorflow": tf.devices if tf else None, "jax": jx.devices if jx else None},
        "settings": {
            "env": setup.get("env"),
            **({"affinity_note": setup["affinity_note"]} if "affinity_note" in setup else {}),
            "tensorflow": tf.settings if tf else None,
            "jax": jx.settings if jx else None,
        },
        "import_s": {"tensorflow": tf.import_s if tf else None, "jax": jx.import_s if jx else None},
        "timing": TIMING_NOTE,
        "spec": spec.summary(),
    }


def run(spec: Spec, out_path: str) -> dict:
    """Run every workload of a validated spec, writing OUT.json after each; return it."""
    setup = limit_process(spec.threads, spec.device)
    _log(f"{sys.executable}: device {spec.device}, threads {spec.threads}, affinity {setup.get('affinity')}, "
         f"peers {spec.peers}")
    frameworks = Frameworks(spec.device, spec.threads)
    workloads: dict[str, dict] = {}
    t0 = time.perf_counter()
    for i, w in enumerate(spec.workloads):
        workloads[w.name] = bench_workload(w, spec, frameworks)
        out = {**_header(spec, setup, frameworks), "complete": i == len(spec.workloads) - 1,
               "total_s": time.perf_counter() - t0, "workloads": workloads}
        _write_json_atomic(out_path, out)
    _log(f"done in {time.perf_counter() - t0:.1f} s; wrote {out_path}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``peers.py SPEC.json OUT.json``; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 2 or args[0] in ("-h", "--help"):
        print("usage: peers.py SPEC.json OUT.json (times TF/JAX per-example Jacobians; see the module docstring)",
              file=sys.stderr)
        return EXIT_OK if args[:1] in (["-h"], ["--help"]) else EXIT_BAD_SPEC
    spec_path, out_path = args
    try:
        try:
            with open(spec_path) as f:
                raw = json.load(f)
        except OSError as err:
            raise SpecError(f"cannot read it: {type(err).__name__}: {err}") from None
        except json.JSONDecodeError as err:
            raise SpecError(f"not valid JSON: {err}") from None
        spec = parse_spec(raw)
        out_dir = os.path.dirname(os.path.abspath(out_path))
        if not os.path.isdir(out_dir):
            raise SpecError(f"the folder of OUT.json does not exist: {out_dir}")
    except SpecError as err:
        print(f"peers.py: malformed spec {spec_path}: {err}", file=sys.stderr)
        return EXIT_BAD_SPEC
    run(spec, out_path)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
