"""Property-based tests (hypothesis): every mode, chunk size and shape agrees with the
float64 per-example loop reference."""

from __future__ import annotations

import math

import torch
from helpers import assert_close, randn, reference_batch_jacobian
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import distjac

MODES = ["rev", "fwd", "auto"]
SETTINGS = settings(max_examples=40, deadline=None)


class _Smooth(nn.Module):
    """A smooth per-example map (B, *in) -> (B, *out) with a nonlinearity on both paths:
    y = tanh(x W1) W2 + (x * x) C, with x flattened per example."""

    def __init__(self, in_shape: tuple, out_shape: tuple, seed: int, dtype: torch.dtype):
        super().__init__()
        n, m = math.prod(in_shape), math.prod(out_shape)
        self.out_shape = out_shape
        self.w1 = nn.Parameter(randn(n, 4, seed=seed, dtype=dtype))
        self.w2 = nn.Parameter(randn(4, m, seed=seed + 1, dtype=dtype))
        self.c = nn.Parameter(randn(n, m, seed=seed + 2, dtype=dtype) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.reshape(x.shape[0], -1)
        y = torch.tanh(xf @ self.w1) @ self.w2 + (xf * xf) @ self.c
        return y.reshape(x.shape[0], *self.out_shape)


shapes = st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple)


@st.composite
def problems(draw):
    b = draw(st.integers(1, 5))
    in_shape, out_shape = draw(shapes), draw(shapes)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 10_000))
    fn = _Smooth(in_shape, out_shape, seed, dtype)
    x = randn(b, *in_shape, seed=seed + 3, dtype=dtype)
    return fn, x


options = st.fixed_dictionaries({
    "mode": st.sampled_from(MODES),
    "parallel_iterations": st.one_of(st.none(), st.integers(1, 7)),
    "experimental_use_pfor": st.booleans(),
})


@SETTINGS
@given(problem=problems(), opts=options)
def test_functional_equals_float64_loop(problem, opts):
    fn, x = problem
    jac = distjac.batch_jacobian(fn, x, **opts)
    assert jac.dtype == x.dtype
    assert jac.shape == (x.shape[0], *fn.out_shape, *x.shape[1:])
    assert_close(jac, reference_batch_jacobian(fn, x), msg=str(opts))


@SETTINGS
@given(
    problem=problems(),
    pi=st.one_of(st.none(), st.integers(1, 7)),
    pfor=st.booleans(),
)
def test_tape_equals_float64_loop(problem, pi, pfor):
    fn, x = problem
    x = x.clone()
    with distjac.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    jac = tape.batch_jacobian(y, x, parallel_iterations=pi, experimental_use_pfor=pfor)
    assert not x.requires_grad
    assert_close(jac, reference_batch_jacobian(fn, x), msg=f"pi={pi} pfor={pfor}")


@SETTINGS
@given(problem=problems(), opts=options, split=st.integers(1, 4))
def test_batch_split_invariance(problem, opts, split):
    """The Jacobian of a batch is the concatenation of its parts' Jacobians: examples do
    not leak into each other through chunking or blocking."""
    fn, x = problem
    split = min(split, x.shape[0])
    whole = distjac.batch_jacobian(fn, x, **opts)
    parts = [distjac.batch_jacobian(fn, x[:split], **opts)]
    if split < x.shape[0]:
        parts.append(distjac.batch_jacobian(fn, x[split:], **opts))
    assert_close(whole, torch.cat(parts), msg=str(opts))
