"""Phase 6, extrapolate: theta_{t+1} = theta_hat_{t+1} + alpha (theta_hat_{t+1} - theta_hat_t), saved as a checkpoint.

The step uses the two RAW training outputs (theta_hat_0 = the initial model), never the extrapolated theta_t: that
is Nesterov momentum (see "What APO is" in README.md). The trained weights are updated in place where they live
(the GPU when training ran there, through apo_merge's Triton path; the CPU twin otherwise: fp32 math, one
rounding), with theta_hat_t streamed to the same device in groups. With ``checkpoint_format: dcp`` nothing is
gathered: every process extrapolates its own shards (FSDP2 DTensors; whole tensors otherwise) against theta_hat_t
read into the same layout (``dcp.load`` reshards, so the world size may change between rounds), and writes them as
a DCP folder. alpha = 0 copies theta_hat_{t+1} exactly. With
``restart: score`` the step's alpha comes from ``apo_trainer.restart`` (0 after a round whose score dropped).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from apo_merge import shards
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


def read_previous(source: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """theta_hat_t as CPU tensors in ``state``'s layout and dtypes (this process's shards under FSDP2): from a DCP
    folder (every process takes part), a local Hugging Face folder (only this process's slices are read) or a Hub
    id. Cast to the model's dtypes, as the gathered path loads theta_hat_t in the training dtype."""
    if Path(source).is_dir():
        prev = shards.load_local(source, state)
    else:  # a Hub id (theta_hat_0 only)
        from transformers import AutoModelForCausalLM

        prev = shards.load_local(AutoModelForCausalLM.from_pretrained(source).state_dict(), state)
    return {n: p.to(state[n].dtype) if n in state and state[n].is_floating_point() else p for n, p in prev.items()}


def extrapolate_shards_(*, prev: dict[str, torch.Tensor], state: dict[str, torch.Tensor], alpha: float) -> int:
    """In place on this process's part of ``state`` (a model's state dict: FSDP2 DTensors or whole tensors), against
    ``prev`` in the same layout (``read_previous``); no communication. Returns the tensor count."""
    return extrapolate_state_(prev=prev, cur=shards.local_state(state), alpha=alpha)


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
    if ctx.config.checkpoint_format == "dcp":
        return _run_sharded(ctx, t, model, summary)
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


def _run_sharded(ctx: RunContext, t: int, model: Any | None, summary: dict[str, Any]) -> dict[str, Any]:
    """The extrapolate phase on every process's own shards; round-<t>/policy written as DCP."""
    if ctx.config.restart != "none":
        summary["alpha"] = _broadcast(ctx, summary["alpha"])  # decided on the main process
    holder = ctx.accelerator.unwrap_model(model) if model is not None else ctx.load_policy(ctx.store.trained(t))
    state = holder.state_dict()
    prev = read_previous(previous_raw(ctx, t), state)
    summary["tensors"] = extrapolate_shards_(prev=prev, state=state, alpha=summary["alpha"])
    summary["device"] = str(next(iter(state.values())).device)
    bad = first_new_non_finite(prev, shards.local_state(state))
    if shards.any_rank(bad is not None):
        where = f"{bad[1]} inf/NaN values in {bad[0]} (this process's shard)" if bad else "inf/NaN values"
        raise TrainError(
            f"round {t}, extrapolate phase: theta_{t + 1} = theta_hat_{t + 1} + {summary['alpha']!r} "
            f"(theta_hat_{t + 1} - theta_hat_t) has {where} where theta_hat_t is finite; nothing was written: lower "
            "alpha (with --allow-changed-config) and rerun the same command"
        )
    del prev
    ctx.save_checkpoint(holder, ctx.store.policy(t), round_index=t, phase="extrapolate")
    del state, holder, model
    free_memory()
    return summary


def _broadcast(ctx: RunContext, value: float) -> float:
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0] if ctx.accelerator.num_processes > 1 else value


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
