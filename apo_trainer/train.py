"""Phase 5, train: theta_hat_{t+1} from theta_t with the preference loss, then save it.

The reference is pi_theta_t through the log-probs stored by the reference phase (no reference model in memory).
accelerate prepares model, optimizer and data (DDP / FSDP / DeepSpeed per ``accelerate config``); gradients
accumulate over ``grad_accum`` micro-batches, are clipped only when they sync, and AdamW restarts every round with
linear warm-up. Per optimizer step, loss, reward margin, preference accuracy and chosen / rejected log-probs are
summed across processes and written to ``round-<t>/train_log.jsonl`` (and the accelerate trackers). A round
without pairs (every prompt tied) takes no step: theta_hat_{t+1} = theta_t. With ``peft`` set, a fresh LoRA on the
frozen theta_t is trained instead, saved to ``round-<t>/adapter`` and merged exactly (apo_trainer.lora).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from apo_trainer import lora
from apo_trainer.data import load_pairs
from apo_trainer.errors import TrainError
from apo_trainer.losses import dpo_loss, sppo_loss
from apo_trainer.reference import load_logprobs
from apo_trainer.runtime import RunContext, phase_seed
from apo_trainer.sample import load_samples
from apo_trainer.sequences import collate, sequence_logps


class _Items(Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class _Collate:
    """Chosen rows first, then rejected rows: one forward pass over 2B sequences."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [(b["prompt_ids"], b["chosen_ids"]) for b in batch] + [
            (b["prompt_ids"], b["rejected_ids"]) for b in batch
        ]
        enc = collate(seqs, self.pad_id)
        enc["ref_logps"] = torch.tensor(
            [b["ref_chosen"] for b in batch] + [b["ref_rejected"] for b in batch], dtype=torch.float32
        )
        enc["win_rates"] = torch.tensor(
            [b["p_chosen"] for b in batch] + [b["p_rejected"] for b in batch], dtype=torch.float32
        )
        return enc


def training_items(ctx: RunContext, t: int) -> list[dict[str, Any]]:
    """Round ``t``'s pairs joined with their token ids and reference log-probs."""
    rows = load_samples(ctx, t)
    ref = load_logprobs(ctx, t)["policy"]
    items = []
    for p in load_pairs(ctx, t):
        row, c, r = rows[p["prompt"]], p["chosen"], p["rejected"]
        items.append(
            {
                "prompt_ids": row["prompt_ids"],
                "chosen_ids": row["response_ids"][c],
                "rejected_ids": row["response_ids"][r],
                "ref_chosen": float(ref[p["prompt"], c]),
                "ref_rejected": float(ref[p["prompt"], r]),
                "p_chosen": p["p_chosen"],
                "p_rejected": p["p_rejected"],
            }
        )
    return items


def _digest(items: list[dict[str, Any]], order: torch.Tensor) -> str:
    h = hashlib.sha256(json.dumps(items, sort_keys=True).encode())
    h.update(order.numpy().tobytes())
    return h.hexdigest()[:16]


def _check_agreement(ctx: RunContext, t: int, digest: str) -> list[str]:
    from accelerate.utils import gather_object

    seen = gather_object([digest])
    if len(set(seen)) != 1:
        raise TrainError(
            f"round {t}: processes read different training data (digests {', '.join(seen)}); the "
            "output_dir must be on a filesystem that every process shares"
        )
    return seen


