"""Reference models for configs, tests and benchmarks.

Each factory returns a ``torch.nn.Module`` whose weights depend only on its arguments
(seeded), so a job that names a model by import path (``distjac.models:mlp``) builds the
same network on every worker.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "Cube", "convnet", "cube", "mlp"]

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus}



def mlp(sizes: Sequence[int], activation: str = "tanh", seed: int = 0) -> nn.Sequential:
    """A multilayer perceptron ``sizes[0] -> ... -> sizes[-1]``, activation between layers.

    Example (W1 of the benchmarks): ``mlp([64, 256, 256, 32])``.
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise ValueError(f"mlp(sizes={sizes!r}): give at least two sizes, each >= 1, e.g. [64, 256, 32].")
    if activation not in ACTIVATIONS:
        raise ValueError(f"mlp(activation={activation!r}): use one of {sorted(ACTIVATIONS)}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(ACTIVATIONS[activation]())
        return nn.Sequential(*layers)


def convnet(
    in_shape: Sequence[int] = (1, 28, 28), channels: int = 8, kernel: int = 3, out: int = 10, seed: int = 0
) -> nn.Sequential:
    """conv(channels, kernel x kernel) -> relu -> flatten -> linear(out) (W4 of the benchmarks)."""
    c, h, w = (int(v) for v in in_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(c, channels, kernel),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(channels * (h - kernel + 1) * (w - kernel + 1), out),
        )


class Cube(nn.Module):
    """y = x ** 3, elementwise (W3 of the benchmarks; the seed example of DESIGN.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x * x


def cube() -> Cube:
    """The elementwise cube, as a module (so configs can name it ``distjac.models:cube``)."""
    return Cube()
