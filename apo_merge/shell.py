"""The command-line shell shared by apo-merge, apo-train and the demo: one line per failure, one exit code each.

``run_cli`` parses and runs a click/Typer command and turns every way it can end into ``<prog>: error: <message>``
on stderr and an exit code: a ``UserError`` (its own code), a usage error from the option parser (2), Ctrl-C
(130), SIGTERM (143), a stdout that cannot be written (1). docs/errors.md lists every condition.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
import typer.core

try:  # typer 0.2x carries its own copy of click; older typer uses click itself
    from typer._click import exceptions as _parser
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as _parser

from apo_merge.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, UserError, shorten

MAX_VALUE_CHARS = 200  # each whitespace-separated value shown in a message (a tensor name, a path)
MAX_MESSAGE_CHARS = 4000  # the whole line, should it hold many values
DEBUG_ENV = (
    "APO_DEBUG"  # set to 1: an unanticipated OSError, or the cause of a UserError (user code), shows its traceback
)


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that cleanup (finally blocks, context managers) runs."""


_received: list[int] = []  # the signals that reached this run (SIGINT, SIGTERM)
_owning: list[bool] = [False]  # run_cli owns the process (the console scripts)


_held: list[int] = []  # signals received while held (see hold_signals); raised when the hold ends
_holding: list[bool] = [False]


def _on_term(signum, frame) -> None:
    _received.append(signum)
    if _holding[0]:
        _held.append(signum)
        return
    raise Terminated()


def _on_int(signum, frame) -> None:
    _received.append(signum)
    if _holding[0]:
        _held.append(signum)
        return
    raise KeyboardInterrupt


@contextmanager
def hold_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM (as run_cli handles them) wait until the block ends, then raise as usual.

    For native code that calls back into Python: an exception raised by a signal handler inside such a callback
    cannot unwind through the native frames, and the process aborts (``import torch`` does this: a Ctrl-C there
    ended a merge with SIGABRT instead of exit 130, about 1 run in 40 under load).
    """
    if _holding[0]:
        yield
        return
    _holding[0] = True
    try:
        yield
    finally:
        _holding[0] = False
        if _held:
            signum = _held[-1]
            del _held[:]
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt


def import_torch() -> Any:
    """``import torch`` with signals held (see hold_signals); the first import runs torch's native start-up."""
    with hold_signals():
        import torch
    return torch


def interruption(e: BaseException) -> BaseException | None:
    """``e`` if it is Ctrl-C or SIGTERM, or the signal's exception when ``e`` is what a signal tore on its way
    (a Ctrl-C inside ``import torch`` can surface as an ImportError); None for any other ending."""
    if isinstance(e, (KeyboardInterrupt, Terminated)):
        return e
    if _received and not isinstance(e, UserError):
        return Terminated() if _received[-1] == signal.SIGTERM else KeyboardInterrupt()
    return None


def one_line(message: str) -> str:
    """The message as one printable line: control characters escaped, each value and the whole line capped."""
    printable = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in message)
    words = [shorten(w, MAX_VALUE_CHARS) for w in printable.split(" ")]
    return shorten(" ".join(words), MAX_MESSAGE_CHARS)


def error_line(prog: str, message: str) -> str:
    return f"{prog}: error: {one_line(message)}"


class StdoutLost(UserError):
    """stdout could not be written (a full device, a closed pipe) after the work itself was done."""


_done: list[str] = []  # what is complete, for the message should stdout fail afterwards


def completed(what: str) -> None:
    """Record that ``what`` is done (e.g. "runs/x-apo is complete"), for a later stdout failure's message.

    From here on Ctrl-C and SIGTERM cannot undo anything: the console scripts ignore them, report and exit 0.
    """
    _done.append(what)
    if _owning[0]:
        signal.signal(signal.SIGINT, _ignore)
        signal.signal(signal.SIGTERM, _ignore)


def say(text: str, end: str = "\n") -> None:
    """Print the command's result on stdout; a write that fails raises ``StdoutLost``."""
    try:
        sys.stdout.write(text + end)
        sys.stdout.flush()
    except OSError as e:
        raise _stdout_lost(e) from None


def _stdout_lost(e: OSError) -> StdoutLost:
    finished = f"; the work itself finished: {'; '.join(_done)}" if _done else ""
    if e.errno == errno.EPIPE:
        return StdoutLost(f"stdout was closed by its reader (broken pipe) before the result was written{finished}")
    return StdoutLost(f"cannot write the result to stdout ({e.strerror or e}){finished}")


def interrupted(e: BaseException, then: str, action: str = "") -> UserError:
    """For ``except (KeyboardInterrupt, Terminated) as e``: ``<action >interrupted; <then>`` (130) or
    ``terminated`` (143), so that the message says what state the command left behind."""
    prefix = f"{action} " if action else ""
    if isinstance(e, Terminated):
        return UserError(f"{prefix}terminated; {then}", EXIT_TERMINATED)
    return UserError(f"{prefix}interrupted; {then}", EXIT_INTERRUPTED)


def _usage_line(e: _parser.UsageError) -> str:
    message = e.format_message().strip().rstrip(".").replace("Value error, ", "")  # pydantic's prefix (typer 0.2x)
    path = e.ctx.command_path if e.ctx is not None else None
    return f"{message} (see {path} --help)" if path else message


def _invoke(command: Any, prog: str, args: Sequence[str]) -> int:
    """Parse ``args`` and run ``command``; the exit code, or an exception for the shell to report."""
    try:
        with command.make_context(prog, list(args)) as ctx:
            command.invoke(ctx)
    except typer.Exit as e:  # --help, --version, typer.Exit(n)
        return e.exit_code
    return 0


