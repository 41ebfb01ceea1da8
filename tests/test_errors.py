"""Every error path, matched against a stable part of its message (STYLE.md, Errors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SEED_X, assert_close, cube, randn, reference_batch_jacobian

import distjac

MODES = ["rev", "fwd", "auto"]


def _recorded(x: torch.Tensor, fn=cube, persistent: bool = True):
    with distjac.GradientTape(persistent=persistent) as tape:
        tape.watch(x)
        y = fn(x)
    return tape, y


# --------------------------------------------------------------------------------------
# The exception tree
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (distjac.ShapeError, ValueError),
        (distjac.DtypeError, TypeError),
        (distjac.OptionError, ValueError),
        (distjac.TapeError, RuntimeError),
        (distjac.VectorizationError, RuntimeError),
        (distjac.CoupledExamplesError, ValueError),
        (distjac.MemoryBudgetError, MemoryError),
        (distjac.ShardError, RuntimeError),
    ],
)
def test_error_classes_subclass_builtins(cls, builtin):
    assert issubclass(cls, builtin)
    assert issubclass(cls, distjac.DistjacError)
    assert cls.__name__.endswith("Error")


def test_shard_error_keeps_its_attributes_across_pickling():
    import pickle

    err = distjac.ShardError("shard 3 failed", shard=3, start=30, stop=40, node="n1")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.shard, back.start, back.stop, back.node) == ("shard 3 failed", 3, 30, 40, "n1")


# --------------------------------------------------------------------------------------
# Ranks (TF BatchJacobianTest.testBadInputRank / testBadOutputRank)
# --------------------------------------------------------------------------------------


# TF: BatchJacobianTest.testBadInputRank
def test_tape_rank_one_source():
    x = torch.tensor([1.0, 2.0])
    tape, _ = _recorded(x)
    y = torch.stack([x, x], dim=1)  # (2, 2)
    with pytest.raises(distjac.ShapeError,
                       match=r"source has shape \(2,\), rank 1; it must have rank at least 2.*rank >= 2"):
        tape.batch_jacobian(y, x)


# TF: BatchJacobianTest.testBadOutputRank
def test_tape_rank_one_target():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    tape, y = _recorded(x, fn=lambda z: z.sum(1))
    with pytest.raises(distjac.ShapeError, match=r"target has shape \(2,\), rank 1.*rank >= 2"):
        tape.batch_jacobian(y, x)
    with pytest.raises(ValueError, match="Reshape to"):  # a ValueError, as TF's
        tape.batch_jacobian(y, x)


def test_tape_rank_zero():
    x = torch.tensor(2.0)
    tape, y = _recorded(x)
    with pytest.raises(distjac.ShapeError, match="rank 0"):
        tape.batch_jacobian(y, x)


@pytest.mark.parametrize("mode", MODES)
def test_functional_rank_one_source(mode):
    with pytest.raises(distjac.ShapeError, match=r"x \(the source\) has shape \(3,\), rank 1"):
        distjac.batch_jacobian(cube, torch.ones(3), mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_functional_rank_one_target(mode):
    with pytest.raises(distjac.ShapeError, match=r"fn\(x\) \(the target\) has shape \(3,\), rank 1"):
        distjac.batch_jacobian(lambda z: z.sum(1), torch.ones(3, 2), mode=mode)


# --------------------------------------------------------------------------------------
# Batch sizes (TF BatchJacobianTest.testBadShape, parallel_for test_batch_jacobian_bad_shapes)
# --------------------------------------------------------------------------------------


# TF: BatchJacobianTest.testBadShape, GradientsTest.test_batch_jacobian_bad_shapes
def test_tape_batch_sizes_differ():
    x = randn(2, 3, seed=1)
    tape, y = _recorded(x, fn=lambda z: torch.cat([z, z], dim=0))  # (4, 3)
    with pytest.raises(distjac.ShapeError, match=r"Need first dimension of target shape \(4, 3\) and "
                                                 r"source shape \(2, 3\) to match.*got 4 and 2"):
        tape.batch_jacobian(y, x)


# TF: GradientsTest.test_batch_jacobian_bad_unknown_shapes (the mismatch appears only when
# fn runs, as with TF's placeholders).
@pytest.mark.parametrize("pi", [None, 2])
@pytest.mark.parametrize("mode", MODES)
def test_functional_fn_changes_the_batch_size(mode, pi):
    with pytest.raises(distjac.ShapeError, match="must match"):
        distjac.batch_jacobian(lambda z: torch.cat([z, z]), randn(2, 3), mode=mode, parallel_iterations=pi)


# --------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
@pytest.mark.parametrize("mode", MODES)
def test_functional_integer_and_bool_sources(mode, dtype):
    x = torch.ones(2, 2, dtype=dtype)
    with pytest.raises(distjac.DtypeError, match=f"dtype {dtype}; only floating dtypes"):
        distjac.batch_jacobian(lambda z: z.float(), x, mode=mode)
    with pytest.raises(TypeError):
        distjac.batch_jacobian(lambda z: z.float(), x, mode=mode)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_tape_integer_and_bool_sources(dtype):
    # TF only warns and returns int32 zeros (fixture errors/int_source_result); DESIGN.md
    # asks for an error.
    x = torch.ones(2, 2, dtype=dtype)
    with distjac.GradientTape() as tape:
        with pytest.raises(distjac.DtypeError, match="only floating dtypes"):
            tape.watch(x)
    xf = torch.ones(2, 2)
    with distjac.GradientTape() as tape:
        tape.watch(xf)
        y = xf * 2
    with pytest.raises(distjac.DtypeError, match="only floating dtypes"):
        tape.batch_jacobian(y, x)


@pytest.mark.parametrize("mode", MODES)
def test_functional_integer_target(mode):
    with pytest.raises(distjac.DtypeError, match=r"fn\(x\) \(the target\) has dtype torch.int64"):
        distjac.batch_jacobian(lambda z: (z > 0).long(), randn(2, 2), mode=mode)


# --------------------------------------------------------------------------------------
# A non-persistent tape used twice
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("second", ["batch_jacobian", "jacobian", "gradient"])
def test_non_persistent_tape_used_twice(second):
    x = torch.tensor(SEED_X)
    tape, y = _recorded(x, persistent=False)
    tape.batch_jacobian(y, x)
    with pytest.raises(distjac.TapeError, match="non-persistent GradientTape can only be used to compute one set"):
        getattr(tape, second)(y, x)


# --------------------------------------------------------------------------------------
# parallel_iterations, mode, unconnected_gradients, max_memory
# --------------------------------------------------------------------------------------

BAD_COUNTS = [0, -1, 2.5, True, "2"]


@pytest.mark.parametrize("pi", BAD_COUNTS, ids=repr)
@pytest.mark.parametrize("mode", MODES)
def test_functional_bad_parallel_iterations(mode, pi):
    with pytest.raises(distjac.OptionError, match=r"parallel_iterations=.* is not valid; use None .*integer >= 1"):
        distjac.batch_jacobian(cube, torch.tensor(SEED_X), mode=mode, parallel_iterations=pi)


@pytest.mark.parametrize("pi", BAD_COUNTS, ids=repr)
@pytest.mark.parametrize("how", ["batch_jacobian", "jacobian"])
def test_tape_bad_parallel_iterations(how, pi):
    x = torch.tensor(SEED_X)
    tape, y = _recorded(x)
    with pytest.raises(distjac.OptionError, match=r"parallel_iterations=.* is not valid"):
        getattr(tape, how)(y, x, parallel_iterations=pi)


@pytest.mark.parametrize("mode", ["reverse", "forward", "REV", "", None, 1])
def test_unknown_mode_lists_the_valid_ones(mode):
    with pytest.raises(distjac.OptionError, match=r"mode=.* is not valid; use one of 'rev', 'fwd' or 'auto'"):
        distjac.batch_jacobian(cube, torch.tensor(SEED_X), mode=mode)


VALID_UNCONNECTED = (
    r"use one of 'none', 'zero', distjac.UnconnectedGradients.NONE or distjac.UnconnectedGradients.ZERO"
)


@pytest.mark.parametrize("value", ["bogus", "zeros", None, 0])
def test_unknown_unconnected_gradients_lists_the_valid_ones(value):
    x = torch.tensor(SEED_X)
    with pytest.raises(distjac.OptionError, match=VALID_UNCONNECTED):
        distjac.batch_jacobian(cube, x, unconnected_gradients=value)
    tape, y = _recorded(x)
    for how in ("batch_jacobian", "jacobian", "gradient"):
        with pytest.raises(distjac.OptionError, match=VALID_UNCONNECTED):
            getattr(tape, how)(y, x, unconnected_gradients=value)


def test_unconnected_gradients_accepts_any_case():
    x = torch.tensor(SEED_X)
    assert distjac.batch_jacobian(lambda z: torch.ones(2, 1), x, unconnected_gradients="NONE") is None


@pytest.mark.parametrize("budget", [0, -5, 2.5])
def test_bad_max_memory(budget):
    with pytest.raises(distjac.OptionError, match=r"max_memory=.* is not valid"):
        distjac.batch_jacobian(cube, torch.tensor(SEED_X), max_memory=budget)


# --------------------------------------------------------------------------------------
# Functions vmap cannot handle
# --------------------------------------------------------------------------------------


class _ItemInBackward(torch.autograd.Function):
    """y = 3x; its backward calls .item(), which has no vmap rule."""

    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, g):
        scale = 3.0 if g.abs().sum().item() >= 0 else 0.0
        return g * scale


class _BranchInBackward(torch.autograd.Function):
    """y = x**2; its backward branches in Python on the values of the cotangent."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if (g != 0).any():
            return 2 * x * g
        return torch.zeros_like(g)


