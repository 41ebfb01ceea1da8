"""Per-example reductions of a Jacobian block: (B, *out, *in) -> (B,).

A job over millions of examples rarely needs every Jacobian; one number per example
(its Frobenius or spectral norm, its trace, log|det|) makes a shard's output kilobytes
instead of gigabytes. Workers reduce each block right after computing it.

Each example's Jacobian is read as an M x N matrix, M = prod(out), N = prod(in), both
flattened in C order (as ``reshape`` flattens). ``trace`` and ``logabsdet`` need M == N.

Reductions are computed in float32 at least (float16 and bfloat16 blocks are upcast:
an SVD or a determinant in half precision loses most of its digits), float64 stays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .errors import ConfigError

__all__ = ["REDUCTIONS", "check_reductions", "reduce_block"]


def _frobenius(j: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(j, ord=2, dim=(-2, -1))


def _spectral(j: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(j, ord=2)  # the largest singular value


def _trace(j: torch.Tensor) -> torch.Tensor:
    return j.diagonal(dim1=-2, dim2=-1).sum(-1)


def _logabsdet(j: torch.Tensor) -> torch.Tensor:
    return torch.linalg.slogdet(j).logabsdet  # -inf for a singular Jacobian


# name -> (function of a (B, M, N) block, needs a square Jacobian)
_REDUCERS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], bool]] = {
    "frobenius": (_frobenius, False),
    "spectral": (_spectral, False),
    "trace": (_trace, True),
    "logabsdet": (_logabsdet, True),
}
REDUCTIONS = tuple(_REDUCERS)


def check_reductions(
    names: Sequence[str], out_shape: Sequence[int], in_shape: Sequence[int], call: str = "jacobian.reduce"
) -> tuple[str, ...]:
    """Check that every reduction exists and fits per-example shapes ``out_shape``, ``in_shape``.

    Raises:
        ConfigError: an unknown name, or trace/logabsdet of a non-square Jacobian.
    """
    m, n = math.prod(out_shape), math.prod(in_shape)
    for name in names:
        if name not in _REDUCERS:
            raise ConfigError(
                f"{call}: unknown reduction {name!r}; use one of {', '.join(repr(r) for r in REDUCTIONS)}."
            )
        if _REDUCERS[name][1] and m != n:
            raise ConfigError(
                f"{call}: {name!r} needs a square per-example Jacobian, but it is {m} x {n} (output "
                f"{tuple(out_shape)}, input {tuple(in_shape)}). Use frobenius or spectral, or a model "
                f"whose output has as many elements as its input."
            )
    return tuple(names)


def reduce_block(jac: torch.Tensor, names: Sequence[str], in_ndim: int) -> dict[str, torch.Tensor]:
    """Reduce a Jacobian block (B, *out, *in) to one value per example and reduction.

    Args:
        jac: the block; its last ``in_ndim`` dimensions are the per-example input shape.
        names: reductions among frobenius, spectral, trace, logabsdet.
        in_ndim: number of input dimensions (rank of one example of the source).

    Returns:
        name -> tensor of shape (B,), in the block's dtype (float32 for half precision).

    Example:
        >>> j = torch.tensor([[[3.0, 0.0], [0.0, 4.0]]])
        >>> {k: round(v.item(), 4) for k, v in reduce_block(j, ["frobenius", "spectral", "trace"], 1).items()}
        {'frobenius': 5.0, 'spectral': 4.0, 'trace': 7.0}
    """
    b = jac.shape[0]
    in_shape = jac.shape[jac.dim() - in_ndim:]
    out_shape = jac.shape[1 : jac.dim() - in_ndim]
    check_reductions(names, out_shape, in_shape, call="reduce_block")
    mat = jac.reshape(b, math.prod(out_shape), math.prod(in_shape))
    if mat.dtype in (torch.float16, torch.bfloat16):
        mat = mat.float()
    return {name: _REDUCERS[name][0](mat) for name in names}
