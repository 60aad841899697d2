"""User-facing errors: the CLI prints these as one line and exits non-zero, with no traceback."""


class CapfastError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2
    own = True  # the process's own problem (under DDP, posted as its last words); False: a report of another rank's
