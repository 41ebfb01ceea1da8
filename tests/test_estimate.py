"""Matrix-free estimates (distjac.estimate, distjac.sketch) against the exact reductions of
the full Jacobian (distjac.batch_jacobian + distjac.reduce) on models small enough to build it."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import distjac
from distjac import models
from distjac.estimates import (
    check_estimates,
    estimate_block,
    estimate_columns,
    estimate_products,
    probe_vectors,
    sketch_matrix,
)
from distjac.reduce import reduce_block

F64 = torch.float64


def exact(fn, x, name):
    jac = distjac.batch_jacobian(fn, x, mode="rev")
    return reduce_block(jac, [name], x.dim() - 1)[name]


def rms_rel(est, want):
    return ((est - want) / want).square().mean().sqrt().item()


@pytest.fixture(scope="module")
def wide():
    """8 -> 32 -> 6: M < N, so Frobenius takes reverse products."""
    torch.manual_seed(1)
    return models.mlp([8, 32, 6], seed=3).double(), torch.randn(300, 8, dtype=F64)


@pytest.fixture(scope="module")
def tall():
    """4 -> 16 -> 12: N <= M, so Frobenius takes forward products."""
    torch.manual_seed(2)
    return models.mlp([4, 16, 12], seed=4).double(), torch.randn(300, 4, dtype=F64)


@pytest.fixture(scope="module")
def square():
    torch.manual_seed(3)
    return models.mlp([10, 24, 10], seed=5).double(), torch.randn(200, 10, dtype=F64)


def conv():
    torch.manual_seed(4)
    return models.convnet((2, 6, 6), channels=3, kernel=3, out=5, seed=6).double(), torch.randn(40, 2, 6, 6, dtype=F64)


# --------------------------------------------------------------------------------------
# Frobenius: 1/sqrt(k) decay, calibrated error bars, both product directions
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["wide", "tall"])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_frobenius_error_shrinks_as_one_over_sqrt_k(which, distribution, request):
    fn, x = request.getfixturevalue(which)
    want = exact(fn, x, "frobenius")
    errs = [rms_rel(distjac.estimate(fn, x, "frobenius", probes=k, distribution=distribution).value, want)
            for k in (4, 16, 64)]
    # 4x the probes halves the error (ratio 2); no decay would give 1, 1/k decay 4.
    for a, b in zip(errs, errs[1:]):
        assert 1.5 < a / b < 2.7, errs
    assert errs[-1] < 0.1


@pytest.mark.parametrize("which", ["wide", "tall"])
def test_frobenius_stderr_is_calibrated(which, request):
    fn, x = request.getfixturevalue(which)
    want = exact(fn, x, "frobenius")
    est = distjac.estimate(fn, x, "frobenius", probes=32, seed=7)
    z = (est.value - want).abs() / est.stderr
    assert (z <= 3).float().mean() >= 0.95
    assert 0.4 < z.median() < 1.1  # a standard normal's median |z| is 0.67: neither too wide nor too narrow


def test_frobenius_products_follow_the_shape(wide, tall):
    assert distjac.estimate(wide[0], wide[1][:4], "frobenius", probes=8).products == 9  # 1 forward + 8 VJPs
    assert distjac.estimate(tall[0], tall[1][:4], "frobenius", probes=8).products == 8  # 8 JVPs
    fn, x = wide
    fwd = distjac.estimate(fn, x, "frobenius", probes=256, mode="fwd").value
    rev = distjac.estimate(fn, x, "frobenius", probes=256, mode="rev").value
    want = exact(fn, x, "frobenius")
    assert rms_rel(fwd, want) < 0.05 and rms_rel(rev, want) < 0.05
    assert not torch.equal(fwd, rev)  # really two paths


def test_frobenius_of_elementwise_is_exact_with_rademacher():
    # diagonal J: ||J v||^2 = sum d_i^2 v_i^2 = ||J||_F^2 for every +-1 vector
    x = torch.randn(16, 3, 4, dtype=F64)
    est = distjac.estimate(models.cube(), x, "frobenius", probes=3)
    torch.testing.assert_close(est.value, exact(models.cube(), x, "frobenius"), rtol=1e-12, atol=0)
    assert torch.equal(est.stderr, torch.zeros(16, dtype=F64))


def test_conv_model():
    fn, x = conv()
    want = exact(fn, x, "frobenius")
    est = distjac.estimate(fn, x, "frobenius", probes=64)
    assert rms_rel(est.value, want) < 0.1
    assert ((est.value - want).abs() <= 4 * est.stderr).float().mean() >= 0.9
    spec = distjac.estimate(fn, x, "spectral", iters=200)
    torch.testing.assert_close(spec.value, exact(fn, x, "spectral"), rtol=1e-6, atol=0)
    s = distjac.sketch(fn, x, 3, side="left")
    jac = distjac.batch_jacobian(fn, x).reshape(40, 5, 72)
    r = sketch_matrix((5,), 3, 0, dtype=F64)
    torch.testing.assert_close(s, (r.T @ jac).reshape(40, 3, 2, 6, 6))


def test_one_probe_has_no_measurable_stderr(wide):
    est = distjac.estimate(*wide, "frobenius", probes=1)
    assert torch.isnan(est.stderr).all() and torch.isfinite(est.value).all()


# --------------------------------------------------------------------------------------
# Spectral: power iteration converges to matrix_norm(ord=2) from below
# --------------------------------------------------------------------------------------


def test_spectral_converges_to_the_top_singular_value(wide):
    fn, x = wide
    x = x[:60]
    want = torch.linalg.matrix_norm(distjac.batch_jacobian(fn, x), ord=2)
    errs = []
    for iters in (3, 10, 300):
        est = distjac.estimate(fn, x, "spectral", iters=iters)
        assert (est.value <= want * (1 + 1e-12)).all()  # a lower bound
        assert est.products == 2 * iters + 1
        errs.append((want - est.value).abs().max().item())
    assert errs[0] > errs[1] > errs[2]
    torch.testing.assert_close(est.value, want, rtol=1e-9, atol=0)


def test_spectral_error_bar_and_tol(wide):
    fn, x = wide
    x = x[:60]
    want = torch.linalg.matrix_norm(distjac.batch_jacobian(fn, x), ord=2)
    est = distjac.estimate(fn, x, "spectral", iters=10)
    assert ((want - est.value) <= 3 * est.stderr + 1e-12).float().mean() >= 0.9
    assert torch.isnan(distjac.estimate(fn, x, "spectral", iters=1).stderr).all()
    tol = distjac.estimate(fn, x, "spectral", iters=500, tol=1e-6)
    assert tol.products < 2 * 500 + 1  # stopped early
    assert ((want - tol.value) / want).abs().max() < 1e-5
    assert (tol.stderr <= 1e-6 * tol.value).all()


# --------------------------------------------------------------------------------------
# Trace: exact for diagonal J, 1/sqrt(k), Hutch++
# --------------------------------------------------------------------------------------


def test_trace_of_diagonal_is_exact():
    x = torch.tensor([[4.0, 2.0], [1.0, 3.0]])
    est = distjac.estimate(lambda t: t * t * t, x, "trace", probes=2)
    assert torch.equal(est.value, torch.tensor([60.0, 30.0])) and torch.equal(est.stderr, torch.zeros(2))
    x = torch.randn(8, 2, 5, dtype=F64)
    est = distjac.estimate(torch.tanh, x, "trace", probes=1, mode="rev")
    torch.testing.assert_close(est.value, exact(torch.tanh, x, "trace"), rtol=1e-12, atol=1e-12)


def test_trace_error_shrinks_and_is_calibrated(square):
    fn, x = square
    want = exact(fn, x, "trace")
    scale = distjac.batch_jacobian(fn, x).reshape(len(x), -1).norm(dim=1)  # trace can be near 0: use ||J||_F
    errs = []
    for k in (4, 16, 64):
        est = distjac.estimate(fn, x, "trace", probes=k)
        errs.append(((est.value - want) / scale).square().mean().sqrt().item())
    for a, b in zip(errs, errs[1:]):
        assert 1.5 < a / b < 2.7, errs
    z = (est.value - want).abs() / est.stderr
    assert (z <= 3).float().mean() >= 0.95


def test_hutch_plus_plus():
    # A Jacobian with a fast-decaying spectrum: Hutch++ deflates the top directions exactly.
    torch.manual_seed(5)
    u = torch.linalg.qr(torch.randn(12, 12, dtype=F64)).Q
    a = u @ torch.diag(2.0 ** -torch.arange(12, dtype=F64) * 10) @ u.T
    fn = lambda t: torch.tanh(0.1 * t) @ a.T  # noqa: E731
    x = torch.randn(200, 12, dtype=F64)
    want = exact(fn, x, "trace")
    plain = distjac.estimate(fn, x, "trace", probes=12)
    pp = distjac.estimate(fn, x, "trace", probes=12, variance_reduction="hutch++")
    assert pp.products == 12
    e_plain, e_pp = (plain.value - want).abs().mean(), (pp.value - want).abs().mean()
    assert e_pp < e_plain / 5
    assert ((pp.value - want).abs() <= 4 * pp.stderr + 1e-12).float().mean() >= 0.9
    # a sketch as large as J itself leaves nothing to estimate
    full = distjac.estimate(fn, x[:5], "trace", probes=40, variance_reduction="hutch++")
    torch.testing.assert_close(full.value, want[:5], rtol=1e-10, atol=1e-10)


def test_trace_needs_a_square_jacobian(wide):
    with pytest.raises(distjac.ShapeError, match=r"'trace' needs a square per-example Jacobian, but it is 6 x 8"):
        distjac.estimate(wide[0], wide[1][:2], "trace")


# --------------------------------------------------------------------------------------
# Sketches
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sketch_equals_j_times_r(wide, dtype):
    fn, x = wide
    fn, x = models.mlp([8, 32, 6], seed=3).to(dtype), x[:20].to(dtype)
    jac = distjac.batch_jacobian(fn, x)  # (20, 6, 8)
    right = distjac.sketch(fn, x, 5, seed=2)
    r = sketch_matrix((8,), 5, seed=2, dtype=dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    assert right.shape == (20, 6, 5) and right.dtype == dtype
    torch.testing.assert_close(right, jac @ r, **tol)
    left = distjac.sketch(fn, x, 4, side="left", seed=2)
    rl = sketch_matrix((6,), 4, seed=2, dtype=dtype)
    assert left.shape == (20, 4, 8)
    torch.testing.assert_close(left, rl.T @ jac, **tol)


def test_sketch_of_multidimensional_shapes_and_chunks():
    fn, x = conv()
    s = distjac.sketch(fn, x, 6, seed=1, parallel_iterations=4, block=7)
    r = sketch_matrix((2, 6, 6), 6, seed=1, dtype=F64)
    assert r.shape == (2, 6, 6, 6)
    jac = distjac.batch_jacobian(fn, x).reshape(40, 5, 72)
    torch.testing.assert_close(s, jac @ r.reshape(72, 6))


def test_sketch_against_finite_differences():
    fn = models.mlp([5, 16, 3], activation="softplus", seed=1).double()
    x = torch.randn(6, 5, dtype=F64)
    s = distjac.sketch(fn, x, 3, seed=4)
    r = sketch_matrix((5,), 3, seed=4, dtype=F64)
    h = 1e-6
    for j in range(3):
        with torch.no_grad():
            fd = (fn(x + h * r[:, j]) - fn(x - h * r[:, j])) / (2 * h)
        torch.testing.assert_close(s[..., j], fd, rtol=1e-7, atol=1e-8)


def test_sketch_matrix_distribution():
    r = sketch_matrix((200, 50), 20, seed=0, dtype=F64)
    assert abs(r.mean()) < 0.01 and abs(r.std() - 1) < 0.01
    assert abs((r ** 4).mean() - 3) < 0.05  # Gaussian kurtosis
    assert torch.equal(r, sketch_matrix((200, 50), 20, seed=0, dtype=F64))
    assert not torch.equal(r, sketch_matrix((200, 50), 20, seed=1, dtype=F64))


# --------------------------------------------------------------------------------------
# Seeding: probes depend on (seed, global row id) only
# --------------------------------------------------------------------------------------


def test_probes_depend_only_on_the_global_row():
    whole = probe_vectors(30, 4, rows=torch.arange(100), seed=3)
    part = probe_vectors(30, 4, rows=torch.arange(10, 20), seed=3)
    assert torch.equal(part, whole[:, 10:20])
    assert set(whole.unique().tolist()) == {-1.0, 1.0}
    assert abs(whole.mean()) < 0.02
    assert not torch.equal(whole, probe_vectors(30, 4, rows=torch.arange(100), seed=4))
    assert not torch.equal(whole[:, 0], whole[:, 1])  # rows differ
    assert not torch.equal(whole[0], whole[1])  # probes differ


@pytest.mark.parametrize(("kind", "opts"), [("frobenius", {}), ("spectral", {}), ("spectral", {"tol": 1e-3}),
                                            ("trace", {}), ("trace", {"variance_reduction": "hutch++"})])
def test_a_shard_gets_the_whole_batchs_bits(kind, opts):
    # no BLAS in fn: its rows' results do not depend on the batch around them (no GEMM
    # blocking by batch size), so the shard's estimate equals the whole batch's bit for bit
    fn = lambda t: torch.sin(t) * t.sum(dim=(1, 2), keepdim=True)  # noqa: E731
    x = torch.randn(40, 3, 2)
    whole = distjac.estimate(fn, x, kind, seed=11, **opts)
    shard = distjac.estimate(fn, x[10:20], kind, seed=11, row_offset=10, **opts)
    assert torch.equal(shard.value, whole.value[10:20]) and torch.equal(shard.stderr, whole.stderr[10:20])
    by_ids = distjac.estimate(fn, x[10:20], kind, seed=11, rows=list(range(10, 20)), **opts)
    assert torch.equal(by_ids.value, shard.value)
    blocked = distjac.estimate(fn, x, kind, seed=11, block=7, **opts)
    assert torch.equal(blocked.value, whole.value)
    # ids matter: other rows' probes give other values. A power iteration run to
    # convergence forgets its start (the same top singular value, at times bit for bit),
    # so spectral is checked after one step, where the value still depends on the probe.
    early = {"iters": 1} if kind == "spectral" else opts
    assert not torch.equal(distjac.estimate(fn, x[10:20], kind, seed=11, **early).value,
                           distjac.estimate(fn, x[10:20], kind, seed=11, row_offset=10, **early).value)


def test_a_recomputed_shard_gives_the_same_bits(wide):
    fn, x = wide
    x = x[:50].float()
    fn = models.mlp([8, 32, 6], seed=3)
    for kind in ("frobenius", "spectral"):
        a = distjac.estimate(fn, x[10:20], kind, row_offset=10)
        b = distjac.estimate(fn, x[10:20], kind, row_offset=10)
        assert torch.equal(a.value, b.value) and torch.equal(a.stderr, b.stderr)
        whole = distjac.estimate(fn, x, kind)
        torch.testing.assert_close(a.value, whole.value[10:20], rtol=1e-5, atol=0)


def test_seeds_change_the_probes(wide):
    fn, x = wide
    a = distjac.estimate(fn, x[:10], "frobenius", seed=0).value
    b = distjac.estimate(fn, x[:10], "frobenius", seed=1).value
    assert not torch.equal(a, b)


# --------------------------------------------------------------------------------------
# Results, dtypes, devices, fallbacks
# --------------------------------------------------------------------------------------


def test_results_have_no_autograd_history():
    fn = models.mlp([4, 8, 3])
    assert next(fn.parameters()).requires_grad
    x = torch.randn(5, 4, requires_grad=True)
    for kind in ("frobenius", "spectral"):
        est = distjac.estimate(fn, x, kind)
        assert not est.value.requires_grad and not est.stderr.requires_grad
        assert est.value.shape == est.stderr.shape == (5,) and est.value.dtype == torch.float32
    assert not distjac.sketch(fn, x, 2).requires_grad
    assert not distjac.sketch(fn, x, 2, side="left").requires_grad
    with pytest.raises(dataclasses.FrozenInstanceError):
        est.value = None


def test_vmap_fallback_to_a_loop():
    def fn(t):  # data-dependent control flow: vmap cannot run it, a loop can
        if bool((t.abs() > 1e6).any()):
            raise ValueError("too large")
        return torch.tanh(t)[:, :3] * 2

    x = torch.randn(6, 5, dtype=F64)
    est = distjac.estimate(fn, x, "frobenius", probes=4, mode="fwd")
    loop = distjac.estimate(fn, x, "frobenius", probes=4, mode="fwd", experimental_use_pfor=False)
    torch.testing.assert_close(est.value, loop.value, rtol=1e-12, atol=0)
    assert distjac.sketch(fn, x, 2).shape == (6, 3, 2)


def test_auto_falls_back_to_reverse_without_a_forward_derivative():
    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(t):
            return t * t

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (t,) = ctx.saved_tensors
            return 2 * t * g

    fn = lambda t: NoJvp.apply(t)  # noqa: E731
    x = torch.randn(4, 3, dtype=F64)
    est = distjac.estimate(fn, x, "frobenius", probes=2)  # N == M: forward first, then reverse
    torch.testing.assert_close(est.value, exact(fn, x, "frobenius"), rtol=1e-12, atol=0)  # diagonal: exact
    with pytest.raises(Exception, match="(?i)forward"):
        distjac.estimate(fn, x, "frobenius", probes=2, mode="fwd")


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; torch sees none here")
    fn = models.mlp([8, 32, 6], seed=3).double()
    x = torch.randn(30, 8, dtype=F64)
    for kind in ("frobenius", "spectral"):
        cpu = distjac.estimate(fn, x, kind)
        gpu = distjac.estimate(fn.cuda(), x.cuda(), kind)
        fn = fn.cpu()
        assert gpu.value.device.type == "cuda"
        torch.testing.assert_close(gpu.value.cpu(), cpu.value, rtol=1e-9, atol=0)
    assert torch.equal(probe_vectors(9, 2, rows=torch.arange(5, device="cuda")).cpu(),
                       probe_vectors(9, 2, rows=torch.arange(5)))


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "kwargs", "err", "match"), [
    ((torch.ones(3),), {}, distjac.ShapeError, "rank 1"),
    ((torch.ones(3, 2, dtype=torch.int64),), {}, distjac.DtypeError, "floating"),
    ((torch.ones(3, 2), "nuclear"), {}, distjac.OptionError, "kind='nuclear' is not valid; use one of 'frobenius'"),
    ((torch.ones(3, 2),), {"probes": 0}, distjac.OptionError, r"probes=0 is not valid; use an integer >= 1"),
    ((torch.ones(3, 2),), {"probes": True}, distjac.OptionError, "probes=True"),
    ((torch.ones(3, 2),), {"iters": 5}, distjac.OptionError, r"iters do\(es\) not apply to 'frobenius'"),
    ((torch.ones(3, 2), "spectral"), {"probes": 3}, distjac.OptionError, "probes do"),
    ((torch.ones(3, 2), "trace"), {"variance_reduction": "hutch++", "probes": 2}, distjac.OptionError,
     "probes >= 3"),
    ((torch.ones(3, 2),), {"distribution": "uniform"}, distjac.OptionError, "distribution='uniform'"),
    ((torch.ones(3, 2),), {"seed": -1}, distjac.OptionError, "seed=-1"),
    ((torch.ones(3, 2),), {"row_offset": -1}, distjac.OptionError, "row_offset=-1"),
    ((torch.ones(3, 2),), {"rows": [0, 1]}, distjac.OptionError, "rows must be 3 integer row ids"),
    ((torch.ones(3, 2), "spectral"), {"tol": 0}, distjac.OptionError, "tol=0"),
])
def test_bad_input_is_refused(args, kwargs, err, match):
    x, *rest = args
    kind = rest[0] if rest else "frobenius"
    with pytest.raises(err, match=match):
        distjac.estimate(torch.tanh, x, kind, **kwargs)


def test_sketch_checks():
    with pytest.raises(distjac.OptionError, match="k=0"):
        distjac.sketch(torch.tanh, torch.ones(2, 2), 0)
    with pytest.raises(distjac.OptionError, match="side='up'"):
        distjac.sketch(torch.tanh, torch.ones(2, 2), 1, side="up")
    with pytest.raises(distjac.ShapeError):
        distjac.sketch(torch.tanh, torch.ones(2), 1)
    assert distjac.sketch(torch.tanh, torch.ones(0, 2), 3).shape == (0, 2, 3)
    assert distjac.estimate(torch.tanh, torch.ones(0, 2), "frobenius").value.shape == (0,)


# --------------------------------------------------------------------------------------
# The jobs side: check_estimates and estimate_block
# --------------------------------------------------------------------------------------


def test_check_estimates_fills_defaults():
    got = check_estimates({"frobenius": {"probes": 4}, "spectral": None}, (3,), (5,))
    assert got == {
        "frobenius": {"probes": 4, "seed": 0, "distribution": "rademacher", "mode": "auto",
                      "parallel_iterations": None},
        "spectral": {"iters": 20, "tol": None, "seed": 0},
    }
    assert estimate_columns(got) == ["frobenius", "frobenius_stderr", "spectral", "spectral_stderr"]


@pytest.mark.parametrize(("mapping", "shapes", "match"), [
    ({"nuclear": {}}, None, "unknown estimate 'nuclear'; use one of frobenius, spectral, trace"),
    ({"frobenius": {"iters": 3}}, None, r"jacobian.estimate.frobenius: unknown option\(s\) 'iters'; 'frobenius' takes "
                                        "probes, seed"),
    ({"frobenius": {"probes": 0}}, None, "jacobian.estimate.frobenius: probes: 0 is not valid"),
    ({"spectral": {"tol": -1}}, None, "tol: -1 is not valid"),
    ({"trace": {}}, ((3,), (5,)), "'trace' needs a square per-example Jacobian, but it is 3 x 5"),
    ({"frobenius": 8}, None, "use a mapping of options"),
    ([], None, "use a mapping of estimates"),
])
def test_check_estimates_errors(mapping, shapes, match):
    with pytest.raises(distjac.ConfigError, match=match) as info:
        check_estimates(mapping, *(shapes or (None, None)))
    assert isinstance(info.value, ValueError)


def test_estimate_products_match_what_estimate_spends(wide, tall):
    mapping = {"frobenius": {"probes": 4}, "spectral": {"iters": 5}}
    for fn, x in (wide, tall):
        want = {k: distjac.estimate(fn, x[:3], k, **o).products for k, o in mapping.items()}
        assert estimate_products(mapping, (fn(x[:1]).shape[1],), (x.shape[1],)) == want
    assert estimate_products({"trace": {"probes": 6}}, (4,), (4,)) == {"trace": 6}


def test_estimate_block_equals_estimate(wide):
    fn, x = wide
    got = estimate_block(fn, x[10:30], {"frobenius": {"probes": 4}, "spectral": {"iters": 5}}, row_offset=10)
    assert list(got) == ["frobenius", "spectral"]
    fro = distjac.estimate(fn, x[10:30], "frobenius", probes=4, row_offset=10)
    assert torch.equal(got["frobenius"][0], fro.value) and torch.equal(got["frobenius"][1], fro.stderr)
    spec = distjac.estimate(fn, x[10:30], "spectral", iters=5, row_offset=10)
    assert torch.equal(got["spectral"][0], spec.value)


def test_public_names():
    assert distjac.Estimate is distjac.estimate(torch.tanh, torch.ones(1, 1), "frobenius").__class__
    assert callable(distjac.sketch) and math.isfinite(distjac.estimate(torch.tanh, torch.ones(1, 1), "trace").value)


# --------------------------------------------------------------------------------------
# The large reference model
# --------------------------------------------------------------------------------------


def test_resnet_small():
    big = models.resnet_small()
    assert not big.training  # eval: batch norm uses running statistics, examples stay independent
    with torch.no_grad():
        assert big(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    small = models.resnet_small(num_classes=10, width=4, seed=1)
    again = models.resnet_small(num_classes=10, width=4, seed=1)
    other = models.resnet_small(num_classes=10, width=4, seed=2)
    sd, sd2, sd3 = small.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not all(torch.equal(sd[k], sd3[k]) for k in sd if sd[k].is_floating_point())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():  # eval mode: an example's output does not depend on the batch around it
        torch.testing.assert_close(small(x[1:2]), small(x)[1:2])
    jac = distjac.batch_jacobian(small, x, mode="rev")
    est = distjac.estimate(small, x, "frobenius", probes=16)
    want = reduce_block(jac, ["frobenius"], 3)["frobenius"]
    assert ((est.value - want).abs() <= 5 * est.stderr).all()
    with pytest.raises(ValueError, match="every size must be >= 1"):
        models.resnet_small(width=0)
