"""Phase 2, judge: every sampled response's preference against the other K - 1 of its prompt, batched and split
across processes.

A scalar oracle scores each response once and the K x K matrix is Bradley-Terry's ``sigmoid(s_i - s_j)``; a
pairwise oracle is asked every ordered pair (both orders, averaged: ``P_ij = 1/2 + (f(i, j) - f(j, i)) / 2``). Either
way each response's win rate against the policy is ``p_i = mean_j P_ij`` with ``P_ii = 1/2`` (SPPO's estimate of
P(y_i beats pi_t | x)), and the data phase picks pairs from ``p``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from apo_merge.errors import shorten
from apo_merge.shell import DEBUG_ENV
from apo_trainer.errors import TrainError
from apo_trainer.oracle import (
    Oracle,
    PairwiseOracle,
    bradley_terry,
    compare_batched,
    is_pairwise,
    load_oracle,
    matrix_from_comparisons,
    ordered_pairs,
    user_oracle,
)
from apo_trainer.runtime import RunContext, free_memory
from apo_trainer.sample import load_samples
from apo_trainer.store import dumps


def run(ctx: RunContext, t: int) -> dict[str, Any]:
    """Judge round ``t``'s samples; writes scores.json and returns the phase summary.

    scores.json holds ``win_rates`` ([prompt][k] p_i), ``matrices`` ([prompt][i][j] P_ij) and, for a scalar oracle,
    ``scores`` ([prompt][k] the oracle's scores; null for a pairwise one).
    """
    cfg = ctx.config
    rows = load_samples(ctx, t)
    oracle = ctx.oracle or build_oracle(cfg, ctx.device, ctx.store.root)
    name = cfg.oracle or getattr(oracle, "name", type(oracle).__name__)
    prompts = [r["prompt"] for r in rows]
    responses = [r["responses"] for r in rows]
    with ctx.progress(f"round {t}: judging", len(rows)) as bar, user_oracle(name, t, "judge"):
        if is_pairwise(oracle):
            scores = None
            matrices = _pairwise(ctx, oracle, prompts, responses)
        else:
            scores = _scalar(ctx, t, oracle, prompts, responses)
            matrices = [bradley_terry(s) for s in scores]
        bar.advance(len(rows))
    if oracle is not ctx.oracle and hasattr(oracle, "close"):
        oracle.close()
    free_memory()
    win_rates = [m.mean(dim=1).tolist() for m in matrices]
    if ctx.is_main:
        body = {"scores": scores, "win_rates": win_rates, "matrices": [m.tolist() for m in matrices]}
        ctx.store.write_text(ctx.store.scores(t), dumps(body, ctx.store.scores(t)) + "\n", round_index=t, phase="judge")
    if scores is None:
        # Every P_ij + P_ji = 1, so mean p_i is 1/2 by construction: report the spread of the win rates instead.
        flat = [v for row in win_rates for v in row]
        return {
            "judge": "pairwise",
            "mean_best_win_rate": sum(max(r) for r in win_rates) / len(win_rates),
            "min_win_rate": min(flat),
            "max_win_rate": max(flat),
        }
    flat = [v for row in scores for v in row]
    mean = sum(flat) / len(flat)
    var = sum((v - mean) ** 2 for v in flat) / len(flat)
    return {"mean_score": mean, "std_score": math.sqrt(var), "min_score": min(flat), "max_score": max(flat)}


def _scalar(ctx: RunContext, t: int, oracle: Oracle, prompts: list[str], responses: list[list[str]]):
    cfg, acc = ctx.config, ctx.accelerator
    k = cfg.samples_per_prompt
    flat = [(i, s) for i in range(len(prompts)) for s in range(k)]
    mine = flat[ctx.rank :: acc.num_processes]
    got_mine: list[float] = []
    for start in range(0, len(mine), cfg.oracle_batch_size):
        chunk = mine[start : start + cfg.oracle_batch_size]
        got = oracle.score([prompts[i] for i, _ in chunk], [responses[i][s] for i, s in chunk])
        got_mine.extend(checked_scores(got, len(chunk)))
    from accelerate.utils import gather_object

    gathered = dict(gather_object(list(zip(mine, got_mine, strict=True))))
    scores = [[gathered[(i, s)] for s in range(k)] for i in range(len(prompts))]
    for i, row in enumerate(scores):
        for s, v in enumerate(row):
            check_score(v, t, f"prompt {i} response {s}")
    return scores


def check_score(value: float, t: int, what: str) -> None:
    """One judge score as the trainer accepts it: a finite float (NaN or inf would poison every mean after it).
    Training's judge phase and ``apo-train eval`` both check every score here."""
    if not math.isfinite(value):
        raise TrainError(f"round {t}: the oracle scored {what} as {value}; it must return finite floats")


def checked_scores(got: Sequence[Any], n: int) -> list[float]:
    """``got`` (an oracle's answer for ``n`` responses) as floats, one per response; ``check_score`` each next."""
    if len(got) != n:
        raise TrainError(
            f"oracle returned {len(got)} scores for {n} responses; it must return one float per (prompt, response)"
        )
    return [float(x) for x in got]


def _pairwise(
    ctx: RunContext, oracle: PairwiseOracle, prompts: list[str], responses: list[list[str]]
) -> list[torch.Tensor]:
    cfg, acc = ctx.config, ctx.accelerator
    k = cfg.samples_per_prompt
    queries = [(i, a, b) for i in range(len(prompts)) for a, b in ordered_pairs(k)]
    mine = queries[ctx.rank :: acc.num_processes]
    got = compare_batched(oracle, mine, prompts, responses, cfg.oracle_batch_size)
    from accelerate.utils import gather_object

    gathered = dict(gather_object(list(zip(mine, got, strict=True))))
    return [
        matrix_from_comparisons(k, {(a, b): gathered[(i, a, b)] for a, b in ordered_pairs(k)})
        for i in range(len(prompts))
    ]


def build_oracle(cfg: Any, device: torch.device | str, cache_dir: Path | None = None) -> Oracle | PairwiseOracle:
    """The configured oracle, built now (its module imported, its model loaded): one line naming the oracle and
    what failed, exit code 1, when it cannot be. Runs before the first sample, so a judge that cannot load costs
    nothing."""
    try:
        return load_oracle(
            cfg.oracle,
            device=device,
            batch_size=cfg.oracle_batch_size,
            trust_remote_code=cfg.trust_remote_code,
            cache_dir=cache_dir,  # the LLM judge's verdict cache
        )
    except TrainError:
        raise
    except Exception as e:  # the oracle's own code and its libraries fail in any way while loading
        detail = shorten(" ".join(str(e).split()) or "no message", 300)
        raise TrainError(
            f"the oracle {cfg.oracle} cannot be built ({type(e).__name__}: {detail}); fix it and rerun "
            f"({DEBUG_ENV}=1 shows the traceback)"
        ) from e


def load_judgement(ctx: RunContext, t: int) -> dict[str, Any]:
    """scores.json of round ``t``: ``win_rates``, ``matrices`` and ``scores`` (None for a pairwise judge)."""
    return json.loads(ctx.store.scores(t).read_text(encoding="utf-8"))


def load_scores(ctx: RunContext, t: int) -> list[list[float]] | None:
    """scores[prompt][k] for round ``t`` (None for a pairwise judge)."""
    return load_judgement(ctx, t)["scores"]
