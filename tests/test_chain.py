"""The chain strategy (distjac/chain.py): per-example Jacobians of chains of known layers
multiplied out, against reverse mode, the float64 per-example loop and finite differences."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from helpers import assert_close, check_finite_difference, randn, reference_batch_jacobian
from torch import nn

import distjac
from distjac import kernels
from distjac.chain import plan_chain
from distjac.kernels import Strategy, choose_strategy, clear_caches, run_strategy


def _seeded(build, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


# name -> (builder, per-example input shape); beyond W1-W4: other activations, conv nets
# with Flatten, LayerNorm, 1-D conv, out > in and in > out, nested Sequentials.
CHAINS = {
    "mlp_gelu_out_gt_in": (lambda: nn.Sequential(nn.Linear(6, 9), nn.GELU(), nn.Linear(9, 4), nn.SiLU(),
                                                 nn.Linear(4, 11)), (6,)),
    "deep_mlp_in_gt_out": (lambda: nn.Sequential(nn.Linear(20, 16), nn.ELU(), nn.Linear(16, 16), nn.Softplus(),
                                                 nn.Linear(16, 12), nn.LeakyReLU(0.2), nn.Linear(12, 3),
                                                 nn.Sigmoid()), (20,)),
    "w1_like": (lambda: nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                                      nn.Linear(32, 8)), (16,)),
    "conv2d_flatten": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2),
                                             nn.Mish(), nn.Flatten(), nn.Linear(18, 5)), (2, 7, 7)),
    "conv1d_layernorm": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3, padding="same"), nn.ELU(), nn.LayerNorm(10),
                                               nn.Flatten(), nn.Dropout(0.3), nn.Linear(40, 6), nn.Softplus()),
                         (3, 10)),
    "conv_circular_groups": (lambda: nn.Sequential(nn.Conv1d(4, 4, 3, padding=1, padding_mode="circular", groups=2),
                                                   nn.Hardswish(), nn.Flatten(), nn.Linear(24, 30)), (4, 6)),
    # the reverse side's conv as a forward conv of flipped kernels (NOTE [conv transpose]):
    # dilated, grouped, non-square; then paddings past d(k-1) and strides (conv*_input)
    "conv2d_dilated_grouped": (lambda: nn.Sequential(nn.Conv2d(4, 6, (3, 2), dilation=(2, 1), padding=(1, 0),
                                                               groups=2), nn.Softplus(),
                                                     nn.Conv2d(6, 2, 3, padding=3), nn.Tanh(), nn.Flatten(),
                                                     nn.Linear(180, 4)), (4, 8, 6)),
    "conv1d_dilated_strided": (lambda: nn.Sequential(nn.Conv1d(2, 4, 3, dilation=2, padding=2), nn.Tanh(),
                                                     nn.Conv1d(4, 3, 2, stride=2), nn.Flatten(), nn.Linear(12, 5)),
                               (2, 9)),
    "layernorm_first": (lambda: nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 3), nn.Tanh()), (5,)),
    "nested_unflatten": (lambda: nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.1)),
                                               nn.Sequential(nn.Linear(4, 6), nn.Softsign()), nn.Unflatten(1, (2, 3)),
                                               nn.LayerNorm([2, 3], elementwise_affine=False), nn.Flatten()), (4,)),
    "linear_on_sequences": (lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 2)),
                            (3, 5)),
    "one_linear": (lambda: nn.Sequential(nn.Linear(5, 3)), (5,)),
    "one_activation": (lambda: nn.Sequential(nn.ReLU6()), (5,)),
}
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def plan_shape(plan, x) -> tuple[int, int]:
    """(M, N) of the plan's per-example Jacobian."""
    return math.prod(plan.steps[-1].out_shape), math.prod(x.shape[1:])


