"""The exception family that the CLI turns into one-line messages (exit code 2).

Anything raised from this family is a *user* mistake (bad option, missing data, bad
checkpoint) and its message says what to do next. Any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations


class ResunitError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class ConfigError(ResunitError, ValueError):
    """An impossible or unknown configuration (model name, shortcut kind, option value)."""


class DatasetError(ResunitError):
    """A dataset is missing, unreadable or malformed."""


class CheckpointError(ResunitError):
    """A checkpoint is missing, corrupt, unsafe or belongs to another architecture."""


class TrainingError(ResunitError):
    """Training cannot go on (e.g. the loss became non-finite)."""


class DeployError(ResunitError):
    """An export or optimisation cannot be done (missing extra, failed verification)."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when it has none): third-party
    errors (inductor, TorchScript, ONNX Runtime) can run to pages, and the first line says what
    went wrong."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "DeployError",
    "ResunitError",
    "TrainingError",
    "first_line",
]
