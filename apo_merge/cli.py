"""`apo-merge`: argument parsing, progress and exit codes only; the work happens in apo_merge.api."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from apo_merge._version import __version__
from apo_merge.cliopts import option, takes
from apo_merge.dcp import cli as dcp_cli
from apo_merge.hub import PushOptions
from apo_merge.options import MergeOptions
from apo_merge.shell import (
    completed,
    interrupted,
    interruption,
    run_cli,
    say,
    shell_command,
    shell_group,
)

EXAMPLE = """Example:

    apo-merge runs/round-1 runs/round-2 --alpha 0.3 -o runs/round-2-apo

Other commands: `apo-merge verify OUT` re-checks an output; `apo-merge push OUT REPO_ID` uploads one. A PREV
folder literally named verify or push is merged, not taken for the command, whenever a file or folder of that
name exists in the working folder (write ./verify to make that plain)."""

PROG = "apo-merge"
NOTHING_LEFT = "no partial output was left and the inputs are unchanged"
app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
tools = typer.Typer(
    cls=shell_group(PROG),
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="apo-merge maintenance commands.",
)
SUBCOMMANDS = ("verify", "push", "export")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"apo-merge {__version__}")
        raise typer.Exit()


PrevArg = Annotated[
    str,
    typer.Argument(
        metavar="PREV",
        help="Previous round's raw checkpoint (theta_hat_t): a folder, a Hub repo id org/name[@revision], or a "
        "LoRA adapter.",
    ),
]
CurArg = Annotated[
    str, typer.Argument(metavar="CUR", help="Current round's raw checkpoint (theta_hat_t+1), of the same kind as PREV.")
]
OutputOpt = Annotated[
    str | None,
    typer.Option(
        "-o",
        "--output",
        help="Output folder [default: <CUR>-apo<ALPHA> beside CUR]; with several alphas it must contain {alpha}, "
        "e.g. -o runs/apo{alpha}.",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
TokenOpt = option(MergeOptions, "token")  # `apo-merge push` takes this one field of MergeOptions
VersionOpt = Annotated[
    bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
]


def _human(nbytes: float) -> str:
    if nbytes < 1000:
        return f"{int(nbytes)} B"
    for unit in ("KB", "MB", "GB"):
        nbytes /= 1000
        if nbytes < 1000:
            return f"{nbytes:.1f} {unit}"
    return f"{nbytes / 1000:.1f} TB"


@app.command(
    cls=shell_command(PROG),
    help=f"Write CUR + ALPHA * (CUR - PREV) for two Hugging Face safetensors checkpoints.\n\n{EXAMPLE}",
    no_args_is_help=True,
)
@takes(MergeOptions)
def merge(
    prev: PrevArg,
    cur: CurArg,
    output: OutputOpt = None,
    *,
    options: MergeOptions,  # every MergeOptions field is a flag (apo_merge.cliopts)
    quiet: QuietOpt = False,
    version: VersionOpt = False,
) -> None:
    from apo_merge.io.prefetch import Prefetcher

    prefetcher = Prefetcher()
    prefetcher.checkpoints(prev, cur)  # the disk streams the inputs in while torch loads
    try:
        reports = _run(prev, cur, options, output, quiet, prefetcher)
    except BaseException as e:
        signal = interruption(e)
        if signal is None:
            raise
        raise interrupted(signal, NOTHING_LEFT) from None
    for report in reports:
        _summary(report)
    if reports[0].pushed is not None:  # the upload is the API's (MergeOptions.push_to_hub): report it
        _pushed(reports[0].output, reports[0].pushed)


def _summary(report) -> None:
    completed(f"{report.output} is complete")
    notes = []
    if report.copied_cur_only:
        notes.append(f"{len(report.copied_cur_only)} CUR-only tensors copied unchanged")
    if report.ignored_prev_only:
        notes.append(f"{len(report.ignored_prev_only)} PREV-only tensors left out")
    if report.kind != "checkpoint":
        notes.append(report.kind)
    if report.new_nonfinite:
        notes.append(f"warning: {report.new_nonfinite} inf/NaN values from finite inputs")
    copied = report.n_tensors - report.n_extrapolated
    say(
        f"apo-merge: {report.n_tensors} tensors ({report.n_extrapolated} extrapolated, {copied} copied), "
        f"{_human(report.bytes_written)} in {report.seconds:.2f} s ({report.gb_per_s:.2f} GB/s) on "
        f"{report.device}" + "".join(f"; {n}" for n in notes) + f" -> {report.output}"
    )


def _pushed(folder: Path, url: str) -> None:
    completed(f"uploaded {folder} -> {url}")
    say(f"apo-merge: uploaded {folder} -> {url}")


@tools.callback()
def _tools() -> None:
    """apo-merge maintenance commands."""


@tools.command(
    "push",
    no_args_is_help=True,
    help="Upload an apo-merge output folder to a Hub model repo (e.g. to retry a failed --push-to-hub).\n\n"
    "Example:\n\n    apo-merge push runs/round-2-apo me/model-apo --revision round-2",
)
@takes(PushOptions)
def push_command(
    folder: Annotated[Path, typer.Argument(metavar="OUT", help="The output folder to upload.")],
    options: PushOptions,
    token: TokenOpt = None,
) -> None:
    from apo_merge.hub import push

    _pushed(folder, push(folder, options, token=token))


def _run(prev, cur, options, output, quiet, prefetcher):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from apo_merge.api import Hooks, run_merges

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        return run_merges(prev, cur, options, output, hooks=Hooks(prefetcher=prefetcher))
    with Progress(
        TextColumn("merging"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("merge", total=None)

        def on_plan(plan) -> None:  # once per output
            bar.update(task, total=(bar.tasks[0].total or 0) + plan.total_bytes)

        hooks = Hooks(progress=lambda n: bar.advance(task, n), on_plan=on_plan, prefetcher=prefetcher)
        return run_merges(prev, cur, options, output, hooks=hooks)


@tools.command(
    "verify",
    help="Re-check an apo-merge output: headers, index, and each file's hash (BLAKE3 or SHA-256) against the model card.",
)
def verify(
    folder: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder of an apo-merge run.")],
) -> None:
    from apo_merge import dcp
    from apo_merge.verify import verify_output

    report = dcp.verify_dcp(folder) if dcp.is_dcp(folder) else verify_output(folder)
    completed(f"{folder} passed verification")
    say(
        f"apo-merge: {folder}: OK, {len(report.files)} file(s), {report.n_tensors} tensors, "
        f"{_human(report.total_bytes)}; every {report.output_hash} matches the model card"
    )


dcp_cli.register(tools)  # apo-merge export DCP OUT


def command_for(args: list[str]) -> typer.Typer:
    """`verify` and `push` name the maintenance commands unless a file or folder of that name exists: then the
    word is PREV, and the merge runs (a folder named like a command is never shadowed)."""
    if args and args[0] in SUBCOMMANDS and not os.path.lexists(args[0]):
        return tools
    return app


def main(argv: list[str] | None = None) -> None:
    """Console entry point: `apo-merge PREV CUR ...`, or `apo-merge verify|push ...`; exits with the run's code.

    With ``argv`` (tests, callers in the same process) the signal handlers are restored on return; without it
    the process is ours to end (see ``run_cli``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    run_cli(PROG, command_for(args), args, owns_process=argv is None)


if __name__ == "__main__":
    main()
