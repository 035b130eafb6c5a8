"""`python -m apo_trainer.demo`: the same command as `apo-train demo`."""

import typer

from apo_merge.shell import run_cli, shell_command
from apo_trainer.demo.cli import demo

if __name__ == "__main__":
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(cls=shell_command("apo-train demo"))(demo)
    run_cli("apo-train demo", app)
