"""The functional API, ``distjac.batch_jacobian(fn, x, mode=...)``, and the kernels under it.

Every mode is compared against the float64 per-example loop and a finite difference
(tests/helpers.py); the seed examples must come out exactly.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import (
    SEED_FIRST,
    SEED_SECOND,
    SEED_X,
    assert_close,
    check_finite_difference,
    cube,
    make_conv,
    make_lstm,
    make_lstm_cell,
    make_matrix_model,
    make_mlp,
    randn,
    reference_batch_hessian,
    reference_batch_jacobian,
)
from torch import nn

import distjac
from distjac import kernels
from distjac.kernels import Strategy, choose_strategy, clear_caches, run_strategy

MODES = ["rev", "fwd", "auto"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# name -> (factory(dtype) -> fn, input shape (B, *in))
MODELS = {
    "mlp": (lambda dt: make_mlp((5, 7, 3), dtype=dt), (4, 5)),
    "mlp_wide_output": (lambda dt: make_mlp((3, 8, 12), seed=1, dtype=dt), (4, 3)),
    "conv": (lambda dt: make_conv(dtype=dt), (2, 1, 6, 6)),
    "lstm": (lambda dt: make_lstm(dtype=dt), (3, 3, 4)),
    "lstm_cell": (lambda dt: make_lstm_cell(dtype=dt), (3, 3, 4)),
    "matrix": (lambda dt: make_matrix_model(dtype=dt), (3, 2, 4)),  # (B,2,4) -> (B,2,5)
}


def _model(name: str, dtype: torch.dtype = torch.float32, seed: int = 1):
    factory, shape = MODELS[name]
    return factory(dtype), randn(*shape, seed=seed, dtype=dtype)


# --------------------------------------------------------------------------------------
# The seed example, exactly
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pfor", [True, False])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_seed_first_order_exact(mode, pfor, dtype):
    x = torch.tensor(SEED_X, dtype=dtype)
    jac = distjac.batch_jacobian(cube, x, mode=mode, experimental_use_pfor=pfor)
    assert jac.dtype == dtype
    assert torch.equal(jac, torch.tensor(SEED_FIRST, dtype=dtype)), jac


@pytest.mark.parametrize("pi", [1, 2, 3, None])
@pytest.mark.parametrize("mode", MODES)
def test_seed_first_order_exact_any_parallel_iterations(mode, pi):
    x = torch.tensor(SEED_X)
    jac = distjac.batch_jacobian(cube, x, mode=mode, parallel_iterations=pi)
    assert torch.equal(jac, torch.tensor(SEED_FIRST)), jac


# --------------------------------------------------------------------------------------
# Every mode against the float64 loop reference and finite differences
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pfor", [True, False])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_matches_float64_reference_and_finite_differences(name, mode, pfor, dtype):
    fn, x = _model(name, dtype)
    jac = distjac.batch_jacobian(fn, x, mode=mode, experimental_use_pfor=pfor)
    ref = reference_batch_jacobian(fn, x)
    assert jac.dtype == dtype
    assert_close(jac, ref, msg=f"{name} mode={mode} pfor={pfor}")
    check_finite_difference(fn, x, jac)


def test_matrix_shaped_source_and_target_layout():
    """x (B,2,4) -> y (B,2,5): result (B,2,5,2,4) with J[b,i,j,k,l] = dy[b,i,j]/dx[b,k,l]."""
    fn, x = _model("matrix", torch.float64)
    jac = distjac.batch_jacobian(fn, x, mode="rev")
    assert jac.shape == (3, 2, 5, 2, 4)
    # Rows of x do not mix: dy[b, i] / dx[b, k] is zero for i != k.
    assert torch.count_nonzero(jac[:, 0, :, 1, :]) == 0
    assert torch.count_nonzero(jac[:, 1, :, 0, :]) == 0
    # And the diagonal blocks are a.T scaled by 1 - tanh^2 (computed by hand).
    a = fn.a.detach()
    y = torch.tanh(x @ a)
    expected = (1 - y[:, 0, :] ** 2)[:, :, None] * a.T[None]
    assert_close(jac[:, 0, :, 0, :], expected)


@pytest.mark.parametrize("pi", [1, 2, 3, 7, None])
@pytest.mark.parametrize("pfor", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_parallel_iterations_and_pfor_do_not_change_the_result(mode, pfor, pi):
    # TF BatchJacobianTest.test_parallel_iterations: parallel_iterations 2 vs 3 agree.
    # 6 inputs, 8 outputs: chunks of 1, 2, 3, 7 and all leave remainders in both modes.
    fn = make_mlp((6, 8, 8), seed=10, dtype=torch.float64)
    x = randn(3, 6, seed=10, dtype=torch.float64)
    jac = distjac.batch_jacobian(fn, x, mode=mode, parallel_iterations=pi, experimental_use_pfor=pfor)
    assert_close(jac, reference_batch_jacobian(fn, x))


def test_parallel_iterations_2_vs_3_equal():
    fn, x = _model("mlp")
    for mode in MODES:
        j2 = distjac.batch_jacobian(fn, x, mode=mode, parallel_iterations=2)
        j3 = distjac.batch_jacobian(fn, x, mode=mode, parallel_iterations=3)
        assert_close(j2, j3, msg=mode)


# --------------------------------------------------------------------------------------
# Composability: second (and third) order
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", MODES)
@pytest.mark.parametrize("outer", MODES)
def test_second_order_seed_exact(outer, inner):
    x = torch.tensor(SEED_X)
    jac2 = distjac.batch_jacobian(lambda z: distjac.batch_jacobian(cube, z, mode=inner), x, mode=outer)
    assert torch.equal(jac2, torch.tensor(SEED_SECOND)), jac2


@pytest.mark.parametrize("inner", MODES)
@pytest.mark.parametrize("outer", MODES)
def test_second_order_mlp_matches_float64_reference(outer, inner):
    fn = make_mlp((3, 6, 2), seed=3, dtype=torch.float64)
    x = randn(4, 3, seed=4, dtype=torch.float64)
    jac2 = distjac.batch_jacobian(lambda z: distjac.batch_jacobian(fn, z, mode=inner), x, mode=outer)
    assert jac2.shape == (4, 2, 3, 3)
    ref = reference_batch_hessian(fn, x)
    assert_close(jac2, ref)
    # A Hessian of each output is symmetric in its last two axes.
    assert_close(jac2, jac2.transpose(-1, -2))


@pytest.mark.parametrize("inner", MODES)
@pytest.mark.parametrize("middle", MODES)
@pytest.mark.parametrize("outer", MODES)
def test_third_order_of_the_seed(outer, middle, inner):
    # d^3 (x^3) / dx^3 = 6 on the triple diagonal, 0 elsewhere.
    x = torch.tensor(SEED_X)
    f1 = lambda z: distjac.batch_jacobian(cube, z, mode=inner)
    f2 = lambda z: distjac.batch_jacobian(f1, z, mode=middle)
    jac3 = distjac.batch_jacobian(f2, x, mode=outer)
    expected = torch.zeros(2, 2, 2, 2, 2)
    for i in range(2):
        expected[:, i, i, i, i] = 6
    assert torch.equal(jac3, expected), jac3


def _jacobian_by_tape(z):
    with distjac.GradientTape() as tape:
        tape.watch(z)
        y = z * z * z
    return tape.batch_jacobian(y, z)


@pytest.mark.parametrize("mode", MODES)
def test_functional_over_a_tape_inside_fn(mode):
    # TF's style: fn computes a batch Jacobian with its own tape; the functional API
    # differentiates fn. Second order of the seed, exactly.
    x = torch.tensor(SEED_X)
    if mode == "fwd":  # fn runs under torch.func.jvp, where a tape cannot: a clear error
        with pytest.raises(RuntimeError, match="mode='rev'"):
            distjac.batch_jacobian(_jacobian_by_tape, x, mode=mode)
        return
    assert torch.equal(distjac.batch_jacobian(_jacobian_by_tape, x, mode=mode), torch.tensor(SEED_SECOND))


@pytest.mark.parametrize("mode", MODES)
def test_result_is_differentiable_when_x_requires_grad(mode):
    fn = make_mlp((3, 5, 2), seed=5, dtype=torch.float64)
    x = randn(3, 3, seed=6, dtype=torch.float64).requires_grad_(True)
    jac = distjac.batch_jacobian(fn, x, mode=mode)
    assert jac.requires_grad
    w = randn(3, 2, 3, seed=7, dtype=torch.float64)
    (g,) = torch.autograd.grad((jac * w).sum(), x)
    hess = reference_batch_hessian(fn, x)  # (B, M, N, N)
    assert_close(g, torch.einsum("bmn,bmnk->bk", w, hess))


@pytest.mark.parametrize("mode", MODES)
def test_result_does_not_require_grad_for_a_plain_input(mode):
    x = torch.tensor(SEED_X)
    jac = distjac.batch_jacobian(cube, x, mode=mode)
    assert not jac.requires_grad


# --------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_against_float64_reference(dtype, mode):
    fn = make_mlp((6, 16, 16, 4), seed=8, dtype=dtype)
    x = randn(5, 6, seed=9, dtype=dtype)
    jac = distjac.batch_jacobian(fn, x, mode=mode)
    assert jac.dtype == dtype
    assert jac.shape == (5, 4, 6)
    # The reference runs the same (rounded) weights and inputs in float64; the tolerance
    # is that of the dtype the result was computed in.
    assert_close(jac, reference_batch_jacobian(fn, x))
    check_finite_difference(fn, x, jac)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_conv(dtype, mode):
    fn, x = _model("conv", dtype)
    jac = distjac.batch_jacobian(fn, x, mode=mode)
    assert jac.dtype == dtype
    assert_close(jac, reference_batch_jacobian(fn, x))


# --------------------------------------------------------------------------------------
# Degenerate shapes
# --------------------------------------------------------------------------------------

DEGENERATE = {
    # name: (x shape, fn, expected result shape); TF's test_degenerate_shape is the first.
    "square_(1,0)": ((1, 0), lambda x: x**2, (1, 0, 0)),
    "(1,0)->(1,2)": ((1, 0), lambda x: x.sum(1, keepdim=True) + torch.tensor([[1.0, 2.0]]), (1, 2, 0)),
    "(1,2)->(1,0)": ((1, 2), lambda x: x[:, :0] * 3, (1, 0, 2)),
    "batch_0": ((0, 3), lambda x: x**2, (0, 3, 3)),
    "batch_0_matrix": ((0, 2, 3), lambda x: torch.tanh(x).sum(-1), (0, 2, 2, 3)),
}


@pytest.mark.parametrize("pfor", [True, False])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_shapes(case, mode, pfor):
    shape, fn, expected = DEGENERATE[case]
    x = torch.zeros(shape)
    jac = distjac.batch_jacobian(fn, x, mode=mode, experimental_use_pfor=pfor)
    assert jac is not None
    assert tuple(jac.shape) == expected
    assert jac.dtype == torch.float32


# --------------------------------------------------------------------------------------
# Unconnected targets
# --------------------------------------------------------------------------------------

UNCONNECTED_NONE = ["none", distjac.UnconnectedGradients.NONE]
UNCONNECTED_ZERO = ["zero", distjac.UnconnectedGradients.ZERO]


@pytest.mark.parametrize("pfor", [True, False])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ug", UNCONNECTED_NONE + UNCONNECTED_ZERO, ids=str)
def test_unconnected(ug, mode, pfor):
    x = randn(3, 4, seed=2, dtype=torch.float64)
    # The target has another dtype than the source: zeros take the source's dtype.
    fn = lambda z: torch.ones(z.shape[0], 2, 5, dtype=torch.float32)
    jac = distjac.batch_jacobian(fn, x, mode=mode, unconnected_gradients=ug, experimental_use_pfor=pfor)
    if ug in UNCONNECTED_NONE:
        assert jac is None
    else:
        assert jac is not None and jac.shape == (3, 2, 5, 4)
        assert jac.dtype == torch.float64
        assert torch.count_nonzero(jac) == 0


@pytest.mark.parametrize("mode", MODES)
def test_partly_connected_target_is_a_tensor_with_zeros(mode):
    # Only some outputs depend on x: a Jacobian with zero rows, never None.
    x = randn(3, 2, seed=3)
    fn = lambda z: torch.cat([z**2, torch.ones(z.shape[0], 1)], dim=1)
    jac = distjac.batch_jacobian(fn, x, mode=mode)
    assert jac is not None and jac.shape == (3, 3, 2)
    assert torch.count_nonzero(jac[:, 2]) == 0
    assert_close(jac[:, :2], torch.diag_embed(2 * x))


# --------------------------------------------------------------------------------------
# fn is called on batches: Python control flow on the batch's values works
# --------------------------------------------------------------------------------------


class _Guarded:
    """A function with Python control flow on the batch's values; records batch sizes."""

    def __init__(self):
        self.batch_sizes: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        if x.isnan().any():
            raise ValueError("NaN in the batch")
        if (x.abs().max() > 100).item():  # a branch on a value, not taken here
            return x * 0
        return torch.sin(x) + x**2


