"""Exceptions raised by overunlearn, each with a message that says what to do."""

from __future__ import annotations


class OverunlearnError(Exception):
    """Base class of every error raised on purpose by this package."""


class DataError(OverunlearnError, ValueError):
    """Input data is malformed: empty, wrong shapes, non-finite values."""


class DatasetNotFoundError(OverunlearnError, FileNotFoundError):
    """A dataset is not on disk; the message says how to provide it."""


class DatasetFileError(DataError):
    """A dataset file is on disk but unusable (truncated, corrupt, of another format); ``path`` names it
    and the message says to delete it and provide it again."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class NonFiniteLossError(OverunlearnError, FloatingPointError):
    """The loss became NaN or infinite; ``step`` is the (0-based) step at which it happened."""

    def __init__(self, message: str, step: int, method: str = "") -> None:
        super().__init__(message)
        self.step = step
        self.method = method


class UnknownMethodError(OverunlearnError, KeyError):
    """No method is registered under the requested name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CacheFileError(OverunlearnError, RuntimeError):
    """A cached file is truncated, corrupt or holds something other than tensors; ``path`` names it."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class PluginError(OverunlearnError, ImportError):
    """A plugin module (``--plugin``, ``$OVERUNLEARN_PLUGINS`` or an ``overunlearn.plugins`` entry point)
    could not be imported; the message names it and the reason."""


class BenchmarkDefinitionError(OverunlearnError, ValueError):
    """A registered benchmark does not follow the protocol (a missing method, malformed ``metrics``, an
    ``evaluate`` that leaves out a declared metric); the message names the benchmark and what to fix."""


class CacheRebuiltWarning(UserWarning):
    """A cache entry could not be used (corrupt, of another format) and is rebuilt; the message names it."""
