"""Reference models for configs, tests and benchmarks.

Each factory returns a ``torch.nn.Module`` whose weights depend only on its arguments
(seeded), so a job that names a model by import path (``distjac.models:mlp``) builds the
same network on every worker.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "Cube", "convnet", "cube", "mlp", "resnet_small"]

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


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a skip connection (He et al., 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.skip(x))


class ResNet(nn.Module):
    """A ResNet-18-style CNN: stem (7x7 stride 2, max-pool), four stages of basic blocks
    (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2), global average pooling, a linear head."""

    def __init__(self, num_classes: int, width: int, blocks: Sequence[int], in_channels: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        stages, c = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2 ** i
            for j in range(n):
                stages.append(_BasicBlock(c, c_out, 2 if (i > 0 and j == 0) else 1))
                c = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def resnet_small(num_classes: int = 1000, width: int = 16, blocks: Sequence[int] = (1, 1, 1, 1),
                 in_channels: int = 3, seed: int = 0) -> ResNet:
    """The large reference model of issue 13: a ResNet-style CNN for 3x224x224 images with
    1,000 outputs, random seeded weights (no downloads), in eval mode.

    Its per-example Jacobian is 1,000 x 150,528 (602 MB in float32, 1,000 backward
    passes): the model the matrix-free estimates (docs/estimates.md) are for. Batch norm
    uses running statistics (eval mode), so examples stay independent, as a per-example
    Jacobian needs; the running statistics are set, from the seed, to values that keep
    activations of unit scale. ``width=64, blocks=(2, 2, 2, 2)`` is ResNet-18's shape.
    """
    blocks = tuple(int(b) for b in blocks)
    if num_classes < 1 or width < 1 or in_channels < 1 or not blocks or any(b < 1 for b in blocks):
        raise ValueError(f"resnet_small(num_classes={num_classes}, width={width}, blocks={blocks}, in_channels="
                         f"{in_channels}): every size must be >= 1 and blocks a non-empty list, e.g. [1, 1, 1, 1].")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNet(int(num_classes), int(width), blocks, int(in_channels))
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.0)
                nn.init.normal_(m.bias, 0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(1.0, 2.0)
    return model.eval()