@pytest.mark.parametrize("pfor", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_python_control_flow_on_the_batch_values(mode, pfor):
    fn = _Guarded()
    x = randn(6, 3, seed=11)
    jac = distjac.batch_jacobian(fn, x, mode=mode, experimental_use_pfor=pfor)
    # fn saw batches, never one example at a time (the reference below does call it on
    # single examples, so look first).
    assert fn.batch_sizes and min(fn.batch_sizes) > 1, fn.batch_sizes
    assert_close(jac, reference_batch_jacobian(fn, x))

    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN in the batch"):
        distjac.batch_jacobian(_Guarded(), bad, mode=mode, experimental_use_pfor=pfor)


# --------------------------------------------------------------------------------------
# The user's tensors and modules are left as they were found
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_inputs_and_parameters_left_untouched(mode):
    fn, x = _model("mlp")
    x_before = x.clone()
    jac = distjac.batch_jacobian(fn, x, mode=mode)
    assert jac.shape == (4, 3, 5)
    assert not x.requires_grad and x.grad is None
    assert torch.equal(x, x_before)
    for p in fn.parameters():
        assert p.grad is None


# --------------------------------------------------------------------------------------
# The memory budget
# --------------------------------------------------------------------------------------


def _budget_fn():
    return make_mlp((8, 32, 16), seed=12), randn(64, 8, seed=13)


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_max_memory_shrinks_the_pass_and_keeps_the_answer(mode):
    fn, x = _budget_fn()
    b, m, n = 64, 16, 8
    rows = m if mode == "rev" else n
    out_bytes = b * m * n * x.element_size()
    ref = reference_batch_jacobian(fn, x)

    roomy = choose_strategy(fn, x, mode=mode, max_memory=1 << 40)
    assert isinstance(roomy, Strategy) and roomy.mode == mode
    assert (roomy.chunk or rows) == rows and (roomy.block or b) == b

    # Walk the budget down: the work per pass (chunk x block) never grows, and some budget
    # makes it smaller than all rows at once before MemoryBudgetError.
    seen_smaller_chunk = seen_smaller_block = False
    last_work = rows * b
    budget = out_bytes * 64
    while budget > out_bytes:
        try:
            s = choose_strategy(fn, x, mode=mode, max_memory=budget)
        except distjac.MemoryBudgetError:
            break
        work = (s.chunk or rows) * (s.block or b)
        assert work <= last_work, (budget, s)
        last_work = work
        if (s.chunk or rows) < rows and not seen_smaller_chunk:
            seen_smaller_chunk = True
            jac = distjac.batch_jacobian(fn, x, mode=mode, max_memory=budget)
            assert_close(jac, ref, msg=f"max_memory={budget} -> {s}")
        if (s.block or b) < b and not seen_smaller_block:
            seen_smaller_block = True
            jac = distjac.batch_jacobian(fn, x, mode=mode, max_memory=budget)
            assert_close(jac, ref, msg=f"max_memory={budget} -> {s}")
        budget = int(budget * 0.8)
    assert seen_smaller_chunk, "no budget made the vectorized pass smaller"


@pytest.mark.parametrize("mode", MODES)
def test_tiny_max_memory_raises(mode):
    fn, x = _budget_fn()
    out_bytes = 64 * 16 * 8 * x.element_size()
    for budget in (100, out_bytes - 1, out_bytes + 8):
        with pytest.raises(distjac.MemoryBudgetError, match="memory budget"):
            distjac.batch_jacobian(fn, x, mode=mode, max_memory=budget)
    # MemoryBudgetError is a MemoryError, so `except MemoryError` works.
    with pytest.raises(MemoryError):
        distjac.batch_jacobian(fn, x, mode=mode, max_memory=100)


def test_max_memory_default_from_environment(monkeypatch):
    fn, x = _budget_fn()
    monkeypatch.setenv("DISTJAC_MAX_MEMORY", "1000")
    with pytest.raises(distjac.MemoryBudgetError, match="memory budget"):
        distjac.batch_jacobian(fn, x, mode="rev")
    monkeypatch.setenv("DISTJAC_MAX_MEMORY", str(1 << 30))
    assert_close(distjac.batch_jacobian(fn, x, mode="rev"), reference_batch_jacobian(fn, x))


# --------------------------------------------------------------------------------------
# check_independence
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_check_independence_passes_for_an_mlp(mode):
    fn, x = _model("mlp")
    jac = distjac.batch_jacobian(fn, x, mode=mode, check_independence=True)
    assert_close(jac, reference_batch_jacobian(fn, x))


def _batchnorm(train: bool) -> nn.Module:
    model = nn.Sequential(make_mlp((5, 6), seed=14), nn.BatchNorm1d(6))
    return model.train(train)


@pytest.mark.parametrize("mode", ["rev", "auto"])
def test_check_independence_rejects_batchnorm_in_train_mode(mode):
    # TF issue #38428: TF silently sums the cross-example terms.
    x = randn(8, 5, seed=15)
    with pytest.raises(distjac.CoupledExamplesError, match="couples the examples"):
        distjac.batch_jacobian(_batchnorm(train=True), x, mode=mode, check_independence=True)


@pytest.mark.parametrize("mode", MODES)
def test_check_independence_passes_for_batchnorm_in_eval_mode(mode):
    model = _batchnorm(train=False)
    x = randn(8, 5, seed=15)
    jac = distjac.batch_jacobian(model, x, mode=mode, check_independence=True)
    assert_close(jac, reference_batch_jacobian(model, x))


COUPLED = {
    "minus_batch_mean": lambda x: x - x.mean(0),
    "roll_over_batch": lambda x: x + x.roll(1, 0),
    "softmax_over_batch": lambda x: torch.softmax(x, dim=0),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(COUPLED))
def test_check_independence_rejects_coupled_functions(name, mode):
    x = randn(6, 3, seed=16)
    with pytest.raises(distjac.CoupledExamplesError, match="couples the examples"):
        distjac.batch_jacobian(COUPLED[name], x, mode=mode, check_independence=True)
    # CoupledExamplesError is a ValueError.
    with pytest.raises(ValueError):
        distjac.batch_jacobian(COUPLED[name], x, mode=mode, check_independence=True)


# --------------------------------------------------------------------------------------
# mode="auto"
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_auto_equals_explicit_modes(name):
    fn, x = _model(name)
    auto = distjac.batch_jacobian(fn, x, mode="auto")
    rev = distjac.batch_jacobian(fn, x, mode="rev")
    assert_close(auto, rev, msg=name)
    s = choose_strategy(fn, x, mode="auto")
    assert s.mode in ("rev", "fwd", "chain"), s  # chain: NOTE [small chains]


def test_auto_picks_by_per_example_sizes():
    # Far apart sizes decide without measuring: narrow input -> forward, narrow output -> reverse.
    # (Called through plain functions: the Sequentials themselves are chains of known
    # layers, which auto takes at these sizes, NOTE [small chains].)
    narrow_in = make_mlp((2, 16, 64), seed=17)
    narrow_out = make_mlp((64, 16, 2), seed=18)
    assert choose_strategy(lambda z: narrow_in(z), randn(4, 2, seed=1), mode="auto").mode == "fwd"
    assert choose_strategy(lambda z: narrow_out(z), randn(4, 64, seed=1), mode="auto").mode == "rev"
    for fn, x in ((narrow_in, randn(4, 2, seed=1)), (narrow_out, randn(4, 64, seed=1))):
        s = choose_strategy(fn, x, mode="auto")
        assert s.mode == "chain" and s.record.how == "sizes", s.record
        assert any(n.startswith("chain: chain of 3") for n in s.record.notes), s.record
        assert_close(distjac.batch_jacobian(fn, x), reference_batch_jacobian(fn, x))


@pytest.mark.slow
def test_auto_measured_choice_w1_mlp_equals_rev():
    """A W1-like MLP (64-256-256-32, B=2048): B*M*N = 2**22, so auto measures."""
    fn = make_mlp((64, 256, 256, 32), seed=19)
    x = randn(2048, 64, seed=20)
    assert x.shape[0] * 32 * 64 >= 1 << 22
    clear_caches()
    auto = distjac.batch_jacobian(fn, x, mode="auto")
    s = choose_strategy(fn, x, mode="auto")  # cached: no second measurement
    assert s.mode in ("rev", "fwd", "chain")  # an MLP in a Sequential is a chain candidate
    assert s.record.how == "cached" and any(t.startswith("chain/") for t, _ in s.record.times)
    assert choose_strategy(fn, x, mode="auto") == s
    rev = distjac.batch_jacobian(fn, x, mode="rev")
    assert auto.shape == (2048, 32, 64)
    assert_close(auto, rev)
    idx = torch.tensor([0, 1023, 2047])
    assert_close(auto[idx], reference_batch_jacobian(fn, x[idx]))


# --------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none found")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_cpu(mode):
    fn, x = _model("conv")
    cpu = distjac.batch_jacobian(fn, x, mode=mode)
    dev = distjac.batch_jacobian(fn.cuda(), x.cuda(), mode=mode)
    assert dev.device.type == "cuda"
    assert_close(dev.cpu(), cpu, rtol=1e-4, atol=1e-5)
    seed = distjac.batch_jacobian(cube, torch.tensor(SEED_X, device="cuda"), mode=mode)
    assert torch.equal(seed.cpu(), torch.tensor(SEED_FIRST))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none found")
def test_auto_keeps_vectorized_candidates_on_cuda():
    """Heavy rows (W3: 512 x 512 per example) measure only loops on a CPU; on a GPU a loop
    of 512 passes was 25x slower than one vectorized pass (H200), so auto must vectorize."""
    clear_caches()
    x = torch.randn(1024, 512, device="cuda")
    s = choose_strategy(cube, x, mode="auto")
    assert s.vectorize, s
    assert_close(distjac.batch_jacobian(cube, x[:4], mode="auto").cpu(),
                 reference_batch_jacobian(cube, x[:4].cpu()))


def test_explicit_parallel_iterations_is_honoured():
    """TF runs exactly parallel_iterations rows per pass; the budget does not override it."""
    fn, x = _model("conv")
    s = choose_strategy(fn, x, mode="fwd", parallel_iterations=5)
    assert (s.mode, s.vectorize, s.chunk) == ("fwd", True, 5)
    s = choose_strategy(fn, x, mode="rev", experimental_use_pfor=False)
    assert (s.mode, s.vectorize) == ("rev", False)


# --------------------------------------------------------------------------------------
# Autograd history of the result, the probe cache, the choice cache's key
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_module_result_has_no_history_when_nothing_differentiates(mode):
    """Parameters require grad, x does not, no tape records: no mode returns history
    (forward mode used to return grad_fn=<ViewBackward0>)."""
    fn = make_mlp((3, 5, 4), seed=5)
    assert all(p.requires_grad for p in fn.parameters())
    x = randn(6, 3, seed=6)
    jac = distjac.batch_jacobian(fn, x, mode=mode)
    assert jac.grad_fn is None and not jac.requires_grad
    assert_close(jac, reference_batch_jacobian(fn, x))
    # also when the batch is cut into blocks (max_memory small enough for a few rows)
    jac = distjac.batch_jacobian(fn, x, mode=mode, max_memory=6 * 4 * 3 * 4 + 1500)
    assert jac.grad_fn is None and not jac.requires_grad


@pytest.mark.parametrize("mode", MODES)
def test_module_result_is_differentiable_while_a_tape_records(mode):
    """TF's rule, the same in every mode: under a recording tape the result is
    differentiable, here w.r.t. the parameters (x itself is not watched)."""
    fn = make_mlp((3, 5, 4), seed=5, dtype=torch.float64)
    x = randn(6, 3, seed=6, dtype=torch.float64)
    w0 = fn[0].weight
    with distjac.GradientTape() as tape:
        jac = distjac.batch_jacobian(fn, x, mode=mode)
    assert jac.requires_grad
    (g,) = torch.autograd.grad((jac ** 2).sum(), w0)
    # reference: torch.func over one example, differentiated w.r.t. the weight
    single = lambda xi: fn(xi.unsqueeze(0)).squeeze(0)  # noqa: E731
    ref = torch.func.vmap(torch.func.jacrev(single))(x)
    (g_ref,) = torch.autograd.grad((ref ** 2).sum(), w0)
    assert_close(g, g_ref)
    assert not tape.watched_variables()


class _Counting(nn.Module):
    """Wraps a module; counts calls by the number of rows they get."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.rows: list[int] = []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.inner(x)


@pytest.mark.parametrize("mode", MODES)
def test_probe_runs_once_per_function_and_shape(mode):
    from distjac.kernels import PROBE_ROWS

    clear_caches()
    fn = _Counting(make_mlp((4, 6, 3), seed=2))
    x = randn(50, 4, seed=3)
    first = distjac.batch_jacobian(fn, x, mode=mode)
    assert fn.rows.count(PROBE_ROWS) == 1
    fn.rows.clear()
    second = distjac.batch_jacobian(fn, x, mode=mode)
    choose_strategy(fn, x, mode=mode)
    assert PROBE_ROWS not in fn.rows, fn.rows  # no second probe
    assert torch.equal(first, second)
    # another dtype is another key: probed again
    distjac.batch_jacobian(fn.double(), x.double(), mode=mode)
    assert fn.rows.count(PROBE_ROWS) == 1


@pytest.mark.parametrize("mode", ["fwd", "auto"])
def test_probe_cache_follows_a_module_that_changes(mode):
    """Forward mode trusts the probed output shape: a resized layer, or a switch to
    eval mode, must be probed afresh (the fingerprint is part of the key)."""
    clear_caches()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    x = randn(5, 4, seed=4)
    model.eval()
    assert distjac.batch_jacobian(model, x, mode=mode).shape == (5, 3, 4)
    model[0] = nn.Linear(4, 7)
    jac = distjac.batch_jacobian(model, x, mode=mode)
    assert_close(jac, reference_batch_jacobian(model, x))
    fn = _Counting(model).eval()
    distjac.batch_jacobian(fn, x, mode=mode)
    fn.rows.clear()
    fn.train()
    fn.eval()  # same fingerprint again: cached
    distjac.batch_jacobian(fn, x, mode=mode)
    assert fn.rows.count(5) == 1, fn.rows  # the run only (B=5 < PROBE_ROWS: the probe sees 5 too)
    fn.rows.clear()
    model[1].train()  # a training flag flipped: probed afresh
    distjac.batch_jacobian(fn, x, mode="rev")
    assert fn.rows.count(5) == 2, fn.rows


def test_the_fingerprint_sees_what_the_caches_depend_on():
    from distjac.kernels import _fingerprint

    def fp(m):
        return _fingerprint(m)

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Dropout(0.1))
    model = nn.Sequential(inner, nn.Tanh(), nn.Linear(5, 3))
    base = fp(model)
    assert base == fp(model) and hash(base) == hash(fp(model))
    assert fp(model.forward) == base  # a bound method of the module
    seen = fp(lambda z: model(z))  # a closure: what it sees (NOTE [what a function sees])
    assert ("module", base) in seen
    with torch.no_grad():
        model[2].weight.mul_(2)
    assert fp(model) == base  # values are not part of it
    inner[1].train(False)
    assert fp(model) != base  # a nested training flag
    inner[1].train(True)
    assert fp(model) == base
    model[2] = nn.Linear(5, 4)
    assert fp(model) != base  # a resized layer
    model[2] = nn.Linear(5, 3)
    assert fp(model) == base
    assert fp(model.double()) != base  # dtypes
    model.float()
    model.register_buffer("scale", torch.ones(3))
    with_buffer = fp(model)
    assert with_buffer != base
    model.scale = torch.ones(4)
    assert fp(model) != with_buffer  # a buffer's shape
    tied = nn.Sequential(inner, inner)  # one submodule twice: fine, and told apart from one
    assert fp(tied) != fp(nn.Sequential(inner)) and fp(tied) == fp(tied)


class _Switchable(nn.Module):
    """A user's module whose plain attribute decides what forward computes."""

    def __init__(self):
        super().__init__()
        self.mix = False

    def forward(self, x):
        return torch.tanh(x).cumsum(-1) if self.mix else torch.tanh(x)


def _swap_activation(m):
    m[1] = nn.Softmax(-1).train(m.training)  # the same flag: only the class tells them apart


def _hook(m):
    m[1].register_forward_hook(lambda mod, args, out: out * out)


def _unpad(m):
    m[0].padding = (0,)


def _drop(m):
    m[1].p = 0.5


def _flag(m):
    m.mix = True


def _forward_replaced(m):
    m.forward = lambda z: torch.tanh(z).flip(-1)


class _BufferSwitch(nn.Module):
    """A switch kept in a one-element buffer (it follows .to() and the state dict)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("flip", torch.tensor(False))

    def forward(self, x):
        return torch.tanh(x).flip(-1) if self.flip else torch.tanh(x)


class _PlainListOfLayers(nn.Module):
    """Layers kept in a plain Python list (not a ModuleList), as users sometimes do."""

    def __init__(self):
        super().__init__()
        self.layers = [nn.Sequential(nn.Tanh())]

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# what a user edits in place -> (model, input shape); every edit keeps the parameters'
# names and shapes, so the caches must see it some other way (the fingerprint did not:
# a stale chain plan or elementwise proof answered with the old function's Jacobian)
EDITS = {
    "layer swapped (train mode)": (_swap_activation, lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(),
                                                                        nn.Linear(5, 3)), (9, 4)),
    "layer swapped (eval mode)": (_swap_activation, lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(),
                                                                       nn.Linear(5, 3)).eval(), (9, 4)),
    "elementwise layer swapped": (lambda m: m.__setitem__(0, nn.Softmax(-1)), lambda: nn.Sequential(nn.Tanh()),
                                  (6, 4)),
    "output reshaped": (lambda m: m.__setitem__(1, nn.Identity()),
                        lambda: nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3))), (5, 4)),
    "hook registered": (_hook, lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), (9, 4)),
    "conv padding changed": (_unpad, lambda: nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten()),
                             (7, 2, 6)),
    "dropout p raised in train mode": (_drop, lambda: nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.0),
                                                                     nn.Linear(5, 3)), (9, 4)),
    "user flag": (_flag, _Switchable, (6, 4)),
    "forward replaced": (_forward_replaced, _Switchable, (6, 4)),
    "switch buffer flipped": (lambda m: m.flip.fill_(True), _BufferSwitch, (6, 4)),
    "layer in a plain list swapped": (lambda m: m.layers.__setitem__(0, nn.Softmax(-1)), _PlainListOfLayers, (6, 4)),
    "layer inside a plain list's module swapped": (lambda m: m.layers[0].__setitem__(0, nn.Softmax(-1)),
                                                   _PlainListOfLayers, (6, 4)),
}


@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_a_module_edited_in_place_is_probed_afresh(edit):
    """The fingerprint holds each submodule's class, plain settings, hooks and instance
    callables besides its tensors' shapes: after an in-place edit every cached fact (probe,
    chain plan, elementwise proof, choice) is worked out again."""
    change, build, shape = EDITS[edit]
    clear_caches()
    torch.manual_seed(0)
    model = build()
    x = randn(*shape, seed=6)
    for mode in ("auto", "fwd", "rev"):
        distjac.batch_jacobian(model, x, mode=mode)
    change(model)
    if edit == "dropout p raised in train mode":  # random masks: no dense reference; never the identity
        assert choose_strategy(model, x).mode != "chain"
        return
    ref = reference_batch_jacobian(model, x)
    for mode in ("auto", "fwd", "rev"):
        assert_close(distjac.batch_jacobian(model, x, mode=mode), ref)
    if edit in ("elementwise layer swapped", "user flag", "forward replaced", "switch buffer flipped",
                "layer in a plain list swapped", "layer inside a plain list's module swapped"):
        with pytest.raises(distjac.OptionError, match="not provably elementwise"):
            distjac.batch_jacobian(model, x, structure="diagonal")


class _Options:  # a user's config object a function reads
    def __init__(self):
        self.mix = False


_GLOBAL_MODEL = nn.Sequential(nn.Tanh())
_GLOBAL_CFG = {"mix": False}


def _reads_global_model(t):
    return _GLOBAL_MODEL(t)


def _helper_reading_cfg(t):
    return torch.softmax(t, -1) if _GLOBAL_CFG["mix"] else torch.tanh(t)


def _calls_a_helper(t):
    return _helper_reading_cfg(t) * 1.0


def _function_cases():
    """name -> (fn, change): functions whose Jacobian changes with what they can see (NOTE
    [what a function sees]); each cached an elementwise proof, or a probed output shape,
    that outlived the change and answered with the old function's Jacobian, silently."""
    model = nn.Sequential(nn.Tanh())
    resized = nn.Sequential(nn.Linear(5, 6))
    cfg = {"mix": False}
    opts = _Options()
    cfg2 = {"f": (False,)}
    act = {0: torch.tanh}

    class Callable:
        def __init__(self):
            self.mix = False

        def __call__(self, t):
            return torch.softmax(t, -1) if self.mix else torch.tanh(t)

    obj = Callable()

    def partial_target(t, mix):
        return torch.softmax(t, -1) if mix["on"] else torch.tanh(t)

    switch = {"on": False}
    _GLOBAL_MODEL[0] = nn.Tanh()
    _GLOBAL_CFG["mix"] = False
    return {
        "lambda over a module, layer swapped": (lambda t: model(t), lambda: model.__setitem__(0, nn.Softmax(-1))),
        "lambda over a module, output resized": (lambda t: resized(t),
                                                 lambda: resized.__setitem__(0, nn.Linear(5, 2))),
        "closure over a dict flag": (lambda t: torch.softmax(t, -1) if cfg["mix"] else torch.tanh(t),
                                     lambda: cfg.__setitem__("mix", True)),
        "closure over a config object": (lambda t: torch.softmax(t, -1) if opts.mix else torch.tanh(t),
                                         lambda: setattr(opts, "mix", True)),
        "closure over a tuple of flags in a dict": (lambda t: torch.softmax(t, -1) if cfg2["f"][0] else torch.tanh(t),
                                                    lambda: cfg2.__setitem__("f", (True,))),
        "a builtin swapped": (lambda t: act[0](t), lambda: act.__setitem__(0, torch.fliplr)),
        "global module": (_reads_global_model, lambda: _GLOBAL_MODEL.__setitem__(0, nn.Softmax(-1))),
        "helper reading a global dict": (_calls_a_helper, lambda: _GLOBAL_CFG.__setitem__("mix", True)),
        "callable object": (obj, lambda: setattr(obj, "mix", True)),
        "partial": (functools.partial(partial_target, mix=switch), lambda: switch.__setitem__("on", True)),
    }


