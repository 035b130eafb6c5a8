"""`apo-train demo`: iterative DPO against APO on a known-reward toy task, on the CPU in minutes."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Annotated

import typer

from apo_merge.cliopts import takes
from apo_trainer.demo.runner import SPPO_BETA, DemoSettings  # noqa: F401 - SPPO_BETA: bench/demo_sweeps.py
from apo_trainer.errors import TrainError

LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
LORA_LR = 3e-3  # LoRA factors take larger steps than full weights


@takes(DemoSettings, "settings")
def demo(
    settings: DemoSettings,  # every DemoSettings field with a help text is an option (apo_merge.cliopts)
    peft: Annotated[
        bool,
        typer.Option(
            "--peft",
            help=f"LoRA rounds (r {LORA['r']}, lora_alpha {LORA['lora_alpha']}, all Linear layers, learning rate "
            f"{LORA_LR:g}) instead of training every weight; needs peft.",
        ),
    ] = False,
    jobs: Annotated[
        int | None,
        typer.Option(min=1, help="Runs at once, each in its own process (default: one per CPU core, at most 4)."),
    ] = None,
) -> None:
    """Run iterative DPO (alpha 0) and APO (alpha 0.3) from the same warmed-up toy policy and report.

    Writes OUTPUT/report.md and OUTPUT/report.png: per round, the true reward (mean and spread over seeds),
    response length, KL to the start, and the win rate and length-controlled win rate against theta_0 on held-out
    prompts. The defaults take a few minutes on 2 CPU cores.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from apo_trainer.demo.report import table_rows, verdict
    from apo_trainer.demo.runner import run_demo
    from apo_trainer.log import quiet_libraries

    if importlib.util.find_spec("matplotlib") is None:  # a missing package: the state of the machine, exit 1
        raise TrainError("demo: the report's plot needs matplotlib; install it with pip install 'apo-merge[demo]'")
    if peft:
        from apo_trainer.config import peft_group
        from apo_trainer.lora import require_peft

        require_peft()
        settings = dataclasses.replace(settings, peft=peft_group(LORA, "--peft"), learning_rate=LORA_LR)
    console = Console()
    total = len(settings.alphas) * settings.seeds * (settings.rounds + 1)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        bar = progress.add_task("rounds", total=total)

        def on_record(label: str, record: dict) -> None:
            progress.console.print(
                f"{label}: round {record['round']}  reward {record['mean_score']:.3f}  "
                f"length {record['mean_length']:.1f}  KL {record['kl_to_init']:.2f}"
                + ("  momentum restart (alpha 0)" if record.get("restart") else "")
            )
            progress.advance(bar)

        with quiet_libraries(True):
            runs = run_demo(settings, jobs=jobs, log=progress.console.print, on_record=on_record)
    header, rows = table_rows(runs)
    table = Table(*header, title="true reward, length and KL per round (mean ± sd over seeds)")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in verdict(runs):
        console.print(line.replace("**", ""))
    console.print(f"wrote {settings.output / 'report.md'} and {settings.output / 'report.png'}")
