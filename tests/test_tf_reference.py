"""distjac against TensorFlow: TF's own outputs, and TF's own test cases ported.

Part 1 compares with ``tests/fixtures/tf_reference.npz``, made by TensorFlow 2.21 with
``scripts/make_tf_fixtures.py`` (layout and keys: tests/fixtures/README.md). TensorFlow
is not needed to run these tests.

Part 2 ports the computational cases of TF's own suites, listed in
docs/tf_tests_inventory.md: ``backprop_test.py`` (``BatchJacobianTest``, ``JacobianTest``)
and ``parallel_for/gradients_test.py`` (``GradientsTest``). Each test is preceded by a
``# TF: <Class>.<test name>`` comment and named ``test_tf_<bjt|jt|pfor>_<test name>``
(BatchJacobianTest, JacobianTest, parallel_for GradientsTest). Error cases of those suites live in test_errors.py
(testBadShape, testBadInputRank, testBadOutputRank, test_batch_jacobian_bad_shapes) and
the pfor/while degenerate shapes also in test_kernels.py (test_degenerate_shape).

Where distjac differs from TF by design, the test checks distjac's documented behaviour
and says so:

* ``unconnected_gradients="none"``: TF's batch_jacobian returns zeros anyway (a quirk
  kept in its source); distjac returns None, as TF documents and DESIGN.md requires.
* An empty batch (0, n): TF raises ZeroDivisionError (``num_elements // batch_size``);
  distjac returns the empty (0, *out, *in) result.
* Integer sources: TF warns and returns int32 zeros; distjac raises DtypeError.
* A non-persistent tape with ``experimental_use_pfor=False`` or with ``parallel_iterations``
  smaller than the row count: TF refuses (its loop re-reads the tape); distjac computes
  it (one recorded graph, one use); ``parallel_iterations=1`` with pfor: TF refuses,
  distjac runs one-row vectorized passes.
"""

from __future__ import annotations

import builtins
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    LSTMModel,
    assert_close,
    check_finite_difference,
    make_conv,
    make_mlp,
    randn,
    reference_batch_jacobian,
)
from torch import nn

import distjac

FIXTURE = Path(__file__).parent / "fixtures" / "tf_reference.npz"
FX = np.load(FIXTURE, allow_pickle=False)
MODES = ["rev", "fwd", "auto"]


def fx(key: str) -> torch.Tensor:
    return torch.from_numpy(np.array(FX[key]))


def fx_str(key: str) -> str:
    return str(FX[key])


def fx_flag(key: str) -> bool:
    return bool(int(FX[key]))


def _tape_batch_jacobian(fn, x, **kwargs):
    x = x.clone()
    with distjac.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    return tape.batch_jacobian(y, x, **kwargs)


def _assert_tf_close(actual, expected, msg=""):
    # TF and torch sum in different orders: float32 results agree to a few ulps.
    assert_close(actual, expected, dtype=expected.dtype, msg=msg)


# ======================================================================================
# Part 1: TensorFlow's outputs
# ======================================================================================


def test_fixture_provenance():
    assert fx_str("meta/tf_version").startswith("2.")
    assert fx_str("meta/generator") == "scripts/make_tf_fixtures.py"


@pytest.mark.parametrize("suffix", ["", "_f64"])
def test_seed_first_order_tape_and_functional(suffix):
    x = fx(f"seed_first{suffix}/x")
    tf_jac = fx(f"seed_first{suffix}/jac")
    assert torch.equal(x * x * x, fx(f"seed_first{suffix}/y"))
    for pfor in (True, False):
        assert torch.equal(_tape_batch_jacobian(lambda z: z * z * z, x, experimental_use_pfor=pfor), tf_jac)
        for mode in MODES:
            jac = distjac.batch_jacobian(lambda z: z * z * z, x, mode=mode, experimental_use_pfor=pfor)
            assert torch.equal(jac, tf_jac), (mode, pfor)


@pytest.mark.parametrize("suffix", ["", "_f64"])
def test_seed_second_order_tape_and_functional(suffix):
    x = fx(f"seed_second{suffix}/x")
    with distjac.GradientTape() as outer:
        outer.watch(x)
        with distjac.GradientTape() as inner:
            inner.watch(x)
            y = x * x * x
        jac1 = inner.batch_jacobian(y, x)
    jac2 = outer.batch_jacobian(jac1, x)
    assert torch.equal(jac1.detach(), fx(f"seed_second{suffix}/jac1"))
    assert torch.equal(jac2, fx(f"seed_second{suffix}/jac"))
    for outer_mode in MODES:
        for inner_mode in MODES:
            got = distjac.batch_jacobian(
                lambda z, m=inner_mode: distjac.batch_jacobian(lambda u: u * u * u, z, mode=m), x, mode=outer_mode
            )
            assert torch.equal(got, fx(f"seed_second{suffix}/jac")), (outer_mode, inner_mode)


def _tf_mlp(prefix: str) -> nn.Module:
    w1 = fx(f"{prefix}/w1")
    model = make_mlp((5, 7, 3), dtype=w1.dtype)
    with torch.no_grad():
        model[0].weight.copy_(w1)
        model[0].bias.copy_(fx(f"{prefix}/b1"))
        model[2].weight.copy_(fx(f"{prefix}/w2"))
        model[2].bias.copy_(fx(f"{prefix}/b2"))
    return model


@pytest.mark.parametrize("prefix", ["mlp", "mlp_f64"])
def test_mlp_first_and_second_order(prefix):
    model, x = _tf_mlp(prefix), fx(f"{prefix}/x")
    tf_jac, tf_jac2 = fx(f"{prefix}/jac"), fx(f"{prefix}/jac2")
    _assert_tf_close(model(x), fx(f"{prefix}/y"), "forward pass")
    _assert_tf_close(_tape_batch_jacobian(model, x), tf_jac, "tape")
    for mode in MODES:
        _assert_tf_close(distjac.batch_jacobian(model, x, mode=mode), tf_jac, mode)
        jac2 = distjac.batch_jacobian(lambda z, m=mode: distjac.batch_jacobian(model, z, mode=m), x, mode=mode)
        _assert_tf_close(jac2, tf_jac2, f"second order {mode}")
    # Nested tapes, as TF made jac2.
    xw = x.clone()
    with distjac.GradientTape() as outer:
        outer.watch(xw)
        with distjac.GradientTape() as inner:
            inner.watch(xw)
            y = model(xw)
        jac1 = inner.batch_jacobian(y, xw)
    _assert_tf_close(outer.batch_jacobian(jac1, xw), tf_jac2, "nested tapes")