@pytest.mark.parametrize("case", list(_function_cases()))
def test_a_function_is_probed_afresh_when_what_it_sees_changes(case):
    clear_caches()
    torch.manual_seed(0)
    fn, change = _function_cases()[case]
    x = randn(17, 5, seed=8)

    def reference():  # per example, by torch.func (fn's modules are float32)
        return torch.func.vmap(torch.func.jacrev(lambda r: fn(r[None])[0]))(x)

    for mode in ("auto", "fwd", "rev"):
        assert_close(distjac.batch_jacobian(fn, x, mode=mode), reference())
    change()
    ref = reference()
    for mode in ("auto", "fwd", "rev"):
        assert_close(distjac.batch_jacobian(fn, x, mode=mode), ref, msg=mode)


def test_a_module_option_kept_in_a_dict_is_seen():
    class Opts(nn.Module):
        def __init__(self):
            super().__init__()
            self.opts = {"mix": False}

        def forward(self, t):
            return torch.softmax(t, -1) if self.opts["mix"] else torch.tanh(t)

    clear_caches()
    m, x = Opts(), randn(6, 4, seed=9)
    distjac.batch_jacobian(m, x)
    m.opts["mix"] = True
    assert_close(distjac.batch_jacobian(m, x), reference_batch_jacobian(m, x))


