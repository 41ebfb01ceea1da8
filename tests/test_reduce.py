"""Per-example reductions against numpy, one example at a time in float64."""

import numpy as np
import pytest
import torch

from distjac.errors import ConfigError
from distjac.reduce import REDUCTIONS, check_reductions, reduce_block


def _reference(jac: np.ndarray, name: str, in_ndim: int) -> np.ndarray:
    b = jac.shape[0]
    n = int(np.prod(jac.shape[jac.ndim - in_ndim:]))
    out = []
    for i in range(b):
        m = jac[i].astype(np.float64).reshape(-1, n)
        if name == "frobenius":
            out.append(np.linalg.norm(m, "fro"))
        elif name == "spectral":
            out.append(np.linalg.svd(m, compute_uv=False).max())
        elif name == "trace":
            out.append(np.trace(m))
        else:
            out.append(np.linalg.slogdet(m)[1])
    return np.array(out)


@pytest.mark.parametrize("name", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_square_vector_jacobians_match_numpy(name, dtype):
    g = torch.Generator().manual_seed(0)
    jac = torch.randn(5, 4, 4, generator=g, dtype=dtype)
    got = reduce_block(jac, [name], in_ndim=1)[name]
    assert got.shape == (5,) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(got.numpy(), _reference(jac.numpy(), name, 1), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", REDUCTIONS)
def test_matrix_shaped_jacobians_are_flattened_in_c_order(name):
    # output (2, 3), input (3, 2): each example's Jacobian is a 6 x 6 matrix
    jac = torch.randn(3, 2, 3, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = reduce_block(jac, [name], in_ndim=2)[name]
    np.testing.assert_allclose(got.numpy(), _reference(jac.numpy(), name, 2), rtol=1e-12)


@pytest.mark.parametrize("name", ["frobenius", "spectral"])
def test_non_square_norms(name):
    jac = torch.randn(4, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = reduce_block(jac, [name], in_ndim=1)[name]
    np.testing.assert_allclose(got.numpy(), _reference(jac.numpy(), name, 1), rtol=1e-12)


def test_several_at_once_in_order():
    jac = torch.diag_embed(torch.tensor([[3.0, 4.0], [1.0, 2.0]]))
    got = reduce_block(jac, ["trace", "logabsdet", "frobenius"], in_ndim=1)
    assert list(got) == ["trace", "logabsdet", "frobenius"]
    np.testing.assert_allclose(got["trace"].numpy(), [7.0, 3.0])
    np.testing.assert_allclose(got["logabsdet"].numpy(), np.log([12.0, 2.0]), rtol=1e-6)
    np.testing.assert_allclose(got["frobenius"].numpy(), [5.0, np.sqrt(5.0)], rtol=1e-6)


def test_half_precision_is_upcast():
    jac = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(3)).half()
    got = reduce_block(jac, ["spectral", "logabsdet"], in_ndim=1)
    assert got["spectral"].dtype == torch.float32
    np.testing.assert_allclose(got["spectral"].numpy(), _reference(jac.float().numpy(), "spectral", 1), rtol=1e-5)


def test_singular_logabsdet_is_minus_inf():
    jac = torch.zeros(2, 3, 3)
    assert torch.isneginf(reduce_block(jac, ["logabsdet"], 1)["logabsdet"]).all()


def test_empty_batch():
    got = reduce_block(torch.zeros(0, 3, 3), list(REDUCTIONS), 1)
    assert all(v.shape == (0,) for v in got.values())


@pytest.mark.parametrize("name", ["trace", "logabsdet"])
def test_square_only_reductions_reject_non_square(name):
    with pytest.raises(ConfigError, match=f"'{name}' needs a square per-example Jacobian, but it is 2 x 3"):
        reduce_block(torch.zeros(4, 2, 3), [name], in_ndim=1)
    with pytest.raises(ValueError, match="Use frobenius or spectral"):
        check_reductions([name], (2,), (3,))


def test_unknown_reduction():
    with pytest.raises(ConfigError, match="unknown reduction 'nuclear'; use one of 'frobenius', 'spectral'"):
        check_reductions(["nuclear"], (2,), (2,))
