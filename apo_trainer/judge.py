"""Phase 2, judge: the oracle's score for every sampled response, batched and split across processes."""

from __future__ import annotations

import json
import math
from typing import Any

from apo_trainer.errors import TrainError
from apo_trainer.oracle import Oracle, judge_failed, load_oracle
from apo_trainer.runtime import RunContext, free_memory
from apo_trainer.sample import load_samples


def run(ctx: RunContext, t: int) -> dict[str, Any]:
    """Score round ``t``'s samples; writes scores.json ([prompt][k] floats) and returns the phase summary."""
    cfg, acc = ctx.config, ctx.accelerator
    rows = load_samples(ctx, t)
    k = cfg.samples_per_prompt
    flat = [(i, s) for i in range(len(rows)) for s in range(k)]
    mine = flat[ctx.rank :: acc.num_processes]

    oracle: Oracle = ctx.oracle or load_oracle(
        cfg.oracle, device=ctx.device, batch_size=cfg.oracle_batch_size, trust_remote_code=cfg.trust_remote_code
    )
    name = cfg.oracle or getattr(oracle, "name", type(oracle).__name__)
    scores_mine: list[float] = []
    batch = cfg.oracle_batch_size
    with ctx.progress(f"round {t}: judging", len(flat)) as bar:
        for start in range(0, len(mine), batch):
            chunk = mine[start : start + batch]
            prompts = [rows[i]["prompt"] for i, _ in chunk]
            responses = [rows[i]["responses"][s] for i, s in chunk]
            try:
                got = [float(x) for x in oracle.score(prompts, responses)]
            except TrainError:
                raise
            except Exception as e:  # the oracle is user code: any failure is reported as its own, in one line
                raise judge_failed(name, t, e) from e
            if len(got) != len(chunk):
                raise TrainError(
                    f"oracle returned {len(got)} scores for {len(chunk)} responses; it must return one "
                    "float per (prompt, response)"
                )
            scores_mine.extend(got)
            bar.advance(len(chunk) * acc.num_processes)
    if oracle is not ctx.oracle and hasattr(oracle, "close"):
        oracle.close()
    free_memory()

    from accelerate.utils import gather_object

    gathered = dict(gather_object([(pos, v) for pos, v in zip(mine, scores_mine, strict=True)]))
    scores = [[gathered[(i, s)] for s in range(k)] for i in range(len(rows))]
    for i, row in enumerate(scores):
        for s, v in enumerate(row):
            if not math.isfinite(v):
                raise TrainError(
                    f"round {t}: the oracle scored prompt {i} response {s} as {v}; it must return finite floats"
                )
    if ctx.is_main:
        ctx.store.write_text(ctx.store.scores(t), json.dumps({"scores": scores}) + "\n", round_index=t, phase="judge")
    flat_scores = [v for row in scores for v in row]
    mean = sum(flat_scores) / len(flat_scores)
    var = sum((v - mean) ** 2 for v in flat_scores) / len(flat_scores)
    return {
        "mean_score": mean,
        "std_score": math.sqrt(var),
        "min_score": min(flat_scores),
        "max_score": max(flat_scores),
    }


def load_scores(ctx: RunContext, t: int) -> list[list[float]]:
    """scores[prompt][k] for round ``t``."""
    return json.loads(ctx.store.scores(t).read_text(encoding="utf-8"))["scores"]
