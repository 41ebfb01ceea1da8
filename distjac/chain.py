"""The "chain" strategy: per-example Jacobians of a chain of known layers, multiplied out.

Part of the kernels: :mod:`distjac.kernels` is the only caller (as the internal strategy
``Strategy("chain")``, one candidate of ``mode="auto"``); nothing here is public.

NOTE [chains]
When ``fn`` is an ``nn.Sequential`` (nested ones flattened) of layers whose Jacobians
are known exactly, the per-example Jacobian is the product J = J_L ... J_1 of per-layer
Jacobians, and it can be multiplied out directly, as batched GEMMs, instead of running
one autograd pass per output (or input) element:

- Linear: its weight, shared by every example (never copied per example);
- elementwise activations: a diagonal per example, applied as a scaling of rows;
- Flatten, Unflatten, Identity, Dropout in eval mode: nothing (vectors are flat);
- Conv1d/Conv2d: shared and linear, applied to a stack of vectors by the convolution
  itself (forward side) or by its input-gradient convolution (reverse side);
- LayerNorm: a dense block per example and position, applied in closed form.

The product is bracketed at one split point k: layers [0, k) are accumulated from the
input side (a stack of N tangent images, "forward accumulation"), layers [k, L) from
the output side (a stack of M cotangent rows, "reverse accumulation"), and the two
meet in one batched GEMM of (M x d_k) by (d_k x N). k = L is pure forward, k = 0 pure
reverse. k is chosen by counting multiply-adds per example (:func:`plan_chain`), with
the shared-weight start of either side counted once per block, not per example. With
diagonals between the dense factors (an MLP), one split is what a matrix-chain order
over these shapes comes to: a product of two dense factors away from both ends would
have to be materialized per example, which never pays.

Anything else (another layer type, a subclass, hooks, Dropout in training mode,
half-precision types) is not a chain; :func:`plan_chain` says why, and auto records it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

__all__ = ["ChainPlan", "chain_jacobian", "plan_chain"]

# Blocks of examples the shared start of a side is amortized over in the cost model
# (what auto measures first; an explicit chain of 128-row blocks matched TF graph mode
# on W1 in the measurement).
COST_BLOCK = 128
# The largest working set a block of the chain keeps on a CPU (NOTE [allocator ceiling]).
CPU_BLOCK_BYTES = 32 << 20
# Working set per example, in units of the largest per-example state (K x d): the state,
# the next state, and a temporary of an elementwise step.
STATE_COPIES = 3

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Softshrink, nn.Hardshrink, nn.Threshold,
)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)
_CONV_RANK = {nn.Conv1d: 2, nn.Conv2d: 3}  # per-example rank: (C, L) or (C, H, W)


@dataclass(frozen=True)
class _Step:
    kind: str  # "linear" | "conv" | "diag" | "layernorm" | "reshape"
    index: int  # position in the flattened chain
    in_shape: tuple
    out_shape: tuple
    macs: int  # multiply-adds to apply the layer's Jacobian to one vector


@dataclass(frozen=True)
class ChainPlan:
    """A chain of known layers and where its product is split; a pure, printable value.

    Attributes:
        steps: one per layer, with per-example input and output shapes.
        split: layers [0, split) are accumulated from the input side, [split, L) from
            the output side.
        cost: estimated multiply-adds per example at that split.
        state_elements: the largest per-example state at that split (for memory).
    """

    steps: tuple[_Step, ...]
    split: int
    cost: int
    state_elements: int

    def work_bytes(self, itemsize: int) -> int:
        """Bytes per example a block holds beyond the result (NOTE [chains])."""
        values = sum(math.prod(s.in_shape) for s in self.steps if s.kind in ("diag", "layernorm"))
        return (STATE_COPIES * self.state_elements + 2 * values) * itemsize

    def cost_at(self, rows: int) -> int:
        """Multiply-adds per example at this split when the shared starts are amortized
        over ``rows`` examples (the plan itself assumes COST_BLOCK)."""
        n, m = math.prod(self.steps[0].in_shape), math.prod(self.steps[-1].out_shape)
        rows = max(1, rows)
        cost_f, _, kind_f, d = _side(list(self.steps[:self.split]), n, forward=True, block=rows)
        cost_r, _, kind_r, _ = _side(list(self.steps[self.split:])[::-1], m, forward=False, block=rows)
        return cost_f + cost_r + _meet_cost(kind_f, kind_r, m, d, n, rows)

    def autograd_cost(self) -> int:
        """Multiply-adds per example of autograd's cheaper mode on the same layers: one
        vector pulled (M of them) or pushed (N of them) through every layer."""
        n, m = math.prod(self.steps[0].in_shape), math.prod(self.steps[-1].out_shape)
        return min(m, n) * sum(s.macs for s in self.steps)

    def cpu_block(self, itemsize: int) -> int:
        """The largest block whose working set stays under CPU_BLOCK_BYTES (at least 1).

        NOTE [allocator ceiling]
        glibc serves allocations above its mmap threshold (dynamic, at most 32 MiB on a
        64-bit system) with fresh mappings, unmapped again when freed, so each such
        temporary is faulted in page by page on every block. On the 2-core machine of
        docs/benchmarks.md filling a new 31 MB tensor ran at 34 GB/s, a 33 MB one at
        3.6 GB/s, and 48-128 MB ones at 2.5-2.7 GB/s; a chain block of conv-ReLU-linear
        (kernel suite W4, 0.69 MB per example) took 0.28 s per 2,048 rows at 48-row
        blocks and 0.63-0.74 s at 96-128 rows. So on a CPU the chain's blocks are cut to
        keep its working set under the ceiling. Auto's stage two also races the block
        sizes it tries for every strategy (AUTO_BLOCKS) that are below the cap: a block
        that fits the core caches can be faster again (W1 ran best at 128 rows, 0.3 of
        its ceiling); a cap of 128 rows or less is the only size tried. A GPU's caching
        allocator keeps its blocks, so there is no cap.
        """
        return max(1, CPU_BLOCK_BYTES // max(1, self.work_bytes(itemsize)))

    def __str__(self) -> str:
        kinds = "-".join(s.kind for s in self.steps)
        return f"chain of {len(self.steps)} ({kinds}), split at {self.split}, ~{self.cost:,} MACs/example"


# --------------------------------------------------------------------------------------
# Is fn a chain, and of what
# --------------------------------------------------------------------------------------


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _flatten(fn) -> list[nn.Module] | str:
    """The layers of a (nested) Sequential, in order, or why fn is not one."""
    if type(fn) is not nn.Sequential:  # a subclass may override forward
        return f"{type(fn).__name__} is not an nn.Sequential"
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return "global module hooks are registered"
    if _hooked(fn):
        return "the Sequential has hooks"
    return _in_order(fn)


def _in_order(seq: nn.Sequential) -> list[nn.Module] | str:
    out: list[nn.Module] = []
    for layer in seq:
        if type(layer) is nn.Sequential:
            if _hooked(layer):
                return "a Sequential has hooks"
            inner = _in_order(layer)
            if isinstance(inner, str):
                return inner
            out.extend(inner)
        else:
            out.append(layer)
    return out


def _kind(layer: nn.Module, shape: tuple) -> str:
    """The step kind of ``layer`` on per-example ``shape``, or "not ...: why"."""
    t = type(layer)
    name = t.__name__
    if _hooked(layer):
        return f"not: {name} has hooks"
    if t is nn.Linear:
        return "linear" if shape and shape[-1] == layer.in_features else f"not: {name} on shape {shape}"
    if t in _CONV_RANK:
        return "conv" if len(shape) == _CONV_RANK[t] else f"not: {name} on per-example shape {shape}"
    if t in _ACTIVATIONS:
        return "diag"
    if t in _DROPOUTS:
        return "reshape" if not layer.training or layer.p == 0 else f"not: {name} in training mode"
    if t is nn.LayerNorm:
        # LayerNorm computes the same in train and eval mode.
        k = len(layer.normalized_shape)
        return "layernorm" if tuple(shape[-k:]) == tuple(layer.normalized_shape) else f"not: {name} on {shape}"
    if t in _RESHAPES:
        dim = layer.start_dim if t is nn.Flatten else layer.dim if t is nn.Unflatten else 1
        return "reshape" if dim % (len(shape) + 1) >= 1 else f"not: {name} reshapes the batch axis"
    return f"not: {name} is not a layer the chain knows"


def _macs(kind: str, layer: nn.Module, in_shape: tuple, out_shape: tuple) -> int:
    if kind == "linear":
        return math.prod(in_shape[:-1]) * layer.in_features * layer.out_features
    if kind == "conv":
        return math.prod(out_shape) * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
    if kind == "layernorm":
        return 5 * math.prod(in_shape)
    if kind == "diag":
        return math.prod(in_shape)
    return 0


def plan_chain(fn, x: torch.Tensor, out_shape: tuple) -> ChainPlan | str:
    """The chain plan for ``fn`` on batches like ``x``, or a reason it does not apply.

    Runs the layers once on up to two rows of ``x`` (no grad) for their shapes, and
    checks the result has ``out_shape`` per example.
    """
    if x.dtype not in (torch.float32, torch.float64):
        return f"dtype {x.dtype} (the chain runs float32 and float64 only)"
    layers = _flatten(fn)
    if isinstance(layers, str):
        return layers
    if not layers:
        return "an empty Sequential"
    steps: list[_Step] = []
    h = x[: min(2, x.shape[0])].detach()
    with torch.no_grad():
        for i, layer in enumerate(layers):
            shape = tuple(h.shape[1:])
            kind = _kind(layer, shape)
            if kind.startswith("not"):
                return f"layer {i}: {kind[5:]}"
            try:
                h2 = layer(h.clone() if getattr(layer, "inplace", False) else h)
            except Exception as err:  # noqa: BLE001 - fn's own call will report it
                return f"layer {i} ({type(layer).__name__}) failed: {type(err).__name__}"
            if not isinstance(h2, torch.Tensor) or h2.dim() < 1 or h2.shape[0] != h.shape[0]:
                return f"layer {i} ({type(layer).__name__}) does not keep the batch axis"
            if kind == "diag" and h2.shape != h.shape:
                return f"layer {i} ({type(layer).__name__}) changes the shape"
            out = tuple(h2.shape[1:])
            steps.append(_Step(kind, i, shape, out, _macs(kind, layer, shape, out)))
            h = h2
    if tuple(h.shape[1:]) != tuple(out_shape):
        return f"the layers give per-example shape {tuple(h.shape[1:])}, fn gives {tuple(out_shape)}"
    n, m = math.prod(x.shape[1:]), math.prod(out_shape)
    best = None
    for k in range(len(steps) + 1):
        cost_f, peak_f, kind_f, d = _side(steps[:k], n, forward=True)
        cost_r, peak_r, kind_r, _ = _side(steps[k:][::-1], m, forward=False)
        meet = _meet_cost(kind_f, kind_r, m, d, n)
        cand = (cost_f + cost_r + meet, -k, max(peak_f, peak_r, m * n))
        if best is None or cand < best:
            best = cand
    cost, neg_k, peak = best
    return ChainPlan(tuple(steps), -neg_k, int(cost), int(peak))


def _meet_cost(kind_f: str, kind_r: str, m: int, d: int, n: int, block: int = COST_BLOCK) -> int:
    """Multiply-adds per example of :func:`_meet`: an identity or a diagonal on either
    side is a copy or a scaling (M x N); otherwise a GEMM of (M x d) by (d x N), once per
    block where both sides are shared, per example where either is dense (a shared
    forward side meeting a dense reverse side is a full GEMM per example: counting it as
    M x N once chose, on a conv-ReLU-linear chain, a split 1.7x slower than pure reverse)."""
    if "eye" in (kind_f, kind_r) or "diag" in (kind_f, kind_r):
        return m * n
    if kind_f == kind_r == "shared":
        return (m * d * n) // block + m * n  # once per block, then copied per example
    return m * d * n


def _side(steps: list[_Step], k: int, *, forward: bool, block: int = COST_BLOCK) -> tuple[int, int, str, int]:
    """Multiply-adds per example, peak state elements per example, the final state kind
    and feature size of one side: ``k`` vectors pushed (forward) or pulled (reverse)
    through ``steps`` in the order given. Mirrors :func:`_apply`'s cases."""
    kind, cost, peak = "eye", 0, 0
    d = None
    for s in steps:
        d_in, d_out = (math.prod(s.in_shape), math.prod(s.out_shape))
        if not forward:
            d_in, d_out = d_out, d_in
        if d is None:
            d = d_in
        if s.kind == "reshape":
            d = d_out
            continue
        if s.kind == "diag":
            cost += k if kind in ("eye", "diag") else k * d_in
            kind = "diag" if kind in ("eye", "diag") else "dense"
        elif s.kind == "linear" and kind == "eye" and len(s.in_shape) == 1:
            kind = "shared"
        elif s.kind == "linear" and kind == "diag" and len(s.in_shape) == 1:
            cost += k * d_out
            kind = "dense"
        elif s.kind in ("linear", "conv") and kind in ("eye", "shared"):
            cost += (k * s.macs) // block  # shared: once per block
            kind = "shared"
        else:  # a per-example dense state (LayerNorm always ends in one)
            cost += k * s.macs
            kind = "dense"
        d = d_out
        if kind == "dense":
            peak = max(peak, k * max(d_in, d_out))
    return cost, peak, kind, d if d is not None else k


