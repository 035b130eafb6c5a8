"""Phase 4, data: preference pairs from the judge's win rates.

Per prompt, chosen = the response with the highest win rate against the policy, ``p_i = mean_j P_ij`` over the K
samples (self-comparison 1/2), and rejected = the lowest (first index on ties); prompts whose K responses all tie
are dropped. Each pair carries p of both responses (SPPO's targets; the DPO loss ignores them). For a scalar
oracle P is Bradley-Terry's ``sigmoid(s_i - s_j)``, increasing in s_i, so the pairs are its best and worst scores.
"""

from __future__ import annotations

from typing import Any

from apo_trainer.judge import load_judgement
from apo_trainer.oracle import bradley_terry
from apo_trainer.runtime import RunContext
from apo_trainer.store import read_jsonl


def win_rates(scores: list[float]) -> list[float]:
    """p_i = mean over the K samples j of sigmoid(s_i - s_j), the self-comparison counting 0.5."""
    return bradley_terry(scores).mean(dim=1).tolist()


def build_pairs(
    scores: list[list[float]] | None, p: list[list[float]] | None = None
) -> tuple[list[dict[str, Any]], int]:
    """(pairs, number of prompts dropped because all their responses tie) from the win rates ``p`` (computed
    from ``scores`` through Bradley-Terry when not given). ``scores`` may be None (pairwise judge)."""
    if p is None:
        p = [win_rates(s) for s in scores]
    pairs, ties = [], 0
    for i, w in enumerate(p):
        best = max(range(len(w)), key=w.__getitem__)
        worst = min(range(len(w)), key=w.__getitem__)
        if w[best] == w[worst]:
            ties += 1
            continue
        pair = {"prompt": i, "chosen": best, "rejected": worst}
        if scores is not None:
            pair.update(score_chosen=scores[i][best], score_rejected=scores[i][worst])
        pairs.append({**pair, "p_chosen": w[best], "p_rejected": w[worst]})
    return pairs, ties


def run(ctx: RunContext, t: int) -> dict[str, Any]:
    """Write pairs.jsonl for round ``t`` and return the phase summary."""
    judged = load_judgement(ctx, t)
    pairs, ties = build_pairs(judged["scores"], judged["win_rates"])
    if ctx.is_main:
        ctx.store.write_jsonl(ctx.store.pairs(t), pairs, round_index=t, phase="data")
    gap = [p["p_chosen"] - p["p_rejected"] for p in pairs]
    summary = {"pairs": len(pairs), "tied_prompts": ties, "mean_win_rate_gap": sum(gap) / len(gap) if gap else 0.0}
    if judged["scores"] is not None:
        gap = [p["score_chosen"] - p["score_rejected"] for p in pairs]
        summary["mean_score_gap"] = sum(gap) / len(gap) if gap else 0.0
    return summary


def load_pairs(ctx: RunContext, t: int) -> list[dict[str, Any]]:
    return read_jsonl(ctx.store.pairs(t))
