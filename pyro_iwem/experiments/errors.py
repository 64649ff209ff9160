"""Errors the command line reports as one line, without a traceback."""


class RunError(Exception):
    """A problem with the arguments or the run directory (exit status 2 by default)."""

    exit_code = 2


class TrainingDiverged(RunError):
    """The training loss became NaN or infinite (exit status 1); the last checkpoint is kept."""

    exit_code = 1
