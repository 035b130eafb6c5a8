"""The paper's open questions on the demo's toy task, with seeds and spread.

    python bench/demo_sweeps.py [--output bench-sweeps] [--rounds 3] [--seeds 3] [--only alpha,sppo,length]

Experiments (each a full demo run with its own report.md and report.png under OUTPUT/<name>/):
- alpha: iterative DPO and APO with alpha in {0, 0.1, 0.3, 0.5, 0.7}: how much extrapolation helps, where it stops;
- sppo:  APO with the SPPO loss (alpha 0.3) against iterative SPPO, which the paper never ran;
- length: responses of free length (the policy ends them), DPO with alpha 0 and 0.3: does extrapolation change
  response length over rounds (the paper notes APO's longer responses)?
Prints a markdown summary (also OUTPUT/sweeps.md) with the wall time of each experiment.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apo_trainer.demo.cli import SPPO_BETA  # noqa: E402
from apo_trainer.demo.report import markdown_table, method_name, summarise, verdict  # noqa: E402
from apo_trainer.demo.runner import DemoSettings, run_demo  # noqa: E402
from apo_trainer.demo.task import ToyTask  # noqa: E402
from apo_trainer.log import quiet_libraries  # noqa: E402

EXPERIMENTS = ("alpha", "sppo", "length")


def settings_for(name: str, output: Path, rounds: int, seeds: int) -> DemoSettings:
    base = dict(output=output / name, rounds=rounds, seeds=seeds)
    if name == "alpha":
        return DemoSettings(alphas=(0.0, 0.1, 0.3, 0.5, 0.7), **base)
    if name == "sppo":
        return DemoSettings(alphas=(0.0, 0.3), loss="sppo", beta=SPPO_BETA, **base)
    if name == "length":
        return DemoSettings(alphas=(0.0, 0.3), task=ToyTask(free_length=True), **base)
    raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")


def per_round_table(runs, metric: str) -> str:
    """One row per method, one column per round: mean ± sd over seeds."""
    cells = summarise(runs, metric)
    n = max(len(c) for c in cells.values())
    header = ["method", *(f"round {t}" for t in range(n))]
    rows = [[method_name(*key), *(str(c) for c in row)] for key, row in cells.items()]
    return markdown_table(header, rows)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _progress(label: str, r: dict) -> None:
    _log(f"  {label}: round {r['round']} reward {r['mean_score']:.3f} length {r['mean_length']:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("bench-sweeps"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=None, help="runs at once (default: one per CPU core, max 4)")
    parser.add_argument("--only", default=",".join(EXPERIMENTS), help="comma-separated subset of experiments")
    args = parser.parse_args()

    out: list[str] = [f"# Toy-task sweeps ({args.rounds} rounds, {args.seeds} seeds per method)\n"]
    shared_start: dict[ToyTask, Path] = {}
    for name in [x.strip() for x in args.only.split(",") if x.strip()]:
        settings = settings_for(name, args.output, args.rounds, args.seeds)
        start = settings.output / "start"
        # The same task gets the same warmed-up start (the warm-up is seeded, so this only saves time).
        if settings.task in shared_start and not start.exists():
            shutil.copytree(shared_start[settings.task], start)
        t0 = time.perf_counter()
        with quiet_libraries(True):
            runs = run_demo(settings, jobs=args.jobs, log=_log, on_record=_progress)
        seconds = time.perf_counter() - t0
        shared_start.setdefault(settings.task, start)
        out += [
            f"## {name} ({len(runs)} runs, {seconds:.0f} s; details in {settings.output}/report.md)\n",
            "True reward per round (mean ± sd over seeds):\n",
            per_round_table(runs, "mean_score"),
            "Response length per round (tokens):\n",
            per_round_table(runs, "mean_length"),
            "KL to the start per round:\n",
            per_round_table(runs, "kl_to_init"),
            *[line + "\n" for line in verdict(runs)],
        ]
        text = "\n".join(out)
        (args.output / "sweeps.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
