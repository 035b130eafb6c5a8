"""The APO round loop (arXiv 2410.06293, Algorithm 1), top to bottom.

For t = 0 .. T-1, with theta_0 = theta_hat_0 = the initial model:

    sample      K responses per prompt from theta_t                      round-<t>/samples.jsonl
    judge       oracle scores                                             round-<t>/scores.json
    reference   log pi_theta_t (and log pi_theta_0 for the KL estimate)   round-<t>/logprobs.safetensors
    data        best vs worst pairs, SPPO win-rates                       round-<t>/pairs.jsonl
    train       theta_hat_{t+1} from theta_t, reference pi_theta_t        round-<t>/trained/
                (or by another trainer: train_command / run(train_fn=...), see external.py)
    extrapolate theta_{t+1} = theta_hat_{t+1} + alpha (theta_hat_{t+1} - theta_hat_t)   round-<t>/policy/
                (alpha 0 after a drop in mean score with ``restart: score``, see restart.py)
    log         one record per round                                      metrics.jsonl

With ``final_eval`` (default), round T runs sample, judge and reference only, so that the final policy theta_T is
evaluated on fresh prompts (the held-out prompts when ``eval_prompts`` or ``eval_fraction`` sets some, which no
round trains on): T rounds give T+1 records (rounds 0..T). Raising ``rounds`` on a finished run
continues it from there.

Every phase reseeds from (seed, round, phase), writes its result atomically and then a done marker; a rerun skips
phases with markers, so an interrupted run resumes and ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import yaml

from apo_trainer import data, extrapolate, judge, log, reference, sample, train
from apo_trainer.config import APOConfig
from apo_trainer.errors import ConfigError
from apo_trainer.oracle import Oracle
from apo_trainer.prompts import split_prompts
from apo_trainer.runtime import RunContext, export_policy, load_tokenizer, phase_seed, seed_everything
from apo_trainer.store import RunStore


def run(
    config: APOConfig,
    oracle: Oracle | None = None,
    *,
    quiet: bool = False,
    allow_changed_config: bool = False,
    train_fn: Callable[[str, str, str], Any] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) every round of ``config``; return the per-round records, also in OUTPUT/metrics.jsonl.

    Each record has at least ``round``, ``mean_score`` (oracle mean over the round's samples), ``std_score``,
    ``mean_length`` (response tokens), ``kl_to_init`` and ``time_<phase>`` seconds; training rounds add
    ``pairs``, ``train_loss``, ``train_accuracy``, ``train_margin``. An ``oracle`` object overrides
    ``config.oracle``. ``allow_changed_config`` accepts a config that differs from the one the run folder started
    with (the new values apply to phases not yet done).

    ``train_fn(policy, pairs, output)`` replaces the train phase in this process (as ``train_command`` does with
    a command, see apo_trainer.external): called with theta_t's folder (also the DPO reference), the folder of
    the round's pairs as a TRL preference dataset (``train.jsonl``) and the folder to save theta_hat_{t+1} into.

    >>> records = run(APOConfig.from_yaml("run.yaml"))  # doctest: +SKIP
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers.utils import logging as hf_logging

    config.validate(need_oracle=oracle is None)
    if train_fn is not None and (config.train_command or not callable(train_fn)):
        raise ConfigError(
            "run(): train_fn must be a callable train_fn(policy, pairs, output), and replaces train_command: "
            "give one of them"
        )
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own bars cover the phases; theirs repeat per checkpoint load
    trackers = [x.strip() for x in config.log_with.split(",") if x.strip()]
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        log_with=trackers or None,
        project_dir=config.output_dir,
    )
    store = RunStore(config.output_dir)
    try:
        # Everything that can fail at the start (prompts, tokenizer, oracle) runs before the run folder is made or
        # its config pinned: a failed start leaves nothing, and the corrected rerun is a fresh run.
        prompts, held_out = split_prompts(config)
        ctx = RunContext(
            config=config,
            accelerator=accelerator,
            store=store,
            tokenizer=load_tokenizer(config),
            prompts=prompts,
            eval_prompts=held_out,
            oracle=oracle,
            quiet=quiet,
        )
        if oracle is None:
            built = judge.build_oracle(config, accelerator.device)
            if hasattr(built, "close"):
                built.close()  # a reward model would hold its memory through sampling and training: reloaded there
        with store.lock() if accelerator.is_main_process else nullcontext():
            if accelerator.is_main_process:
                _check_config(store, config, allow_changed_config)
                if not allow_changed_config:
                    _check_train_fn(store, config.rounds, train_fn)
                store.remove_stale_temporaries()
            accelerator.wait_for_everyone()
            return _rounds(ctx, trackers, train_fn)
    finally:
        accelerator.end_training()
        if bars_were_on:
            hf_logging.enable_progress_bar()
        # Lets a later run() in this process choose another mixed precision.
        AcceleratorState._reset_state()


def _rounds(ctx: RunContext, trackers: list[str], train_fn: Any = None) -> list[dict[str, Any]]:
    config, accelerator, store, quiet = ctx.config, ctx.accelerator, ctx.store, ctx.quiet
    held_out = ctx.eval_prompts
    if trackers:
        accelerator.init_trackers(
            "apo-train", config={k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
        )
    records: list[dict[str, Any]] = []
    last = config.rounds + (1 if config.final_eval else 0)
    for t in range(last):
        theta_t = config.model if t == 0 else str(store.policy(t - 1))
        final = t == config.rounds and bool(held_out)
        if t < config.rounds and (store.done(t, "sample") or {}).get("held_out") and accelerator.is_main_process:
            # round t was the final evaluation on held-out prompts before `rounds` was raised: sample it afresh
            store.clear_markers(t, ("sample", "judge", "reference"))
        accelerator.wait_for_everyone()
        _phase(ctx, t, "sample", sample.run, theta_t, final)
        _phase(ctx, t, "judge", judge.run)
        _phase(ctx, t, "reference", reference.run, theta_t)
        if t < config.rounds:
            _phase(ctx, t, "data", data.run)
            trained = _phase(ctx, t, "train", train.run, theta_t, train_fn)
            _phase(ctx, t, "extrapolate", extrapolate.run, trained)
            del trained  # the trained model in memory: freed before the push and the next round's sampling
            if config.push_to_hub:
                _phase(ctx, t, "push", _push_round)
            ctx.step_offset += (store.done(t, "train") or {}).get("steps", 0)
        record = log.round_record(store, t)
        records.append(record)
        if accelerator.is_main_process:
            log.write_metrics(store, records)
            # Trackers such as wandb need steps that never decrease: use the optimizer steps taken so far.
            accelerator.log(
                {f"round/{k}": v for k, v in record.items() if isinstance(v, (int, float))}, step=ctx.step_offset
            )
            if not quiet:
                log.print_round(record)
        accelerator.wait_for_everyone()
    if config.checkpoint_format == "dcp" and config.rounds and accelerator.is_main_process:
        export_policy(store.policy(config.rounds - 1), store.root / "final-policy")  # the one Hugging Face export
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not quiet:
        log.print_table(records, title=f"apo-train: {config.output_dir}")
    return records


def _phase(ctx: RunContext, t: int, name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(ctx, t, *args)`` unless the phase's done marker exists; returns what ``fn`` returns beside its
    summary (or None when skipped)."""
    if ctx.store.done(t, name) is not None:
        return None
    seed_everything(phase_seed(ctx.config.seed, t, name, ctx.rank))
    start = time.perf_counter()
    result = fn(ctx, t, *args)
    summary, extra = result if isinstance(result, tuple) else (result, None)
    summary = dict(summary, seconds=time.perf_counter() - start)
    if ctx.is_main:
        ctx.store.mark_done(t, name, summary)
    ctx.accelerator.wait_for_everyone()
    return extra