def test_a_forward_replaced_again_and_again_is_never_mistaken():
    """Callables set on a module are told apart by a token, not their id: a new lambda
    can take a freed one's id (after 39 swaps between an elementwise and a dense
    forward, auto once took the dense one for the elementwise one's diagonal)."""
    clear_caches()

    class Plain(nn.Module):
        def forward(self, z):
            return z

    model, x = Plain(), randn(4, 5, seed=14)
    for i in range(20):
        model.forward = lambda z: torch.sin(z)
        assert_close(distjac.batch_jacobian(model, x), reference_batch_jacobian(model, x), msg=str(i))
        del model.forward  # freed: the next lambda is likely made at its address
        model.forward = lambda z: torch.sin(z).cumsum(-1)
        assert_close(distjac.batch_jacobian(model, x), reference_batch_jacobian(model, x), msg=str(i))
        del model.forward


def test_a_global_module_hook_is_seen():
    """A global forward hook registered after a chain was planned changes every module's
    output: the chain (which refuses hooked modules) must not answer from its old plan."""
    clear_caches()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    x = randn(9, 4, seed=7)
    before = distjac.batch_jacobian(model, x)
    handle = nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: out * 2 if isinstance(mod, nn.Tanh) else None)
    try:
        assert choose_strategy(model, x).mode != "chain"
        ref = reference_batch_jacobian(model, x)  # the hook doubles the reference's Tanh too
        assert_close(2 * before, ref)
        assert_close(distjac.batch_jacobian(model, x), ref)
    finally:
        handle.remove()


