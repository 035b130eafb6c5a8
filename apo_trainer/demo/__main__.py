"""`python -m apo_trainer.demo`: the same command as `apo-train demo`."""

import typer

from apo_trainer.demo.cli import demo

if __name__ == "__main__":
    typer.run(demo)
