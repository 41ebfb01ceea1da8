"""``GradientTape``: TensorFlow's tape on PyTorch autograd.

PyTorch records every operation on a tensor that requires grad; TensorFlow records only
operations on tensors a tape watches, while the tape is active. The tape maps one onto
the other:

NOTE [watching = requires_grad for the tape's lifetime]
``watch(x)`` turns on ``x.requires_grad`` (if it was off) for as long as the tape is
recording, and turns it back off when the ``with`` block ends. So operations after the
block are not recorded (as in TF), and the user's tensor is left as it was found. When a
gradient is asked for later, the tape switches requires_grad on again for the duration
of the call: autograd needs it to accept the tensor as an input, and the graph recorded
during the block still holds the tensor's gradient accumulator.

NOTE [nesting]
Tapes form a stack. A gradient computed while any tape is recording is itself recorded
(``create_graph=True``), so an outer tape can differentiate an inner tape's result:
that is how second and higher orders work, exactly as in TF.

NOTE [graphs]
``jacobian`` and ``batch_jacobian`` return a differentiable result when a tape is still
recording (TF's rule) or when a source already required grad before the tape watched it
(PyTorch's rule, the same as ``distjac.batch_jacobian`` with an ``x`` that requires grad).
``gradient`` follows TF's rule alone: gradients w.r.t. parameters are the common case and
keeping their double-backward graph would cost memory for nothing.

NOTE [recording whatever surrounds it]
A tape records what runs in its ``with`` block, as TF's does, so the block runs with
grad mode on and inference mode off even under an outer ``torch.no_grad()`` or
``torch.inference_mode()`` (which would otherwise record nothing and make every
source look unconnected: None, silently). This is the rule of torch.func's transforms,
which ignore an outer no_grad and respect one inside: a ``torch.no_grad()`` block inside
the tape's block still stops recording there. A tensor made under inference mode
cannot be recorded through at all; ``watch`` says so and what to do. The modes are set
only where they must change, and restored when the block ends: a tape's block nests
with the contexts around it, as any ``with`` block does.

Tensors that already required grad when first seen (``torch.nn.Parameter`` and friends)
play the part of TF's trainable variables: with ``watch_accessed_variables=True`` (the
default) they can be differentiated without an explicit ``watch``.

NOTE [intermediate sources]
TF differentiates with respect to any tensor its tape computed (``h = a * 3`` inside the
block, then ``tape.gradient(y, h)``: the features of Grad-CAM). A tensor made in the
block from watched tensors has an autograd node, and autograd numbers its nodes in the
order they are made (per thread). The tape takes a node's number when it starts and
stops recording (``_mark``), and a source whose node falls inside one of its recording
spans was computed by it: admitted like a watched tensor. A tensor computed before the
block or after it is not; with ``watch_accessed_variables=False`` the source must also
derive from a tensor the tape watches (its graph is walked back), as TF records only
operations on watched tensors. (A target computed after the block from a parameter is
still differentiated, as PyTorch records it; TF would answer None. Autograd numbers
nodes per thread: a tensor computed on another thread while the tape records is judged
by that thread's numbers. Where the numbers are not available, intermediate sources are
not admitted.)
"""

from __future__ import annotations

import bisect
import contextlib
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .errors import TapeError
from .kernels import graph_batch_jacobian, graph_jacobian, graph_nodes, recording_stack
from .options import (
    UnconnectedGradients,
    check_batched,
    check_floating,
    check_positive_int,
    check_same_batch,
    check_tensor,
    parse_unconnected,
)

__all__ = ["GradientTape"]


def _mark() -> int | None:
    """The number autograd gives the next node made on this thread (NOTE [intermediate
    sources]), or None where this torch has no such number."""
    with torch.inference_mode(False), torch.enable_grad():
        node = (torch.zeros((), requires_grad=True) * 1).grad_fn
    number = getattr(node, "_sequence_nr", None)
    return number() if number is not None else None

