"""Momentum restart on the demo's toy task: APO-DPO at alpha 0.5 and 0.7, with and without ``restart: score``.

    python bench/restart_study.py [--output restart-study] [--rounds 5] [--seeds 3] [--prompts-per-round 128]

Two demo runs from one warmed-up start (OUTPUT/none/ and OUTPUT/score/, each with its report.md; rerunning
resumes), then one table: the true reward per round (mean ± sd over seeds, paired seeds) and the rounds at which
each seed restarted. Prints it and writes OUTPUT/restart.md. Same as
``apo-train demo --alphas 0.5,0.7 --restart none|score`` run twice.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apo_trainer.demo.report import markdown_table, summarise  # noqa: E402
from apo_trainer.demo.runner import DemoSettings, run_demo  # noqa: E402
from apo_trainer.log import quiet_libraries  # noqa: E402

MODES = ("none", "score")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _progress(label: str, r: dict) -> None:
    mark = "  restart" if r.get("restart") else ""
    _log(f"  {label}: round {r['round']} reward {r['mean_score']:.3f}{mark}")


def study_table(by_mode: dict[str, list]) -> str:
    """Rows (alpha, restart): the reward per round, mean ± sd over seeds, and where each seed restarted."""
    rounds = min(len(r.records) for runs in by_mode.values() for r in runs)
    header = ["alpha", "restart", *(f"round {t}" for t in range(rounds)), "restarts (seed: rounds)"]
    rows = []
    alphas = sorted({r.alpha for runs in by_mode.values() for r in runs})
    for alpha in alphas:
        for mode, runs in by_mode.items():
            cells = summarise([r for r in runs if r.alpha == alpha], "mean_score")[("dpo", alpha)]
            where = []
            for run in sorted((r for r in runs if r.alpha == alpha), key=lambda r: r.seed):
                hit = [str(rec["round"]) for rec in run.records if rec.get("restart")]
                where.append(f"{run.seed}: {','.join(hit) or '-'}")
            rows.append(
                [
                    f"{alpha:g}",
                    mode,
                    *(str(c) for c in cells[:rounds]),
                    "; ".join(where) if mode != "none" else "",
                ]
            )
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("restart-study"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--alphas", default="0.5,0.7")
    parser.add_argument("--prompts-per-round", type=int, default=128)
    parser.add_argument("--jobs", type=int, default=None, help="runs at once per mode (default: one per core, max 4)")
    args = parser.parse_args()
    alphas = tuple(float(a) for a in args.alphas.split(","))

    by_mode, seconds = {}, {}
    for mode in MODES:
        settings = DemoSettings(
            output=args.output / mode,
            rounds=args.rounds,
            seeds=args.seeds,
            alphas=alphas,
            prompts_per_round=args.prompts_per_round,
            restart=mode,
        )
        first = args.output / MODES[0] / "start"
        if mode != MODES[0] and first.exists() and not (settings.output / "start").exists():
            shutil.copytree(first, settings.output / "start")  # the warm-up is seeded: this only saves time
        t0 = time.perf_counter()
        with quiet_libraries(True):
            by_mode[mode] = run_demo(settings, jobs=args.jobs, log=_log, on_record=_progress)
        seconds[mode] = time.perf_counter() - t0
    text = (
        f"# Momentum restart: APO-DPO, {args.rounds} rounds, {args.seeds} seeds, {args.prompts_per_round} prompts "
        "per round\n\nTrue reward per round (mean ± sd over seeds; round "
        f"{args.rounds} is the final evaluation).\n\n"
        + study_table(by_mode)
        + "\n"
        + " ".join(f"{m}: {s:.0f} s." for m, s in seconds.items())
        + "\n"
    )
    (args.output / "restart.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