@pytest.mark.parametrize("pi", [None, 2, 3])
@pytest.mark.parametrize("pfor", [True, False])
def test_mlp_variants(pfor, pi):
    model, x = _tf_mlp("mlp"), fx("mlp_variants/x")
    key = f"mlp_variants/{'pfor' if pfor else 'while'}_pi{pi if pi else 'none'}"
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = model(x)
    jac = tape.batch_jacobian(y, x, parallel_iterations=pi, experimental_use_pfor=pfor)
    _assert_tf_close(jac, fx(key), key)
    for mode in MODES:
        got = distjac.batch_jacobian(model, x, mode=mode, parallel_iterations=pi, experimental_use_pfor=pfor)
        _assert_tf_close(got, fx(key), f"{key} {mode}")


def test_matrix():
    x, a = fx("matrix/x"), fx("matrix/a")
    fn = lambda z: torch.tanh(z @ a)
    _assert_tf_close(fn(x), fx("matrix/y"))
    _assert_tf_close(_tape_batch_jacobian(fn, x), fx("matrix/jac"), "tape")
    for mode in MODES:
        _assert_tf_close(distjac.batch_jacobian(fn, x, mode=mode), fx("matrix/jac"), mode)


def _tf_conv() -> nn.Module:
    model = make_conv()
    with torch.no_grad():
        model[0].weight.copy_(fx("conv/conv_weight"))
        model[0].bias.copy_(fx("conv/conv_bias"))
        model[3].weight.copy_(fx("conv/fc_weight"))
        model[3].bias.copy_(fx("conv/fc_bias"))
    return model


def test_conv():
    model, x = _tf_conv(), fx("conv/x")
    _assert_tf_close(model(x), fx("conv/y"), "forward pass")
    _assert_tf_close(_tape_batch_jacobian(model, x), fx("conv/jac"), "tape")
    for mode in MODES:
        _assert_tf_close(distjac.batch_jacobian(model, x, mode=mode), fx("conv/jac"), mode)


@pytest.mark.parametrize("block", [None, 1, 3])
@pytest.mark.parametrize("name", ["mlp", "mlp_f64", "conv"])
def test_chain_strategy_against_tf(name, block):
    """The chain strategy (per-layer Jacobians multiplied out, chain.py), forced at several
    blocks, against TF's own batch_jacobian of the same weights."""
    from distjac.kernels import Strategy, chain_plan, run_strategy

    model, x = (_tf_conv(), fx("conv/x")) if name == "conv" else (_tf_mlp(name), fx(f"{name}/x"))
    tf_jac = fx(f"{name}/jac")
    assert not isinstance(chain_plan(model, x, tuple(tf_jac.shape[1:2])), str)
    _assert_tf_close(run_strategy(model, x, Strategy("chain", vectorize=False, block=block)), tf_jac, name)
    _assert_tf_close(distjac.batch_jacobian(model, x, strategy=Strategy("chain", vectorize=False, block=block)),
                     tf_jac, name)


def _tf_lstm() -> nn.Module:
    model = LSTMModel(4, 5)
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(model.lstm, name).copy_(fx(f"lstm/{name}"))
    return model


@pytest.mark.parametrize("mode", MODES)
def test_lstm(mode):
    model, x = _tf_lstm(), fx("lstm/x")
    _assert_tf_close(model(x), fx("lstm/y"), "forward pass")
    _assert_tf_close(_tape_batch_jacobian(model, x), fx("lstm/jac"), "tape")
    _assert_tf_close(distjac.batch_jacobian(model, x, mode=mode), fx("lstm/jac"), mode)


def test_full_jacobian_and_gradient():
    x, b = fx("full_jacobian/x"), fx("full_jacobian/b")
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch([x, b])
        y = torch.sin(x) @ b
        s = y.sum()
    _assert_tf_close(y, fx("full_jacobian/y"))
    _assert_tf_close(tape.jacobian(y, x), fx("full_jacobian/jac"))
    _assert_tf_close(tape.jacobian(y, x, experimental_use_pfor=False), fx("full_jacobian/jac_while"))
    _assert_tf_close(tape.jacobian(y, x, parallel_iterations=2), fx("full_jacobian/jac_pi2"))
    jx, jb = tape.jacobian(y, [x, b])
    _assert_tf_close(jx, fx("full_jacobian/list_jac_x"))
    _assert_tf_close(jb, fx("full_jacobian/list_jac_b"))
    _assert_tf_close(tape.gradient(s, x), fx("full_jacobian/grad_sum"))
    _assert_tf_close(tape.gradient(y, x), fx("full_jacobian/grad_y"))
    g = tape.gradient(y, x, output_gradients=fx("full_jacobian/output_gradients"))
    _assert_tf_close(g, fx("full_jacobian/grad_with_output_gradients"))


