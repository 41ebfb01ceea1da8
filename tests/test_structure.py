"""Elementwise functions (distjac/structure.py, NOTE [elementwise functions]): proved from
the traced graph, never from values; ``structure="diagonal"`` and auto's dense result from
one forward pass, against reverse mode, the float64 per-example loop and TF's fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SEED_FIRST, SEED_X, assert_close, check_finite_difference, cube, randn, reference_batch_jacobian
from torch import nn

import distjac
from distjac.kernels import Strategy, choose_strategy, clear_caches, run_strategy
from distjac.structure import elementwise_reason

FX = np.load(Path(__file__).parent / "fixtures" / "tf_reference.npz", allow_pickle=False)


class Scaled(nn.Module):
    """A per-feature scale and shift (parameters broadcast against x: still elementwise)."""

    def __init__(self, shape):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(shape, generator=g))
        self.b = nn.Parameter(torch.randn(shape, generator=g))

    def forward(self, x):
        return torch.tanh(x * self.w + self.b) * x


ELEMENTWISE = {
    "cube": (cube, (3,)),
    "gelu_times_sigmoid": (lambda x: nn.functional.gelu(x) * torch.sigmoid(x) + 1.0, (5,)),
    "where_pow": (lambda x: torch.where(x > 0, x ** 3, torch.expm1(x)), (4,)),
    "activations_inplace": (nn.Sequential(nn.Softplus(), nn.ReLU(inplace=True), nn.Tanh()).eval(), (6,)),
    "param_scale": (Scaled((2, 3)), (2, 3)),
    "dtype_round_trip": (lambda x: torch.exp(x.to(torch.float64)).to(x.dtype) - x, (4,)),
    "clamp_abs_erf": (lambda x: torch.erf(x.clamp(-1, 1)) + x.abs() * torch.arange(4.0, dtype=x.dtype), (4,)),
}

NOT_ELEMENTWISE = {
    "mean": (lambda x: x - x.mean(1, keepdim=True), "mean"),
    "softmax": (lambda x: torch.softmax(x, dim=1), "softmax"),
    "flip": (lambda x: x.flip(1) * x, "flip"),
    "matmul": (lambda x: x @ torch.ones(4, 4), "not a pointwise"),
    "slice_broadcast": (lambda x: x * x[:, :1], "shape"),
    "layernorm": (nn.LayerNorm(4), "native_layer_norm"),
    "cumsum": (lambda x: torch.cumsum(x, 1), "cumsum"),
    "branch_on_values": (lambda x: x * 2 if (x.sum() > 0).item() else x, "could not be traced"),
    "roll": (lambda x: torch.roll(x, 1, 1), "roll"),
}


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_elementwise_functions_are_proved(name):
    fn, shape = ELEMENTWISE[name]
    assert elementwise_reason(fn, randn(3, *shape, seed=1)) is None


@pytest.mark.parametrize("name", sorted(NOT_ELEMENTWISE))
def test_other_functions_are_not_and_say_why(name):
    fn, word = NOT_ELEMENTWISE[name]
    reason = elementwise_reason(fn, randn(3, 4, seed=1))
    assert reason is not None and word in reason, reason


class _StraightThrough(torch.autograd.Function):
    """Forward rounds (pointwise); backward passes the cotangent through unchanged."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def test_custom_autograd_function_is_not_proved():
    reason = elementwise_reason(lambda z: _StraightThrough.apply(z) * z, randn(3, 4))
    assert reason is not None and "custom autograd.Function (_StraightThroughBackward)" in reason


