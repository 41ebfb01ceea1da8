"""``distjac.GradientTape``: watch, gradient, jacobian, batch_jacobian, with TF's semantics."""

from __future__ import annotations

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
    make_matrix_model,
    make_mlp,
    randn,
    reference_batch_jacobian,
)

import distjac

NONPERSISTENT = "non-persistent GradientTape can only be used to compute one set"


def _seed(dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(SEED_X, dtype=dtype)


# --------------------------------------------------------------------------------------
# The seed examples, exactly
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pi", [None, 1, 2, 3])
@pytest.mark.parametrize("pfor", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seed_first_order_exact(dtype, pfor, pi):
    x = _seed(dtype)
    with distjac.GradientTape() as tape:
        tape.watch(x)
        y = x * x * x
    jac = tape.batch_jacobian(y, x, parallel_iterations=pi, experimental_use_pfor=pfor)
    assert jac.dtype == dtype
    assert torch.equal(jac, torch.tensor(SEED_FIRST, dtype=dtype)), jac


@pytest.mark.parametrize("outer_pfor", [True, False])
@pytest.mark.parametrize("inner_pfor", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seed_second_order_exact(dtype, inner_pfor, outer_pfor):
    x = _seed(dtype)
    with distjac.GradientTape() as outer:
        outer.watch(x)
        with distjac.GradientTape() as inner:
            inner.watch(x)
            y = x * x * x
        jac1 = inner.batch_jacobian(y, x, experimental_use_pfor=inner_pfor)
    jac2 = outer.batch_jacobian(jac1, x, experimental_use_pfor=outer_pfor)
    assert torch.equal(jac1.detach(), torch.tensor(SEED_FIRST, dtype=dtype)), jac1
    assert torch.equal(jac2, torch.tensor(SEED_SECOND, dtype=dtype)), jac2


def test_third_order_with_three_tapes():
    x = _seed()
    with distjac.GradientTape() as t3:
        t3.watch(x)
        with distjac.GradientTape() as t2:
            t2.watch(x)
            with distjac.GradientTape() as t1:
                t1.watch(x)
                y = cube(x)
            j1 = t1.batch_jacobian(y, x)
        j2 = t2.batch_jacobian(j1, x)
    j3 = t3.batch_jacobian(j2, x)
    expected = torch.zeros(2, 2, 2, 2, 2)
    for i in range(2):
        expected[:, i, i, i, i] = 6
    assert torch.equal(j3, expected), j3


# --------------------------------------------------------------------------------------
# batch_jacobian on models, against the float64 reference
# --------------------------------------------------------------------------------------

TAPE_MODELS = {
    "mlp": (lambda: make_mlp((5, 7, 3)), (4, 5)),
    "conv": (lambda: make_conv(), (2, 1, 6, 6)),
    "lstm": (lambda: make_lstm(), (3, 3, 4)),
    "matrix": (lambda: make_matrix_model(), (3, 2, 4)),
}


@pytest.mark.parametrize("pi", [None, 2, 3])
@pytest.mark.parametrize("pfor", [True, False])
@pytest.mark.parametrize("name", sorted(TAPE_MODELS))
def test_batch_jacobian_of_models(name, pfor, pi):
    factory, shape = TAPE_MODELS[name]
    model, x = factory(), randn(*shape, seed=3)
    with distjac.GradientTape() as tape:
        tape.watch(x)
        y = model(x)
    jac = tape.batch_jacobian(y, x, parallel_iterations=pi, experimental_use_pfor=pfor)
    assert_close(jac, reference_batch_jacobian(model, x), msg=name)
    check_finite_difference(model, x, jac)


def test_parallel_iterations_2_vs_3_and_pfor_agree():
    # TF BatchJacobianTest.test_parallel_iterations and parallel_for's pfor-vs-while tests.
    model, x = make_mlp((5, 7, 3)), randn(4, 5, seed=4)
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = model(x)
    results = {
        (pfor, pi): tape.batch_jacobian(y, x, parallel_iterations=pi, experimental_use_pfor=pfor)
        for pfor in (True, False) for pi in (None, 1, 2, 3)
    }
    base = results[(True, None)]
    for key, jac in results.items():
        assert_close(jac, base, msg=str(key))
    full = {
        (pfor, pi): tape.jacobian(y, x, parallel_iterations=pi, experimental_use_pfor=pfor)
        for pfor in (True, False) for pi in (None, 2, 3)
    }
    for key, jac in full.items():
        assert_close(jac, full[(True, None)], msg=str(key))


# --------------------------------------------------------------------------------------
# gradient and jacobian
# --------------------------------------------------------------------------------------


def test_gradient_sums_a_non_scalar_target():
    x = _seed()
    with distjac.GradientTape() as tape:
        tape.watch(x)
        y = x * x * x
    g = tape.gradient(y, x)
    assert torch.equal(g, 3 * x * x)


def test_gradient_output_gradients_and_structures():
    x, w = randn(2, 3, seed=5), randn(3, 2, seed=6)
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch([x, w])
        y = torch.sin(x) @ w
    v = randn(2, 2, seed=7)
    g = tape.gradient(y, x, output_gradients=v)
    assert_close(g, torch.cos(x) * (v @ w.T))
    # A list in, a list out; a dict in, a dict out.
    gx, gw = tape.gradient(y, [x, w])
    assert_close(gx, torch.cos(x) * w.sum(1))
    assert_close(gw, torch.sin(x).T @ torch.ones(2, 2))
    d = tape.gradient(y, {"x": x, "w": w})
    assert set(d) == {"x", "w"}
    assert_close(d["w"], gw)
    # A list of targets: the gradients of their sum.
    g2 = tape.gradient([y, y.sum() * 2], x)
    assert_close(g2, 3 * gx)


def test_jacobian_full():
    x, w = randn(2, 3, seed=8), randn(3, 2, seed=9)
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch([x, w])
        y = torch.sin(x) @ w
    jac = tape.jacobian(y, x)
    assert jac.shape == (2, 2, 2, 3)
    ref = torch.autograd.functional.jacobian(lambda z: torch.sin(z) @ w, x)
    assert_close(jac, ref)
    jx, jw = tape.jacobian(y, [x, w])
    assert_close(jx, ref)
    assert_close(jw, torch.autograd.functional.jacobian(lambda v: torch.sin(x) @ v, w))
    # The diagonal blocks of the full Jacobian are the batch Jacobian.
    bj = tape.batch_jacobian(y, x)
    assert_close(torch.stack([jac[i, :, i] for i in range(2)]), bj)
    assert torch.count_nonzero(jac[0, :, 1]) == 0 and torch.count_nonzero(jac[1, :, 0]) == 0


@pytest.mark.parametrize("pi", [None, 1, 4])
@pytest.mark.parametrize("pfor", [True, False])
def test_jacobian_pfor_and_chunks(pfor, pi):
    x = randn(3, 2, seed=10)
    with distjac.GradientTape() as tape:
        tape.watch(x)
        y = torch.tanh(x @ x.T)
    jac = tape.jacobian(y, x, parallel_iterations=pi, experimental_use_pfor=pfor)
    assert_close(jac, torch.autograd.functional.jacobian(lambda z: torch.tanh(z @ z.T), x))


# --------------------------------------------------------------------------------------
# persistent
# --------------------------------------------------------------------------------------

SECOND_USES = {
    "batch_jacobian_twice": ("batch_jacobian", "batch_jacobian"),
    "gradient_twice": ("gradient", "gradient"),
    "jacobian_twice": ("jacobian", "jacobian"),
    "batch_jacobian_then_gradient": ("batch_jacobian", "gradient"),
    "gradient_then_batch_jacobian": ("gradient", "batch_jacobian"),
}


def _use(tape, how: str, y, x):
    return getattr(tape, how)(y, x)


@pytest.mark.parametrize("case", sorted(SECOND_USES))
def test_non_persistent_tape_used_twice_raises(case):
    first, second = SECOND_USES[case]
    x = _seed()
    with distjac.GradientTape() as tape:
        tape.watch(x)
        y = x * x * x
    assert _use(tape, first, y, x) is not None
    with pytest.raises(distjac.TapeError, match=NONPERSISTENT):
        _use(tape, second, y, x)
    # TapeError is a RuntimeError, as TF's.
    with pytest.raises(RuntimeError, match="persistent=True"):
        _use(tape, second, y, x)


def test_non_persistent_tape_used_twice_inside_the_context_raises():
    x = _seed()
    with distjac.GradientTape() as tape:
        tape.watch(x)
        y = x * x * x
        tape.batch_jacobian(y, x)
        with pytest.raises(distjac.TapeError, match=NONPERSISTENT):
            tape.batch_jacobian(y, x)


@pytest.mark.parametrize("pfor", [True, False])
def test_persistent_tape_used_many_times(pfor):
    x = _seed()
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = x * x * x
    for _ in range(3):
        jac = tape.batch_jacobian(y, x, experimental_use_pfor=pfor)
        assert torch.equal(jac, torch.tensor(SEED_FIRST))
    assert torch.equal(tape.gradient(y, x), 3 * x * x)
    assert tape.jacobian(y, x).shape == (2, 2, 2, 2)


def test_non_persistent_tape_once_without_pfor_works():
    # TF refuses this eagerly ("GradientTape must be created with persistent=True to compute
    # the batch_jacobian with eager execution enabled and with experimental_use_pfor set to
    # False"): its while loop needs the tape several times. distjac's loop runs on one
    # recorded graph, so one call on a non-persistent tape is one use, as for pfor.
    x = _seed()
    with distjac.GradientTape() as tape:
        tape.watch(x)
        y = x * x * x
    jac = tape.batch_jacobian(y, x, experimental_use_pfor=False, parallel_iterations=1)
    assert torch.equal(jac, torch.tensor(SEED_FIRST))


def test_persistent_tape_reentered_keeps_recording():
    x = _seed()
    tape = distjac.GradientTape(persistent=True)
    with tape:
        tape.watch(x)
        y = x * 2
    assert not x.requires_grad
    with tape:
        z = x * x * x
    assert torch.equal(tape.batch_jacobian(z, x), torch.tensor(SEED_FIRST))
    assert torch.equal(tape.batch_jacobian(y, x), 2 * torch.eye(2).expand(2, 2, 2))
    assert not x.requires_grad


# --------------------------------------------------------------------------------------
# nesting
# --------------------------------------------------------------------------------------


def test_nested_tapes_watch_state():
    x = randn(3, 2, seed=11)
    with distjac.GradientTape() as outer:
        outer.watch(x)
        with distjac.GradientTape() as inner:
            inner.watch(x)
            y = torch.sin(x)
        assert x.requires_grad  # the outer tape still records x
        g = inner.gradient(y, x)  # computed while outer records: differentiable
        assert g.requires_grad
    assert not x.requires_grad
    h = outer.batch_jacobian(g, x)
    assert_close(h, torch.diag_embed(-torch.sin(x)))


def test_gradient_inside_an_outer_tape_is_recorded_jacobian_outside_is_not():
    x = randn(2, 3, seed=12)
    with distjac.GradientTape() as inner:
        inner.watch(x)
        y = x**3
    g = inner.gradient(y, x)  # no tape recording: a plain tensor
    assert not g.requires_grad
    assert_close(g, 3 * x**2)


def test_only_inner_tape_watches():
    x = _seed()
    with distjac.GradientTape(persistent=True) as outer:
        with distjac.GradientTape() as inner:
            inner.watch(x)
            y = x * x * x
        jac = inner.batch_jacobian(y, x)
    assert torch.equal(jac.detach(), torch.tensor(SEED_FIRST))
    # The outer tape never watched x: nothing to differentiate.
    assert outer.batch_jacobian(jac, x) is None
    assert not x.requires_grad


# --------------------------------------------------------------------------------------
# unconnected_gradients
# --------------------------------------------------------------------------------------

NONE_VALUES = ["none", distjac.UnconnectedGradients.NONE]
ZERO_VALUES = ["zero", distjac.UnconnectedGradients.ZERO]


def _unconnected_tape():
    x = randn(2, 3, seed=13, dtype=torch.float64)  # source float64
    z = randn(2, 4, seed=14)  # target float32
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch([x, z])
        y = z * 2
    return tape, x, y


@pytest.mark.parametrize("pfor", [True, False])
@pytest.mark.parametrize("ug", NONE_VALUES + ZERO_VALUES, ids=str)
def test_unconnected_batch_jacobian(ug, pfor):
    tape, x, y = _unconnected_tape()
    jac = tape.batch_jacobian(y, x, unconnected_gradients=ug, experimental_use_pfor=pfor)
    if ug in NONE_VALUES:
        assert jac is None  # TF returns zeros here; distjac follows TF's documentation
    else:
        assert jac.shape == (2, 4, 3) and jac.dtype == torch.float64
        assert torch.count_nonzero(jac) == 0


@pytest.mark.parametrize("pfor", [True, False])
@pytest.mark.parametrize("ug", NONE_VALUES + ZERO_VALUES, ids=str)
def test_unconnected_jacobian(ug, pfor):
    tape, x, y = _unconnected_tape()
    jac = tape.jacobian(y, x, unconnected_gradients=ug, experimental_use_pfor=pfor)
    if ug in NONE_VALUES:
        assert jac is None
    else:
        assert jac.shape == (2, 4, 2, 3) and jac.dtype == torch.float64
        assert torch.count_nonzero(jac) == 0


@pytest.mark.parametrize("ug", NONE_VALUES + ZERO_VALUES, ids=str)
def test_unconnected_gradient(ug):
    tape, x, y = _unconnected_tape()
    g = tape.gradient(y, x, unconnected_gradients=ug)
    gl = tape.gradient(y, [x, y], unconnected_gradients=ug)
    if ug in NONE_VALUES:
        assert g is None and gl[0] is None
    else:
        assert g.shape == (2, 3) and g.dtype == torch.float64
        assert torch.count_nonzero(g) == 0
        assert torch.equal(gl[0], g)


def test_unconnected_source_never_watched():
    x, w = randn(2, 3, seed=15), randn(2, 3, seed=16)
    with distjac.GradientTape() as tape:
        tape.watch(x)
        y = x * w
    assert tape.batch_jacobian(y, w) is None


def test_unconnected_zero_float64_dtype():
    # TF BatchJacobianTest.test_zeros_type_correct: zeros of the source's dtype.
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([[2.0]], dtype=dtype)
        with distjac.GradientTape(persistent=True) as tape:
            tape.watch(x)
            y = torch.tensor([[1.0]], dtype=dtype)
        for pfor in (True, False):
            jac = tape.batch_jacobian(y, x, unconnected_gradients="zero", experimental_use_pfor=pfor)
            assert jac.dtype == dtype and torch.equal(jac, torch.zeros(1, 1, 1, dtype=dtype))
            assert tape.batch_jacobian(y, x, experimental_use_pfor=pfor) is None


# --------------------------------------------------------------------------------------
# The user's tensor is left as found
# --------------------------------------------------------------------------------------


def test_watched_tensor_left_as_found():
    x = _seed()
    x_before = x.clone()
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch(x)
        assert x.requires_grad
        y = x * x * x
    assert not x.requires_grad and x.is_leaf
    tape.batch_jacobian(y, x)
    tape.gradient(y, x)
    tape.jacobian(y, x)
    assert not x.requires_grad
    assert x.grad is None
    assert torch.equal(x, x_before)


def test_tensor_that_already_required_grad_keeps_its_grad():
    x = _seed().requires_grad_(True)
    (x * 5).sum().backward()
    grad_before = x.grad.clone()
    with distjac.GradientTape() as tape:
        tape.watch(x)
        y = x * x * x
    assert x.requires_grad  # it required grad before the tape: it still does
    assert torch.equal(tape.batch_jacobian(y, x), torch.tensor(SEED_FIRST))
    assert torch.equal(x.grad, grad_before)


def test_model_parameters_get_no_grad():
    model, x = make_mlp((5, 7, 3)), randn(4, 5, seed=17)
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = model(x)
    tape.batch_jacobian(y, x)
    tape.gradient(y, [x, *model.parameters()])
    assert all(p.grad is None for p in model.parameters())
    assert x.grad is None


def test_operations_after_the_block_are_not_recorded():
    x = _seed()
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = x * x * x
    z = x * x * x  # after the block
    assert not z.requires_grad
    assert tape.batch_jacobian(z, x) is None
    assert torch.count_nonzero(tape.batch_jacobian(z, x, unconnected_gradients="zero")) == 0
    # Mixing recorded and unrecorded parts: only the recorded part is differentiated.
    assert torch.equal(tape.batch_jacobian(y + z, x), torch.tensor(SEED_FIRST))


def test_operations_before_watch_are_not_recorded():
    x = _seed()
    with distjac.GradientTape() as tape:
        y0 = x * 2  # before watch
        tape.watch(x)
        y = y0 + x * x * x
    assert torch.equal(tape.batch_jacobian(y, x), torch.tensor(SEED_FIRST))


# --------------------------------------------------------------------------------------
# watch
# --------------------------------------------------------------------------------------


def test_watch_outside_a_tape_raises():
    x = _seed()
    tape = distjac.GradientTape()
    with pytest.raises(distjac.TapeError, match="not recording"):
        tape.watch(x)
    with tape:
        tape.watch(x)
    with pytest.raises(distjac.TapeError, match="not recording"):
        tape.watch(x)  # after the block
    assert not x.requires_grad


def test_watch_nested_structures_and_watched_variables():
    a, b, c = randn(2, 2, seed=1), randn(2, 2, seed=2), randn(2, 2, seed=3)
    with distjac.GradientTape() as tape:
        tape.watch({"a": a, "rest": [b, (c,)]})
        y = a * b * c
    watched = tape.watched_variables()
    assert len(watched) == 3 and all(any(w is t for w in watched) for t in (a, b, c))
    ga, gb, gc = tape.gradient(y, [a, b, c])
    assert_close(ga, b * c)
    assert_close(gb, a * c)
    assert_close(gc, a * b)


def test_watch_accessed_variables():
    model, x = make_mlp((3, 2)), randn(4, 3, seed=18)
    weight = model[0].weight
    with distjac.GradientTape() as tape:
        y = model(x)
    # Parameters (tensors that required grad already) count as watched, like TF variables.
    g = tape.gradient(y, weight)
    assert_close(g, torch.ones(4, 2).T @ x)
    with distjac.GradientTape(watch_accessed_variables=False) as tape:
        y = model(x)
    assert tape.gradient(y, weight) is None


@pytest.mark.parametrize("pfor", [True, False])
def test_jacobian_of_a_scalar_wrt_a_scalar(pfor):
    x = torch.tensor(3.0)
    with distjac.GradientTape() as tape:
        tape.watch(x)
        y = x**2
    jac = tape.jacobian(y, x, experimental_use_pfor=pfor)
    assert jac.shape == () and jac.item() == 6.0


def test_tape_result_is_differentiable_when_the_source_requires_grad():
    """A tape used inside a function that something outside differentiates (the source
    already requires grad): its result must carry the graph, as autograd.grad would with
    create_graph=True; otherwise the outer derivative silently comes out as zero/None."""
    x = randn(3, 2, seed=19, dtype=torch.float64).requires_grad_(True)
    with distjac.GradientTape() as tape:
        tape.watch(x)
        y = torch.sin(x)
    jac = tape.batch_jacobian(y, x)
    assert jac.requires_grad
    (g,) = torch.autograd.grad(jac.sum(), x)
    assert_close(g, -torch.sin(x))


@pytest.mark.parametrize("outer", ["no_grad", "inference_mode"])
def test_tape_records_under_an_outer_no_grad_or_inference_mode(outer):
    # NOTE [recording whatever surrounds it]: the tape's block records, as TF's does and
    # as torch.func's transforms ignore an outer no_grad; before, every source came back
    # unconnected (None) without a word.
    context = torch.no_grad() if outer == "no_grad" else torch.inference_mode()
    model = make_mlp((4, 6, 3), seed=3)
    x = randn(5, 4, seed=4)
    want = reference_batch_jacobian(model, x)
    with context:
        xs = x.clone()  # under inference_mode an inference tensor: it cannot be watched
        with distjac.GradientTape(persistent=True) as tape:
            if outer == "inference_mode":
                with pytest.raises(distjac.TapeError, match="inference tensor.*clone"):
                    tape.watch(xs)
                xs = xs.clone()  # a normal tensor: made inside the block
            tape.watch(xs)
            y = model(xs)
            with torch.no_grad():  # an inner no_grad is respected
                z = model(xs)
        assert torch.is_grad_enabled() is False  # the outer mode is back after the block
        assert_close(tape.batch_jacobian(y, xs), want)
        assert tape.batch_jacobian(z, xs) is None


def test_tape_second_order_under_inference_mode_matches_tf():
    with torch.inference_mode():
        with distjac.GradientTape() as outer:
            x = _seed().clone()  # made in inference mode, copied inside the block: a normal tensor
            outer.watch(x)
            with distjac.GradientTape() as inner:
                inner.watch(x)
                y = x * x * x
            jac = inner.batch_jacobian(y, x)
        hess = outer.batch_jacobian(jac, x)
    assert hess.tolist() == SEED_SECOND


def test_stop_recording_as_tf():
    """TF's example: a gradient computed inside stop_recording is not itself recorded, and
    neither is anything else in the block."""
    x = _seed()
    with distjac.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = x * x * x
        with tape.stop_recording():
            jac = tape.batch_jacobian(y, x)
            z = x * 2.0
        w = x * 3.0
    assert jac.tolist() == SEED_FIRST and not jac.requires_grad
    assert tape.batch_jacobian(z, x) is None  # not recorded
    assert tape.batch_jacobian(w, x).tolist() == [[[3, 0], [0, 3]], [[3, 0], [0, 3]]]  # recording resumed
    with pytest.raises(distjac.TapeError, match="stop_recording: the tape is not recording"):
        with tape.stop_recording():
            pass