@pytest.mark.parametrize("tag", ["none", "zero"])
def test_unconnected(tag):
    x, z = fx("unconnected/x"), fx("unconnected/z")
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch([x, z])
        y = z * 2
    ug = tag
    for what, kwargs in (("batch_jacobian", {}), ("batch_jacobian_while", {"experimental_use_pfor": False})):
        got = tape.batch_jacobian(y, x, unconnected_gradients=ug, **kwargs)
        tf_key = f"unconnected/{what}_{tag}"
        assert not fx_flag(tf_key + "_is_none")  # TF: zeros in both cases
        if tag == "none":
            # By design: distjac follows TF's documented meaning, not its batch_jacobian.
            assert got is None
        else:
            assert torch.equal(got, fx(tf_key))
    for what, kwargs in (("jacobian", {}), ("jacobian_while", {"experimental_use_pfor": False})):
        got = tape.jacobian(y, x, unconnected_gradients=ug, **kwargs)
        tf_key = f"unconnected/{what}_{tag}"
        if fx_flag(tf_key + "_is_none"):
            assert got is None
        else:
            assert torch.equal(got, fx(tf_key))
    g = tape.gradient(y, x, unconnected_gradients=ug)
    if fx_flag(f"unconnected/gradient_{tag}_is_none"):
        assert g is None
    else:
        assert torch.equal(g, fx(f"unconnected/gradient_{tag}"))
    if tag == "zero":  # the string form gives the same as the enum
        assert torch.equal(tape.batch_jacobian(y, x, unconnected_gradients="zero"),
                           fx("unconnected/batch_jacobian_str_zero"))
        assert torch.equal(tape.jacobian(y, x, unconnected_gradients="zero"), fx("unconnected/jacobian_str_zero"))


ZEROS_DTYPE = {"f64": (torch.float64, torch.float64), "src64_tgt32": (torch.float64, torch.float32),
               "src32_tgt64": (torch.float32, torch.float64)}


@pytest.mark.parametrize("pfor", [True, False])
@pytest.mark.parametrize("variant", sorted(ZEROS_DTYPE))
def test_zeros_dtype(variant, pfor):
    # TF BatchJacobianTest.test_zeros_type_correct and mixed-dtype variants.
    sdt, tdt = ZEROS_DTYPE[variant]
    x = torch.tensor([[2.0, 3.0]], dtype=sdt)
    z = torch.tensor([[1.0, 4.0, 5.0]], dtype=tdt)
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch([x, z])
        y = z * 2
    zero = tape.batch_jacobian(y, x, unconnected_gradients="zero", experimental_use_pfor=pfor)
    assert zero.shape == (1, 3, 2) and zero.dtype == sdt and torch.count_nonzero(zero) == 0
    # TF pfor ZERO gives the source's dtype too (its while loop fails on mixed dtypes).
    tf_key = f"zeros_dtype/{variant}_pfor_zero"
    assert fx_str(tf_key + "_dtype") == str(sdt).removeprefix("torch.")
    assert torch.equal(zero, fx(tf_key))
    # NONE: TF returns zeros (of the target's dtype); distjac returns None by design.
    assert tape.batch_jacobian(y, x, experimental_use_pfor=pfor) is None


DEGENERATE_TF = {
    "square_10": ((1, 0), lambda x: x**2),
    "src10_tgt12": ((1, 0), lambda x: x.sum(1, keepdim=True) + torch.tensor([[1.0, 2.0]])),
    "src12_tgt10": ((1, 2), lambda x: x[:, :0] * 3),
}


@pytest.mark.parametrize("pfor", [True, False])
@pytest.mark.parametrize("name", sorted(DEGENERATE_TF))
def test_degenerate_shapes_tape(name, pfor):
    shape, fn = DEGENERATE_TF[name]
    tf_key = f"degenerate/{name}_{'pfor' if pfor else 'while'}"
    jac = _tape_batch_jacobian(fn, torch.zeros(shape), experimental_use_pfor=pfor)
    assert tuple(jac.shape) == tuple(FX[tf_key + "_shape"].tolist())
    assert torch.equal(jac, fx(tf_key))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(DEGENERATE_TF))
def test_degenerate_shapes_functional(name, mode):
    shape, fn = DEGENERATE_TF[name]
    jac = distjac.batch_jacobian(fn, torch.zeros(shape), mode=mode)
    assert jac is not None
    assert tuple(jac.shape) == tuple(FX[f"degenerate/{name}_pfor_shape"].tolist())


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_where_tf_raises(mode):
    # TF: ZeroDivisionError (fixture degenerate/square_00_*). distjac: the empty result.
    assert fx_str("degenerate/square_00_pfor_error_type") == "ZeroDivisionError"
    x = torch.zeros(0, 3)
    assert _tape_batch_jacobian(lambda z: z**2, x).shape == (0, 3, 3)
    assert distjac.batch_jacobian(lambda z: z**2, x, mode=mode).shape == (0, 3, 3)


# Error situations: distjac raises the same built-in class as TF, with its own message.
TF_ERROR_SITUATIONS = ["rank_source", "rank_target", "batch_mismatch", "bad_unconnected_value",
                       "nonpersistent_twice_gradient", "nonpersistent_twice_jacobian",
                       "nonpersistent_twice_batch_jacobian", "nonpersistent_batch_jacobian_then_gradient",
                       "inside_context_twice"]


def _provoke(situation: str) -> None:
    x2 = torch.ones(2, 2)
    if situation == "rank_source":
        x = torch.ones(2)
        with distjac.GradientTape() as t:
            t.watch(x)
            y = torch.stack([x, x], 1)
        t.batch_jacobian(y, x)
    elif situation == "rank_target":
        with distjac.GradientTape() as t:
            t.watch(x2)
            y = x2.sum(1)
        t.batch_jacobian(y, x2)
    elif situation == "batch_mismatch":
        x = torch.ones(2, 3)
        with distjac.GradientTape() as t:
            t.watch(x)
            y = torch.cat([x, x])
        t.batch_jacobian(y, x)
    elif situation == "bad_unconnected_value":
        with distjac.GradientTape() as t:
            t.watch(x2)
            y = x2 * x2
        t.batch_jacobian(y, x2, unconnected_gradients="bogus")
    else:
        first, second = {
            "nonpersistent_twice_gradient": ("gradient", "gradient"),
            "nonpersistent_twice_jacobian": ("jacobian", "jacobian"),
            "nonpersistent_twice_batch_jacobian": ("batch_jacobian", "batch_jacobian"),
            "nonpersistent_batch_jacobian_then_gradient": ("batch_jacobian", "gradient"),
            "inside_context_twice": ("batch_jacobian", "batch_jacobian"),
        }[situation]
        with distjac.GradientTape() as t:
            t.watch(x2)
            y = x2 * x2
            if situation == "inside_context_twice":
                t.batch_jacobian(y, x2)
                t.batch_jacobian(y, x2)
        getattr(t, first)(y, x2)
        getattr(t, second)(y, x2)