def test_writing_x_into_a_constant_is_refused():
    buf = torch.zeros(1, 4)

    def sneaky(x):
        c = buf.clone()
        c.add_(x[:1].sum())  # the sum mixes features: refused before the write already
        return x * c

    assert elementwise_reason(sneaky, randn(2, 4)) is not None

    def sneaky2(x):
        c = torch.zeros_like(x)  # does not depend on x's values
        c.copy_(x.flip(0))
        return c

    assert elementwise_reason(sneaky2, randn(2, 4)) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_diagonal_matches_rev_and_float64_loop(name, dtype):
    fn, shape = ELEMENTWISE[name]
    if isinstance(fn, nn.Module):
        fn = fn.to(dtype)
    x = randn(7, *shape, seed=2, dtype=dtype)
    diag = distjac.batch_jacobian(fn, x, structure="diagonal")
    assert diag.shape == x.shape and diag.dtype == dtype and not diag.requires_grad
    n = x[0].numel()
    rev = distjac.batch_jacobian(fn, x, mode="rev").reshape(7, n, n)
    ref = reference_batch_jacobian(fn, x).reshape(7, n, n)
    assert_close(diag.reshape(7, n), torch.diagonal(rev, dim1=1, dim2=2))
    assert_close(diag.reshape(7, n), torch.diagonal(ref, dim1=1, dim2=2))
    # and the off-diagonal of the dense reference is zero: the proof was right
    off = ref - torch.diag_embed(torch.diagonal(ref, dim1=1, dim2=2))
    assert torch.count_nonzero(off) == 0


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_auto_builds_the_dense_result_from_the_diagonal(name):
    clear_caches()
    fn, shape = ELEMENTWISE[name]
    x = randn(5, *shape, seed=3, dtype=torch.float64)
    if isinstance(fn, nn.Module):
        fn = fn.double()
    s = choose_strategy(fn, x, mode="auto")
    assert s.mode == "diag" and s.record.how == "structure", s.record
    jac = distjac.batch_jacobian(fn, x, mode="auto")
    assert not jac.requires_grad
    assert_close(jac, distjac.batch_jacobian(fn, x, mode="rev"))
    assert_close(jac, reference_batch_jacobian(fn, x))
    check_finite_difference(fn, x, jac)
    assert_close(run_strategy(fn, x, Strategy("diag", block=2)), jac)


def test_seed_example_exact_and_tf_fixture():
    x = torch.tensor(SEED_X)
    diag = distjac.batch_jacobian(cube, x, structure="diagonal")
    tf = torch.from_numpy(np.array(FX["seed_first/jac"]))
    assert torch.equal(diag, torch.diagonal(tf, dim1=1, dim2=2))
    assert torch.equal(distjac.batch_jacobian(cube, x, mode="auto"), torch.tensor(SEED_FIRST))


def test_diagonal_is_differentiable_when_x_requires_grad():
    """d/dx of the diagonal of x**3 is 6x: the diagonal keeps autograd history when asked."""
    x = randn(4, 3, seed=5, dtype=torch.float64).requires_grad_(True)
    diag = distjac.batch_jacobian(cube, x, structure="diagonal")
    assert diag.requires_grad
    (g,) = torch.autograd.grad(diag.sum(), x)
    assert_close(g, 6 * x.detach())
    jac = distjac.batch_jacobian(cube, x, mode="auto")
    (g2,) = torch.autograd.grad(jac.sum(), x)
    assert_close(g2, 6 * x.detach())


def test_diagonal_errors_say_what_is_wrong():
    x = randn(3, 4, seed=1)
    with pytest.raises(distjac.OptionError, match="structure='bogus' is not valid"):
        distjac.batch_jacobian(cube, x, structure="bogus")
    with pytest.raises(distjac.OptionError, match="not provably elementwise .*softmax"):
        distjac.batch_jacobian(lambda z: torch.softmax(z, 1), x, structure="diagonal")
    with pytest.raises(distjac.OptionError, match=r"output shape \(2,\) is not its input shape \(4,\)"):
        distjac.batch_jacobian(lambda z: z[:, :2] ** 2, x, structure="diagonal")
    with pytest.raises(ValueError, match="diag strategy needs a provably elementwise fn"):
        run_strategy(lambda z: z.cumsum(1), x, Strategy("diag"))


def test_diagonal_unconnected_and_empty():
    x = randn(3, 4, seed=1)
    const = lambda z: torch.ones_like(z).detach()  # noqa: E731
    assert distjac.batch_jacobian(const, x, structure="diagonal") is None
    zeros = distjac.batch_jacobian(const, x, structure="diagonal", unconnected_gradients="zero")
    assert zeros.shape == x.shape and torch.count_nonzero(zeros) == 0
    empty = distjac.batch_jacobian(cube, torch.zeros(0, 4), structure="diagonal")
    assert empty.shape == (0, 4)


def test_not_elementwise_auto_records_why_and_stays_dense():
    clear_caches()
    fn = lambda z: torch.softmax(z, 1)  # noqa: E731
    x = randn(4, 5, seed=1)
    rec = choose_strategy(fn, x, mode="auto").record
    assert rec.how == "sizes" and any("diag: not applicable" in n and "softmax" in n for n in rec.notes), rec
    assert_close(distjac.batch_jacobian(fn, x), reference_batch_jacobian(fn, x))