class GradientTape:
    """Records operations on watched tensors so they can be differentiated, as TF's tape.

    Args:
        persistent: if False (the default) the tape computes one set of gradients (one
            call of gradient, jacobian or batch_jacobian) and is then spent.
        watch_accessed_variables: if True, tensors that already require grad (model
            parameters) count as watched, like TF's trainable variables.

    Example:
        >>> x = torch.tensor([[4.0, 2.0], [1.0, 3.0]])
        >>> with GradientTape() as tape:
        ...     tape.watch(x)
        ...     y = x * x * x
        >>> tape.batch_jacobian(y, x)
        tensor([[[48.,  0.],
                 [ 0., 12.]],
        <BLANKLINE>
                [[ 3.,  0.],
                 [ 0., 27.]]])
    """

    def __init__(self, persistent: bool = False, watch_accessed_variables: bool = True):
        self._persistent = bool(persistent)
        self._watch_accessed_variables = bool(watch_accessed_variables)
        self._recording = False
        self._used = False
        self._watched: dict[int, torch.Tensor] = {}  # id -> tensor
        self._switched_on: dict[int, torch.Tensor] = {}  # tensors whose requires_grad we set
        self._modes: contextlib.ExitStack | None = None  # NOTE [recording whatever surrounds it]
        self._spans: list[list] = []  # [first, last) autograd node numbers recorded: NOTE [intermediate sources]
        self._span_starts: list[int] = []  # their firsts, for bisect (a persistent tape re-entered often)

    # -- context ------------------------------------------------------------------------

    def __enter__(self) -> GradientTape:
        if self._recording:
            raise TapeError("GradientTape: this tape is already recording; a tape cannot be entered twice at once.")
        self._recording = True
        # Only where something must change: a tape entered with grad on (the usual case)
        # leaves the modes alone, so tapes exited out of order cannot disturb them.
        self._modes = contextlib.ExitStack()
        if torch.is_inference_mode_enabled():
            self._modes.enter_context(torch.inference_mode(False))
        if not torch.is_grad_enabled():
            self._modes.enter_context(torch.enable_grad())
        for t in self._switched_on.values():  # re-entered persistent tape: watch again
            t.requires_grad_(True)
        self._open_span()
        recording_stack().append(self)
        return self

    def __exit__(self, *exc) -> None:
        stack = recording_stack()
        if self in stack:
            stack.remove(self)
        self._recording = False
        if self._spans and self._spans[-1][1] is None:
            self._spans[-1][1] = _mark()
        if self._modes is not None:
            self._modes.close()
            self._modes = None
        for key, t in self._switched_on.items():
            # A tensor another recording tape also watches stays on: that tape owns it now.
            heir = next((tp for tp in reversed(stack) if key in getattr(tp, "_watched", ())), None)
            if heir is not None:
                heir._switched_on[key] = t
            elif t.is_leaf:
                t.requires_grad_(False)

    @contextlib.contextmanager
    def stop_recording(self):
        """Operations in this block are not recorded, as TF's ``stop_recording``: to save
        the memory of a graph nobody will differentiate (a gradient computed here has no
        autograd history). PyTorch keeps one graph for every tape, so no tape records in
        the block.

        Raises:
            TapeError: the tape is not recording.
        """
        if not self._recording:
            raise TapeError(
                "GradientTape.stop_recording: the tape is not recording; use it inside "
                "`with distjac.GradientTape() as tape:`."
            )
        with torch.no_grad():
            yield

    # -- watching -----------------------------------------------------------------------

    def watch(self, tensor: Any) -> None:
        """Record operations on ``tensor`` (a tensor or a nested list/tuple/dict of them)."""
        if not self._recording:
            raise TapeError(
                "GradientTape.watch: the tape is not recording; call watch inside "
                "`with distjac.GradientTape() as tape:`."
            )
        for t in pytree.tree_leaves(tensor):
            t = check_tensor(t, "the watched value", "GradientTape.watch(tensor)")
            check_floating(t, "the watched tensor", "GradientTape.watch(tensor)")
            if t.is_inference():
                raise TapeError(
                    "GradientTape.watch: the tensor was made under torch.inference_mode() (an inference "
                    "tensor), and autograd cannot record operations on it. Make it outside inference mode, "
                    "or watch a normal copy made inside the tape's block (x = x.clone())."
                )
            self._watched[id(t)] = t
            if not t.requires_grad:
                t.requires_grad_(True)
                self._switched_on[id(t)] = t

    def watched_variables(self) -> tuple[torch.Tensor, ...]:
        """The tensors this tape watches, in the order they were first watched."""
        return tuple(self._watched.values())

    def reset(self) -> None:
        """Forget everything watched, as TF's ``reset``; a non-persistent tape may be used again."""
        for t in self._switched_on.values():
            if t.is_leaf and not self._recording:
                t.requires_grad_(False)
        self._watched.clear()
        self._switched_on.clear()
        self._spans, self._span_starts = [], []
        if self._recording:
            self._open_span()
        self._used = False

    def _open_span(self) -> None:
        first = _mark()
        if first is not None:
            self._spans.append([first, None])
            self._span_starts.append(first)

    # -- shared machinery ---------------------------------------------------------------

    def _start_call(self, call: str) -> bool:
        """Mark the tape used; return whether the result must itself be differentiable."""
        if self._used and not self._persistent:
            raise TapeError(
                f"{call}: a non-persistent GradientTape can only be used to compute one set "
                "of gradients (or jacobians). Create the tape with "
                "distjac.GradientTape(persistent=True) to call it several times."
            )
        self._used = True
        return torch.is_grad_enabled() and bool(recording_stack())

    def _user_tracked(self, sources: list[torch.Tensor]) -> bool:
        """Whether a source required grad before this tape watched it (NOTE [graphs]); a
        tensor the tape computed itself does not count (NOTE [intermediate sources])."""
        return torch.is_grad_enabled() and any(
            s.requires_grad and id(s) not in self._switched_on and not self._intermediate(s)
            for s in sources if self._admitted(s)
        )

    def _watched_here(self, source: torch.Tensor) -> bool:
        return id(source) in self._watched and self._watched[id(source)] is source

    def _intermediate(self, source: torch.Tensor) -> bool:
        """Whether ``source`` was computed while this tape recorded, from what it watches
        (NOTE [intermediate sources])."""
        if self._watched_here(source) or source.grad_fn is None:
            return False
        number = getattr(source.grad_fn, "_sequence_nr", None)
        if number is None:
            return False
        n = number()
        # Spans are recorded in order of their node numbers: the one starting last before n.
        i = bisect.bisect_right(self._span_starts, n) - 1
        if i < 0 or not (self._spans[i][1] is None or n < self._spans[i][1]):
            return False
        # With every accessed variable watched, anything recorded derives from something
        # watched; otherwise the source's graph must reach a tensor this tape watches.
        return self._watch_accessed_variables or self._derives_from_watched(source.grad_fn)

    def _derives_from_watched(self, node) -> bool:
        watched_nodes = {id(t.grad_fn) for t in self._watched.values() if t.grad_fn is not None}
        for n in graph_nodes(node):
            variable = getattr(n, "variable", None)
            if id(n) in watched_nodes or (variable is not None and self._watched_here(variable)):
                return True
        return False

    def _admitted(self, source: torch.Tensor) -> bool:
        if self._watched_here(source):
            return True
        if self._watch_accessed_variables and source.requires_grad and source.is_leaf:
            return True
        return self._intermediate(source)

    class _Reenabled:
        """Switch requires_grad back on for watched sources during one call (NOTE [watching])."""

        def __init__(self, tape: GradientTape, sources: list[torch.Tensor]):
            self.off = [s for s in sources if tape._admitted(s) and not s.requires_grad]

        def __enter__(self):
            for s in self.off:
                s.requires_grad_(True)

        def __exit__(self, *exc):
            for s in self.off:
                s.requires_grad_(False)

    @staticmethod
    def _finish(value, source: torch.Tensor, shape: tuple, unconnected: UnconnectedGradients):
        if value is not None:
            return value
        if unconnected is UnconnectedGradients.ZERO:
            return torch.zeros(shape, dtype=source.dtype, device=source.device)
        return None

    # -- the three ways to differentiate ------------------------------------------------

    def gradient(self, target, sources, output_gradients=None, unconnected_gradients="none"):
        """Gradient of ``target`` (the sum of its elements, or weighted by output_gradients).

        Args:
            target: a tensor or a list of tensors.
            sources: a tensor or a nested structure (list, tuple, dict) of tensors.
            output_gradients: per-target weights of the same shapes, or None for ones.
            unconnected_gradients: "none" (None for unconnected sources) or "zero".

        Returns:
            The gradients in the structure of ``sources``.
        """
        call = "GradientTape.gradient(target, sources)"
        unconnected = parse_unconnected(unconnected_gradients, call)
        targets = pytree.tree_leaves(target)
        flat_sources, spec = pytree.tree_flatten(sources)
        for t in targets:
            check_tensor(t, "target", call)
        for s in flat_sources:
            check_tensor(s, "each source", call)
        if output_gradients is None:
            weights = [None] * len(targets)
        else:
            # None entries are leaves to pytree: one weight per target, None meaning ones (TF's).
            weights = pytree.tree_leaves(output_gradients, is_leaf=lambda v: v is None)
            if len(weights) != len(targets):
                raise ValueError(f"{call}: got {len(weights)} output_gradients for {len(targets)} targets.")
            for w in weights:
                if w is not None:
                    check_tensor(w, "each output gradient", call)
        weights = [torch.ones_like(t) if w is None else w for t, w in zip(targets, weights)]
        create_graph = self._start_call(call)  # after the checks: a refused call does not spend the tape
        results: list = [None] * len(flat_sources)
        with GradientTape._Reenabled(self, flat_sources + targets):
            # Inside: a watched target (tape.gradient(x, x)) requires grad again here.
            pairs = [(t, w) for t, w in zip(targets, weights) if t.requires_grad]
            idx = [i for i, s in enumerate(flat_sources) if self._admitted(s) and s.requires_grad]
            if pairs and idx:
                grads = torch.autograd.grad(
                    [t for t, _ in pairs], [flat_sources[i] for i in idx], [w for _, w in pairs],
                    retain_graph=True, create_graph=create_graph, allow_unused=True,
                )
                for i, g in zip(idx, grads):
                    results[i] = g
        results = [self._finish(g, s, tuple(s.shape), unconnected) for g, s in zip(results, flat_sources)]
        return pytree.tree_unflatten(results, spec)

    def jacobian(self, target, sources, unconnected_gradients="none", parallel_iterations=None,
                 experimental_use_pfor=True):
        """Full Jacobian of ``target`` w.r.t. each source: shape target.shape + source.shape.

        Args:
            target: a tensor.
            sources: a tensor or a nested structure of tensors.
            unconnected_gradients: "none" or "zero".
            parallel_iterations: Jacobian rows per vectorized pass (None: all).
            experimental_use_pfor: False computes one autograd pass per row.

        Returns:
            Jacobians in the structure of ``sources``.
        """
        call = "GradientTape.jacobian(target, sources)"
        unconnected = parse_unconnected(unconnected_gradients, call)
        check_positive_int(parallel_iterations, "parallel_iterations", call)
        target = check_tensor(target, "target", call)
        flat_sources, spec = pytree.tree_flatten(sources)
        for s in flat_sources:
            check_tensor(s, "each source", call)
        create_graph = self._start_call(call) or self._user_tracked(flat_sources)
        results: list = [None] * len(flat_sources)
        with GradientTape._Reenabled(self, flat_sources + [target]):
            idx = [i for i, s in enumerate(flat_sources) if self._admitted(s) and s.requires_grad]
            if idx:
                jacs = graph_jacobian(
                    target, [flat_sources[i] for i in idx], chunk=parallel_iterations,
                    vectorize=bool(experimental_use_pfor), create_graph=create_graph, call=call,
                )
                for i, j in zip(idx, jacs):
                    results[i] = j
        results = [
            self._finish(j, s, (*target.shape, *s.shape), unconnected)
            for j, s in zip(results, flat_sources)
        ]
        return pytree.tree_unflatten(results, spec)

    def batch_jacobian(self, target, source, unconnected_gradients="none", parallel_iterations=None,
                       experimental_use_pfor=True):
        """Per-example Jacobians: for each i, the Jacobian of target[i] w.r.t. source[i].

        target[i] must depend only on source[i] (TF's contract; not checked here, see
        ``distjac.batch_jacobian(..., check_independence=True)``).

        Args:
            target: tensor of shape (B, y1..yn), rank >= 2.
            source: tensor of shape (B, x1..xm), rank >= 2, floating.
            unconnected_gradients: "none" returns None when target does not depend on
                source; "zero" returns zeros. (TF's own batch_jacobian returns zeros in
                both cases; distjac follows TF's documented meaning.)
            parallel_iterations: Jacobian rows computed per vectorized pass (None: all).
            experimental_use_pfor: False computes one autograd pass per row.

        Returns:
            A tensor of shape (B, y1..yn, x1..xm), or None (see unconnected_gradients).

        Raises:
            ShapeError: rank < 2, or batch sizes that differ.
            DtypeError: a non-floating source.
            TapeError: a non-persistent tape used a second time.
        """
        call = "GradientTape.batch_jacobian(target, source)"
        target = check_tensor(target, "target", call)
        source = check_tensor(source, "source", call)
        check_batched(target, "target", call)
        check_batched(source, "source", call)
        check_same_batch(target, source, call)
        check_floating(source, "source", call)
        unconnected = parse_unconnected(unconnected_gradients, call)
        check_positive_int(parallel_iterations, "parallel_iterations", call)
        create_graph = self._start_call(call) or self._user_tracked([source])
        jac = None
        with GradientTape._Reenabled(self, [source, target]):
            if self._admitted(source) and source.requires_grad:
                jac = graph_batch_jacobian(
                    target, source, chunk=parallel_iterations,
                    vectorize=bool(experimental_use_pfor), create_graph=create_graph, call=call,
                )
        return self._finish(jac, source, (*target.shape, *source.shape[1:]), unconnected)
