"""distjac: per-example Jacobians, TensorFlow's batch_jacobian on PyTorch, from one
process to a Ray cluster."""

from .config import JobSpec
from .engine import Engine
from .errors import (
    ConfigError,
    CoupledExamplesError,
    DistjacError,
    DtypeError,
    JobInputError,
    MemoryBudgetError,
    OptionError,
    OutputExistsError,
    OutputLockedError,
    ResultError,
    ShapeError,
    ShardError,
    SourceDtypeError,
    SourceError,
    SourceNotFoundError,
    TapeError,
    VectorizationError,
)
from .estimate import Estimate, estimate, sketch
from .io.sink import read_result
from .kernels import batch_jacobian
from .options import UnconnectedGradients
from .plan import ShardPlan, make_plan
from .tape import GradientTape

__version__ = "0.1.0"

# The names of DESIGN.md's public API and the whole exception tree of distjac.errors;
# everything else is internal (importable from its module, not promised).
__all__ = [
    "ConfigError",
    "CoupledExamplesError",
    "DistjacError",
    "DtypeError",
    "Engine",
    "Estimate",
    "GradientTape",
    "JobInputError",
    "JobSpec",
    "MemoryBudgetError",
    "OptionError",
    "OutputExistsError",
    "OutputLockedError",
    "ResultError",
    "ShapeError",
    "ShardError",
    "ShardPlan",
    "SourceDtypeError",
    "SourceError",
    "SourceNotFoundError",
    "TapeError",
    "UnconnectedGradients",
    "VectorizationError",
    "__version__",
    "batch_jacobian",
    "estimate",
    "make_plan",
    "read_result",
    "sketch",
]
