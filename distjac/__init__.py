"""distjac: per-example Jacobians, TensorFlow's batch_jacobian on PyTorch, from one
process to a Ray cluster.

The public names are loaded on first use (PEP 562), so that ``import distjac`` and
``distjac --version`` import neither torch nor Ray until something needs them.
"""

import importlib as _importlib

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

# public name -> the module that defines it (imported on first use)
_LAZY = {
    "Engine": ".engine",
    "Estimate": ".estimates",
    "GradientTape": ".tape",
    "JobSpec": ".config",
    "ShardPlan": ".plan",
    "UnconnectedGradients": ".options",
    "batch_jacobian": ".kernels",
    "estimate": ".estimates",
    "sketch": ".estimates",
    "make_plan": ".plan",
    "read_result": ".io.sink",
}
# submodules that ``distjac.<name>`` reaches without an import statement, as before
_SUBMODULES = ("arrow", "config", "engine", "io", "jobs", "kernels", "models", "options", "plan", "progress",
               "ray_data", "reduce", "tape", "worker", "chain", "bench", "estimates", "shard",
               "compiled", "structure", "tuning")


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        try:
            return _importlib.import_module("." + name, __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
