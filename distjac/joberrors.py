"""Errors of jobs: configs, input sources and output datasets.

They extend the tree of :mod:`distjac.errors` (and are meant to move there)::

    DistjacError
    ├── JobInputError                 a job that cannot start; raised before any work is done
    │   ├── ConfigError(ValueError)   unknown key, bad value, conflicting settings, a reduction
    │   │                             the Jacobian's shape does not allow
    │   ├── SourceError(ValueError)   a missing column, a column that holds no tensors
    │   ├── SourceNotFoundError(FileNotFoundError)
    │   │                             an input file (data, weights, config) that does not exist
    │   ├── SourceDtypeError(DtypeError)
    │   │                             input values of a dtype that cannot be differentiated
    │   └── OutputExistsError(FileExistsError)
    │                                 the output holds another job's results; --overwrite replaces it
    └── ResultError(RuntimeError)     an output dataset that is not a distjac result, or misses rows

The CLI exits with status 2 for every ``JobInputError`` (the job never started) and 1 for
anything that fails while it runs.
"""

from __future__ import annotations

from .errors import DistjacError, DtypeError

__all__ = [
    "ConfigError",
    "JobInputError",
    "OutputExistsError",
    "ResultError",
    "SourceDtypeError",
    "SourceError",
    "SourceNotFoundError",
]


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


class ResultError(DistjacError, RuntimeError):
    """An output dataset that is not a distjac result, is incomplete or is corrupted."""
