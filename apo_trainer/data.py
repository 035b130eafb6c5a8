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


# Preference columns other trainers read; the win rates (SPPO's targets) and scores ride along as extra columns.
_EXTRA = ("p_chosen", "p_rejected", "score_chosen", "score_rejected")


def trainer_rows(
    pairs: list[dict[str, Any]], samples: list[dict[str, Any]], tokenizer: Any, conversational: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Round pairs as (TRL rows, OpenRLHF rows).

    TRL's preference dataset: ``prompt`` / ``chosen`` / ``rejected`` (conversational: message lists, the user turn
    in ``prompt`` and the assistant turn in ``chosen`` / ``rejected``; else the texts). OpenRLHF's train_dpo with
    its default keys (``--prompt_key`` unset, ``--chosen_key chosen``, ``--rejected_key rejected``) reads the
    whole sequence from ``chosen`` / ``rejected`` (the conversation, or prompt and response decoded together);
    ``prompt`` is kept beside them.
    """
    trl, orlhf = [], []
    for p in pairs:
        row = samples[p["prompt"]]
        extra = {k: p[k] for k in _EXTRA if k in p}
        chosen, rejected = row["responses"][p["chosen"]], row["responses"][p["rejected"]]
        if conversational:
            user = [{"role": "user", "content": row["prompt"]}]
            trl.append(
                {
                    "prompt": user,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    **extra,
                }
            )
            orlhf.append(
                {"prompt": user, "chosen": user + trl[-1]["chosen"], "rejected": user + trl[-1]["rejected"], **extra}
            )
            continue
        trl.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, **extra})
        ids = row["prompt_ids"]
        full = [
            tokenizer.decode(ids + row["response_ids"][i], skip_special_tokens=True)
            for i in (p["chosen"], p["rejected"])
        ]
        orlhf.append({"prompt": row["prompt"], "chosen": full[0], "rejected": full[1], **extra})
    return trl, orlhf
