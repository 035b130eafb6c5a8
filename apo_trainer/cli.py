"""The ``apo-train`` command line: ``run CONFIG.yaml [--set key=value ...]``, ``config`` (print every key).

Errors print one line on stderr (``apo_merge.shell.run_cli``); exit code 2 for a wrong command line or config,
1 for the state of the world and failures during the run, 130 on Ctrl-C, 143 on SIGTERM (docs/errors.md).
``apo-train demo`` is added by ``apo_trainer.demo.cli:demo`` when that module is present.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Annotated

import typer

from apo_merge.shell import import_torch, interrupted, interruption, run_cli, say, shell_group
from apo_trainer.log import quiet_libraries

PROG = "apo-train"
app = typer.Typer(
    name=PROG,
    cls=shell_group(PROG),
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run Accelerated Preference Optimization rounds (arXiv 2410.06293).",
)


def _version(value: bool) -> None:
    if value:
        from apo_merge._version import __version__

        typer.echo(f"apo-train {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Run Accelerated Preference Optimization rounds (arXiv 2410.06293)."""


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML config file (see `apo-train config`).")],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override one key: --set alpha=0.5 (repeatable; values parsed as YAML)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")] = False,
    allow_changed_config: Annotated[
        bool,
        typer.Option(
            "--allow-changed-config",
            help="Resume even though the config differs from the one the run started "
            "with; new values apply to phases not yet done.",
        ),
    ] = False,
) -> None:
    """Run (or resume) the APO rounds a config describes. Rerun the same command to resume after a crash."""
    import_torch()
    from apo_trainer.config import APOConfig

    cfg = APOConfig.from_yaml(config, overrides or [])
    cfg.validate()
    from apo_trainer.loop import run as run_loop

    try:
        with quiet_libraries(quiet):
            run_loop(cfg, quiet=quiet, allow_changed_config=allow_changed_config)
    except BaseException as e:
        stop = interruption(e)
        if stop is None:
            raise
        raise interrupted(stop, "rerun the same command to resume") from None


@app.command("eval")
def eval_runs(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders (output_dir of apo-train run), one or more.")],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override an eval_* key: --set eval_temperature=0.5 (repeatable)."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Folder for eval.md and eval.png (default: RUN_DIR/eval of the first run)."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Win rate and length-controlled win rate of each round's policy against a reference on held-out prompts.

    Results go to RUN_DIR/eval/ (resumable: rerun the same command after an interruption); the table of every run
    is printed and written with a plot of all runs to eval.md and eval.png.
    """
    from apo_trainer import evaluation

    labels = [str(d) if [x.name for x in run_dirs].count(d.name) > 1 else d.name for d in run_dirs]
    results = {}
    try:
        with quiet_libraries(quiet):
            for label, run_dir in zip(labels, run_dirs, strict=True):
                results[label] = evaluation.evaluate_run(run_dir, overrides or [], quiet=quiet)
    except BaseException as e:
        stop = interruption(e)
        if stop is None:
            raise
        raise interrupted(stop, "rerun the same command to resume") from None
    out = output or run_dirs[0] / "eval"
    out.mkdir(parents=True, exist_ok=True)
    text = evaluation.table(results)
    (out / "eval.md").write_text(text, encoding="utf-8")
    say(text, end="")
    if importlib.util.find_spec("matplotlib") is not None:
        evaluation.plot(results, out / "eval.png", "win rate against the reference, per round")
        say(f"plot: {out / 'eval.png'}")
    else:
        say("no plot: install matplotlib (pip install 'apo-merge[demo]') for eval.png")


@app.command("config")
def config_reference(
    markdown: Annotated[
        bool,
        typer.Option(
            "--markdown", help="Markdown instead of YAML: one table per group of keys (docs/train.md holds it)."
        ),
    ] = False,
) -> None:
    """Print every config key with its default and help: a YAML file to start from, or Markdown for the docs."""
    from apo_trainer.config import APOConfig

    say(APOConfig.reference_markdown() if markdown else APOConfig.reference_yaml(), end="")


def _register_optional_commands() -> None:
    # The demo lives in its own package; register it only when it is installed beside the trainer.
    try:
        found = importlib.util.find_spec("apo_trainer.demo.cli") is not None
    except ModuleNotFoundError:
        found = False
    if found:
        app.command("demo")(importlib.import_module("apo_trainer.demo.cli").demo)


_register_optional_commands()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``apo-train``); exits with the run's code (see ``apo_merge.shell.run_cli``)."""
    run_cli(PROG, app, argv, owns_process=argv is None)


if __name__ == "__main__":
    main()