# --------------------------------------------------------------------------------------
# Multiplying it out
# --------------------------------------------------------------------------------------


class _State:
    """A stack of K vectors per example: ``eye`` (K = d, the identity), ``diag`` (a
    diagonal, ``t`` of shape (B, d)), ``shared`` (``t`` (K, d), the same for every
    example) or ``dense`` (``t`` (B, K, d))."""

    __slots__ = ("kind", "t", "d")

    def __init__(self, kind: str, t: torch.Tensor | None, d: int):
        self.kind, self.t, self.d = kind, t, d

    def dense(self, b: int, like: torch.Tensor) -> torch.Tensor:
        """As (B, K, d) or (K, d) (shared)."""
        if self.kind == "eye":
            return torch.eye(self.d, dtype=like.dtype, device=like.device)
        if self.kind == "diag":
            return torch.diag_embed(self.t)
        return self.t


def _forward_values(layers: list[nn.Module], plan: ChainPlan, xb: torch.Tensor) -> list:
    """Run the chain on the block; per step what its Jacobian needs (diag: the derivative,
    layernorm: (xhat, rstd)), None for the rest. The pass stops after the last step that
    needs values: the layers after it are linear, their Jacobians their weights, and their
    outputs are not part of the result (W2, 16-128-256: its last Linear is 94% of the
    forward pass's multiply-adds)."""
    ctx: list = [None] * len(plan.steps)
    needed = [i for i, s in enumerate(plan.steps) if s.kind in ("diag", "layernorm")]
    h = xb.detach()
    with torch.no_grad():
        for i, s in enumerate(plan.steps[:needed[-1] + 1] if needed else ()):
            layer = layers[s.index]
            c = None
            if s.kind == "diag":
                h2, c = _activation_and_derivative(layer, h)
            else:
                if s.kind == "layernorm":
                    dims = tuple(range(-len(layer.normalized_shape), 0))
                    var, mean = torch.var_mean(h, dim=dims, unbiased=False, keepdim=True)
                    rstd = torch.rsqrt(var + layer.eps)
                    c = ((h - mean) * rstd, rstd)
                h2 = layer(h)
            ctx[i] = c
            h = h2
    return ctx


