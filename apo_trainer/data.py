"""Phase 4, data: preference pairs from the scores.

Per prompt, chosen = the best-scored response and rejected = the worst (first index on ties); prompts whose K
responses all tie are dropped. Each pair carries the SPPO win-rate estimates of both responses,
``p_i = mean_j P(i beats j)`` over the K samples with ``P = bradley_terry(scores)`` (self-comparison 0.5);
the DPO loss ignores them.
"""

from __future__ import annotations

from typing import Any

from apo_trainer.judge import load_scores
from apo_trainer.oracle import bradley_terry
from apo_trainer.runtime import RunContext
from apo_trainer.store import read_jsonl


def win_rates(scores: list[float]) -> list[float]:
    """p_i = mean over the K samples j of sigmoid(s_i - s_j), the self-comparison counting 0.5."""
    return bradley_terry(scores).mean(dim=1).tolist()


def build_pairs(scores: list[list[float]]) -> tuple[list[dict[str, Any]], int]:
    """(pairs, number of prompts dropped because all their responses tie)."""
    pairs, ties = [], 0
    for i, s in enumerate(scores):
        best = max(range(len(s)), key=s.__getitem__)
        worst = min(range(len(s)), key=s.__getitem__)
        if s[best] == s[worst]:
            ties += 1
            continue
        p = win_rates(s)
        pairs.append(
            {
                "prompt": i,
                "chosen": best,
                "rejected": worst,
                "score_chosen": s[best],
                "score_rejected": s[worst],
                "p_chosen": p[best],
                "p_rejected": p[worst],
            }
        )
    return pairs, ties


def run(ctx: RunContext, t: int) -> dict[str, Any]:
    """Write pairs.jsonl for round ``t`` and return the phase summary."""
    pairs, ties = build_pairs(load_scores(ctx, t))
    if ctx.is_main:
        ctx.store.write_jsonl(ctx.store.pairs(t), pairs, round_index=t, phase="data")
    gap = [p["score_chosen"] - p["score_rejected"] for p in pairs]
    return {"pairs": len(pairs), "tied_prompts": ties, "mean_score_gap": sum(gap) / len(gap) if gap else 0.0}


def load_pairs(ctx: RunContext, t: int) -> list[dict[str, Any]]:
    return read_jsonl(ctx.store.pairs(t))
