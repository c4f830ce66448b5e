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


class OutputError(BenchmarkError):
    """A result, checkpoint or table cannot be written (folder not writable, disk full)."""


class CheckpointError(BenchmarkError):
    """A checkpoint cannot be read, or does not belong to the run that asks for it."""


class TrainingDiverged(BenchmarkError):
    """The training loss became NaN or infinite; the last checkpoint is kept."""

    exit_code = 3


class BrokenFeatures(TrainingDiverged):
    """A method encoded test items to NaN or infinite features; nothing is ranked, the last
    checkpoint is kept (exit status 3, as for a diverged loss)."""


class CellsFailed(BenchmarkError):
    """``--launcher ray``: some runs of the grid failed (each left ``runs/<run_id>.error.json``);
    every other run finished and the tables were rebuilt from them. Exit status 4."""

    exit_code = 4


class RunInterrupted(BenchmarkError):
    """Ctrl-C (SIGINT) or SIGTERM stopped a run after it saved a checkpoint.

    The exit status follows the shell convention for a process ended by a signal: 128 + the
    signal number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number


def one_line(error: BaseException) -> str:
    """An error's message on one line. A DataLoader worker re-raises an error with the worker's
    traceback as its message; only the original message (the traceback's last line, without the
    exception's class name) is kept."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return " ".join(line.strip() for line in text.splitlines())
