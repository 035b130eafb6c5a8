"""The one error type that crosses from the core to the CLI."""

from __future__ import annotations


class MergeError(Exception):
    """A failure with a one-line, user-facing message (cause and fix) and the process exit code to use.

    ``exit_code`` is 2 for bad usage (arguments, output location) and 1 for runtime failures (bad input files,
    I/O errors).
    """

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def usage_error(message: str) -> MergeError:
    return MergeError(message, exit_code=2)