@pytest.mark.parametrize("situation", TF_ERROR_SITUATIONS)
def test_errors_have_tf_builtin_classes(situation):
    tf_type = getattr(builtins, fx_str(f"errors/{situation}_type"))
    with pytest.raises(tf_type) as info:
        _provoke(situation)
    assert isinstance(info.value, distjac.DistjacError)


def test_tf_refusals_distjac_computes():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]])
    expected = w.T.expand(2, 4, 2)
    assert fx_str("errors/nonpersistent_while_batch_jacobian_type") == "RuntimeError"
    assert torch.equal(_tape_batch_jacobian(lambda z: z @ w, x, experimental_use_pfor=False), expected)
    assert fx_str("errors/nonpersistent_parallel_iterations_type") == "RuntimeError"
    assert torch.equal(_tape_batch_jacobian(lambda z: z @ w, x, parallel_iterations=2), expected)
    assert fx_str("errors/parallel_iterations_1_type") == "ValueError"
    assert torch.equal(_tape_batch_jacobian(lambda z: z @ w, x, parallel_iterations=1), expected)


def test_integer_source_where_tf_returns_int_zeros():
    assert fx_str("errors/int_source_result_dtype") == "int32"
    x = torch.tensor([[1, 2]], dtype=torch.int32)
    with pytest.raises(distjac.DtypeError, match="only floating dtypes"):
        distjac.batch_jacobian(lambda z: z * z, x)



# -- what a tape differentiates besides watched tensors (NOTE [intermediate sources]) --


def _recorded_sin():
    a = fx("tape/a").clone()
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch(a)
        h = a * 3.0
        y = torch.sin(h)
    return tape, a, h, y


@pytest.mark.parametrize("method", ["gradient", "jacobian", "batch_jacobian"])
def test_tape_differentiates_a_tensor_it_computed_as_tf(method):
    tape, _, h, y = _recorded_sin()
    assert not fx_flag(f"tape/intermediate_{method}_is_none")
    _assert_tf_close(getattr(tape, method)(y, h), fx(f"tape/intermediate_{method}"))


def test_tape_gradient_wrt_a_layers_activations_as_tf():
    """Grad-CAM's question: parameters accessed in the block, the features computed there."""
    lin1, lin2 = torch.nn.Linear(2, 3, bias=False), torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        lin1.weight.copy_(fx("tape/w1").T)
        lin2.weight.copy_(fx("tape/w2").T)
    with distjac.GradientTape() as tape:
        feat = torch.tanh(lin1(fx("tape/a")))
        out = lin2(feat)
    _assert_tf_close(tape.gradient(out, feat), fx("tape/features_gradient"))


@pytest.mark.parametrize("method", ["gradient", "jacobian", "batch_jacobian"])
def test_tape_target_that_is_its_own_source_as_tf(method):
    tape, a, _, _ = _recorded_sin()
    assert not fx_flag(f"tape/self_{method}_is_none")
    _assert_tf_close(getattr(tape, method)(a, a), fx(f"tape/self_{method}"))


def test_tape_a_tensor_computed_before_the_block_is_not_a_source_as_tf():
    a = fx("tape/a").clone()
    with distjac.GradientTape(persistent=True) as outer:
        outer.watch(a)
        pre = a * 2.0
    with distjac.GradientTape() as tape:
        tape.watch(a)
        z = pre * 5.0
    assert fx_flag("tape/before_block_gradient_is_none")
    assert tape.gradient(z, pre) is None
    assert torch.equal(outer.gradient(pre, a), torch.full((2, 2), 2.0))  # its own tape: a source


def test_tape_with_accessed_variables_unwatched_an_intermediate_of_a_variable_is_no_source_as_tf():
    v = torch.nn.Parameter(fx("tape/a").clone())
    x = fx("tape/a").clone()
    with distjac.GradientTape(watch_accessed_variables=False, persistent=True) as tape:
        tape.watch(x)
        h = v * 3.0
        y = (h * h).sum()
        hx = x * 3.0
        yx = (hx * hx).sum()
    assert fx_flag("tape/unwatched_variable_intermediate_gradient_is_none")
    assert tape.gradient(y, h) is None and tape.gradient(y, v) is None
    assert torch.equal(tape.gradient(yx, hx), 2 * hx.detach())  # derived from a watched tensor


def test_tape_output_gradients_with_none_means_ones():
    """TF 2.21 raises on a None among output_gradients (fixture); distjac reads it as
    ones, as it reads output_gradients=None for every target."""
    assert fx_str("tape/output_gradients_none_error_type") == "ValueError"
    a = fx("tape/a").clone()
    with distjac.GradientTape() as tape:
        tape.watch(a)
        y1, y2 = a * a, a * 3.0
    got = tape.gradient([y1, y2], a, output_gradients=[None, torch.eye(2)])
    assert torch.equal(got, 2 * a + 3 * torch.eye(2))


def test_tape_a_refused_call_does_not_spend_a_non_persistent_tape():
    a = fx("tape/a").clone()
    for refused in (lambda t, y: t.gradient("nope", a), lambda t, y: t.jacobian(y, "nope"),
                    lambda t, y: t.gradient(y, a, output_gradients=["nope"])):
        with distjac.GradientTape() as tape:
            tape.watch(a)
            y = a * a
        with pytest.raises(TypeError):
            refused(tape, y)
        assert torch.equal(tape.gradient(y, a), 2 * a)


# ======================================================================================
# Part 2: TF's own test cases, ported (docs/tf_tests_inventory.md)
# ======================================================================================

# --- backprop_test.py: BatchJacobianTest ----------------------------------------------


