"""Phase 3, reference: log pi_theta_t(y|x) of every sampled response, computed once before training.

Training reads these instead of keeping a reference model in memory. The same pass under theta_0 (rounds t > 0)
gives the KL estimate to the initial policy, mean over samples y ~ pi_theta_t of log pi_theta_t(y|x) -
log pi_theta_0(y|x) (the samples follow the configured temperature and top_p, so this estimates the KL of the
sampling distribution when those differ from 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from apo_trainer.runtime import RunContext, free_memory
from apo_trainer.sample import load_samples
from apo_trainer.sequences import collate, sequence_logps


@torch.no_grad()
def all_logps(ctx: RunContext, model_path: str | Path, rows: list[dict[str, Any]], label: str) -> torch.Tensor:
    """Summed response log-probs (prompts, K) in float32 under the checkpoint at ``model_path``.

    Sequences are sorted by length, batched, dealt across processes and gathered; every process returns the
    full tensor.
    """
    cfg, acc = ctx.config, ctx.accelerator
    k = cfg.samples_per_prompt
    seqs = [(i, s) for i in range(len(rows)) for s in range(k)]
    length = {(i, s): len(rows[i]["prompt_ids"]) + len(rows[i]["response_ids"][s]) for i, s in seqs}
    seqs.sort(key=lambda x: -length[x])
    batches = [seqs[b : b + cfg.logprob_batch_size] for b in range(0, len(seqs), cfg.logprob_batch_size)]
    mine = batches[ctx.rank :: acc.num_processes]

    model = ctx.load_policy(model_path)
    model.eval()
    found: list[tuple[tuple[int, int], float]] = []
    with ctx.progress(f"{label}: log-probs", len(batches)) as bar:
        for batch in mine:
            enc = collate(
                [(rows[i]["prompt_ids"], rows[i]["response_ids"][s]) for i, s in batch], ctx.tokenizer.pad_token_id
            )
            enc = {name: v.to(ctx.device) for name, v in enc.items()}
            with acc.autocast():
                lp = sequence_logps(model, **enc)
            found.extend(zip(batch, lp.cpu().tolist(), strict=True))
            bar.advance(acc.num_processes)
    del model
    free_memory()

    from accelerate.utils import gather_object

    values = dict(gather_object(found))
    out = torch.empty((len(rows), k), dtype=torch.float32)
    for (i, s), v in values.items():
        out[i, s] = v
    return out


def run(ctx: RunContext, t: int, policy_path: str | Path) -> dict[str, Any]:
    """Write logprobs.safetensors for round ``t`` ("policy" under theta_t, "initial" under theta_0)."""
    rows = load_samples(ctx, t)
    policy = all_logps(ctx, policy_path, rows, f"round {t}: reference")
    initial = policy.clone() if t == 0 else all_logps(ctx, ctx.initial_model(), rows, f"round {t}: initial model")
    if ctx.is_main:
        tmp = ctx.store.tmp_path(ctx.store.logprobs(t))
        save_file({"policy": policy, "initial": initial}, str(tmp))
        ctx.store.commit(tmp, ctx.store.logprobs(t), round_index=t, phase="reference")
    kl = float((policy - initial).mean()) if t > 0 else 0.0
    return {"kl_to_init": kl, "mean_logp": float(policy.mean())}


def load_logprobs(ctx: RunContext, t: int) -> dict[str, torch.Tensor]:
    """{"policy": (prompts, K), "initial": (prompts, K)} float32 log-probs of round ``t``'s samples."""
    return load_file(str(ctx.store.logprobs(t)))
