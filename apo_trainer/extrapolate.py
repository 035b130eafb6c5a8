"""Phase 6, extrapolate: theta_{t+1} = theta_hat_{t+1} + alpha (theta_hat_{t+1} - theta_hat_t), saved as a checkpoint.

The step uses the two RAW training outputs (theta_hat_0 = the initial model), never the extrapolated theta_t: that
is Nesterov momentum (see "What APO is" in README.md). The trained weights are updated in place where they live
(the GPU when training ran there, through apo_merge's Triton path; the CPU twin otherwise: fp32 math, one
rounding), with theta_hat_t streamed to the same device in groups. alpha = 0 copies theta_hat_{t+1} exactly. With
``restart: score`` the step's alpha comes from ``apo_trainer.restart`` (0 after a round whose score dropped).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from apo_merge.state import StateMismatchError, extrapolate_state_dict_
from apo_trainer import restart
from apo_trainer.errors import TrainError
from apo_trainer.runtime import RunContext, free_memory


def previous_raw(ctx: RunContext, t: int) -> str:
    """theta_hat_t: the initial model for t = 0, else round t-1's training output."""
    return ctx.initial_model() if t == 0 else str(ctx.store.trained(t - 1))


def extrapolate_state_(*, prev: dict[str, torch.Tensor], cur: dict[str, torch.Tensor], alpha: float) -> int:
    """In place on ``cur``'s floating tensors: ``cur <- cur + alpha * (cur - prev)``; returns the tensor count.

    ``apo_merge.extrapolate_state_dict_`` (tied tensors once, prev moved to cur's device in groups), with the
    mismatches worded for apo-train's users.
    """
    try:
        return extrapolate_state_dict_(prev=prev, cur=cur, alpha=alpha)
    except StateMismatchError as e:
        if e.kind == "names":
            raise TrainError(
                f"theta_hat_t and theta_hat_t+1 differ in tensor names ({', '.join(e.names[:5])}); both "
                "must be checkpoints of the same architecture"
            ) from None
        if e.kind == "shape":
            (name,), (prev_shape, cur_shape) = e.names, e.shapes
            raise TrainError(f"{name}: shape {prev_shape} in theta_hat_t, {cur_shape} in theta_hat_t+1") from None
        raise TrainError(f"theta_hat_t (prev) and theta_hat_t+1 (cur) do not match: {e}") from None


@torch.no_grad()
def first_new_non_finite(prev: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    """The first of ``out``'s floating tensors holding inf or NaN where ``prev`` is finite, with their count.

    One sum per tensor (finite only when every term is); the exact count only for a tensor whose sum is not.
    """
    for name, x in out.items():
        if not x.is_floating_point() or x.numel() == 0 or math.isfinite(x.sum(dtype=torch.float32).item()):
            continue
        p = prev[name].to(x.device)
        count = int((torch.isfinite(x).logical_not_() & torch.isfinite(p)).sum())
        if count:
            return name, count
    return None


@torch.no_grad()
def run(ctx: RunContext, t: int, model: Any | None) -> dict[str, Any]:
    """Write round-<t>/policy = theta_{t+1}; ``model`` is the trained model in memory, or None to read it back."""
    from transformers import AutoModelForCausalLM

    acc, store = ctx.accelerator, ctx.store
    summary: dict[str, Any] = {"alpha": ctx.config.alpha, "previous": previous_raw(ctx, t)}
    if ctx.config.restart != "none" and ctx.is_main:
        summary.update(_restart(ctx, t))
    if model is not None:
        state = acc.get_state_dict(model)  # every process: a collective under FSDP / DeepSpeed
        holder = acc.unwrap_model(model)
    elif ctx.is_main:
        holder = ctx.load_policy(store.trained(t))  # resumed after the train phase: read theta_hat_{t+1} back
        state = holder.state_dict()
    if ctx.is_main:
        prev = AutoModelForCausalLM.from_pretrained(previous_raw(ctx, t), dtype=ctx.dtype).state_dict()
        summary["tensors"] = extrapolate_state_(prev=prev, cur=state, alpha=summary["alpha"])
        summary["device"] = str(next(iter(state.values())).device)
        bad = first_new_non_finite(prev, state)
        if bad is not None:
            name, count = bad
            raise TrainError(
                f"round {t}, extrapolate phase: theta_{t + 1} = theta_hat_{t + 1} + {summary['alpha']!r} "
                f"(theta_hat_{t + 1} - theta_hat_t) has {count} inf/NaN values in {name} (the first such tensor) "
                "where theta_hat_t is finite; nothing was written: lower alpha (with --allow-changed-config) and "
                "rerun the same command"
            )
        del prev
        tmp = store.tmp_path(store.policy(t))
        holder.save_pretrained(Path(tmp), state_dict=state)
        ctx.tokenizer.save_pretrained(tmp)
        store.commit(tmp, store.policy(t), round_index=t, phase="extrapolate")
        del state, holder
    del model
    free_memory()
    return summary


def _restart(ctx: RunContext, t: int) -> dict[str, Any]:
    """This step's alpha under ``restart: score``, decided from the stored judge scores of rounds 0 .. t."""
    history = restart.score_history(ctx.store, t)
    decision = restart.decide(history, ctx.config.alpha, ctx.config.restart)
    if decision.restarted and not ctx.quiet:
        ctx.accelerator.print(
            f"apo-train: round {t}: mean score {history[-1]:.4g} fell below round {t - 1}'s {history[-2]:.4g}; "
            f"momentum restart: theta_{t + 1} = theta_hat_{t + 1} (alpha 0)"
        )
    return {"alpha": decision.alpha, "restart": decision.restarted}
