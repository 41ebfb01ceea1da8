"""distjac's experiment harness: ``distjac bench SUITE...`` (docs/benchmarks.md).

Four suites, each measured side by side in one run, after a warm-up, repeated, with the
median reported, and checked for correctness before anything is timed:

``kernels``
    W1-W4 of issue 2 in one process: distjac's modes against torch.func and autograd
    baselines, and TensorFlow / JAX as optional peers (:mod:`distjac.bench.peers`, run by
    an interpreter that has them; skipped with the reason where none does).
``scaling``
    A synthetic dataset of millions of rows through the engine, 1..N workers, on the
    embedded local Ray and on a multi-node ``ray.cluster_utils.Cluster`` on this machine;
    gathered in memory, written to Arrow parts, and written reduced. Examples/s,
    efficiency against linear scaling, and each shard's time by stage.
``memory``
    Peak resident memory of the driver and of the workers as a job's rows grow.
``estimates``
    On the large reference model (``distjac.models.resnet_small``, 3x224x224 -> 1,000):
    rows/s of the matrix-free Frobenius estimate (8 probes) against the exact Jacobian's
    measured cost on a small slice, with the estimate's relative standard error.

Each suite writes ``<out>/<suite>.json`` (machine, versions, config, and one record per
measurement), ``<out>/<suite>.md`` (the tables) and PNG plots when matplotlib is installed
(``pip install "distjac[plot]"``).
"""

from __future__ import annotations

SUITES = ("kernels", "scaling", "memory", "estimates")
SIZES = ("tiny", "full")

__all__ = ["SIZES", "SUITES"]