UNVECTORIZABLE = {"item_in_backward": _ItemInBackward.apply, "branch_in_backward": _BranchInBackward.apply}


@pytest.mark.parametrize("mode", ["rev", "auto"])
@pytest.mark.parametrize("name", sorted(UNVECTORIZABLE))
def test_functional_vmap_failure_says_how_to_take_the_loop(name, mode):
    fn, x = UNVECTORIZABLE[name], randn(3, 4, seed=2)
    ref = reference_batch_jacobian(fn, x)
    if mode == "rev":  # an explicit mode does what it says, and says what to do
        with pytest.raises(distjac.VectorizationError, match="experimental_use_pfor=False"):
            distjac.batch_jacobian(fn, x, mode=mode)
    else:  # vectorizing was auto's own choice: it takes the loop (NOTE [vmap fallback])
        distjac.kernels.clear_caches()
        assert_close(distjac.batch_jacobian(fn, x, mode=mode), ref)
        assert "loop" in distjac.kernels.choose_strategy(fn, x).record.strategy
    # ... and the loop path works.
    jac = distjac.batch_jacobian(fn, x, mode=mode, experimental_use_pfor=False)
    assert_close(jac, ref)


@pytest.mark.parametrize("name", sorted(UNVECTORIZABLE))
def test_tape_vmap_failure_says_how_to_take_the_loop(name):
    fn, x = UNVECTORIZABLE[name], randn(3, 4, seed=3)
    tape, y = _recorded(x, fn=fn)
    with pytest.raises(distjac.VectorizationError, match="disabled by setting experimental_use_pfor=False"):
        tape.batch_jacobian(y, x)
    jac = tape.batch_jacobian(y, x, experimental_use_pfor=False)
    assert_close(jac, reference_batch_jacobian(fn, x))


