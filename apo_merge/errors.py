"""The one error type that crosses from the core to the command line, shared by apo-merge and apo-train.

Exit codes (docs/errors.md lists every condition): 2 when the command line itself is wrong (a value that does not
parse or is out of range, an unknown or misplaced option, options that contradict each other), 1 for the state of
the world (input files, the output location, the device, the network, a full disk), 130 for Ctrl-C, 143 for SIGTERM.
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class UserError(Exception):
    """A failure with a one-line, user-facing message (cause and fix) and the process exit code to use."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class MergeError(UserError):
    """A UserError raised by apo_merge (a subclass, so that API callers can still catch the merge's own errors).

    ``exit_code`` is 2 when the command line is wrong (see ``usage_error``), 1 otherwise.
    """

    def __init__(self, message: str, *, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message, exit_code)


ELLIPSIS = "…"


def shorten(text: str, limit: int) -> str:
    """``text`` if it is at most ``limit`` characters, else its head and tail around an ellipsis."""
    if len(text) <= limit:
        return text
    keep = limit - len(ELLIPSIS)
    return text[: keep - keep // 2] + ELLIPSIS + text[len(text) - keep // 2 :]


def shown(value: object, limit: int = 60, *, quote: bool = True) -> str:
    """A value for a one-line message: its repr (``quote=False``: a string as it is), at most ``limit`` characters.

    Names and values from hostile files can be megabytes long; an int too long to print is named by its type.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return "a number over 2**64"
    if isinstance(value, str) and not quote:
        text = value
    else:
        try:
            text = repr(value)
        except ValueError:
            text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(e: BaseException, *, typed: bool = False) -> str:
    """The first line of an exception's message (``typed``: after its type's name), for a one-line error."""
    lines = str(e).strip().splitlines()
    head = lines[0] if lines else ""
    if typed:
        return f"{type(e).__name__}: {head}" if head else type(e).__name__
    return head or "no details"


def usage_error(message: str) -> MergeError:
    """The command line itself is wrong, whatever the files hold (exit code 2)."""
    return MergeError(message, exit_code=EXIT_USAGE)
