"""Summaries of demo runs: a table per method and round, a plain verdict, report.md and report.png."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

METRICS = {
    "mean_score": "true reward",
    "mean_length": "response length",
    "kl_to_init": "KL to start",
    "win_rate": "win rate vs theta_0",
    "lc_win_rate": "LC win rate vs theta_0",
}


@dataclass(frozen=True)
class Run:
    """One finished run: its method (loss and alpha), seed and per-round records from ``apo_trainer.loop.run``."""

    loss: str
    alpha: float
    seed: int
    records: list[dict]

    @property
    def method(self) -> str:
        return method_name(self.loss, self.alpha)


@dataclass(frozen=True)
class Cell:
    """A metric over seeds at one round: mean, sample standard deviation (0 for one seed) and per-seed values."""

    mean: float
    sd: float
    values: tuple[float, ...]

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.sd:.3f}" if len(self.values) > 1 else f"{self.mean:.3f}"


def method_name(loss: str, alpha: float) -> str:
    """'iterative DPO' for alpha 0, 'APO-DPO (alpha 0.3)' otherwise."""
    return f"iterative {loss.upper()}" if alpha == 0 else f"APO-{loss.upper()} (alpha {alpha:g})"


def summarise(runs: Sequence[Run], metric: str) -> dict[tuple[str, float], list[Cell]]:
    """(loss, alpha) -> one Cell per round (rounds every seed of the method reached), for ``metric``."""
    out: dict[tuple[str, float], list[Cell]] = {}
    for key in _methods(runs):
        group = [r for r in runs if (r.loss, r.alpha) == key]
        n_rounds = min(sum(metric in rec for rec in r.records) for r in group)
        cells = []
        for t in range(n_rounds):
            values = tuple(float(r.records[t][metric]) for r in sorted(group, key=lambda r: r.seed))
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(Cell(statistics.fmean(values), sd, values))
        out[key] = cells
    return out


def table_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: method, round, then each metric as mean ± sd over seeds."""
    sums = {m: summarise(runs, m) for m in METRICS}
    header = ["method", "round", *(f"{label} (mean ± sd)" for label in METRICS.values()), "per-seed reward"]
    rows = []
    for key, reward_cells in sums["mean_score"].items():
        for t, cell in enumerate(reward_cells):
            rows.append(
                [
                    method_name(*key),
                    str(t),
                    *(str(sums[m][key][t]) if t < len(sums[m][key]) else "-" for m in METRICS),
                    " ".join(f"{v:.3f}" for v in cell.values),
                ]
            )
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def verdict(runs: Sequence[Run]) -> list[str]:
    """Plain sentences comparing each alpha > 0 with alpha 0 of the same loss, seed by seed, at the last round.

    "wins" needs the extrapolated run ahead in every seed, "loses" behind in every seed; anything else is
    reported as no clear difference. Also says whether and when it reached the baseline's final reward.
    """
    rewards, kls = summarise(runs, "mean_score"), summarise(runs, "kl_to_init")
    out = []
    for (loss, alpha), cells in rewards.items():
        base = rewards.get((loss, 0.0))
        if alpha == 0 or base is None:
            continue
        t = min(len(cells), len(base)) - 1
        if t < 1:
            continue
        seeds = min(len(cells[t].values), len(base[t].values))
        diffs = [a - b for a, b in zip(cells[t].values[:seeds], base[t].values[:seeds], strict=True)]
        ahead = sum(d > 0 for d in diffs)
        if ahead == len(diffs):
            word = "wins"
        elif ahead == 0:
            word = "loses"
        else:
            word = "shows no clear difference"
        name, base_name = method_name(loss, alpha), method_name(loss, 0.0)
        out.append(
            f"**{name} {word} against {base_name} on this run.** After {t} rounds its true reward is "
            f"{cells[t]} against {base[t]} (difference {statistics.fmean(diffs):+.3f}; ahead in {ahead} "
            f"of {len(diffs)} seeds, paired by seed)."
        )
        reached = next((s for s in range(1, t + 1) if cells[s].mean >= base[t].mean), None)
        if reached is not None and reached < t:
            out.append(
                f"It reached the baseline's round-{t} reward ({base[t].mean:.3f}) at round {reached}, "
                f"{t - reached} round(s) earlier."
            )
        elif reached is None:
            out.append(f"It did not reach the baseline's round-{t} reward ({base[t].mean:.3f}).")
        k, kb = kls[(loss, alpha)][t], kls[(loss, 0.0)][t]
        out.append(
            f"Its KL to the start after {t} rounds is {k} against {kb}: the extrapolation moves the policy "
            f"{'further from' if k.mean > kb.mean else 'no further from'} the starting model."
        )
    return out


def plot(runs: Sequence[Run], path: Path, title: str) -> Path:
    """report.png: per round, true reward, response length and KL to the start, mean with a ±sd band per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.6 * len(METRICS), 3.4), dpi=90)
    for ax, (metric, label) in zip(axes, METRICS.items(), strict=True):
        for key, cells in summarise(runs, metric).items():
            x = list(range(len(cells)))
            mean = [c.mean for c in cells]
            lo = [c.mean - c.sd for c in cells]
            hi = [c.mean + c.sd for c in cells]
            (line,) = ax.plot(x, mean, marker="o", label=method_name(*key))
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        if metric == "mean_length":
            ax.set_ylim(bottom=0, top=max(1.0, ax.get_ylim()[1] * 1.1))
        ax.set_xlabel("round")
        ax.set_title(label)
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _methods(runs: Sequence[Run]) -> list[tuple[str, float]]:
    return sorted({(r.loss, r.alpha) for r in runs}, key=lambda k: (k[0], k[1]))