def test_vectorization_error_is_chained_from_the_original():
    x = randn(3, 4, seed=4)
    with pytest.raises(distjac.VectorizationError) as info:
        distjac.batch_jacobian(_ItemInBackward.apply, x, mode="rev")
    assert info.value.__cause__ is not None


# --------------------------------------------------------------------------------------
# fn and x of the wrong kind
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "fn", [lambda z: z.tolist(), lambda z: (z,), lambda z: None, lambda z: z.detach().numpy()],
    ids=["list", "tuple", "None", "numpy"],
)
def test_fn_returning_a_non_tensor(fn, mode):
    with pytest.raises(TypeError, match=r"fn must return a torch.Tensor, got"):
        distjac.batch_jacobian(fn, randn(2, 2), mode=mode)


def test_fn_returning_a_non_tensor_on_the_direct_rev_path():
    with pytest.raises(TypeError, match=r"fn must return a torch.Tensor, got tuple"):
        distjac.batch_jacobian(lambda z: (z,), randn(2, 2), mode="rev", parallel_iterations=1)


def test_fn_not_callable():
    with pytest.raises(TypeError, match="fn must be callable"):
        distjac.batch_jacobian(3, randn(2, 2))


def test_x_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        distjac.batch_jacobian(cube, SEED_X)