def _check_config(store: RunStore, config: APOConfig, allow_changed: bool) -> None:
    """Record the config on a fresh run; on a resume refuse one that differs (unless allowed).

    A run folder in which no phase has finished holds no result to stay consistent with: its config.yaml (left by a
    start that failed) is replaced, not enforced.
    """
    text = yaml.safe_dump(config.to_dict(), sort_keys=True)
    if store.config.is_file() and any(store.root.glob("round-*/done/*.json")):
        previous = yaml.safe_load(store.config.read_text(encoding="utf-8")) or {}
        changed = config.changed_fields(previous)
        if changed and not allow_changed:
            detail = ", ".join(f"{k}: {previous.get(k)!r} -> {config.to_dict().get(k)!r}" for k in changed[:4])
            raise ConfigError(
                f"{store.root} was started with another config ({detail}); use a new output_dir, "
                "restore those values, or pass --allow-changed-config",
                exit_code=1,
            )
        if not changed and previous == config.to_dict():
            return
    store.write_text(store.config, text)


def _check_train_fn(store: RunStore, rounds: int, train_fn: Any) -> None:
    """A resume keeps the train phase's kind: train_fn is no config key, so its presence is checked against the
    rounds already trained (a function's rounds then apo-train's own, or the reverse, is one run of two methods)."""
    for t in range(rounds):
        done = store.done(t, "train")
        if done is not None and ("train_fn" in done) != (train_fn is not None):
            was = f"by train_fn {done['train_fn']}" if "train_fn" in done else "without a train_fn"
            raise ConfigError(
                f"{store.root}: round {t} was trained {was}; resume it the same way (pass "
                "--allow-changed-config / allow_changed_config=True to mix them)",
                exit_code=1,
            )


def _push_round(ctx: RunContext, t: int) -> dict[str, Any]:
    """Upload theta_{t+1} to branch ``round-<t+1>`` of ``hub_repo_id`` (main process). A failed upload is reported
    with the command that retries it and does not stop training: the checkpoint is safe on disk."""
    if not ctx.is_main:
        return {"pushed": False}
    from apo_merge.errors import MergeError
    from apo_merge.hub import push_folder

    config = ctx.config
    try:
        url = push_folder(
            ctx.store.policy(t),
            config.hub_repo_id,
            private=True,
            revision=f"round-{t + 1}",
            commit_message=f"APO policy theta_{t + 1} (alpha {ctx.store.done(t, 'extrapolate')['alpha']})",
        )
    except MergeError as e:
        ctx.accelerator.print(f"apo-train: warning: round {t}: {e.message}")
        return {"pushed": False, "error": e.message}
    return {"pushed": True, "url": url}