@pytest.mark.parametrize("mode", ["auto", "fwd"])
def test_a_layer_appended_twice_is_seen(mode):
    """Appending a layer the module already holds adds no parameter name and no new
    module object: the fingerprint must still change (it once did not, and the cached
    one-layer chain plan, or forward mode's probed shape, answered for the longer chain)."""
    clear_caches()
    torch.manual_seed(0)
    lin = nn.Linear(8, 8).requires_grad_(False)
    model = nn.Sequential(lin, nn.Tanh())
    x = randn(64, 8, seed=2)
    assert_close(distjac.batch_jacobian(model, x, mode=mode), reference_batch_jacobian(model, x))
    model.append(lin)
    assert_close(distjac.batch_jacobian(model, x, mode=mode), reference_batch_jacobian(model, x))


def test_one_fingerprint_per_call(monkeypatch):
    """NOTE [one key per call]: a hot call walks the module once, not once per cache."""
    from distjac import kernels

    model = nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 256)).requires_grad_(False)
    x = randn(64, 16, seed=3)
    ref = reference_batch_jacobian(model, x)
    for mode in ("auto", "fwd", "rev"):
        distjac.batch_jacobian(model, x, mode=mode)  # probed, chosen
        walks: list = []
        real = kernels._fingerprint

        def counting(fn, walks=walks, real=real):
            walks.append(1)
            return real(fn)

        monkeypatch.setattr(kernels, "_fingerprint", counting)
        assert_close(distjac.batch_jacobian(model, x, mode=mode), ref)
        assert len(walks) == 1, (mode, len(walks))
        monkeypatch.setattr(kernels, "_fingerprint", real)


