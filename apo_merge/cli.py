"""`apo-merge`: argument parsing, progress and exit codes only; the work happens in apo_merge.api."""

from __future__ import annotations

import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from apo_merge import __version__

EXAMPLE = """Example:

    apo-merge runs/round-1 runs/round-2 --alpha 0.3 -o runs/round-2-apo

Other commands: `apo-merge verify OUT` re-checks an output; `apo-merge push OUT REPO_ID` uploads one."""

app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
tools = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False,
                    help="apo-merge maintenance commands.")
SUBCOMMANDS = ("verify", "push")


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Dtype(str, Enum):
    keep = "keep"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class OnMissing(str, Enum):
    error = "error"
    copy = "copy"


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that cleanup runs."""


def _version(value: bool) -> None:
    if value:
        typer.echo(f"apo-merge {__version__}")
        raise typer.Exit()


def fail(message: str, code: int) -> None:
    """Print a one-line error on stderr and exit with ``code``."""
    one_line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)  # names from files may hold \n
    typer.echo(f"apo-merge: error: {one_line}", err=True)
    raise typer.Exit(code)


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    return ""


@app.command(help=f"Write CUR + ALPHA * (CUR - PREV) for two Hugging Face safetensors checkpoints.\n\n{EXAMPLE}",
             no_args_is_help=True)
def merge(
    prev: Annotated[str, typer.Argument(metavar="PREV", help="Previous round's raw checkpoint folder (theta_hat_t).")],
    cur: Annotated[str, typer.Argument(metavar="CUR", help="Current round's raw checkpoint folder (theta_hat_t+1).")],
    alpha: Annotated[float, typer.Option(help="Extrapolation weight; 0 copies CUR, negative moves toward PREV.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output folder "
                      "[default: <CUR>-apo<ALPHA> beside CUR].")] = None,
    device: Annotated[Device, typer.Option(help="Where to compute; auto uses CUDA when present.")] = Device.auto,
    dtype: Annotated[Dtype, typer.Option(help="Output dtype of floating tensors; keep = CUR's.")] = Dtype.keep,
    max_shard_size: Annotated[str | None, typer.Option(help="Re-shard in HF naming, e.g. 5GB "
                              "[default: keep CUR's files].")] = None,
    on_missing: Annotated[OnMissing, typer.Option(help="Tensors in only one input: error, or copy CUR's "
                          "unchanged.")] = OnMissing.error,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT (an earlier apo-merge output) "
                         "atomically.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail if finite inputs give inf/NaN outputs.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                       help="Show the version and exit.")] = False,
) -> None:
    from apo_merge.errors import MergeError

    def on_term(signum, frame):
        raise _Terminated()

    signal.signal(signal.SIGTERM, on_term)
    try:
        report = _run(prev, cur, alpha, output, device.value, dtype.value, max_shard_size, on_missing.value,
                      overwrite, strict, quiet)
    except MergeError as e:
        fail(e.message, e.exit_code)
    except KeyboardInterrupt:
        fail("interrupted; no partial output was left and the inputs are unchanged", 130)
    except _Terminated:
        fail("terminated; no partial output was left and the inputs are unchanged", 143)
    notes = []
    if report.copied_cur_only:
        notes.append(f"{len(report.copied_cur_only)} CUR-only tensors copied unchanged")
    if report.ignored_prev_only:
        notes.append(f"{len(report.ignored_prev_only)} PREV-only tensors left out")
    if report.new_nonfinite:
        notes.append(f"warning: {report.new_nonfinite} inf/NaN values from finite inputs")
    copied = report.n_tensors - report.n_extrapolated
    typer.echo(f"apo-merge: {report.n_tensors} tensors ({report.n_extrapolated} extrapolated, {copied} copied), "
               f"{_human(report.bytes_written)} in {report.seconds:.2f} s ({report.gb_per_s:.2f} GB/s) on "
               f"{report.device}" + "".join(f"; {n}" for n in notes) + f" -> {report.output}")


def _run(prev, cur, alpha, output, device, dtype, max_shard_size, on_missing, overwrite, strict, quiet):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from apo_merge.api import run_merge

    console = Console(stderr=True)
    options = dict(device=device, dtype=dtype, max_shard_size=max_shard_size, on_missing=on_missing,
                   overwrite=overwrite, strict=strict)
    if quiet or not console.is_terminal:
        return run_merge(prev, cur, alpha, output, **options)
    with Progress(TextColumn("merging"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("merge", total=None)

        def on_plan(plan) -> None:
            bar.update(task, total=plan.total_bytes)

        return run_merge(prev, cur, alpha, output, progress=lambda n: bar.advance(task, n), on_plan=on_plan,
                         **options)


@tools.callback()
def _tools() -> None:
    """Keeps `verify` a named subcommand even while it is the only one."""


@tools.command(help="Re-check an apo-merge output: headers, index, and each file's SHA-256 against the model card.")
def verify(
    folder: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder of an apo-merge run.")],
) -> None:
    from apo_merge.errors import MergeError
    from apo_merge.verify import verify_output

    try:
        report = verify_output(folder)
    except MergeError as e:
        fail(e.message, e.exit_code)
    typer.echo(f"apo-merge: {folder}: OK, {len(report.files)} weight file(s), {report.n_tensors} tensors, "
               f"{_human(report.total_bytes)}; every SHA-256 matches the model card")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: `apo-merge PREV CUR ...`, or `apo-merge verify|push ...`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        tools(args, prog_name="apo-merge")
    else:
        app(args, prog_name="apo-merge")


if __name__ == "__main__":
    main()