def _outcome(prog: str, e: BaseException) -> tuple[int, str]:
    """The exit code and the one line for ``e``; re-raises what is a bug (its traceback is the report)."""
    if isinstance(e, UserError):
        if e.__cause__ is not None and os.environ.get(DEBUG_ENV):  # e.g. the user's own judge code failed
            traceback.print_exception(e.__cause__, file=sys.stderr)
        return e.exit_code, error_line(prog, e.message)
    if isinstance(e, getattr(_parser, "NoArgsIsHelpError", ())):  # `apo-merge` alone: the help, as click shows it
        return EXIT_USAGE, e.format_message().rstrip("\n")
    if isinstance(e, _parser.UsageError):
        return EXIT_USAGE, error_line(prog, _usage_line(e))
    if isinstance(e, _parser.ClickException):
        return e.exit_code, error_line(prog, e.format_message())
    after = f" after the work finished: {'; '.join(_done)}" if _done else ""
    if isinstance(e, (KeyboardInterrupt, typer.Abort)):
        return EXIT_INTERRUPTED, error_line(prog, f"interrupted{after}")
    if isinstance(e, Terminated):
        return EXIT_TERMINATED, error_line(prog, f"terminated{after}")
    if isinstance(e, OSError) and not os.environ.get(DEBUG_ENV):
        where = f": {os.fsdecode(e.filename)}" if e.filename is not None else ""
        return EXIT_FAILURE, error_line(prog, f"{e.strerror or e}{where}")
    raise e


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except OSError as e:
        raise _stdout_lost(e) from None


def _flush_or_silence_stdout() -> None:
    """After any ending: flush what the command printed; if stdout cannot take it, make it a sink.

    A failed write leaves its bytes in the buffer; the interpreter's own flush at exit would fail again, print
    "Exception ignored" and turn the exit code into 120. Pointing stdout at /dev/null lets that flush succeed.
    """
    try:
        sys.stdout.flush()
        return
    except (OSError, ValueError):
        pass
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):  # no real file behind sys.stdout (CliRunner)
        pass


def _ignore(signum, frame) -> None:
    pass


def _forget_caught_interrupt() -> None:
    # CPython marks a KeyboardInterrupt "unhandled" whenever exec() of a source string ends with one, even when the
    # caller catches it (dataclasses and namedtuple build their methods that way, so a Ctrl-C during an import
    # can land there); at exit the interpreter then kills itself with SIGINT (bpo-1054041) instead of exiting
    # with our code. Every exec() of a string clears the mark before it runs.
    exec("")


def run_cli(prog: str, command: Any, args: Sequence[str] | None = None, *, owns_process: bool = True) -> NoReturn:
    """Run ``command`` on ``args`` (default: sys.argv[1:]) and exit with its code.

    While the command runs, SIGTERM raises ``Terminated`` and Ctrl-C KeyboardInterrupt, so that its cleanup runs.
    Once an ending reaches this function the command's cleanup is over and the outcome is decided. With
    ``owns_process`` (the console scripts) SIGINT and SIGTERM are then ignored until the process exits: a signal
    arriving while the message is printed or during interpreter shutdown cannot turn the decided exit code into
    a death by signal. In-process callers (tests, CliRunner) get their handlers back instead.
    """
    if isinstance(command, typer.Typer):
        command = typer.main.get_command(command)
    args = list(sys.argv[1:] if args is None else args)
    del _done[:]
    main_thread = threading.current_thread() is threading.main_thread()  # signals can be handled there only
    owns_process = owns_process and main_thread
    old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    del _received[:], _held[:]
    _owning[0] = owns_process
    if main_thread:
        signal.signal(signal.SIGTERM, _on_term)
        if old_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, _on_int)
    code, line = EXIT_FAILURE, None
    try:
        try:
            code = _invoke(command, prog, args)
            _flush_stdout()
        except BaseException as e:  # noqa: BLE001 - every ending is reported; a bug is re-raised by _outcome
            if owns_process:  # a Python-level no-op first: it absorbs a signal already caught but not yet run
                signal.signal(signal.SIGINT, _ignore)
                signal.signal(signal.SIGTERM, _ignore)
            _flush_or_silence_stdout()
            code, line = _outcome(prog, e)
        if line is not None:
            try:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
            except OSError:
                pass  # stderr is gone too: the exit code is all that is left
    except (KeyboardInterrupt, Terminated) as e:  # in-process only: a second signal while the first was reported
        code = code if line is not None else (EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED)
    finally:
        _owning[0] = False
        if owns_process:  # SIG_IGN, unlike a Python handler, survives interpreter finalization
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _forget_caught_interrupt()
        elif main_thread:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    sys.exit(code)


class ShellCommand(typer.core.TyperCommand):
    """A Typer command whose ``main`` (what ``app()`` and CliRunner call) goes through ``run_cli``."""

    prog = ""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ARG002
        run_cli(self.prog or prog_name or self.name, self, args, owns_process=False)


class ShellGroup(typer.core.TyperGroup):
    """The same for a Typer app with several commands."""

    prog = ""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ARG002
        run_cli(self.prog or prog_name or self.name, self, args, owns_process=False)


def shell_command(prog: str) -> type[ShellCommand]:
    """``@app.command(cls=shell_command("apo-merge"))``: errors of this command read ``apo-merge: error: ...``."""
    return type("ShellCommand", (ShellCommand,), {"prog": prog})


def shell_group(prog: str) -> type[ShellGroup]:
    """``typer.Typer(cls=shell_group("apo-train"))``."""
    return type("ShellGroup", (ShellGroup,), {"prog": prog})