def _activation_and_derivative(layer: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output and its elementwise derivative, exactly as autograd's backward
    computes it (closed forms where they are the backward's own formula)."""
    t = type(layer)
    if t is nn.Tanh:
        a = torch.tanh(h)
        return a, 1 - a * a
    if t is nn.Sigmoid:
        a = torch.sigmoid(h)
        return a, (1 - a) * a
    if t is nn.ReLU:
        return torch.relu(h), (h > 0).to(h.dtype)
    with torch.enable_grad():
        hd = h.detach().requires_grad_(True)
        a = layer(hd.clone() if getattr(layer, "inplace", False) else hd)
        (d,) = torch.autograd.grad(a, hd, torch.ones_like(a))
    return a.detach(), d


def _apply(state: _State, s: _Step, layer: nn.Module, c, *, forward: bool, b: int, like: torch.Tensor) -> _State:
    """Push (forward) or pull (reverse) the stack of vectors through one layer's Jacobian."""
    shape_in, shape_out = (s.in_shape, s.out_shape) if forward else (s.out_shape, s.in_shape)
    d_out = math.prod(shape_out)
    if s.kind == "reshape":
        return _State(state.kind, state.t, d_out) if state.kind != "eye" else _State("eye", None, d_out)
    if s.kind == "diag":
        g = c.reshape(b, -1)
        if state.kind == "eye":
            return _State("diag", g, d_out)
        if state.kind == "diag":
            return _State("diag", state.t * g, d_out)
        if state.kind == "dense":  # a product of this block's own: scaled in place
            return _State("dense", state.t.mul_(g[:, None, :]), d_out)
        return _State("dense", state.t * g[:, None, :], d_out)  # a layer's weight: copied
    if s.kind == "linear" and len(s.in_shape) == 1:
        # Rows are the images of e_k (forward: W^T, made contiguous, or the states scaled
        # from it inherit its transposed layout, and the meet's GEMM ran 2x slower on W2
        # at 64 rows) or of e_j^T (reverse: W).
        w = layer.weight.T.contiguous() if forward else layer.weight
        if state.kind == "eye":
            return _State("shared", w, d_out)
        if state.kind == "diag":
            return _State("dense", state.t[:, :, None] * w, d_out)
    v = state.dense(b, like)  # (K, d) or (B, K, d)
    lead = v.shape[:-1]
    if s.kind == "linear":
        vv = v.reshape(*lead, -1, layer.in_features if forward else layer.out_features)
        out = F.linear(vv, layer.weight) if forward else vv @ layer.weight
    elif s.kind == "conv":
        out = _conv(layer, v.reshape(-1, *shape_in), shape_out, forward=forward)
    else:  # layernorm: per example and position, so the state becomes (B, K, d)
        xhat, rstd = c
        dn = math.prod(layer.normalized_shape)
        p = xhat.reshape(b, 1, -1, dn)
        r = rstd.reshape(b, 1, -1, 1)
        u = v.reshape(b if v.dim() == 3 else 1, lead[-1], -1, dn)
        w = None if layer.weight is None else layer.weight.reshape(dn)
        # J = diag(w) rstd (I - 11^T/dn - xhat xhat^T/dn); the bracket is symmetric.
        if not forward and w is not None:
            u = u * w
        u = r * (u - u.mean(-1, keepdim=True) - p * (p * u).mean(-1, keepdim=True))
        if forward and w is not None:
            u = u * w
        out = u
    out = out.reshape(*lead, d_out) if s.kind != "layernorm" else out.reshape(b, lead[-1], d_out)
    return _State("dense" if out.dim() == 3 else "shared", out, d_out)


def _conv(layer, v: torch.Tensor, shape_out: tuple, *, forward: bool) -> torch.Tensor:
    """The convolution's linear part on a stack of inputs (forward), or its transpose on
    a stack of output cotangents (reverse)."""
    if forward:
        return layer._conv_forward(v, layer.weight, None)
    size = (v.shape[0], *shape_out)
    flipped = _transpose_as_conv(layer)
    if flipped is not None:
        weight, padding = flipped
        conv = F.conv1d if type(layer) is nn.Conv1d else F.conv2d
        return conv(v, weight, None, 1, padding, layer.dilation, layer.groups)
    if layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        grad_input = torch.nn.grad.conv1d_input if type(layer) is nn.Conv1d else torch.nn.grad.conv2d_input
        return grad_input(size, layer.weight, v, layer.stride, layer.padding, layer.dilation, layer.groups)
    # Other paddings: the vector-Jacobian product of the linear map, by autograd.
    with torch.enable_grad():
        z = torch.zeros(size, dtype=v.dtype, device=v.device, requires_grad=True)
        (g,) = torch.autograd.grad(layer._conv_forward(z, layer.weight, None), z, v)
    return g


def _transpose_as_conv(layer) -> tuple[torch.Tensor, tuple] | None:
    """The transpose of a stride-1, zero-padded convolution as a forward convolution:
    (weight, padding), or None where that form does not apply (NOTE [conv transpose]).

    NOTE [conv transpose]
    With stride 1, the input gradient of a convolution (weight w, padding p, dilation d,
    kernel size k) is itself a convolution: of the output cotangents, padded by
    q = d (k - 1) - p, with the kernel flipped in space and its in and out channels
    swapped (within each group), at the same dilation. Same sums, in another order
    (float rounding differs in the last bits). On CPU the forward convolution is the
    better-kept kernel: measured on 9 shapes (1-32 input channels, kernels 3 and 5,
    dilation 1 and 2, 2 threads) it ran at 0.99-3.1x ``torch.nn.grad.conv2d_input``,
    2-3x where there are few input channels (a first layer, as in the kernel suite's W4).
    Strided convolutions (whose transpose interleaves zeros) and paddings with q < 0 keep
    ``conv*_input``.
    """
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str) or any(s != 1 for s in layer.stride):
        return None
    q = tuple(d * (k - 1) - p for d, k, p in zip(layer.dilation, layer.kernel_size, layer.padding, strict=True))
    if any(v < 0 for v in q):
        return None
    w = layer.weight
    g = layer.groups
    co, ci_g = w.shape[:2]
    spatial = tuple(range(2, w.dim()))
    # (C_out, C_in/g, *k) -> (g, C_out/g, C_in/g, *k) -> (C_in, C_out/g, *k), flipped.
    wt = w.reshape(g, co // g, ci_g, *w.shape[2:]).transpose(1, 2).reshape(g * ci_g, co // g, *w.shape[2:])
    return wt.flip(spatial), q


def chain_jacobian(fn: nn.Sequential, plan: ChainPlan, xb: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """(Bb, M, N) per-example Jacobians of the chain on the block ``xb`` (no autograd
    history; the kernels use it only where none is wanted), written into ``out`` (a
    contiguous (Bb, M, N) tensor) when given."""
    layers = _in_order(fn)
    b = xb.shape[0]
    n = math.prod(xb.shape[1:])
    m = math.prod(plan.steps[-1].out_shape)
    with torch.no_grad():
        ctx = _forward_values(layers, plan, xb)
        fwd = _State("eye", None, n)
        for i in range(plan.split):
            fwd = _apply(fwd, plan.steps[i], layers[plan.steps[i].index], ctx[i], forward=True, b=b, like=xb)
        rev = _State("eye", None, m)
        for i in reversed(range(plan.split, len(plan.steps))):
            rev = _apply(rev, plan.steps[i], layers[plan.steps[i].index], ctx[i], forward=False, b=b, like=xb)
        return _meet(rev, fwd, b, m, n, xb, out)


def _meet(rev: _State, fwd: _State, b: int, m: int, n: int, like: torch.Tensor,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """J = R T^T, where R holds cotangent rows (M, d) and T tangent images (N, d); the
    products that are per example are computed into ``out`` when given."""
    into = {} if out is None else {"out": out}  # for the products that are per example
    if fwd.kind == "eye":
        j = rev.dense(b, like)
    elif rev.kind == "eye":
        j = fwd.dense(b, like).transpose(-1, -2)
    elif fwd.kind == "diag":
        j = torch.mul(rev.dense(b, like), fwd.t[:, None, :], **into)
    elif rev.kind == "diag":
        j = torch.mul(rev.t[:, :, None], fwd.dense(b, like).transpose(-1, -2), **into)
    elif rev.t.dim() == 3 or fwd.t.dim() == 3:
        j = torch.matmul(rev.t, fwd.t.transpose(-1, -2), **into)
    else:  # both shared: one (M, N) product, copied per example below
        j = torch.matmul(rev.t, fwd.t.transpose(-1, -2))
    # A shared product (no per-example factor) is copied per example: the result must
    # not alias a layer's weight, nor carry its autograd history.
    if j.dim() == 2:
        j = j.detach().expand(b, m, n)
        return j.contiguous() if out is None else out.copy_(j)
    if out is None:
        return j.detach()
    return j if j.data_ptr() == out.data_ptr() else out.copy_(j)
