"""The round record, after the six phases: built from the phase markers, to metrics.jsonl, trackers and the console.

A record for round t describes theta_t's samples (mean_score, std_score, mean_length, kl_to_init, ...) and, when
round t trained, the training that produced theta_hat_{t+1} (train_loss, train_accuracy, ...). ``time_<phase>``
is the wall time of each phase in seconds (as recorded by the run that did the phase).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from apo_trainer.store import PHASES, RunStore

_COLUMNS = (
    ("round", "round", "{}"),
    ("mean_score", "score", "{:.4f}"),
    ("mean_length", "length", "{:.1f}"),
    ("kl_to_init", "KL(init)", "{:.3f}"),
    ("pairs", "pairs", "{}"),
    ("train_loss", "loss", "{:.4f}"),
    ("train_accuracy", "acc", "{:.2f}"),
    ("time_total", "seconds", "{:.1f}"),
)


def round_record(store: RunStore, t: int) -> dict[str, Any]:
    """The log record of round ``t`` from whatever phases of it are done."""
    rec: dict[str, Any] = {"round": t}
    total = 0.0
    for phase in PHASES:
        done = store.done(t, phase)
        if done is None:
            continue
        seconds = done.pop("seconds", 0.0)
        rec[f"time_{phase}"] = seconds
        total += seconds
        rec.update({k: v for k, v in done.items() if k not in ("data_digests", "previous")})
    rec["time_total"] = total
    return rec


def write_metrics(store: RunStore, records: list[dict[str, Any]]) -> None:
    """Rewrite OUTPUT/metrics.jsonl with one record per round (atomically)."""
    store.write_jsonl(store.metrics, records)


def format_row(record: dict[str, Any]) -> list[str]:
    out = []
    for key, _, fmt in _COLUMNS:
        v = record.get(key)
        out.append("-" if v is None else fmt.format(v))
    return out


def print_table(records: list[dict[str, Any]], title: str = "apo-train") -> None:
    """The per-round table on the console (stderr, so stdout stays clean for scripts)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for _, header, _ in _COLUMNS:
        table.add_column(header, justify="right")
    for rec in records:
        table.add_row(*format_row(rec))
    Console(stderr=True).print(table)


def print_round(record: dict[str, Any]) -> None:
    """One line per finished round on stderr."""
    from rich.console import Console

    parts = [f"{header} {cell}" for (_, header, _), cell in zip(_COLUMNS, format_row(record), strict=True)]
    if record.get("restart"):
        parts.append(f"momentum restart (theta_{record['round'] + 1} not extrapolated)")
    Console(stderr=True, soft_wrap=True).print("  ".join(parts), highlight=False)


@contextmanager
def quiet_libraries(on: bool) -> Iterator[None]:
    """-q: transformers' and huggingface_hub's progress bars ("Loading weights") and advice are off as well;
    their settings are given back afterwards (callers in the same process)."""
    if not on:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    level, bars, hub_off = (
        hf_logging.get_verbosity(),
        hf_logging.is_progress_bar_enabled(),
        are_progress_bars_disabled(),
    )
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # huggingface_hub's bars too
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        (disable_progress_bars if hub_off else enable_progress_bars)()
