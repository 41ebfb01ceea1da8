"""The exception tree of distjac.

Every error subclasses the built-in it refines, so ``except ValueError`` keeps working::

    DistjacError                      base of every distjac error
    ├── ShapeError(ValueError)        ranks < 2, batch sizes that differ, bad output shapes
    ├── DtypeError(TypeError)         integer, bool or complex sources and targets
    ├── OptionError(ValueError)       an unknown mode / unconnected_gradients value, bad counts
    ├── TapeError(RuntimeError)       a non-persistent tape used twice, watch outside a tape
    ├── VectorizationError(RuntimeError)
    │                                 the vectorized (vmap) pass failed; the loop path may work
    ├── CoupledExamplesError(ValueError)
    │                                 check_independence found examples that depend on each other
    ├── MemoryBudgetError(MemoryError)
    │                                 even the smallest pass does not fit the memory budget
    ├── ShardError(RuntimeError)      a shard failed on a worker (raised by the engine)
    ├── JobInputError                 a job that cannot start; raised before any work is done
    │   ├── ConfigError(ValueError)   unknown key, bad value, conflicting settings, a reduction
    │   │                             the Jacobian's shape does not allow
    │   ├── SourceError(ValueError)   a missing column, a column that holds no tensors
    │   ├── SourceNotFoundError(FileNotFoundError)
    │   │                             an input file (data, weights, config) that does not exist
    │   ├── SourceDtypeError(DtypeError)
    │   │                             input values of a dtype that cannot be differentiated
    │   └── OutputExistsError(FileExistsError)
    │       │                         the output holds another job's results (or files distjac did
    │       │                         not write); --overwrite replaces only distjac's own files
    │       └── OutputLockedError     another run holds the output's lock (names its host and pid)
    └── ResultError(RuntimeError)     an output dataset that is not a distjac result, or misses rows

The CLI exits with status 2 for every ``JobInputError`` (the job never started) and 1 for
anything that fails while it runs.

Messages start with the public call, give what was expected and what was received, and
end with the way out.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CoupledExamplesError",
    "DistjacError",
    "DtypeError",
    "JobInputError",
    "MemoryBudgetError",
    "OptionError",
    "OutputExistsError",
    "OutputLockedError",
    "ResultError",
    "ShapeError",
    "ShardError",
    "SourceDtypeError",
    "SourceError",
    "SourceNotFoundError",
    "TapeError",
    "VectorizationError",
]


class DistjacError(Exception):
    """Base class of every error raised by distjac."""


class ShapeError(DistjacError, ValueError):
    """A target or source whose shape batch_jacobian cannot use."""


class DtypeError(DistjacError, TypeError):
    """A tensor whose dtype cannot be differentiated (integer, bool, complex)."""


class OptionError(DistjacError, ValueError):
    """An option with a value outside its valid set."""


class TapeError(DistjacError, RuntimeError):
    """A GradientTape used in a way TensorFlow's tape forbids."""


class VectorizationError(DistjacError, RuntimeError):
    """The vectorized pass failed; ``experimental_use_pfor=False`` takes the loop path."""


class CoupledExamplesError(DistjacError, ValueError):
    """``check_independence=True`` found that examples of the batch depend on each other."""


class MemoryBudgetError(DistjacError, MemoryError):
    """The result, or the smallest pass that computes it, does not fit the memory budget."""


class ShardError(DistjacError, RuntimeError):
    """A shard failed on a worker.

    Attributes:
        shard: the shard's index in the plan.
        start: first row of the shard (inclusive).
        stop: end of the shard's row range (exclusive).
        node: the Ray node the shard ran on, when known.
        remote_traceback: the worker's traceback of the original error, when known.
    """

    def __init__(
        self, message: str, *, shard: int, start: int, stop: int, node: str | None = None,
        remote_traceback: str | None = None,
    ):
        super().__init__(message)
        self.shard = shard
        self.start = start
        self.stop = stop
        self.node = node
        self.remote_traceback = remote_traceback

    def __reduce__(self):  # keep the attributes across pickling (Ray ships errors by pickle)
        return (_rebuild_shard_error, (self.args[0], self.shard, self.start, self.stop, self.node,
                                       self.remote_traceback))


def _rebuild_shard_error(message, shard, start, stop, node, remote_traceback=None):
    return ShardError(message, shard=shard, start=start, stop=stop, node=node, remote_traceback=remote_traceback)


class JobInputError(DistjacError):
    """A job that cannot start: its spec, inputs or output location are wrong."""


class ConfigError(JobInputError, ValueError):
    """A job spec with an unknown key, a bad value or settings that conflict."""


class SourceError(JobInputError, ValueError):
    """An input source that has no usable tensor column or rows."""


class SourceNotFoundError(JobInputError, FileNotFoundError):
    """An input file (data, weights, config) that does not exist."""


class SourceDtypeError(JobInputError, DtypeError):
    """Input values of a dtype that cannot be differentiated (integers, bool, strings)."""


class OutputExistsError(JobInputError, FileExistsError):
    """The output directory holds results of another job (or other files)."""


class OutputLockedError(OutputExistsError):
    """Another run holds the output directory's lock.

    Attributes:
        holder: what the holder wrote into the lock file ("host ... pid ... started ..."),
            or "" when it is unknown.
    """

    def __init__(self, message: str, holder: str = ""):
        super().__init__(message)
        self.holder = holder

    def __reduce__(self):
        return (type(self), (self.args[0], self.holder))


class ResultError(DistjacError, RuntimeError):
    """An output dataset that is not a distjac result, is incomplete or is corrupted."""
