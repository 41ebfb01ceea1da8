"""distjac: per-example Jacobians, TensorFlow's batch_jacobian on PyTorch, from one
process to a Ray cluster."""

from .config import JobSpec
from .engine import Engine
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
from .io.sink import read_result
from .kernels import batch_jacobian
from .options import UnconnectedGradients
from .plan import ShardPlan, make_plan
from .tape import GradientTape

__version__ = "0.1.0"

__all__ = [
    "CoupledExamplesError",
    "DistjacError",
    "DtypeError",
    "Engine",
    "GradientTape",
    "JobSpec",
    "MemoryBudgetError",
    "OptionError",
    "ShapeError",
    "ShardError",
    "ShardPlan",
    "TapeError",
    "UnconnectedGradients",
    "VectorizationError",
    "__version__",
    "batch_jacobian",
    "make_plan",
    "read_result",
]
