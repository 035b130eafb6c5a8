"""The trainer's user-facing errors: one line naming the cause and the fix, and the exit code the CLI uses."""

from __future__ import annotations


class TrainError(Exception):
    """A failure a user can act on; ``exit_code`` 1 for runtime failures, 2 for bad usage or configuration."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class ConfigError(TrainError):
    """Bad configuration, found before any work starts (exit code 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)