def test_modules_made_inside_fn_are_told_apart_within_one_call():
    """Calls made from inside fn, on modules made and dropped there (one address reused,
    shapes changing), must each be probed for themselves."""
    seen = []

    def fn(x):
        for k in (3, 5, 3, 7):
            lin = nn.Linear(4, k).requires_grad_(False)
            for mode in ("fwd", "auto"):
                j = distjac.batch_jacobian(lin, x.detach(), mode=mode)
                seen.append(j.shape == (x.shape[0], k, 4) and torch.equal(j, lin.weight.expand(x.shape[0], k, 4)))
        return x * x

    x = randn(6, 4, seed=7)
    assert_close(distjac.batch_jacobian(fn, x, mode="rev"), torch.diag_embed(2 * x))
    assert len(seen) >= 8 and all(seen), seen


def test_a_module_changed_between_nested_calls_is_probed_afresh():
    """fn switches a submodule between eval and train mode, and swaps a layer, between
    the calls it makes: each call sees the module as it is then (a fingerprint kept for
    the outer call's duration once took train-mode Dropout for eval's, through the
    chain's cached plan, and trusted a stale output shape in forward mode)."""
    torch.manual_seed(0)
    sub = nn.Sequential(nn.Linear(16, 64), nn.Dropout(0.5), nn.Linear(64, 32))
    got = {}

    def fn(x):
        xd = x.detach()
        sub.eval()
        got["eval"] = distjac.batch_jacobian(sub, xd)
        sub.train()
        got["train"] = distjac.batch_jacobian(sub, xd)
        sub.eval()
        sub[2] = nn.Linear(64, 40)
        got["swapped"] = distjac.batch_jacobian(sub, xd, mode="fwd")
        got["swapped_ref"] = reference_batch_jacobian(sub, xd)
        sub[2] = nn.Linear(64, 32)
        return x * x

    x = randn(64, 16, seed=9)
    distjac.batch_jacobian(fn, x, mode="rev")
    assert_close(got["eval"][0], got["eval"][1])  # eval: one linear map for every example
    # train mode: a dropout mask per example, which zeroes some of the eval map's paths
    assert not torch.allclose(got["train"], got["eval"]), "train-mode Dropout taken for eval's"
    assert_close(got["swapped"], got["swapped_ref"])


@pytest.mark.parametrize("mode", ["auto", "fwd", "rev"])
def test_a_lazy_module_is_fingerprinted_before_and_after_its_first_pass(mode):
    """nn.LazyLinear has no parameter shapes until it runs; the first call initializes
    it (in the probe) and the next is probed afresh with the real shapes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(5), nn.Tanh(), nn.Linear(5, 3))
    x = randn(300, 4, seed=8)
    for _ in range(2):
        assert_close(distjac.batch_jacobian(model, x, mode=mode), reference_batch_jacobian(model, x))


def test_probe_cache_never_aliases_a_dead_function():
    """Functions made and dropped in a loop often reuse one address; each must get its
    own probe (forward mode would otherwise return the wrong shape)."""
    import gc

    x = randn(3, 2, seed=5)
    for k in range(1, 12):
        w = randn(k, 2, seed=k)
        fn = lambda z, w=w: z @ w.T  # noqa: E731
        jac = distjac.batch_jacobian(fn, x, mode="fwd")
        assert jac.shape == (3, k, 2)
        assert torch.equal(jac, w.expand(3, k, 2))
        del fn
        gc.collect()


def test_choice_cache_is_keyed_on_max_memory(monkeypatch):
    from distjac import kernels

    monkeypatch.setattr(kernels, "AUTO_MEASURE_MIN_ELEMENTS", 1)  # measure this small fn
    clear_caches()
    fn = make_mlp((6, 8, 6), seed=3)
    x = randn(64, 6, seed=3)
    big, small = 1 << 30, 1 << 29
    r1 = choose_strategy(fn, x, mode="auto", max_memory=big).record
    r2 = choose_strategy(fn, x, mode="auto", max_memory=small).record
    r3 = choose_strategy(fn, x, mode="auto", max_memory=big).record
    r4 = choose_strategy(fn, x, mode="auto").record
    assert (r1.how, r2.how, r3.how, r4.how) == ("measured", "measured", "cached", "measured")
    assert r1.key[-1] == big and r2.key[-1] == small and r4.key[-1] is None
    assert r1.key == r3.key and r1.key != r2.key
    assert r1.times and str(r1).startswith(r1.strategy)
    jac = distjac.batch_jacobian(fn, x, mode="auto", max_memory=small)
    assert_close(jac, distjac.batch_jacobian(fn, x, mode="rev"))


def test_repeated_small_calls_are_measured_once_they_add_up(monkeypatch):
    """NOTE [repeated small calls]: calls too small to measure are counted; the call that
    brings their rows to the threshold measures, and the choice serves every call after.
    choose_strategy's queries do not count; another batch bucket counts apart."""
    from distjac import kernels

    monkeypatch.setenv("DISTJAC_TUNING_CACHE", "0")
    clear_caches()
    fn = make_mlp((6, 8, 6), seed=3)
    x = randn(64, 6, seed=3)
    per_call = 64 * 6 * 6
    monkeypatch.setattr(kernels, "AUTO_MEASURE_MIN_ELEMENTS", 3 * per_call)
    ref = reference_batch_jacobian(fn, x)
    hows = []
    for _ in range(4):
        for _ in range(3):
            choose_strategy(fn, x)  # a query: not counted
        hows.append(choose_strategy(fn, x).record.how)
        assert_close(distjac.batch_jacobian(fn, x), ref)
    assert hows == ["sizes", "sizes", "sizes", "cached"], hows
    rec = choose_strategy(fn, x).record
    assert any("asked for 192 rows in all" in note for note in rec.notes), rec
    assert any("on 64 rows" in what for what, _ in rec.times), rec  # the pilot: the whole 64-row call
    x8 = randn(8, 6, seed=4)
    assert_close(distjac.batch_jacobian(fn, x8), reference_batch_jacobian(fn, x8))
    assert choose_strategy(fn, x8).record.how == "sizes"  # its own bucket, 8 rows counted


def test_repeated_differentiable_calls_measure_without_the_chain(monkeypatch):
    """A result that must be differentiable is its own choice key, and its measured
    choice has no chain among its candidates (the chain records no history): after the
    switch to measuring, the result still carries history, and the plain calls still
    get a chain."""
    from distjac import kernels

    monkeypatch.setenv("DISTJAC_TUNING_CACHE", "0")
    clear_caches()
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5)).requires_grad_(False)
    x = randn(64, 6, seed=5)
    monkeypatch.setattr(kernels, "AUTO_MEASURE_MIN_ELEMENTS", 2 * 64 * 5 * 6)
    ref = reference_batch_jacobian(model, x)
    for _ in range(3):
        xg = x.clone().requires_grad_(True)
        jac = distjac.batch_jacobian(model, xg)
        assert jac.requires_grad and jac.grad_fn is not None
        assert_close(jac.detach(), ref)
    rec = choose_strategy(model, x.clone().requires_grad_(True)).record
    assert rec.how == "cached" and "chain" not in rec.strategy, rec
    assert any(note.startswith("chain: not a candidate: the result must be differentiable") for note in rec.notes)
    (g,) = torch.autograd.grad(jac.sum(), xg)  # second derivatives flow: the tanh's curvature
    assert g.abs().sum() > 0
    for _ in range(3):
        assert_close(distjac.batch_jacobian(model, x), ref)
    plain = choose_strategy(model, x).record
    # the chain raced (timed, or stopped past AUTO_ABANDON x the fastest run: at 64 rows
    # of this small model it can lose on its first run)
    assert plain.how == "cached", plain
    assert (any(what.startswith("chain") for what, _ in plain.times)
            or any(note.startswith("chain/") and "stopped after" in note for note in plain.notes)), plain


