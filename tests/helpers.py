"""Shared comparison helpers and reference models for distjac's tests.

Every execution path is compared against two references that share no code with distjac:

* :func:`reference_batch_jacobian`: a plain per-example loop in float64 — for each example
  ``i`` separately, ``torch.autograd.functional.jacobian`` of ``fn`` on ``x[i:i+1]``.
  Because each example is differentiated alone, a function that couples examples would
  give a different answer here than a batched computation does.
* :func:`check_finite_difference`: central differences in float64 in one random
  direction ``v``: per example, ``J @ v`` against ``(f(x + eps v) - f(x - eps v)) / 2 eps``.

:func:`assert_close` compares in float64 with tolerances chosen by the dtype the result
was computed in (see ``TOLERANCES``).

Reference models are built deterministically from a seed, without touching the global
random state, so tests can be run in any order and alone.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "SEED_FIRST",
    "SEED_SECOND",
    "SEED_X",
    "TOLERANCES",
    "LSTMCellModel",
    "LSTMModel",
    "MatrixModel",
    "assert_close",
    "check_finite_difference",
    "cube",
    "make_conv",
    "make_lstm",
    "make_lstm_cell",
    "make_matrix_model",
    "make_mlp",
    "randn",
    "reference_batch_hessian",
    "reference_batch_jacobian",
    "to_float64",
]

# The seed examples of DESIGN.md, as literal lists: results must equal them exactly.
SEED_X = [[4.0, 2.0], [1.0, 3.0]]
SEED_FIRST = [[[48.0, 0.0], [0.0, 12.0]], [[3.0, 0.0], [0.0, 27.0]]]
SEED_SECOND = [
    [[[24.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 12.0]]],
    [[[6.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 18.0]]],
]


def cube(x: torch.Tensor) -> torch.Tensor:
    """The seed's function, ``y = x * x * x``."""
    return x * x * x


# (rtol, atol) per dtype the result was computed in; atol is relative to the largest
# magnitude of the expected value (at least 1). float32 allows a few ulps accumulated over
# a small network; the half types allow what their 8 (bfloat16) or 11 (float16) bits of
# mantissa lose over two or three layers.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (5e-3, 2e-3),
    torch.bfloat16: (4e-2, 1.5e-2),
}


# Transparent huge pages (NOTE [huge pages] in distjac/_alloc.py): a Linux kernel feature.
HUGE_PAGES = sys.platform.startswith("linux") and Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()


def huge_page_flags(t: torch.Tensor) -> set[str]:
    """VmFlags (/proc/self/smaps) of the mapping holding the first whole 2 MiB page inside
    t's storage: "hg" there means the pages were advised for transparent huge pages."""
    huge = 2 << 20
    addr = -(-t.untyped_storage().data_ptr() // huge) * huge
    lo = hi = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
        elif head == "VmFlags:" and lo is not None and lo <= addr < hi:
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {addr:#x}")


def assert_close(
    actual: torch.Tensor | None,
    expected: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    msg: str = "",
) -> None:
    """Assert ``actual`` equals ``expected`` within the tolerance of ``dtype``.

    ``dtype`` defaults to ``actual.dtype`` (the precision the result was computed in);
    both are compared in float64 on the CPU. Shapes must match exactly.
    """
    assert actual is not None, f"result is None {msg}"
    assert isinstance(actual, torch.Tensor), f"result is {type(actual).__name__}, not a tensor {msg}"
    expected = torch.as_tensor(expected)
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)} {msg}"
    )
    dt = dtype or actual.dtype
    d_rtol, d_atol = TOLERANCES[dt]
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    torch.testing.assert_close(
        a, e,
        rtol=d_rtol if rtol is None else rtol,
        atol=(d_atol if atol is None else atol) * scale,
        msg=lambda m: f"{m}\n{msg}",
    )


def to_float64(fn: Callable) -> Callable:
    """A float64 copy of ``fn``: modules are deep-copied and cast; plain functions must be
    dtype-generic (no captured tensors of another dtype) and are returned as they are."""
    if isinstance(fn, nn.Module):
        return copy.deepcopy(fn).to(torch.float64)
    return fn


def _loop_jacobian(fn64: Callable, x64: torch.Tensor, *, create_graph: bool) -> torch.Tensor:
    """The per-example loop: one ``autograd.functional.jacobian`` per example, stacked."""
    b, in_shape = x64.shape[0], tuple(x64.shape[1:])
    if b == 0:
        out_shape = tuple(fn64(x64).shape[1:])
        return torch.zeros((0, *out_shape, *in_shape), dtype=torch.float64)
    rows = []
    for i in range(b):
        xi = x64[i:i + 1]
        out_shape = tuple(fn64(xi).shape[1:])
        # (1, *out, 1, *in): both batch axes have size one.
        j = torch.autograd.functional.jacobian(fn64, xi, create_graph=create_graph, vectorize=False)
        rows.append(j.reshape(*out_shape, *in_shape))
    return torch.stack(rows)