def test_tape_target_or_source_not_a_tensor():
    x = torch.tensor(SEED_X)
    tape, y = _recorded(x)
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        tape.batch_jacobian(y.tolist(), x)
    with pytest.raises(TypeError, match="source must be a torch.Tensor"):
        tape.batch_jacobian(y, SEED_X)
    with distjac.GradientTape() as tape2:
        with pytest.raises(TypeError, match="must be a torch.Tensor"):
            tape2.watch([x, "not a tensor"])


def test_watch_outside_a_tape():
    with pytest.raises(distjac.TapeError, match="the tape is not recording; call watch inside"):
        distjac.GradientTape().watch(torch.ones(2, 2))


def test_tape_entered_twice_at_once():
    tape = distjac.GradientTape()
    with tape:
        with pytest.raises(distjac.TapeError, match="already recording"):
            with tape:
                pass


# --------------------------------------------------------------------------------------
# fn reading its input's memory (NOTE [fn reading raw memory] in distjac.kernels)
# --------------------------------------------------------------------------------------


def _numpy_guarded(post):
    def fn(z):
        if np.isnan(z.detach().numpy()).any():  # a check through numpy: needs real memory
            raise ValueError("NaN in the batch")
        return post(z)

    return fn


_MIX = torch.linspace(-1.0, 1.0, 15).reshape(3, 5)


@pytest.mark.parametrize("post", [torch.tanh, lambda z: torch.sin(z) @ _MIX.to(z.dtype)], ids=["elementwise", "wide"])
def test_auto_and_the_diagonal_compute_for_a_fn_reading_numpy(post):
    """Under torch.func (forward mode, the diagonal's jvp) fn's tensors have no memory of
    their own; auto and structure='diagonal' then compute by reverse mode, as rev does."""
    fn = _numpy_guarded(post)
    x = randn(6, 3, seed=5)
    want = reference_batch_jacobian(fn, x)
    assert_close(distjac.batch_jacobian(fn, x, mode="auto"), want)
    assert_close(distjac.batch_jacobian(fn, x, mode="auto"), want)  # remembered
    assert_close(distjac.batch_jacobian(fn, x, mode="rev"), want)
    if post is torch.tanh:
        assert_close(distjac.batch_jacobian(fn, x, structure="diagonal"), torch.diagonal(want, dim1=1, dim2=2))
    with pytest.raises(ValueError, match="NaN in the batch"):  # the check itself still runs
        distjac.batch_jacobian(fn, x.index_fill(0, torch.tensor([2]), float("nan")), mode="auto")


@pytest.mark.parametrize("call", ["fwd", "fwd loop", "estimate", "sketch right", "sketch left"])
def test_forward_mode_and_estimates_say_what_to_do_for_a_fn_reading_numpy(call):
    fn = _numpy_guarded(torch.tanh)
    x = randn(4, 3, seed=6)
    run = {
        "fwd": lambda: distjac.batch_jacobian(fn, x, mode="fwd"),
        "fwd loop": lambda: distjac.batch_jacobian(fn, x, mode="fwd", experimental_use_pfor=False),
        "estimate": lambda: distjac.estimate(fn, x, "frobenius", probes=2),
        "sketch right": lambda: distjac.sketch(fn, x, 2),
        "sketch left": lambda: distjac.sketch(fn, x, 2, side="left"),
    }[call]
    with pytest.raises(RuntimeError, match=r"fn reads its input's memory directly.*x\.isnan\(\)\.any\(\)"):
        run()


def test_forward_mode_on_a_random_function_says_what_to_do():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Dropout(0.5)).train()
    x = randn(4, 5, seed=2)
    with pytest.raises(distjac.VectorizationError, match=r"draws random numbers.*Use mode='rev' or mode='auto'"):
        distjac.batch_jacobian(model, x, mode="fwd")
    jac = distjac.batch_jacobian(model, x, mode="auto")  # one draw: each row is W masked by it
    kept = (jac != 0).any(-1)  # (4, 6): the outputs the draw kept
    assert_close(jac, model[0].weight.detach() * kept[:, :, None] / 0.5)