def test_a_hopeless_candidate_is_stopped_at_its_next_pass():
    """NOTE [measuring]: a run past AUTO_ABANDON x the fastest so far stops at its next
    pass and its candidate is dropped: a forward row loop of 64 passes (one fn call each)
    raced against one vectorized pass."""
    import time

    from distjac import kernels

    torch.manual_seed(0)
    w = torch.randn(64, 64)
    calls = [0]

    def fn(z):
        calls[0] += 1
        time.sleep(0.004)
        return torch.tanh(z) @ w.to(z.dtype)

    x = randn(8, 64, seed=1)
    log, notes = [], []
    race = kernels._Race(fn, (64,), "test", 64, 64, log, notes)
    vec, loop = Strategy("fwd", vectorize=True), Strategy("fwd", vectorize=False)
    times = race.run([vec, loop], x)
    assert set(times) == {vec}, (times, notes)
    assert any(note.startswith(f"{loop}: stopped after") for note in notes), notes
    assert calls[0] < 64, calls  # the loop's one run alone would have called fn 64 times
    jac = kernels.run_strategy(fn, x, loop)  # stopping a run leaves nothing behind
    assert_close(jac, reference_batch_jacobian(fn, x))


def test_decision_record_for_explicit_and_size_decided_choices():
    fn, x = _model("mlp")
    assert choose_strategy(fn, x, mode="rev").record.how == "explicit"
    rec = choose_strategy(fn, x, mode="auto").record
    assert rec.how == "sizes" and "not measured" in rec.notes[0]
    assert rec.strategy == str(choose_strategy(fn, x, mode="auto"))


# --------------------------------------------------------------------------------------
# Inputs and contexts a user brings (found by a sweep beyond the suite's models)
# --------------------------------------------------------------------------------------


def _sin_x2(z):
    return torch.sin(z) * z**2


@pytest.mark.parametrize("mode", MODES)
def test_a_broadcast_input_works_in_every_mode(mode):
    """x from ``expand`` (rows sharing memory): forward-mode AD cannot attach a tangent to
    it, and the diagonal strategy raised; every mode, and structure="diagonal", work."""
    clear_caches()
    x = randn(1, 4, seed=8).expand(5, 4)
    ref = reference_batch_jacobian(_sin_x2, x)
    assert_close(distjac.batch_jacobian(_sin_x2, x, mode=mode), ref)
    assert_close(distjac.batch_jacobian(_sin_x2, x, structure="diagonal"), torch.diagonal(ref, dim1=1, dim2=2))


@pytest.mark.parametrize("mode", MODES)
def test_inference_mode_computes_the_jacobian(mode):
    """NOTE [inference mode]: under torch.inference_mode autograd records nothing; every
    output looked unconnected (None, or zeros, and the probe cached that for later calls
    outside it). The Jacobian is computed there too, on an inference tensor as well."""
    clear_caches()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = randn(6, 3, seed=9)
    ref = reference_batch_jacobian(model, x)
    with torch.inference_mode():
        assert_close(distjac.batch_jacobian(model, x, mode=mode), ref)
        assert_close(distjac.batch_jacobian(model, x, mode=mode, unconnected_gradients="zero"), ref)
        xi = x.clone()  # an inference tensor
        assert distjac.batch_jacobian(lambda z: torch.ones_like(z), xi, mode=mode) is None  # truly unconnected
    assert xi.is_inference()
    assert_close(distjac.batch_jacobian(model, xi, mode=mode), ref)  # used outside the context
    assert_close(distjac.batch_jacobian(model, x, mode=mode), ref)  # nothing cached from inside it
    clear_caches()
    xg = x.clone().requires_grad_(True)
    with torch.inference_mode():  # grad mode stays off there: no history, even for x requiring grad
        jac = distjac.batch_jacobian(model, xg, mode=mode)
        assert not jac.requires_grad
        assert_close(jac, ref)
        choose_strategy(model, x)  # the other entry points probe outside inference mode too
        assert_close(distjac.kernels.run_strategy(model, x, Strategy("rev")), ref)
    assert_close(distjac.batch_jacobian(model, x, mode=mode), ref)


def _to_double(z):
    return torch.sin(z.double())


@pytest.mark.parametrize("kw", [{"mode": "rev"}, {"mode": "fwd"}, {"mode": "auto"},
                                {"mode": "fwd", "parallel_iterations": 1},
                                {"mode": "rev", "experimental_use_pfor": False}, {"structure": "diagonal"}])
def test_the_result_has_x_dtype_whatever_fn_computes_in(kw):
    """fn computes in float64 on a float32 x: reverse mode's gradients have x's dtype, and
    so must forward mode's, the diagonal's and auto's (they had fn's)."""
    x = randn(4, 3, seed=10)
    jac = distjac.batch_jacobian(_to_double, x, **kw)
    assert jac.dtype == torch.float32
    ref = reference_batch_jacobian(_to_double, x)
    assert_close(jac, torch.diagonal(ref, dim1=1, dim2=2) if "structure" in kw else ref)


def test_a_differentiable_result_comes_from_reverse_mode_where_forward_mode_is_wrong():
    """NOTE [differentiable results]: LayerNorm's forward-mode second derivatives are wrong
    in PyTorch (J.sum() of a LayerNorm is identically 0, yet its gradient through forward
    mode was not); auto's check on two rows sees it and takes reverse mode when the result
    will be differentiated: by autograd, or by an outer batch_jacobian whatever its mode."""
    clear_caches()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)).double()
    x = randn(2, 3, seed=11, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    rec = choose_strategy(model, xg).record
    assert rec.strategy.startswith("rev") and any("second derivatives disagree" in n for n in rec.notes), rec
    assert choose_strategy(model, x).mode != "rev"  # a plain result: the sizes' choice (forward side)
    (g,) = torch.autograd.grad(distjac.batch_jacobian(model, xg).sum(), xg)
    assert g.abs().max() < 1e-12, g
    ref = reference_batch_hessian(model, x)
    for outer in MODES:
        assert_close(distjac.batch_jacobian(lambda z: distjac.batch_jacobian(model, z), x, mode=outer), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_differentiable_result_keeps_forward_mode_where_it_is_right(dtype):
    """A wide-output decoder with x requiring grad (Jacobian regularisation): forward mode
    is 1/128 of reverse mode's passes here, and its second derivatives agree with reverse
    mode's, so auto keeps it (reverse mode for every differentiable result ran 400x
    slower on such a model); the gradient of the result is right."""
    clear_caches()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 512)).to(dtype)
    x = randn(3, 4, seed=15, dtype=dtype)
    xg = x.clone().requires_grad_(True)
    assert choose_strategy(model, xg).mode == "fwd"
    jac = distjac.batch_jacobian(model, xg)
    assert jac.grad_fn is not None
    assert_close(jac, reference_batch_jacobian(model, x))
    (g,) = torch.autograd.grad((jac * jac).sum(), xg)
    xr = x.clone().double().requires_grad_(True)
    ref = reference_batch_jacobian(model, x)  # float64; its own gradient by reverse mode twice
    (gr,) = torch.autograd.grad((distjac.batch_jacobian(model.double(), xr, mode="rev") ** 2).sum(), xr)
    model.to(dtype)
    assert_close(g, gr, dtype=dtype, rtol=1e-3 if dtype == torch.float32 else None)
    assert ref.shape == (3, 512, 4)


