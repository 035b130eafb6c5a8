"""`apo-train demo`: iterative DPO against APO on a known-reward toy task, on the CPU in minutes."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Annotated

import typer

from apo_trainer.demo.task import ToyTask
from apo_trainer.errors import TrainError

SPPO_BETA = 0.01
LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
LORA_LR = 3e-3  # LoRA factors take larger steps than full weights


def demo(
    rounds: Annotated[int, typer.Option(min=1, help="APO rounds per run.")] = 3,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per method (spread over seeds is reported).")] = 3,
    alphas: Annotated[
        str, typer.Option(help="Comma-separated extrapolation weights; 0 is plain iterative DPO/SPPO.")
    ] = "0,0.3",
    loss: Annotated[str, typer.Option(help="Preference loss: dpo or sppo.")] = "dpo",
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Output folder (a rerun with the same settings resumes).")
    ] = Path("apo-demo"),
    prompts_per_round: Annotated[int, typer.Option(min=8, help="Fresh prompts per round.")] = 512,
    samples: Annotated[int, typer.Option(min=2, help="Samples per prompt.")] = 8,
    eval_prompts: Annotated[
        int, typer.Option(min=8, help="Held-out prompts for the win rates against theta_0 (and the final round).")
    ] = 128,
    beta: Annotated[
        float | None, typer.Option(help=f"Loss temperature (default 0.1 for DPO, {SPPO_BETA:g} for SPPO).")
    ] = None,
    free_length: Annotated[
        bool,
        typer.Option(
            help="Let the policy choose its response length (end-of-sequence token) instead of exactly 12 words."
        ),
    ] = False,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Supervised warm-up steps of the starting policy.")] = 150,
    restart: Annotated[
        str,
        typer.Option(
            help="Momentum restart: 'score' extrapolates with alpha 0 after a round whose mean reward dropped; "
            "'none' never restarts."
        ),
    ] = "none",
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
    from apo_trainer.demo.runner import DemoSettings, quiet_transformers, run_demo

    if importlib.util.find_spec("matplotlib") is None:  # a missing package: the state of the machine, exit 1
        raise TrainError("demo: the report's plot needs matplotlib; install it with pip install 'apo-merge[demo]'")
    alpha_values = _parse_alphas(alphas)
    if loss not in ("dpo", "sppo"):
        raise typer.BadParameter(f"unknown loss {loss!r}; use dpo or sppo", param_hint="--loss")
    if restart not in ("none", "score"):
        raise typer.BadParameter(f"unknown restart {restart!r}; use none or score", param_hint="--restart")
    settings = DemoSettings(
        output=output,
        rounds=rounds,
        seeds=seeds,
        alphas=alpha_values,
        loss=loss,
        prompts_per_round=prompts_per_round,
        samples_per_prompt=samples,
        eval_prompts=eval_prompts,
        beta=beta if beta is not None else (0.1 if loss == "dpo" else SPPO_BETA),
        task=ToyTask(free_length=free_length, warmup_steps=warmup_steps),
        restart=restart,
    )
    if peft:
        from apo_trainer.config import peft_group
        from apo_trainer.lora import require_peft

        require_peft()
        settings = dataclasses.replace(settings, peft=peft_group(LORA, "--peft"), learning_rate=LORA_LR)
    console = Console()
    total = len(alpha_values) * seeds * (rounds + 1)
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

        with quiet_transformers():
            runs = run_demo(settings, jobs=jobs, log=progress.console.print, on_record=on_record)
    header, rows = table_rows(runs)
    table = Table(*header, title="true reward, length and KL per round (mean ± sd over seeds)")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in verdict(runs):
        console.print(line.replace("**", ""))
    console.print(f"wrote {output / 'report.md'} and {output / 'report.png'}")


def _parse_alphas(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a comma-separated list of numbers, e.g. 0,0.3", param_hint="--alphas"
        ) from None
    if not values or any(a < 0 for a in values):
        raise typer.BadParameter("give at least one alpha, none negative, e.g. 0,0.3", param_hint="--alphas")
    return values
