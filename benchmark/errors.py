"""Errors that mean "the user asked for something that cannot be done".

The CLI catches :class:`BenchmarkError` and prints its message as one line, with no
traceback, and exits with a non-zero code. Anything else is a bug and keeps its traceback.
A message should say what is wrong *and* how to fix it.
"""


class BenchmarkError(Exception):
    """A user-facing error: bad config, unknown name, missing or malformed data."""

    exit_code = 2


class ConfigError(BenchmarkError):
    """The configuration (YAML or command line) is invalid."""


class DataError(BenchmarkError):
    """A dataset is missing, incomplete or malformed."""


class RegistryError(BenchmarkError):
    """An unknown scenario, method or backbone name."""