@pytest.mark.parametrize("b", [1, 3, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(CHAINS))
def test_chain_equals_rev_at_every_split(name, dtype, b):
    build, shape = CHAINS[name]
    fn = _seeded(build).to(dtype)
    x = randn(b, *shape, seed=b, dtype=dtype)
    rev = distjac.batch_jacobian(fn, x, mode="rev")
    jac = run_strategy(fn, x, Strategy("chain"))
    assert jac.shape == rev.shape and not jac.requires_grad
    assert_close(jac, rev, rtol=TOL[dtype], atol=TOL[dtype], msg=name)
    assert_close(run_strategy(fn, x, Strategy("chain", block=2)), rev, rtol=TOL[dtype], atol=TOL[dtype])
    out_shape = tuple(rev.shape[1:1 + rev.dim() - x.dim()])
    plan = plan_chain(fn, x, out_shape)
    from distjac.chain import chain_jacobian
    for k in range(len(plan.steps) + 1):  # every bracketing gives the same product
        j = chain_jacobian(fn, replace(plan, split=k), x).reshape(rev.shape)
        assert_close(j, rev, rtol=TOL[dtype], atol=TOL[dtype], msg=f"{name} split {k}")
        out = torch.full((b, *plan_shape(plan, x)), float("nan"), dtype=dtype)  # written in place
        got = chain_jacobian(fn, replace(plan, split=k), x, out=out)
        assert got.data_ptr() == out.data_ptr()
        assert_close(out.reshape(rev.shape), rev, rtol=TOL[dtype], atol=TOL[dtype], msg=f"{name} split {k}, out=")


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_chain_matches_float64_loop_and_finite_differences(name):
    build, shape = CHAINS[name]
    fn = _seeded(build, seed=3).double()
    x = randn(3, *shape, seed=7, dtype=torch.float64)
    jac = run_strategy(fn, x, Strategy("chain"))
    assert_close(jac, reference_batch_jacobian(fn, x))
    check_finite_difference(fn, x, jac)


@pytest.mark.parametrize("fn, reason", [
    (nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)), "Dropout in training mode"),
    (nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).eval(), "BatchNorm1d is not a layer the chain knows"),
    (nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1)).eval(), "Softmax is not a layer the chain knows"),
    (nn.Linear(3, 3), "Linear is not an nn.Sequential"),
    (lambda z: z * 2, "function is not an nn.Sequential"),
])
def test_chain_not_applicable_says_why(fn, reason):
    x = randn(4, 3, seed=1)
    with pytest.raises(ValueError, match=reason):
        run_strategy(fn, x, Strategy("chain"))