def reference_batch_jacobian(fn: Callable, x: torch.Tensor, *, fn64: Callable | None = None) -> torch.Tensor:
    """Per-example Jacobians of ``fn`` at ``x`` in float64, one example at a time.

    Args:
        fn: maps (B, *in) -> (B, *out); modules are copied and cast to float64.
        x: the batch (any floating dtype; cast to float64).
        fn64: a float64 version of fn to use instead of ``to_float64(fn)``.

    Returns:
        float64 tensor (B, *out, *in).
    """
    fn64 = fn64 or to_float64(fn)
    return _loop_jacobian(fn64, x.detach().to(torch.float64), create_graph=False)


def reference_batch_hessian(fn: Callable, x: torch.Tensor, *, fn64: Callable | None = None) -> torch.Tensor:
    """Per-example second derivatives, (B, *out, *in, *in), in float64, example by example."""
    fn64 = fn64 or to_float64(fn)

    def first(z: torch.Tensor) -> torch.Tensor:
        return _loop_jacobian(fn64, z, create_graph=True)

    return _loop_jacobian(first, x.detach().to(torch.float64), create_graph=False)


def check_finite_difference(
    fn: Callable,
    x: torch.Tensor,
    jac: torch.Tensor,
    *,
    eps: float = 1e-6,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    fn64: Callable | None = None,
) -> None:
    """Check ``jac`` against central differences of ``fn`` in a random direction.

    In float64, for a random ``v`` shaped like ``x``: per example, ``J[i] @ v[i]`` must
    equal ``(f(x + eps v) - f(x - eps v))[i] / (2 eps)``, within the tolerance of the
    dtype ``jac`` was computed in. The whole batch is perturbed at once, which is only
    valid when examples are independent (as batch_jacobian assumes).
    """
    fn64 = fn64 or to_float64(fn)
    x64 = x.detach().to(torch.float64)
    b = x64.shape[0]
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(x64.shape, generator=gen, dtype=torch.float64)
    v = v / max(1e-12, v.reshape(b, -1).norm(dim=1).max().item())  # unit-ish per example
    with torch.no_grad():
        fd = (fn64(x64 + eps * v) - fn64(x64 - eps * v)) / (2 * eps)
    n = math.prod(x64.shape[1:])
    m = math.prod(fd.shape[1:])
    j64 = jac.detach().to("cpu", torch.float64).reshape(b, m, n)
    jv = torch.bmm(j64, v.reshape(b, n, 1)).reshape(fd.shape)
    # The difference quotient itself is good to ~1e-9 in float64 with eps = 1e-6.
    d_rtol, d_atol = TOLERANCES[dtype or jac.dtype]
    assert_close(jv, fd, dtype=torch.float64, rtol=max(d_rtol, 1e-7), atol=max(d_atol, 1e-8),
                 msg="(J @ v against a central finite difference)")


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A deterministic standard-normal tensor that leaves the global RNG untouched."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _seeded(build: Callable[[], nn.Module], seed: int, dtype: torch.dtype) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.to(dtype)


def make_mlp(sizes=(5, 7, 3), *, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """tanh MLP, e.g. (5, 7, 3): Linear(5, 7) -> tanh -> Linear(7, 3)."""

    def build():
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(nn.Tanh())
            layers.append(nn.Linear(a, b))
        return nn.Sequential(*layers)

    return _seeded(build, seed, dtype)


def make_conv(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """(B, 1, 6, 6) -> conv(3, 3x3) -> tanh -> flatten (48) -> Linear(48, 4): TF's fixture
    layout (tests/fixtures/README.md, case ``conv``)."""

    def build():
        return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4))

    return _seeded(build, seed, dtype)


class LSTMModel(nn.Module):
    """``nn.LSTM(batch_first=True)``; returns the whole output sequence (B, T, H)."""

    def __init__(self, features: int = 4, hidden: int = 5):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


class LSTMCellModel(nn.Module):
    """The same recurrence unrolled in Python over ``nn.LSTMCell``; (B, T, F) -> (B, T, H)."""

    def __init__(self, features: int = 4, hidden: int = 5):
        super().__init__()
        self.hidden = hidden
        self.cell = nn.LSTMCell(features, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.hidden)
        c = h
        outs = []
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
            outs.append(h)
        return torch.stack(outs, dim=1)


def make_lstm(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``LSTMModel(4, 5)``: (B, T, 4) -> (B, T, 5)."""
    return _seeded(LSTMModel, seed, dtype)


def make_lstm_cell(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``LSTMCellModel(4, 5)``: (B, T, 4) -> (B, T, 5)."""
    return _seeded(LSTMCellModel, seed, dtype)


class MatrixModel(nn.Module):
    """Matrix-shaped source and target: (B, 2, 4) -> tanh(x @ a) (B, 2, 5)."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.a)


def make_matrix_model(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    return MatrixModel(randn(4, 5, seed=seed, dtype=dtype))
