"""Structure of a Jacobian that can be proved from ``fn``'s traced graph, never guessed.

Part of the kernels: :mod:`distjac.kernels` is the only caller. Public through
``distjac.batch_jacobian(fn, x, structure="diagonal")``; the names here are internal.

NOTE [elementwise functions]
A function is *elementwise* when every output element depends on the input element at
the same position only: ``y[b, i] = f_i(x[b, i])``. Its per-example Jacobian is then
diagonal, and one forward-mode pass with the tangent "all ones" gives that diagonal
(``J 1 = diag(J)`` when J is diagonal): one pass instead of N.

It is decided from a trace of ``fn`` on two rows (``make_fx``, real tensors), never from
values: every operation that depends on ``x`` must be

- an ATen operator tagged ``torch.Tag.pointwise`` (add, mul, tanh, where, gelu, ...),
  or one of a few that only copy or re-type elements (clone, alias, _to_copy, a view
  to the same shape), and
- produce a tensor of exactly ``x``'s shape, so no x-dependent tensor is ever
  broadcast, reduced, sliced, permuted or gathered.

Tensors that do not depend on ``x`` (parameters, constants, ``arange``) may have any
shape and come from any operation: they are broadcast against x-shaped tensors,
which mixes nothing (Dropout in training mode draws its mask so, and is elementwise for
the mask it draws: the result is the Jacobian of fn with that draw, as reverse mode's
is for its own). An in-place operation may only write into an x-dependent tensor
(writing x's values into a constant would hide the dependency from the trace). Any
other operation on an x-dependent tensor (a reduction, ``.item()``, indexing, a
random op, a matmul) means "not provably elementwise", and the reason names it. The
proof holds for the operations the trace recorded: Python control flow that looks at
x's values goes through ``.item()``/``bool()`` of an x-dependent tensor, which is
itself refused; control flow on anything else (a global flag, the batch size) is
outside what a trace can see, as for torch.compile. A custom ``torch.autograd.Function``
anywhere in fn's autograd graph means "not proved" too: its backward, not the forward
the trace records, is what autograd differentiates with.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.func import jvp

from . import _alloc

__all__ = ["diagonal_block", "elementwise_reason"]

STRUCTURES = (None, "diagonal")
# Rows of x the trace runs on: two, so the batch axis is not size 1 (which broadcasts).
TRACE_ROWS = 2

_aten = torch.ops.aten
# Operators that copy elements without moving them (checked like pointwise ones: the
# output must have x's shape).
_COPIES = {
    _aten.clone.default, _aten.alias.default, _aten.detach.default, _aten._to_copy.default,
    _aten.lift_fresh_copy.default,
}
# Operators whose result depends on x's shape and dtype only, never its values.
_SHAPE_ONLY = {
    _aten.ones_like.default, _aten.zeros_like.default, _aten.empty_like.default, _aten.full_like.default,
    _aten.new_zeros.default, _aten.new_ones.default, _aten.new_empty.default, _aten.new_full.default,
}
_SAME_SHAPE_VIEWS = {_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default, _aten.expand.default}


def _is_tensor(v) -> bool:
    return isinstance(v, torch.Tensor)


def elementwise_reason(fn: Callable, x: torch.Tensor) -> str | None:
    """None when ``fn`` is provably elementwise on batches like ``x`` (NOTE [elementwise
    functions]); otherwise why not, in words."""
    from torch.fx.experimental.proxy_tensor import make_fx

    xs = x[: min(TRACE_ROWS, x.shape[0])].detach()
    if xs.shape[0] < TRACE_ROWS:
        xs = torch.cat([xs, xs])  # any two rows will do: the trace looks at operations
    try:
        with torch.no_grad():
            gm = make_fx(fn)(xs)
    except Exception as err:  # noqa: BLE001 - anything fn does that cannot be traced
        return f"fn could not be traced ({type(err).__name__}: {str(err)[:160]})"
    shape = tuple(xs.shape)
    dep: set = set()
    outputs = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            dep.add(node)
            continue
        if node.op == "output":
            outputs = node.args[0]
            continue
        if node.op != "call_function":
            continue  # get_attr: a constant (a parameter, a buffer)
        inputs = node.all_input_nodes
        if not any(i in dep for i in inputs):
            continue
        target = node.target
        if target in _SHAPE_ONLY:
            continue  # a constant of x's shape: not x-dependent
        name = str(getattr(target, "__name__", target))
        val = node.meta.get("val")
        if not _is_tensor(val):
            return f"{name} turns an x-dependent tensor into {type(val).__name__}"
        if tuple(val.shape) != shape:
            return f"{name} gives shape {tuple(val.shape)[1:]} per example from x-dependent values of shape {shape[1:]}"
        tags = getattr(target, "tags", ())
        if not (torch.Tag.pointwise in tags or target in _COPIES or target in _SAME_SHAPE_VIEWS):
            return f"{name} is not a pointwise operation"
        schema = getattr(target, "_schema", None)
        if schema is not None and schema.is_mutable:
            first = node.args[0] if node.args else None
            if first not in dep:
                return f"{name} writes x-dependent values into a tensor that does not depend on x"
        for i in inputs:  # every x-dependent operand has x's shape too
            if i in dep:
                v = i.meta.get("val") if i.op != "placeholder" else xs
                if not _is_tensor(v) or tuple(v.shape) != shape:
                    return f"{name} mixes an x-dependent operand of another shape"
        dep.add(node)
    if isinstance(outputs, (list, tuple)):
        if len(outputs) != 1:
            return "fn returns more than one tensor"
        outputs = outputs[0]
    if outputs not in dep:
        return "fn's output does not depend on x"
    return _custom_function(fn, xs)


def _custom_function(fn: Callable, xs: torch.Tensor) -> str | None:
    """Why the trace proves nothing when fn runs a custom ``torch.autograd.Function``: its
    ``backward`` (what autograd differentiates with; a straight-through estimator, say)
    need not be the derivative of the ``forward`` that the trace saw; else None."""
    try:
        xd = xs.detach().requires_grad_(True)
        with torch.enable_grad():
            y = fn(xd)
    except Exception as err:  # noqa: BLE001
        return f"fn failed with autograd on ({type(err).__name__})"
    stack, seen = [getattr(y, "grad_fn", None)], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return (f"fn runs a custom autograd.Function ({type(node).__name__}), whose backward, not its "
                    "traced forward, defines the derivative")
        stack.extend(n for n, _ in node.next_functions)
    return None


def diagonal_block(fn: Callable, xb: torch.Tensor) -> torch.Tensor:
    """(Bb, *in) diagonal of an elementwise fn's per-example Jacobians: one jvp with ones.
    The primal is made contiguous: forward-mode AD cannot attach a tangent to a tensor
    whose elements share memory (a broadcast ``expand``), and a copy of a view is cheap
    next to fn's pass."""
    xb = xb.contiguous()
    return jvp(fn, (xb,), (torch.ones_like(xb),))[1]


def dense_from_diagonal(d: torch.Tensor) -> torch.Tensor:
    """(B, *in, *in) dense Jacobians with the (B, *in) diagonal ``d`` on their diagonals."""
    b, in_shape = d.shape[0], tuple(d.shape[1:])
    n = math.prod(in_shape)
    out = _alloc.zeros((b, n, n), dtype=d.dtype, device=d.device)
    out.diagonal(dim1=1, dim2=2).copy_(d.reshape(b, n))
    return out.view(b, *in_shape, *in_shape)