def test_chain_not_applicable_for_subclasses_hooks_and_half_types():
    class MySeq(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    x = randn(4, 3, seed=1)
    assert "not an nn.Sequential" in plan_chain(MySeq(nn.Linear(3, 3)), x, (3,))
    hooked = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    hooked[1].register_forward_hook(lambda m, i, o: o * 2)
    assert "hooks" in plan_chain(hooked, x, (3,))
    assert "dtype" in plan_chain(nn.Sequential(nn.Linear(3, 3)).half(), x.half(), (3,))


def test_chain_in_auto_is_measured_and_recorded(monkeypatch):
    monkeypatch.setattr(kernels, "AUTO_MEASURE_MIN_ELEMENTS", 1)
    clear_caches()
    fn = _seeded(CHAINS["w1_like"][0])
    x = randn(64, 16, seed=2)
    jac = distjac.batch_jacobian(fn, x, mode="auto")
    rec = choose_strategy(fn, x, mode="auto").record
    assert any(t.startswith("chain/") for t, _ in rec.times), rec
    assert any(note.startswith("chain: chain of 5") for note in rec.notes), rec
    assert_close(jac, distjac.batch_jacobian(fn, x, mode="rev"))
    # not a chain: auto records why and never times it
    clear_caches()
    fn.train()
    fn.append(nn.Dropout(0.5))
    fn.eval()
    fn[-1].train()
    rec = choose_strategy(fn, x, mode="auto").record
    assert not any(t.startswith("chain/") for t, _ in rec.times)
    assert any("chain: not applicable: layer 5: Dropout in training mode" in n for n in rec.notes), rec


def test_chain_falls_back_to_rev_when_the_result_must_be_differentiable():
    fn = _seeded(CHAINS["w1_like"][0]).double()
    x = randn(3, 16, seed=2, dtype=torch.float64).requires_grad_(True)
    jac = run_strategy(fn, x, Strategy("chain"))
    assert jac.requires_grad
    assert_close(jac, reference_batch_jacobian(fn, x))


def test_chain_respects_max_memory():
    fn = _seeded(CHAINS["w1_like"][0])
    x = randn(50, 16, seed=2)
    rev = distjac.batch_jacobian(fn, x, mode="rev")
    out_shape = (8,)
    plan = plan_chain(fn, x, out_shape)
    result_bytes = 50 * 8 * 16 * 4
    budget = result_bytes + 5 * plan.work_bytes(4)
    s = kernels.fit_to_budget(Strategy("chain"), b=50, m=8, n=16, act_bytes=plan.work_bytes(4), itemsize=4,
                              budget=budget, call="t")
    assert s.block == 5
    assert_close(run_strategy(fn, x, Strategy("chain"), max_memory=budget), rev)
    with pytest.raises(distjac.MemoryBudgetError, match="chain strategy needs"):
        run_strategy(fn, x, Strategy("chain"), max_memory=result_bytes + 10)


@pytest.mark.parametrize("layer, flips", [
    (nn.Conv2d(1, 8, 3), True),
    (nn.Conv2d(4, 6, (3, 2), dilation=(2, 1), padding=(1, 0), groups=2), True),
    (nn.Conv1d(6, 9, 5, padding=2, groups=3, bias=False), True),
    (nn.Conv2d(3, 2, 3, padding=3), False),  # padding past d(k - 1)
    (nn.Conv2d(3, 2, 3, stride=2), False),
    (nn.Conv1d(3, 2, 3, padding=1, padding_mode="reflect"), False),
])
def test_reverse_conv_is_the_input_gradient(layer, flips):
    """The reverse side's convolution (a forward conv of flipped kernels where it applies,
    NOTE [conv transpose]) is the convolution's input gradient, in float64."""
    from distjac.chain import _conv, _transpose_as_conv
    layer = layer.double()
    x = randn(3, layer.in_channels, *([11] * (layer.weight.dim() - 2)), seed=4, dtype=torch.float64)
    assert (_transpose_as_conv(layer) is not None) == flips
    y = layer(x)
    v = randn(*y.shape, seed=5, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(layer(xg), xg, v)
    got = _conv(layer, v, tuple(x.shape[1:]), forward=False)
    assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_plan_counts_a_shared_side_meeting_a_dense_one_as_a_gemm():
    """conv -> ReLU -> Flatten -> Linear(-> 10): splitting after the conv would meet a
    dense (10 x 5408) reverse state with the shared (784 x 5408) conv images in a GEMM per
    example, 80x the multiply-adds of pulling the 10 rows through the conv."""
    fn = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))
    x = randn(4, 1, 28, 28, seed=1)
    plan = plan_chain(fn, x, (10,))
    assert plan.split == 0, plan
    assert plan.cost < 784 * 5408 * 10, plan


def test_forward_values_stop_after_the_last_step_that_needs_them():
    """The chain's forward pass runs up to the last activation or LayerNorm: the linear
    layers after it contribute their weights, not their outputs, so they are not run.
    Same result as reverse mode either way."""
    from torch.overrides import TorchFunctionMode

    from distjac import chain

    class Weights(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.used: list = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            self.used += [id(a) for a in (*args, *kwargs.values()) if isinstance(a, nn.Parameter)]
            return func(*args, **kwargs)

    fn = _seeded(lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Linear(6, 9)))
    x = randn(11, 5, seed=2)
    plan = plan_chain(fn, x, (9,))
    with Weights() as seen:
        ctx = chain._forward_values(chain._in_order(fn), plan, x)
    assert id(fn[0].weight) in seen.used and id(fn[2].weight) not in seen.used and id(fn[3].weight) not in seen.used
    assert [c is not None for c in ctx] == [s.kind == "diag" for s in plan.steps]
    tail, x7 = fn[2:], randn(3, 7)
    tail_plan, tail_layers = plan_chain(tail, x7, (9,)), chain._in_order(tail)
    with Weights() as seen:  # no activation at all: no layer to run
        assert chain._forward_values(tail_layers, tail_plan, x7) == [None, None]
    assert not seen.used
    assert_close(run_strategy(fn, x, Strategy("chain")), distjac.batch_jacobian(fn, x, mode="rev"))


