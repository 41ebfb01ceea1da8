"""Option values shared by every entry point, and the checks that reject bad input.

The tape, the functional API and the engine all validate through these functions, so
the same mistake gets the same message wherever it is made.
"""

from __future__ import annotations

import enum
import os
from typing import Any

import torch

from .errors import DtypeError, OptionError, ShapeError

__all__ = ["MODES", "UnconnectedGradients"]

MODES = ("rev", "fwd", "auto")


class UnconnectedGradients(enum.Enum):
    """What a gradient or Jacobian is when the target does not depend on the source.

    ``NONE`` returns ``None``; ``ZERO`` returns zeros of the full shape. (TensorFlow's
    batch_jacobian returns zeros in both cases, a compatibility quirk kept in its source;
    distjac follows the documented meaning.)
    """

    NONE = "none"
    ZERO = "zero"


def parse_unconnected(value: Any, call: str) -> UnconnectedGradients:
    if isinstance(value, UnconnectedGradients):
        return value
    # Accept TF's own enum too (its .value is "none" / "zero") without importing TF.
    raw = getattr(value, "value", value)
    if isinstance(raw, str):
        try:
            return UnconnectedGradients(raw.lower())
        except ValueError:
            pass
    raise OptionError(
        f"{call}: unconnected_gradients={value!r} is not valid; use one of "
        f"'none', 'zero', distjac.UnconnectedGradients.NONE or distjac.UnconnectedGradients.ZERO."
    )


def parse_mode(mode: Any, call: str) -> str:
    if isinstance(mode, str) and mode in MODES:
        return mode
    raise OptionError(f"{call}: mode={mode!r} is not valid; use one of 'rev', 'fwd' or 'auto'.")


# Devices an Engine or a job accepts; "cuda:N" stands for cuda:0, cuda:1, ...
DEVICES = ("auto", "cpu", "cuda", "cuda:N")


def is_device(value: Any) -> bool:
    """Whether ``value`` names a device of :data:`DEVICES` ("auto", "cpu", "cuda", "cuda:N")."""
    return isinstance(value, str) and (value in DEVICES[:3] or (value.startswith("cuda:") and value[5:].isdigit()))


def is_int(value: Any) -> bool:
    """An int that is not a bool: the one integer test of every option, plan and config check."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value: Any, name: str, call: str, *, minimum: int = 1, allow_none: bool = True,
              none: str = "None") -> int | None:
    """``value`` if it is None (where allowed) or an integer >= ``minimum``; else an
    OptionError naming the call, the value and what to use (``none`` says what None means)."""
    if value is None and allow_none:
        return None
    if not is_int(value) or value < minimum:
        hint = f"{none} or " if allow_none else ""
        raise OptionError(f"{call}: {name}={value!r} is not valid; use {hint}an integer >= {minimum}.")
    return value


def check_positive_int(value: Any, name: str, call: str, *, allow_none: bool = True) -> int | None:
    return check_int(value, name, call, allow_none=allow_none, none="None (all at once)")


def check_tensor(t: Any, what: str, call: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{call}: {what} must be a torch.Tensor, got {type(t).__name__}.")
    return t


def check_floating(t: torch.Tensor, what: str, call: str) -> None:
    if not (t.is_floating_point()):
        raise DtypeError(
            f"{call}: {what} has dtype {t.dtype}; only floating dtypes (float16, bfloat16, "
            f"float32, float64) can be differentiated. Convert it, e.g. {what}.float()."
        )


def check_batched(t: torch.Tensor, what: str, call: str) -> None:
    if t.dim() < 2:
        shape = tuple(t.shape)
        fix = f"Reshape to {shape + (1,)}" if t.dim() == 1 else "Add a batch and a feature axis"
        raise ShapeError(
            f"{call}: {what} has shape {shape}, rank {t.dim()}; it must have rank at least 2 (batch_jacobian "
            f"needs rank >= 2, with the batch first). {fix}, or use jacobian() for a full Jacobian."
        )


def check_same_batch(target: torch.Tensor, source: torch.Tensor, call: str) -> None:
    if target.shape[0] != source.shape[0]:
        raise ShapeError(
            f"{call}: Need first dimension of target shape {tuple(target.shape)} and source shape "
            f"{tuple(source.shape)} to match (TF's wording): the first dimensions of target and source "
            f"must match (the batch size), got {target.shape[0]} and {source.shape[0]}. Row i of the "
            "target must depend only on row i of the source."
        )


def env_int(name: str) -> int | None:
    """The one place that reads ``DISTJAC_*`` integer settings from the environment."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise OptionError(f"environment variable {name}={raw!r} must be an integer.") from None


def check_functional_call(fn: Any, x: Any, mode: Any, unconnected_gradients: Any, call: str):
    """The checks every ``batch_jacobian(fn, x, ...)`` entry point makes before any work.

    Returns:
        ``(x, mode, unconnected)``, the latter two parsed.
    """
    if not callable(fn):
        raise TypeError(f"{call}: fn must be callable, got {type(fn).__name__}.")
    x = check_tensor(x, "x", call)
    check_batched(x, "x (the source)", call)
    check_floating(x, "x (the source)", call)
    mode, unconnected = parse_mode(mode, call), parse_unconnected(unconnected_gradients, call)
    if x.layout == torch.strided and _may_overlap(x):
        # An x whose positions share memory (expanded: a stride of 0; overlapping windows
        # from unfold or as_strided) cannot be given tangents laid out like it: forward
        # mode failed on the first and silently mixed columns on the second. A dense copy
        # (differentiable, where x requires grad) computes the same Jacobian in every mode.
        x = x.contiguous()
    return x, mode, unconnected


def _may_overlap(x: torch.Tensor) -> bool:
    """Whether two positions of the strided tensor x may share memory: its dimensions,
    by increasing stride, must each step past everything the smaller ones reach (True
    for some layouts that do not overlap, which then cost a copy, never for one that does)."""
    reach = 0
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False
