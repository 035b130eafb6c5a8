"""The trainer's user-facing errors: one line naming the cause and the fix, and the exit code the CLI uses."""

from __future__ import annotations

from apo_merge.errors import EXIT_FAILURE, EXIT_USAGE, UserError


class TrainError(UserError):
    """A failure a user can act on; ``exit_code`` 1 for the state of the world, 2 for a wrong command line."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message, exit_code)


class ConfigError(TrainError):
    """The configuration (YAML file and --set) is wrong in itself, found before any work starts: exit code 2.

    A config that is well formed but names something missing (a model folder, a prompts file, a package) passes
    ``exit_code=1``: that is the state of the world, not the command line.
    """

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message, exit_code)