def test_glu_result_can_be_differentiated():
    """GLU's forward-mode derivative has no derivative of its own (aten::glu_jvp): with x
    requiring grad, auto's result must still backpropagate (it took forward mode)."""
    clear_caches()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.GLU(1), nn.Flatten(), nn.Linear(8, 40), nn.Tanh()).double()
    x = randn(3, 2, 6, seed=12, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(distjac.batch_jacobian(model, xg).sum(), xg)
    assert_close(g, reference_batch_hessian(model, x).sum(dim=(1, 2, 3)))


def test_a_failed_vectorized_backward_falls_back_to_a_row_loop_in_auto():
    """NOTE [vmap fallback]: GroupNorm's batched double backward fails in PyTorch, so with
    x requiring grad the vectorized reverse pass raises; auto runs the row loop instead
    (and remembers it), an explicit vectorized rev says what to do."""
    clear_caches()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.GroupNorm(2, 6), nn.Linear(6, 2)).double()
    x = randn(5, 6, seed=13, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    ref = reference_batch_jacobian(model, x)
    for _ in range(2):
        jac = distjac.batch_jacobian(model, xg)
        assert_close(jac, ref)
        (g,) = torch.autograd.grad(jac.sum(), xg)
        assert_close(g, reference_batch_hessian(model, x).sum(dim=(1, 2)))
    rec = choose_strategy(model, xg).record
    assert "loop" in rec.strategy and any("NOTE [vmap fallback]" in n for n in rec.notes), rec
    with pytest.raises(distjac.VectorizationError, match="experimental_use_pfor=False"):
        distjac.batch_jacobian(model, xg, mode="rev")
    assert_close(distjac.batch_jacobian(model, x), ref)  # a plain result: vectorized as before


# --------------------------------------------------------------------------------------
# NOTE [connected somewhere]: whether fn(x) depends on x is a fact about the call's rows
# --------------------------------------------------------------------------------------


def _positive_batch_doubles(t):
    """2 t where the rows given sum to more than 0, else a constant: control flow on values."""
    return t * 2 if t.sum() > 0 else torch.zeros_like(t)


@pytest.mark.parametrize("kw", [{"mode": "rev"}, {"mode": "fwd"}, {"mode": "auto"},
                                {"mode": "rev", "parallel_iterations": 2},
                                {"mode": "rev", "experimental_use_pfor": False},
                                {"mode": "auto", "unconnected_gradients": "zero"}])
def test_a_batch_connected_beyond_the_probes_rows_is_not_called_unconnected(kw):
    distjac.kernels.clear_caches()
    x = torch.cat([-torch.ones(kernels.PROBE_ROWS, 4), 10 * torch.ones(12, 4)])  # the probe's rows sum < 0
    jac = distjac.batch_jacobian(_positive_batch_doubles, x, **kw)
    assert jac is not None
    assert torch.equal(jac, 2 * torch.eye(4).expand(20, 4, 4))


def _forces_where_positive(t):
    """A fn that differentiates inside its own forward pass (forces from an energy),
    constant where the rows given sum to 0 or less."""
    if t.sum() <= 0:
        return torch.zeros_like(t)
    with torch.enable_grad():
        (g,) = torch.autograd.grad((t ** 3).sum(), t, create_graph=True)
    return g


def test_the_whole_batch_check_runs_a_fn_that_differentiates_inside_itself():
    distjac.kernels.clear_caches()
    x = torch.cat([-torch.ones(kernels.PROBE_ROWS, 3), 2 * torch.ones(8, 3)])
    jac = distjac.batch_jacobian(_forces_where_positive, x, mode="rev")
    assert jac is not None and torch.equal(jac, torch.diag_embed(6 * x))


def test_an_unconnected_verdict_is_not_reused_for_another_batch():
    distjac.kernels.clear_caches()
    assert distjac.batch_jacobian(_positive_batch_doubles, -torch.ones(3, 4)) is None
    assert torch.equal(distjac.batch_jacobian(_positive_batch_doubles, -torch.ones(3, 4),
                                              unconnected_gradients="zero"), torch.zeros(3, 4, 4))
    jac = distjac.batch_jacobian(_positive_batch_doubles, torch.ones(3, 4))
    assert jac is not None and torch.equal(jac, 2 * torch.eye(4).expand(3, 4, 4))
    s = choose_strategy(_positive_batch_doubles, torch.ones(3, 4))
    assert torch.equal(run_strategy(_positive_batch_doubles, torch.ones(3, 4), s), jac)
    assert run_strategy(_positive_batch_doubles, -torch.ones(3, 4), s) is None


def test_a_block_whose_rows_do_not_reach_the_output_is_zeros_and_the_rest_are_computed():
    """fn sees a block at a time; an unconnected block gives zeros, not a None for the call."""
    x = torch.cat([-torch.ones(8, 3), torch.ones(12, 3)])
    jac = run_strategy(_positive_batch_doubles, x, Strategy("rev", block=8))  # blocks of 8, 8 and 4 rows
    expected = 2 * torch.eye(3).expand(20, 3, 3).clone()
    expected[:8] = 0
    assert torch.equal(jac, expected)
    assert run_strategy(_positive_batch_doubles, -x.abs(), Strategy("rev", block=8)) is None
    # A result that must be differentiable is stacked from its blocks (no preallocated output).
    xg = x.clone().requires_grad_(True)
    jac = run_strategy(_positive_batch_doubles, xg, Strategy("rev", block=8))
    assert torch.equal(jac.detach(), expected)
    assert run_strategy(_positive_batch_doubles, -xg.abs(), Strategy("rev", block=8)) is None


def _tanh_of_mix(t):
    w = torch.linspace(-1, 1, 25, dtype=t.dtype).reshape(5, 5)
    return torch.tanh(t @ w)


_SHARED_MEMORY_X = {
    "expanded": lambda base: base[:4, :1].expand(4, 5),
    "unfolded windows": lambda base: base.flatten()[:9].unfold(0, 5, 1)[:4],
    "as_strided rows overlapping": lambda base: base.flatten().as_strided((4, 5), (2, 1)),
}


@pytest.mark.parametrize("layout", _SHARED_MEMORY_X, ids=list(_SHARED_MEMORY_X))
@pytest.mark.parametrize("kw", [{"mode": "rev"}, {"mode": "fwd"}, {"mode": "auto"},
                                {"mode": "fwd", "experimental_use_pfor": False}])
def test_an_x_whose_positions_share_memory_gives_the_dense_copys_jacobian(kw, layout):
    """Positions of x that share memory (expand, unfold, as_strided) cannot be given
    tangents laid out like x: forward mode failed, or silently mixed columns; distjac
    works on a dense copy."""
    xe = _SHARED_MEMORY_X[layout](torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    expected = reference_batch_jacobian(_tanh_of_mix, xe.contiguous())
    assert_close(distjac.batch_jacobian(_tanh_of_mix, xe, **kw), expected)
    r = distjac.estimates.sketch_matrix((5,), 3, seed=0)
    assert_close(distjac.sketch(_tanh_of_mix, xe, 3, seed=0), expected @ r.double())
    spectral = distjac.estimate(_tanh_of_mix, xe, "spectral", iters=50)
    assert_close(spectral.value, torch.linalg.matrix_norm(expected, ord=2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("x", "error", "match"), [
    (torch.ones(3, 2, dtype=torch.int32), distjac.DtypeError, r"choose_strategy\(fn, x\): x \(the source\) has dtype"),
    (torch.ones(3), distjac.ShapeError, r"choose_strategy\(fn, x\): x \(the source\) has shape \(3,\), rank 1"),
])
def test_choose_strategy_checks_x_as_batch_jacobian_does(x, error, match):
    with pytest.raises(error, match=match):
        choose_strategy(torch.tanh, x)


@pytest.mark.parametrize("call", [
    lambda m, x: distjac.batch_jacobian(m, x, mode="fwd"),
    lambda m, x: distjac.batch_jacobian(m, x, mode="fwd", experimental_use_pfor=False),
    lambda m, x: distjac.estimate(m, x, "frobenius"),
    lambda m, x: distjac.sketch(m, x, 2),
])
def test_batchnorm_in_training_mode_under_torch_func_says_what_to_do(call):
    """Its running statistics are updated in place, which torch.func cannot transform."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    with pytest.raises(RuntimeError, match=r"updates a tensor it holds in place.*model\.eval\(\)"):
        call(model, randn(6, 3, seed=1))


def test_a_one_element_buffer_under_vmap_does_not_break_the_key():
    """Model ensembles call distjac inside torch.func.vmap, where a buffer's value cannot
    be read: the key says so instead of failing."""
    class Scaled(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.register_buffer("k", torch.tensor(k))  # an integer one-element buffer

        def forward(self, t):
            return torch.tanh(t) * self.k

    base = Scaled(1)
    params, buffers = torch.func.stack_module_state([Scaled(2), Scaled(3)])
    x = randn(4, 3, seed=2)

    def one(p, b):
        with torch.nn.utils.stateless._reparametrize_module(base, {**p, **b}):
            return distjac.batch_jacobian(base, x, mode="rev")

    jac = torch.func.vmap(one)(params, buffers)
    assert jac.shape == (2, 4, 3, 3)
    assert_close(jac[1], 3 * reference_batch_jacobian(torch.tanh, x))