def run(
    ctx: RunContext, t: int, policy_path: str, train_fn: Any = None
) -> tuple[dict[str, Any], torch.nn.Module | None]:
    """Train theta_hat_{t+1} from the policy at ``policy_path``, save it to round-<t>/trained; returns the phase
    summary and the trained (accelerate-prepared) model, so extrapolation needs no disk round trip. With
    ``train_command`` or a ``train_fn`` another trainer does it (apo_trainer.external) and the model is None."""
    from transformers import get_scheduler

    if train_fn is not None or ctx.config.train_command:
        from apo_trainer import external

        return external.run(ctx, t, policy_path, train_fn)
    cfg, acc = ctx.config, ctx.accelerator
    items = training_items(ctx, t)
    g = torch.Generator().manual_seed(phase_seed(cfg.seed, t, "train-order"))
    order = (
        torch.cat([torch.randperm(len(items), generator=g) for _ in range(cfg.epochs_per_round)])
        if items
        else torch.zeros(0, dtype=torch.long)
    )
    digests = _check_agreement(ctx, t, _digest(items, order))

    if cfg.peft and acc.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise TrainError(
            f"LoRA rounds (peft) run on one device or under DDP, not {acc.distributed_type.value}: the exact merge "
            "needs whole weights; launch with DDP or without accelerate config"
        )
    model = ctx.load_policy(policy_path)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.peft:
        model = lora.wrap(model, cfg.peft, f"model {policy_path}")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if cfg.peft:  # the frozen embeddings give no grad to checkpointed blocks otherwise
            model.enable_input_require_grads()
        model.config.use_cache = False
    model.train()
    history: list[dict[str, Any]] = []
    if items:
        loader = DataLoader(
            _Items([items[i] for i in order.tolist()]),
            batch_size=cfg.batch_size,
            shuffle=False,
            collate_fn=_Collate(ctx.tokenizer.pad_token_id),
        )
        per_process = math.ceil(len(loader) / acc.num_processes)
        steps = math.ceil(per_process / cfg.grad_accum)
        trainable = [p for p in model.parameters() if p.requires_grad]  # the adapter alone in LoRA rounds
        optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=round(cfg.warmup_ratio * steps), num_training_steps=steps
        )
        model, optimizer, loader = acc.prepare(model, optimizer, loader)
        history = _train_loop(ctx, t, model, optimizer, scheduler, loader, steps)
        del optimizer, scheduler, loader
    if cfg.gradient_checkpointing:
        acc.unwrap_model(model).gradient_checkpointing_disable()
        acc.unwrap_model(model).config.use_cache = True
    if cfg.peft:
        peft_model = acc.unwrap_model(model)
        _save_adapter(ctx, t, peft_model)
        model = lora.merge_and_unload(peft_model)  # theta_hat_{t+1} = theta_t + s B A, one rounding
    _save(ctx, t, model, history)
    acc.free_memory()  # drops accelerate's references to this round's optimizer state before extrapolation
    summary: dict[str, Any] = {
        "steps": len(history),
        "train_pairs": len(items),
        "data_digests": digests,
        "processes": acc.num_processes,
    }
    for key in ("loss", "margin", "accuracy", "logp_chosen", "logp_rejected"):
        summary[f"train_{key}"] = sum(h[key] for h in history) / len(history) if history else None
    summary["train_final_loss"] = history[-1]["loss"] if history else None
    return summary, model


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in training mode: every nn.Dropout gets p = 0, and float attention-dropout rates that some
    attention implementations read directly (``attention_dropout``, ``dropout``) become 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def _train_loop(
    ctx: RunContext, t: int, model: Any, optimizer: Any, scheduler: Any, loader: Any, steps: int
) -> list[dict[str, Any]]:
    cfg, acc = ctx.config, ctx.accelerator
    # Sums over the micro-batches of one optimizer step: loss, margin, correct, logp_w, logp_l, pairs.
    sums = torch.zeros(6, dtype=torch.float64, device=ctx.device)
    log = _StepLog(ctx, t)
    with ctx.progress(f"round {t}: training", steps) as bar:
        for batch in loader:
            with acc.accumulate(model):
                logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
                b = logps.shape[0] // 2
                logr = logps - batch["ref_logps"]
                if cfg.loss == "dpo":
                    losses = dpo_loss(logr[:b], logr[b:], cfg.beta)
                else:
                    p = batch["win_rates"]
                    losses = sppo_loss(logr[:b], logr[b:], p[:b], p[b:], cfg.beta)
                loss = losses.mean()
                log.micro_losses.append(loss.detach())
                acc.backward(loss)
                margin = cfg.beta * (logr[:b] - logr[b:]).detach()
                sums += torch.stack(
                    [
                        losses.detach().sum(),
                        margin.sum(),
                        (margin > 0).sum(),
                        logps[:b].detach().sum(),
                        logps[b:].detach().sum(),
                        torch.tensor(b, device=ctx.device),
                    ]
                ).double()
                grad_norm = None
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                if acc.sync_gradients:
                    lr = optimizer.param_groups[0]["lr"]
                    scheduler.step()
                    log.pending.append((acc.reduce(sums.clone(), "sum"), lr, grad_norm))
                    sums.zero_()
                    if acc.trackers:  # trackers take numbers each step; otherwise nothing waits for the device
                        log.flush()
                    bar.advance(1)
    log.flush()
    return log.history