def test_chain_blocks_stay_under_the_cpu_ceiling(monkeypatch):
    """NOTE [allocator ceiling]: on a CPU, a chain without a block (forced or chosen by
    auto) runs in blocks whose working set stays under CPU_BLOCK_BYTES; same result."""
    from distjac import chain
    fn = _seeded(CHAINS["conv2d_flatten"][0])
    x = randn(40, 2, 7, 7, seed=3)
    plan = plan_chain(fn, x, (5,))
    monkeypatch.setattr(chain, "CPU_BLOCK_BYTES", 6 * plan.work_bytes(4) + 1)
    assert plan.cpu_block(4) == 6
    rev = distjac.batch_jacobian(fn, x, mode="rev")
    assert kernels._given(fn, x, kernels._probe(fn, x, "t"), Strategy("chain"), None, "t").block == 6
    assert_close(run_strategy(fn, x, Strategy("chain")), rev)
    monkeypatch.setattr(kernels, "AUTO_MEASURE_MIN_ELEMENTS", 1)
    clear_caches()
    rec = choose_strategy(fn, x, mode="auto").record
    # the chain candidates raced: timed, or stopped past AUTO_ABANDON x the fastest run
    chains = [t.split(" ")[0] for t, _ in rec.times if t.startswith("chain/")]
    chains += [n.split(":")[0] for n in rec.notes if n.startswith("chain/") and "stopped after" in n]
    assert chains and all(t == "chain/block=6" or t.startswith("chain/block=6,") for t in chains), rec
    assert any("blocks of at most 6 rows" in n for n in rec.notes), rec
    # an explicit block above the cap (a choice made on a GPU, say) is cut to it
    assert kernels._given(fn, x, kernels._probe(fn, x, "t"), Strategy("chain", block=64), None, "t").block == 6


def test_a_capped_chain_keeps_its_cap_when_it_covers_the_batch(monkeypatch):
    """The choice is cached per bucket of batch sizes: a chain measured on a batch its cap
    covers must still run a larger batch of the same bucket in capped blocks."""
    from distjac import chain
    fn = _seeded(CHAINS["w1_like"][0])
    x = randn(12, 16, seed=3)  # fewer rows than the cap, and than a pilot
    plan = plan_chain(fn, x, (8,))
    monkeypatch.setattr(chain, "CPU_BLOCK_BYTES", 48 * plan.work_bytes(4) + 1)
    monkeypatch.setattr(kernels, "AUTO_MEASURE_MIN_ELEMENTS", 1)
    monkeypatch.setattr(kernels, "AUTO_KEEP", 1e9)  # the chain stays in the race
    clear_caches()
    timed = []
    for _ in range(5):  # the race is real: the chain must win at least once to be checked
        clear_caches()
        s = choose_strategy(fn, x, mode="auto")
        timed.append(s)
        if s.mode == "chain":
            assert s.block == 48, s  # not None (a whole pass), though 48 >= 12 rows
            break
    assert any(t.mode == "chain" for t in timed), timed


def test_small_chains_only_where_they_cost_less_and_need_no_history():
    """NOTE [small chains]: too small to measure, a chain is taken where its
    multiply-adds over the call's rows are at most autograd's, and the result need not be
    differentiable; otherwise the sizes' choice, with the reason in the record."""
    conv = _seeded(lambda: nn.Sequential(nn.Conv2d(32, 2, 3, padding=1), nn.Tanh()))
    one = randn(1, 32, 16, 16, seed=1)
    s = choose_strategy(conv, one, mode="auto")
    assert s.mode == "rev" and any("amortized over too few rows" in n for n in s.record.notes), s.record
    mlp = _seeded(CHAINS["mlp_gelu_out_gt_in"][0])
    x = randn(8, 6, seed=2)
    s = choose_strategy(mlp, x, mode="auto")
    assert s.mode == "chain" and s.record.how == "sizes", s.record
    xg = x.clone().requires_grad_(True)
    s = choose_strategy(mlp, xg, mode="auto")
    assert s.mode != "chain" and any("must be differentiable" in n for n in s.record.notes), s.record
    jac = distjac.batch_jacobian(mlp, xg)
    assert jac.requires_grad
    assert_close(jac, reference_batch_jacobian(mlp, x))
