"""distjac: per-example Jacobians, TensorFlow's batch_jacobian on PyTorch, from one
process to a Ray cluster."""

from .errors import (
    CoupledExamplesError,
    DistjacError,
    DtypeError,
    MemoryBudgetError,
    OptionError,
    ShapeError,
    ShardError,
    TapeError,
    VectorizationError,
)
from .kernels import batch_jacobian
from .options import UnconnectedGradients
from .tape import GradientTape

__version__ = "0.1.0"

__all__ = [
    "CoupledExamplesError",
    "DistjacError",
    "DtypeError",
    "GradientTape",
    "MemoryBudgetError",
    "OptionError",
    "ShapeError",
    "ShardError",
    "TapeError",
    "UnconnectedGradients",
    "VectorizationError",
    "__version__",
    "batch_jacobian",
]