# TF: BatchJacobianTest.testPfor, testWhileLoop, testPforDefun, testWhileLoopDefun (_batch_jacobian)
@pytest.mark.parametrize("pfor", [True, False], ids=["testPfor", "testWhileLoop"])
def test_tf_bjt_batch_jacobian(pfor):
    # Also covers testPforDefun / testWhileLoopDefun (the same code under tf.function).
    x, yv = fx("tf_tests/bj_x"), fx("tf_tests/bj_y")
    expected = torch.tensor([[[6.0, 0.0], [0.0, 16.0]], [[30.0, 0.0], [0.0, 48.0]]])
    jac = _tape_batch_jacobian(lambda z: z * z * yv, x, experimental_use_pfor=pfor)
    assert torch.equal(jac, expected)
    assert torch.equal(jac, fx("tf_tests/bj_pfor" if pfor else "tf_tests/bj_while"))
    for mode in MODES:
        assert torch.equal(distjac.batch_jacobian(lambda z: z * z * yv, x, mode=mode, experimental_use_pfor=pfor),
                           expected)


# TF: BatchJacobianTest.testPersistentTape
def test_tf_bjt_persistent_tape():
    # TF raises for a non-persistent tape with pfor off; distjac computes it (one use).
    x = torch.tensor([[1.0, 2.0]])
    jac = _tape_batch_jacobian(lambda z: z * z, x, experimental_use_pfor=False)
    assert torch.equal(jac, torch.tensor([[[2.0, 0.0], [0.0, 4.0]]]))


# TF: BatchJacobianTest.test_parallel_iterations
def test_tf_bjt_parallel_iterations():
    x, w = fx("tf_tests/bj_x"), fx("tf_tests/bj_pi_w")
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = x @ w
    j2 = tape.batch_jacobian(y, x, parallel_iterations=2)
    j3 = tape.batch_jacobian(y, x, parallel_iterations=3)
    assert_close(j2, j3)
    assert torch.equal(j2, w.T.expand(2, 4, 2))
    assert torch.equal(j2, fx("tf_tests/bj_pi2"))
    assert torch.equal(j3, fx("tf_tests/bj_pi3"))


# TF: BatchJacobianTest.test_degenerate_shape
@pytest.mark.parametrize("pfor", [True, False])
def test_tf_bjt_degenerate_shape(pfor):
    x = torch.zeros(1, 0)
    assert _tape_batch_jacobian(lambda z: z**2, x, experimental_use_pfor=pfor).shape == (1, 0, 0)