class _StepLog:
    """The round's step records, kept on the device until ``flush`` reads them in one wait: per optimizer step the
    reduced sums, lr and grad norm; per micro-batch the loss, for the non-finite check. The checkpoint is saved only
    after the loop, so a non-finite loss found at a flush still leaves nothing behind."""

    def __init__(self, ctx: RunContext, t: int) -> None:
        self.ctx, self.t = ctx, t
        self.pending: list[tuple[torch.Tensor, float, torch.Tensor | None]] = []
        self.micro_losses: list[torch.Tensor] = []
        self.checked = 0
        self.history: list[dict[str, Any]] = []

    def flush(self) -> None:
        self._check_finite()
        for sums, lr, grad_norm in self.pending:
            total = sums.tolist()
            n = total[5]
            rec = {
                "round": self.t,
                "step": len(self.history) + 1,
                "loss": total[0] / n,
                "margin": total[1] / n,
                "accuracy": total[2] / n,
                "logp_chosen": total[3] / n,
                "logp_rejected": total[4] / n,
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
            }
            self.history.append(rec)
            self.ctx.accelerator.log(
                {f"train/{k}": v for k, v in rec.items() if k not in ("round", "step") and v is not None},
                step=self.ctx.step_offset + len(self.history),
            )
        self.pending.clear()

    def _check_finite(self) -> None:
        """Raise on the first non-finite micro-batch loss, on any process, since the last check."""
        new = self.micro_losses[self.checked :]
        if not new:
            return
        losses = torch.stack(new)
        bad = self.ctx.accelerator.reduce((~torch.isfinite(losses)).float(), "sum")
        if bool(bad.any()):
            first = int(torch.nonzero(bad)[0, 0])
            micro = self.checked + first + 1
            step = (micro - 1) // self.ctx.config.grad_accum + 1
            t, loss = self.t, losses[first].item()
            raise TrainError(
                f"non-finite loss in round {t} at optimizer step {step} (micro-batch {micro}, loss "
                f"{loss}); lower learning_rate or beta, or use bf16 rather than fp16. Results of "
                "earlier phases are untouched; rerun after the fix (with --allow-changed-config)"
            )
        self.checked = len(self.micro_losses)


def _save_adapter(ctx: RunContext, t: int, peft_model: Any) -> None:
    """round-<t>/adapter: the round's LoRA (adapter_config.json + adapter_model.safetensors), before the merge."""
    store = ctx.store
    ctx.accelerator.wait_for_everyone()
    if ctx.is_main:
        tmp = store.tmp_path(store.adapter(t))
        peft_model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's card template; the adapter is the two files
        lora.canonical_config(tmp / "adapter_config.json")
        store.commit(tmp, store.adapter(t), round_index=t, phase="train")


def _save(ctx: RunContext, t: int, model: Any, history: list[dict[str, Any]]) -> None:
    acc, store = ctx.accelerator, ctx.store
    acc.wait_for_everyone()
    if ctx.config.checkpoint_format == "dcp":  # every process its own shards, no gather
        if ctx.is_main:
            store.write_jsonl(store.round_dir(t) / "train_log.jsonl", history)
        ctx.save_checkpoint(model, store.trained(t), round_index=t, phase="train")
        return
    state = acc.get_state_dict(model)
    if ctx.is_main:
        store.write_jsonl(store.round_dir(t) / "train_log.jsonl", history)
        tmp = store.tmp_path(store.trained(t))
        acc.unwrap_model(model).save_pretrained(tmp, state_dict=state)
        ctx.tokenizer.save_pretrained(tmp)
        store.commit(tmp, store.trained(t), round_index=t, phase="train")
