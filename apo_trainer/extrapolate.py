"""Phase 7, extrapolate: theta_{t+1} = theta_hat_{t+1} + alpha (theta_hat_{t+1} - theta_hat_t), saved as a checkpoint.

The step uses the two RAW training outputs (theta_hat_0 = the initial model), never the extrapolated theta_t: that
is Nesterov momentum (see docs/apo.md). The trained weights are updated in place where they live (the GPU when
training ran there, through apo_merge's Triton path; the CPU twin otherwise: fp32 math, one rounding), with
theta_hat_t streamed to the same device in groups. alpha = 0 copies theta_hat_{t+1} exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from apo_merge import extrapolate_tensors_
from apo_trainer.errors import TrainError
from apo_trainer.runtime import RunContext, free_memory

_GROUP_BYTES = 1 << 28


def previous_raw(ctx: RunContext, t: int) -> str:
    """theta_hat_t: the initial model for t = 0, else round t-1's training output."""
    return ctx.initial_model() if t == 0 else str(ctx.store.trained(t - 1))


def extrapolate_state_(cur: dict[str, torch.Tensor], prev: dict[str, torch.Tensor], alpha: float) -> int:
    """In place on ``cur``'s floating tensors: ``cur <- cur + alpha * (cur - prev)``; returns the tensor count.

    Tensors sharing storage (tied embeddings) are updated once. ``prev`` tensors move to each ``cur`` tensor's
    device in groups of about 256 MiB.
    """
    missing = sorted(set(cur) ^ set(prev))
    if missing:
        raise TrainError(
            f"theta_hat_t and theta_hat_t+1 differ in tensor names ({', '.join(missing[:5])}); both "
            "must be checkpoints of the same architecture"
        )
    seen: set[int] = set()
    names = []
    for name, c in cur.items():
        if not c.is_floating_point() or c.numel() == 0 or c.data_ptr() in seen:
            continue
        if prev[name].shape != c.shape:
            raise TrainError(
                f"{name}: shape {tuple(prev[name].shape)} in theta_hat_t, {tuple(c.shape)} in theta_hat_t+1"
            )
        seen.add(c.data_ptr())
        names.append(name)
    group: list[str] = []
    size = 0
    for name in [*names, None]:
        if name is not None:
            group.append(name)
            size += cur[name].numel() * cur[name].element_size()
        if group and (name is None or size >= _GROUP_BYTES):
            curs = [cur[n] for n in group]
            prevs = [prev[n].to(cur[n].device, non_blocking=True) for n in group]
            extrapolate_tensors_(curs, prevs, alpha)
            group, size = [], 0
    return len(names)


@torch.no_grad()
def run(ctx: RunContext, t: int, model: Any | None) -> dict[str, Any]:
    """Write round-<t>/policy = theta_{t+1}; ``model`` is the trained model in memory, or None to read it back."""
    from transformers import AutoModelForCausalLM

    acc, store = ctx.accelerator, ctx.store
    summary: dict[str, Any] = {"alpha": ctx.config.alpha, "previous": previous_raw(ctx, t)}
    if model is not None:
        state = acc.get_state_dict(model)  # every process: a collective under FSDP / DeepSpeed
        holder = acc.unwrap_model(model)
    elif ctx.is_main:
        holder = ctx.load_policy(store.trained(t))  # resumed after the train phase: read theta_hat_{t+1} back
        state = holder.state_dict()
    if ctx.is_main:
        prev = AutoModelForCausalLM.from_pretrained(previous_raw(ctx, t), dtype=ctx.dtype).state_dict()
        summary["tensors"] = extrapolate_state_(state, prev, ctx.config.alpha)
        summary["device"] = str(next(iter(state.values())).device)
        del prev
        tmp = store.tmp_path(store.policy(t))
        holder.save_pretrained(Path(tmp), state_dict=state)
        ctx.tokenizer.save_pretrained(tmp)
        store.commit(tmp, store.policy(t), round_index=t, phase="extrapolate")
        del state, holder
    del model
    free_memory()
    return summary