# TF: BatchJacobianTest.test_zeros_type_correct
@pytest.mark.parametrize("pfor", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tf_bjt_zeros_type_correct(dtype, pfor):
    x = torch.tensor([[2.0]], dtype=dtype)
    f = lambda z: torch.tensor([[1.0]], dtype=dtype)  # ignores its input
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = f(x)
    zero = tape.batch_jacobian(y, x, unconnected_gradients="zero", experimental_use_pfor=pfor)
    assert zero.dtype == dtype and torch.equal(zero, torch.zeros(1, 1, 1, dtype=dtype))
    # TF's default gives zeros too; distjac's default ("none") gives None.
    assert tape.batch_jacobian(y, x, experimental_use_pfor=pfor) is None
    zero = distjac.batch_jacobian(f, x, unconnected_gradients="zero")
    assert zero.dtype == dtype and torch.equal(zero, torch.zeros(1, 1, 1, dtype=dtype))


# TF: BatchJacobianTest.test_strided_slice
def test_tf_bjt_strided_slice():
    x = torch.ones(2, 4, 2)
    length = torch.tensor([2, 3, 4, 4])
    fn = lambda z: z.repeat_interleave(2, dim=1)[:, : int(length.max())]
    for jac in (_tape_batch_jacobian(fn, x), *(distjac.batch_jacobian(fn, x, mode=m) for m in MODES)):
        assert jac.shape == (2, 4, 2, 4, 2)
        for i in range(4):
            for k in range(4):
                block = jac[:, i, :, k, :]
                expected = torch.eye(2).expand(2, 2, 2) if k == i // 2 else torch.zeros(2, 2, 2)
                assert torch.equal(block, expected), (i, k)


# --- backprop_test.py: JacobianTest -----------------------------------------------------


# TF: JacobianTest.testPfor, testWhileLoop, testPforDefun, testWhileLoopDefun (_jacobian)
@pytest.mark.parametrize("pfor", [True, False], ids=["testPfor", "testWhileLoop"])
def test_tf_jt_jacobian(pfor):
    x, yv = fx("tf_tests/j_x"), fx("tf_tests/j_y")
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch([x, yv])
        z = x * x * yv
    dx, dy = tape.jacobian(z, [x, yv], experimental_use_pfor=pfor)
    assert torch.equal(dx, torch.diag(2 * x * yv)) and torch.equal(dx, fx("tf_tests/j_dx"))
    assert torch.equal(dy, torch.diag(x * x)) and torch.equal(dy, fx("tf_tests/j_dy"))


# TF: JacobianTest.testPersistentTape
def test_tf_jt_persistent_tape():
    # TF raises (non-persistent + pfor off); distjac computes it.
    x = torch.tensor([1.0, 2.0])
    with distjac.GradientTape() as tape:
        tape.watch(x)
        y = x * x
    assert torch.equal(tape.jacobian(y, x, experimental_use_pfor=False), torch.diag(2 * x))


# TF: JacobianTest.test_parallel_iterations
def test_tf_jt_parallel_iterations():
    x = fx("tf_tests/bj_x")
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = x @ x
    j2 = tape.jacobian(y, x, parallel_iterations=2)
    j3 = tape.jacobian(y, x, parallel_iterations=3)
    assert_close(j2, j3)
    assert torch.equal(j2, fx("tf_tests/j_pi2"))
    assert torch.equal(j3, fx("tf_tests/j_pi3"))


# TF: JacobianTest.test_nested_jacobian
def test_tf_jt_nested_jacobian():
    x = torch.ones(10, 2)
    with distjac.GradientTape() as g:
        g.watch(x)
        with distjac.GradientTape() as gg:
            gg.watch(x)
            s = (x**2).sum()
        dy_x = gg.jacobian(s, x)
    jac = g.batch_jacobian(dy_x, x)
    expected = torch.tensor([[2.0, 0.0], [0.0, 2.0]]).expand(10, 2, 2)
    assert torch.equal(jac, expected)
    assert torch.equal(jac, fx("tf_tests/nested_jacobian"))


def _fold_cos(x: torch.Tensor) -> torch.Tensor:
    """TF's foldl(lambda a, b: cos(a + b), transpose(x)) reshaped to (1, 1): cos(x0 + x1)."""
    acc = x[:, 0]
    for k in range(1, x.shape[1]):
        acc = torch.cos(acc + x[:, k])
    return acc.reshape(-1, 1)


# TF: JacobianTest.test_nested_batch_jacobian_foldl
def test_tf_jt_nested_batch_jacobian_foldl():
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    s3, c3 = math.sin(3.0), math.cos(3.0)
    for mode in MODES:
        first = lambda z, mode=mode: distjac.batch_jacobian(_fold_cos, z, mode=mode)
        j1 = first(x)
        assert_close(j1, torch.tensor([[[-s3, -s3]]], dtype=torch.float64))
        check_finite_difference(_fold_cos, x, j1)
        j2 = distjac.batch_jacobian(first, x, mode=mode)
        assert_close(j2, torch.full((1, 1, 2, 2), -c3, dtype=torch.float64))
        check_finite_difference(first, x, j2)



def _first_by_tape(z):
    with distjac.GradientTape() as tape:
        tape.watch(z)
        y = _fold_cos(z)
    return tape.batch_jacobian(y, z)


# TF: JacobianTest.test_nested_batch_jacobian_foldl (TF's form: a tape inside f)
@pytest.mark.parametrize("mode", MODES)
def test_tf_jt_nested_batch_jacobian_foldl_tape_inside(mode):
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    s3, c3 = math.sin(3.0), math.cos(3.0)
    assert_close(_first_by_tape(x.clone()), torch.tensor([[[-s3, -s3]]], dtype=torch.float64))
    # Outer tape around the function's inner tape.
    xw = x.clone()
    with distjac.GradientTape() as outer:
        outer.watch(xw)
        j1 = _first_by_tape(xw)
    assert_close(outer.batch_jacobian(j1, xw), torch.full((1, 1, 2, 2), -c3, dtype=torch.float64))
    # The functional API around the function's tape. Forward mode runs fn under
    # torch.func.jvp, where a tape (requires_grad_, autograd.grad) cannot run: a clear error.
    if mode == "fwd":
        with pytest.raises(RuntimeError, match="autograd inside fn"):
            distjac.batch_jacobian(_first_by_tape, x, mode=mode)
        return
    assert_close(distjac.batch_jacobian(_first_by_tape, x, mode=mode),
                 torch.full((1, 1, 2, 2), -c3, dtype=torch.float64))


# TF: JacobianTest.test_grad_jacobian_conv
def test_tf_jt_grad_jacobian_conv():
    # Gradient through a batch Jacobian (double backward through a convolution).
    conv = nn.Conv2d(1, 9, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0)

    def inner(x):
        with distjac.GradientTape() as tape:
            tape.watch(x)
            reduced = (conv(x) ** 2).sum(dim=(1, 3))  # TF sums NHWC axes W, C: (10, 4)
        return tape.batch_jacobian(reduced, x).sum()

    x = torch.ones(10, 1, 4, 4, dtype=torch.float64)
    with distjac.GradientTape() as outer:
        outer.watch(x)
        value = inner(x)
    grad = outer.gradient(value, x)
    # The same through the functional API, x requiring grad.
    xg = x.clone().requires_grad_(True)
    fn = lambda z: (conv(z) ** 2).sum(dim=(1, 3))
    (grad_f,) = torch.autograd.grad(distjac.batch_jacobian(fn, xg, mode="rev").sum(), xg)
    assert_close(grad_f, grad)
    # Against a central difference of the scalar function in a random direction.
    v = randn(*x.shape, seed=21, dtype=torch.float64)
    eps = 1e-5
    fd = (inner(x + eps * v).item() - inner(x - eps * v).item()) / (2 * eps)
    assert math.isclose((grad * v).sum().item(), fd, rel_tol=1e-6, abs_tol=1e-6)


# TF: JacobianTest.test_indexed_slices
@pytest.mark.parametrize("pi", [None, 2])
def test_tf_jt_indexed_slices(pi):
    inp = randn(3, 2, seed=22)
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch(inp)
        out = inp[[0, 2]]
    pfor = tape.jacobian(out, inp, parallel_iterations=pi)
    loop = tape.jacobian(out, inp, experimental_use_pfor=False)
    assert torch.equal(pfor, loop)
    expected = torch.zeros(2, 2, 3, 2)
    for i, src in enumerate([0, 2]):
        for j in range(2):
            expected[i, j, src, j] = 1
    assert torch.equal(pfor, expected)


def _fold_sum(x: torch.Tensor) -> torch.Tensor:
    acc = x[0]
    for k in range(1, x.shape[0]):
        acc = acc + x[k]
    return acc


# TF: JacobianTest.test_foldl_partial_function, test_foldl_pure_function
@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("pfor", [True, False])
def test_tf_jt_foldl_partial_and_pure_function(pfor, persistent):
    x = torch.zeros(3)
    with distjac.GradientTape(persistent=persistent) as tape:
        tape.watch(x)
        result = _fold_sum(x)
    assert torch.equal(tape.jacobian(result, x, experimental_use_pfor=pfor), torch.ones(3))


# TF: JacobianTest.test_cond_func_grad_jacobian
@pytest.mark.parametrize("pfor", [True, False])
def test_tf_jt_cond_func_grad_jacobian(pfor):
    f = lambda x: x**3 if x > 0 else x**2  # data-dependent Python branch
    x = torch.tensor(1.0)
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = f(x)
        grad = tape.gradient(y, x)  # inside the tape: recorded, so differentiable
    assert grad.item() == 3.0
    assert tape.jacobian(grad, x, experimental_use_pfor=pfor).item() == 6.0


# TF: JacobianTest.test_empty_tensor_consistent_jacobian
@pytest.mark.parametrize("pfor", [True, False])
def test_tf_jt_empty_tensor_consistent_jacobian(pfor):
    variable = torch.tensor(1.0)
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch(variable)
        outputs = variable * torch.cat([torch.zeros(0, 4), torch.zeros(0, 3)], dim=-1)
    jac = tape.jacobian(outputs, variable, experimental_use_pfor=pfor)
    assert jac.shape == (0, 7)


# --- parallel_for/gradients_test.py: GradientsTest -------------------------------------


# TF: GradientsTest.test_no_path
@pytest.mark.parametrize("pfor", [True, False])
def test_tf_pfor_no_path(pfor):
    x = torch.tensor([[1.0]])
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = torch.tensor([[2.0]])
    assert tape.jacobian(y, x, experimental_use_pfor=pfor) is None
    assert tape.batch_jacobian(y, x, experimental_use_pfor=pfor) is None
    for mode in MODES:
        assert distjac.batch_jacobian(lambda z: torch.tensor([[2.0]]), x, mode=mode,
                                      experimental_use_pfor=pfor) is None


def _per_element_jacobian(fn, x):
    """Stacked autograd.grad of each output element: TF's `gradients(y[i][j], x)` loop."""
    xr = x.detach().clone().requires_grad_(True)
    y = fn(xr)
    rows = [torch.autograd.grad(y.reshape(-1)[k], xr, retain_graph=True)[0] for k in range(y.numel())]
    return torch.stack(rows).reshape(*y.shape, *x.shape)


# TF: GradientsTest.test_jacobian_fixed_shape, test_jacobian_unknown_shape
@pytest.mark.parametrize("fixed", [True, False], ids=["test_jacobian_fixed_shape", "test_jacobian_unknown_shape"])
@pytest.mark.parametrize("pfor", [True, False])
def test_tf_pfor_jacobian_shapes(pfor, fixed):
    x = fx("tf_tests/jac_fixed_x") if fixed else torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    fn = lambda z: z.T @ z
    with distjac.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    jac = tape.jacobian(y, x, experimental_use_pfor=pfor)
    assert_close(jac, _per_element_jacobian(fn, x), rtol=1e-4, atol=1e-4)
    if fixed:
        _assert_tf_close(jac, fx("tf_tests/jac_fixed_jac"))


# TF: GradientsTest.test_jacobian_scan_shape
def test_tf_pfor_jacobian_scan_shape():
    x = randn(3, 4, seed=23)
    elems = randn(6, seed=24)
    with distjac.GradientTape() as tape:
        tape.watch(x)
        acc, ys = x, []
        for e in elems:  # tf.scan(lambda a, e: a + e, elems, initializer=x)
            acc = acc + e
            ys.append(acc)
        y = torch.stack(ys)
    jac = tape.jacobian(y, x)
    assert jac.shape == (6, 3, 4, 3, 4)
    assert torch.equal(jac, torch.eye(12).reshape(3, 4, 3, 4).expand(6, 3, 4, 3, 4))


# TF: GradientsTest.test_jacobian_while_loop_shape
def test_tf_pfor_jacobian_while_loop_shape():
    x = randn(3, 4, seed=25)
    with distjac.GradientTape() as tape:
        tape.watch(x)
        result = x
        while False:  # noqa: SIM114 - TF's loop whose condition is false at once
            result = result * 2
        y = result[:2, :3]
    assert tape.jacobian(y, x).shape == (2, 3, 3, 4)


# TF: GradientsTest.test_batch_jacobian_fixed_shape, test_batch_jacobian_unknown_shape
@pytest.mark.parametrize("fixed", [True, False],
                         ids=["test_batch_jacobian_fixed_shape", "test_batch_jacobian_unknown_shape"])
@pytest.mark.parametrize("pfor", [True, False])
def test_tf_pfor_batch_jacobian_shapes(pfor, fixed):
    x = fx("tf_tests/fixed_shape_x") if fixed else torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    jac = _tape_batch_jacobian(lambda z: z * z, x, experimental_use_pfor=pfor)
    b, n = x.shape[0], x[0].numel()
    expected = torch.diag_embed(2 * x.reshape(b, n)).reshape(b, *x.shape[1:], *x.shape[1:])
    assert torch.equal(jac, expected)
    if fixed:
        assert torch.equal(jac, fx("tf_tests/fixed_shape_jac"))
    for mode in MODES:
        assert torch.equal(distjac.batch_jacobian(lambda z: z * z, x, mode=mode, experimental_use_pfor=pfor),
                           expected)


# TF: GradientsTest.test_fc_batch_jacobian
def test_tf_pfor_fc_batch_jacobian():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(26)
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    x = randn(8, 4, seed=27)
    pfor = _tape_batch_jacobian(model, x)
    loop = _tape_batch_jacobian(model, x, experimental_use_pfor=False)
    assert_close(pfor, loop)
    ref = reference_batch_jacobian(model, x)
    assert_close(pfor, ref)
    for mode in MODES:
        assert_close(distjac.batch_jacobian(model, x, mode=mode), ref, msg=mode)


def _lstm_cell(seed=28, features=4, hidden=4, dtype=torch.float32) -> nn.LSTMCell:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.LSTMCell(features, hidden).to(dtype)


def _unroll(cell, inputs, c0, h0):
    h, c = h0, c0
    for t in range(inputs.shape[1]):
        h, c = cell(inputs[:, t], (h, c))
    return h, c


# TF: GradientsTest.test_lstm_batch_jacobian
def test_tf_pfor_lstm_batch_jacobian():
    cell = _lstm_cell()
    inputs = randn(8, 2, 4, seed=29)
    c0, h0 = randn(8, 4, seed=30), randn(8, 4, seed=31)
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch(c0)  # a Jacobian w.r.t. a non-input tensor: the initial cell state
        _, c = _unroll(cell, inputs, c0, h0)
    pfor = tape.batch_jacobian(c, c0)
    loop = tape.batch_jacobian(c, c0, experimental_use_pfor=False)
    assert_close(pfor, loop)
    # Reference: example by example in float64 (inputs and h0 are per-example data too).
    cell64, x64, c064, h064 = copy.deepcopy(cell).double(), inputs.double(), c0.double(), h0.double()
    ref = torch.stack([
        torch.autograd.functional.jacobian(
            lambda cc, i=i: _unroll(cell64, x64[i:i + 1], cc, h064[i:i + 1])[1], c064[i:i + 1]
        ).reshape(4, 4)
        for i in range(8)
    ])
    assert_close(pfor, ref)


# TF: GradientsTest.test_dynamic_lstm_batch_jacobian
def test_tf_pfor_dynamic_lstm_batch_jacobian():
    cell = _lstm_cell(seed=32)
    inputs = randn(8, 3, 4, seed=33)
    lengths = torch.tensor([1, 2, 3, 3, 2, 1, 3, 2])

    def final_c(x):
        h = c = x.new_zeros(x.shape[0], 4)
        for t in range(x.shape[1]):
            h2, c2 = cell(x[:, t], (h, c))
            alive = (t < lengths)[:, None]
            h, c = torch.where(alive, h2, h), torch.where(alive, c2, c)
        return c

    jac = _tape_batch_jacobian(final_c, inputs)
    assert jac.shape == (8, 4, 3, 4)
    xr = inputs.clone().requires_grad_(True)
    c = final_c(xr)
    for i in range(4):  # row i == gradients(final_c[:, i], inputs)
        (g,) = torch.autograd.grad(c[:, i].sum(), xr, retain_graph=True)
        assert_close(jac[:, i], g)
    # Steps past an example's length do not influence it.
    for b, n in enumerate(lengths.tolist()):
        assert torch.count_nonzero(jac[b, :, n:]) == 0
    for mode in MODES:
        assert_close(distjac.batch_jacobian(final_c, inputs, mode=mode), jac, msg=mode)


# TF: GradientsTest.test_lstm_hessian
def test_tf_pfor_lstm_hessian():
    cell = _lstm_cell(seed=34, features=2, hidden=2, dtype=torch.float64)
    inputs = randn(2, 2, 2, seed=35, dtype=torch.float64)
    zeros = torch.zeros(2, 2, dtype=torch.float64)
    weight = cell.weight_ih
    with distjac.GradientTape(persistent=True) as outer:
        with distjac.GradientTape(persistent=True) as inner:
            h, _ = _unroll(cell, inputs, zeros, zeros)
        jac = inner.jacobian(h, weight)
        jac_loop = inner.jacobian(h, weight, experimental_use_pfor=False)
    assert_close(jac, jac_loop)
    hess = outer.jacobian(jac, weight)
    hess_loop = outer.jacobian(jac_loop, weight, experimental_use_pfor=False)
    assert hess.shape == (2, 2, 8, 2, 8, 2)
    assert_close(hess, hess_loop)

    def h_unrolled(w):
        hh, cc = zeros, zeros
        for t in range(inputs.shape[1]):
            hh, cc = torch.func.functional_call(cell, {"weight_ih": w}, (inputs[:, t], (hh, cc)))
        return hh

    ref = torch.autograd.functional.jacobian(
        lambda w: torch.autograd.functional.jacobian(h_unrolled, w, create_graph=True), weight.detach()
    )
    assert_close(hess, ref)


# TF: GradientsTest.test_lstm_batch_hessian
def test_tf_pfor_lstm_batch_hessian():
    cell = _lstm_cell(seed=36, features=3, hidden=3, dtype=torch.float64)
    inputs = randn(4, 2, 3, seed=37, dtype=torch.float64)
    c0, h0 = randn(4, 3, seed=38, dtype=torch.float64), randn(4, 3, seed=39, dtype=torch.float64)
    with distjac.GradientTape(persistent=True) as outer:
        outer.watch(c0)
        with distjac.GradientTape(persistent=True) as inner:
            inner.watch(c0)
            _, c = _unroll(cell, inputs, c0, h0)
        jac = inner.batch_jacobian(c, c0).reshape(4, -1)
    hess = outer.batch_jacobian(jac, c0)
    hess_loop = outer.batch_jacobian(jac, c0, experimental_use_pfor=False)
    assert_close(hess, hess_loop)
    jf = torch.autograd.functional.jacobian
    ref = torch.stack([
        jf(lambda c1, i=i: jf(lambda cc: _unroll(cell, inputs[i:i + 1], cc, h0[i:i + 1])[1], c1,
                              create_graph=True).reshape(9), c0[i:i + 1]).reshape(9, 3)
        for i in range(4)
    ])
    assert_close(hess, ref)


# TF: GradientsTest.test_fc_jacobian, test_fc_per_eg_grad
def test_tf_pfor_fc_jacobian_and_per_eg_grad():
    # test_fc_jacobian: the full Jacobian w.r.t. the weights equals per-example Jacobians;
    # test_fc_per_eg_grad: per-example gradients of a loss. (The mnist/LSTM per-example
    # parameter-gradient variants are the same computation on bigger models; out of scope.)
    model = make_mlp((4, 6, 3), seed=40, dtype=torch.float64)
    x = randn(5, 4, seed=41, dtype=torch.float64)
    weight = model[0].weight
    with distjac.GradientTape(persistent=True) as tape:
        out = model(x)
        losses = (out**2).sum(1)  # (B,)
    jac = tape.jacobian(out, weight)  # (B, 3, 6, 4)
    per_eg = tape.jacobian(losses, weight)  # (B, 6, 4)
    assert_close(tape.jacobian(out, weight, experimental_use_pfor=False), jac)
    for i in range(5):
        ji = torch.autograd.functional.jacobian(
            lambda w, i=i: torch.func.functional_call(model, {"0.weight": w}, (x[i:i + 1],))[0], weight.detach()
        )
        assert_close(jac[i], ji)
        gi = torch.autograd.grad((model(x[i:i + 1]) ** 2).sum(), weight)[0]
        assert_close(per_eg[i], gi)
