"""``apo-train eval RUN_DIR``: each round's policy against a reference on held-out prompts, as the paper reports.

For every policy of a run (theta_0 = the configured model, theta_t = round-<t-1>/policy), one response per held-out
prompt is sampled with the ``eval_*`` keys (training's keys otherwise, :func:`eval_sampling`) and judged against a
reference response by the run's oracle: the reference is theta_0's response to the same row (round 0's) unless
``eval_reference`` names a JSONL of responses keyed by prompt (each prompt once).
A pairwise oracle is asked both orders (``1/2 + (f(x, y, ref) - f(x, ref, y)) / 2``, exact for ties), a scalar one through
Bradley-Terry ``sigmoid(s(y) - s(ref))``; equal scores count one half. Per round:

- ``win_rate``: the mean preference, with a 95% percentile bootstrap interval over prompts (seeded);
- ``lc_win_rate``: AlpacaEval 2.0's length-controlled win rate (:func:`lc_win_rate`).

Layout, beside the run's rounds::

    RUN_DIR/eval/settings.json            the eval keys and min_new_tokens it was made with (others are refused)
    RUN_DIR/eval/round-<t>/samples.jsonl  theta_t's response per held-out prompt
    RUN_DIR/eval/round-<t>/eval.jsonl     per prompt: response, reference, preference, lengths in characters
    RUN_DIR/eval/round-<t>/done/*.json    markers (the judge marker holds the round's summary)
    RUN_DIR/eval/summary.jsonl            one record per round (what later changes read)

Each step writes atomically and then a marker, so an interrupted eval resumes and ends with the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from apo_merge.errors import shown
from apo_trainer.config import APOConfig
from apo_trainer.errors import ConfigError, TrainError
from apo_trainer.oracle import Oracle, PairwiseOracle, both_orders, compare_batched, is_pairwise, user_oracle
from apo_trainer.runtime import RunContext, phase_seed, seed_everything
from apo_trainer.store import RunStore, dumps, read_jsonl

EVAL_KEYS = (
    "eval_prompts",
    "eval_fraction",
    "eval_reference",
    "eval_temperature",
    "eval_top_p",
    "eval_top_k",
    "eval_max_new_tokens",
    "eval_bootstrap",
)
LC_CS = tuple(10.0**e for e in torch.linspace(-4, 4, 10, dtype=torch.float64).tolist())


# ---------------------------------------------------------------- statistics
def bootstrap_interval(prefs: Sequence[float], resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean of ``prefs`` over ``resamples`` resamplings of the prompts (float64,
    seeded: the same inputs give the same bits)."""
    x = torch.tensor(list(prefs), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(x), (resamples, len(x)), generator=g)
    means = x[idx].mean(dim=1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def lc_win_rate(
    prefs: Sequence[float], policy_lengths: Sequence[float], reference_lengths: Sequence[float], n_splits: int = 5
) -> float:
    """AlpacaEval 2.0's length-controlled win rate (glm "length_controlled_minimal": no instruction difficulty,
    which needs AlpacaEval's own instruction set).

    The judge's preference p is modelled as ``logit p = w_len * tanh(d / sd(d)) + w_policy`` with d = reference
    length - policy length (characters, as AlpacaEval); fit with an L1 penalty as scikit-learn's liblinear does,
    its strength C picked from 10 values in [1e-4, 1e4] by 5-fold cross-validation over prompts (continuous log
    loss), then refit on all prompts. The LC win rate is the prediction at zero length difference,
    ``sigmoid(w_policy)``.
    """
    p = torch.tensor(list(prefs), dtype=torch.float64)
    x_len = length_feature(policy_lengths, reference_lengths)
    x = torch.stack([x_len, torch.ones_like(x_len)], dim=1)
    n = len(p)
    if n_splits > 1 and n >= n_splits:
        # scikit-learn's GroupKFold with one group per prompt: prompt i goes to fold (n - 1 - i) % n_splits
        fold = torch.tensor([(n - 1 - i) % n_splits for i in range(n)])
        best_c, best_score = LC_CS[0], -math.inf
        for c in LC_CS:
            scores = []
            for f in range(n_splits):
                train, test = fold != f, fold == f
                w = _l1_logistic(x[train], p[train], c)
                q = torch.sigmoid(x[test] @ w).clamp(1e-15, 1 - 1e-15)
                scores.append(float((p[test] * q.log() + (1 - p[test]) * (1 - q).log()).mean()))
            score = sum(scores) / len(scores)
            if score > best_score:
                best_c, best_score = c, score
    else:
        best_c = 100.0
    w = _l1_logistic(x, p, best_c)
    return float(torch.sigmoid(w[1]))


def length_feature(policy_lengths: Sequence[float], reference_lengths: Sequence[float]) -> torch.Tensor:
    """AlpacaEval's length feature ``tanh(d / sd(d))``, d = reference length - policy length (zeros when d does
    not vary)."""
    d = torch.tensor(list(reference_lengths), dtype=torch.float64) - torch.tensor(
        list(policy_lengths), dtype=torch.float64
    )
    sd = d.std() if len(d) > 1 else torch.tensor(0.0, dtype=torch.float64)
    return torch.tanh(d / sd) if sd > 0 else torch.zeros_like(d)


# Below this spread the length feature is (nearly) a nonzero constant, i.e. the intercept again.
LC_MIN_SPREAD = 0.05


def length_warning(policy_lengths: Sequence[float], reference_lengths: Sequence[float]) -> str | None:
    """Why the LC win rate means little here, or None: when the length feature is near-constant and nonzero
    (every reference much longer, or much shorter, than every response: tanh saturates), it is collinear with the
    policy term, and the L1 fit splits the preference between the two, pulling the LC win rate toward 0.5.
    AlpacaEval's own GLM has the same weakness."""
    x = length_feature(policy_lengths, reference_lengths)
    if len(x) < 2 or float(x.abs().max()) == 0.0 or float(x.std()) >= LC_MIN_SPREAD:
        return None
    return (
        f"the length feature tanh(d / sd(d)) is near-constant (spread {float(x.std()):.2g}, "
        f"mean {float(x.mean()):.2g}): "
        "every reference is much longer or shorter than the responses, so the LC win rate leans toward 0.5 and "
        "says little; read the raw win rate"
    )


def _l1_logistic(x: torch.Tensor, p: torch.Tensor, c: float, sweeps: int = 200) -> torch.Tensor:
    """argmin_w C * sum_i CE(p_i, sigmoid(x_i . w)) + |w|_1 by exact coordinate descent (each coordinate's
    one-dimensional problem solved by bisection on its derivative; float64)."""
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(sweeps):
        before = w.clone()
        for k in range(x.shape[1]):
            rest = x @ w - x[:, k] * w[k]

            def grad(v: float, k: int = k, rest: torch.Tensor = rest) -> float:
                return c * float((x[:, k] * (torch.sigmoid(rest + x[:, k] * v) - p)).sum())

            g0 = grad(0.0)
            if abs(g0) <= 1.0:
                w[k] = 0.0
                continue
            sign = -1.0 if g0 > 0 else 1.0  # the minimum lies where grad(v) = -sign(v)
            lo, hi = 0.0, sign
            while (grad(hi) + sign) * sign < 0:
                lo, hi = hi, hi * 2
                if abs(hi) > 1e6:
                    break
            for _ in range(100):
                mid = (lo + hi) / 2
                if (grad(mid) + sign) * sign < 0:
                    lo = mid
                else:
                    hi = mid
            w[k] = (lo + hi) / 2
        if float((w - before).abs().max()) < 1e-13:
            break
    return w


def preferences(
    oracle: Oracle | PairwiseOracle,
    prompts: list[str],
    responses: list[str],
    references: list[str],
    batch: int,
    round_index: int = 0,
) -> list[float]:
    """P(response beats reference) per prompt: pairwise both orders averaged, scalar sigmoid(s - s_ref).

    Every judge output goes through the training judge's checks (probabilities in [0, 1], finite scores, one
    per response), so a NaN or inf stops the evaluation with one line instead of reaching the win rates.
    """
    from apo_trainer.judge import check_score, checked_scores

    n = len(prompts)
    if is_pairwise(oracle):
        both = [[r, ref] for r, ref in zip(responses, references, strict=True)]
        q = [(i, 0, 1) for i in range(n)] + [(i, 1, 0) for i in range(n)]
        f = compare_batched(oracle, q, prompts, both, batch)
        return [both_orders(f[i], f[n + i]) for i in range(n)]
    s: list[float] = []
    texts = list(responses) + list(references)
    ps = list(prompts) * 2
    for start in range(0, len(texts), batch):
        got = oracle.score(ps[start : start + batch], texts[start : start + batch])
        s.extend(checked_scores(got, len(ps[start : start + batch])))
    for i, v in enumerate(s):
        check_score(v, round_index, f"the {'eval' if i < n else 'reference'} response of held-out prompt {i % n}")
    diff = torch.tensor(s[:n], dtype=torch.float64) - torch.tensor(s[n:], dtype=torch.float64)
    return torch.sigmoid(diff).tolist()


def summarise(rows: list[dict[str, Any]], resamples: int, seed: int) -> dict[str, Any]:
    """The round's summary from its eval.jsonl rows."""
    prefs = [r["preference"] for r in rows]
    lengths, ref_lengths = [r["length"] for r in rows], [r["reference_length"] for r in rows]
    lo, hi = bootstrap_interval(prefs, resamples, seed)
    out = {
        "prompts": len(rows),
        "win_rate": sum(prefs) / len(prefs),
        "win_rate_ci_low": lo,
        "win_rate_ci_high": hi,
        "lc_win_rate": lc_win_rate(prefs, lengths, ref_lengths),
        "mean_length": sum(lengths) / len(rows),
    }
    warning = length_warning(lengths, ref_lengths)
    return out if warning is None else {**out, "lc_warning": warning}


# ---------------------------------------------------------------- the command
def eval_config(run_dir: Path, overrides: Sequence[str] = ()) -> APOConfig:
    """The run's config (RUN_DIR/config.yaml) with ``eval_*`` overrides; other keys cannot change here."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not an apo-train run folder (no config.yaml); pass a run's output_dir")
    cfg = APOConfig.from_dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, source=str(path))
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in EVAL_KEYS or key == "eval_fraction":
            raise ConfigError(
                f"--set {item!r}: apo-train eval changes only {', '.join(k for k in EVAL_KEYS if k != 'eval_fraction')}"
            )
        cfg.set(item)
    return cfg


def evaluate_run(
    run_dir: str | Path,
    overrides: Sequence[str] = (),
    *,
    oracle: Oracle | PairwiseOracle | None = None,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate (or resume evaluating) every finished policy of ``run_dir``; returns one record per round."""
    from apo_trainer.prompts import split_prompts

    run_dir = Path(run_dir)
    cfg = eval_config(run_dir, overrides)
    cfg.validate(need_oracle=oracle is None)
    _, held_out = split_prompts(cfg)
    if not held_out:
        raise ConfigError(
            f"{run_dir}: no held-out prompts; start runs with eval_fraction or eval_prompts, or pass "
            "--set eval_prompts=FILE"
        )
    references = reference_file(Path(cfg.eval_reference), cfg.prompt_field) if cfg.eval_reference else None
    from accelerate.state import AcceleratorState
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # as in apo-train run: theirs repeat per checkpoint load
    try:
        return _evaluate(run_dir, cfg, held_out, oracle, quiet, references)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
        AcceleratorState._reset_state()  # lets a later run() in this process choose another mixed precision


def eval_sampling(cfg: APOConfig) -> APOConfig:
    """The config eval samples with: one response per prompt, the ``eval_*`` keys where they are set, and every
    other sampling key (``min_new_tokens``, ``max_prompt_tokens``, ``chat_template``, ...) as training has it, so
    that eval measures the answers training produces (a ``min_new_tokens`` above ``eval_max_new_tokens`` is
    lowered to it)."""
    longest = cfg.eval_max_new_tokens or cfg.max_new_tokens
    return dataclasses.replace(
        cfg,
        samples_per_prompt=1,
        temperature=cfg.eval_temperature,
        top_p=cfg.eval_top_p,
        top_k=cfg.eval_top_k,
        max_new_tokens=longest,
        min_new_tokens=min(cfg.min_new_tokens, longest),
    )


def _evaluate(
    run_dir: Path,
    cfg: APOConfig,
    held_out: list[str],
    oracle: Oracle | PairwiseOracle | None,
    quiet: bool,
    references: list[tuple[str, str]] | None,
) -> list[dict[str, Any]]:
    from accelerate import Accelerator

    from apo_trainer.judge import build_oracle
    from apo_trainer.runtime import load_tokenizer

    store = RunStore(run_dir / "eval")
    run_store = RunStore(run_dir)
    sampling = eval_sampling(cfg)
    ctx = RunContext(
        config=sampling,
        accelerator=Accelerator(cpu=not torch.cuda.is_available()),
        store=store,
        tokenizer=load_tokenizer(cfg),
        prompts=held_out,
        oracle=oracle,
        quiet=quiet,
    )
    # the judge is built before the first sample (and before RUN_DIR/eval is made): one that cannot load costs nothing
    judge = oracle or build_oracle(cfg, ctx.device, store.root)
    with store.lock():
        _check_settings(store, cfg)
        store.remove_stale_temporaries()
        records = []
        t = 0
        while t == 0 or run_store.done(t - 1, "extrapolate") is not None:
            policy = cfg.model if t == 0 else str(run_store.policy(t - 1))
            if store.done(t, "sample") is None:
                if t > 0:
                    _check_policy_finite(Path(policy), t)
                seed = phase_seed(cfg.seed, t, "eval-sample")
                seed_everything(seed)
                rows, summary = _sample(ctx, sampling, policy, held_out, t, seed)
                store.write_jsonl(store.samples(t), rows)
                store.mark_done(t, "sample", {k: v for k, v in summary.items() if k != "new_tokens_per_second"})
            if store.done(t, "judge") is None:
                rows = _judge(store, cfg, judge, t, references)
                store.write_jsonl(store.round_dir(t) / "eval.jsonl", rows)
                summary = summarise(rows, cfg.eval_bootstrap, phase_seed(cfg.seed, t, "eval-ci"))
                if "lc_warning" in summary:
                    print(f"apo-train: warning: round {t}: {summary['lc_warning']}", file=sys.stderr)
                store.mark_done(t, "judge", summary)
            records.append({"round": t, **store.done(t, "judge")})
            t += 1
        store.write_jsonl(store.root / "summary.jsonl", records)
    if judge is not oracle and hasattr(judge, "close"):
        judge.close()
    return records


def _sample(ctx, sampling, policy, held_out, t, seed):
    from apo_trainer.sample import sample_rows

    rows, summary = sample_rows(ctx, sampling, policy, held_out, list(range(len(held_out))), f"eval round {t}", seed)
    return rows, summary


def _check_policy_finite(folder: Path, t: int) -> None:
    """theta_t's weights must all be finite: sampling from NaN weights ends in an error deep inside torch."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                x = f.get_tensor(name)
                if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                    raise TrainError(
                        f"round {t}: the policy {folder} holds inf/NaN weights ({name} in {path.name}); "
                        "it cannot be evaluated: rerun that round's training with a lower alpha or learning_rate"
                    )


def _judge(
    store: RunStore, cfg: APOConfig, oracle: Any, t: int, reference: list[tuple[str, str]] | None
) -> list[dict[str, Any]]:
    rows = read_jsonl(store.samples(t))
    prompts = [r["prompt"] for r in rows]
    responses = [r["responses"][0] for r in rows]
    if reference is not None:
        refs = dict(reference)
        missing = [p for p in prompts if p not in refs]
        if missing:
            raise ConfigError(
                f"config: eval_reference {cfg.eval_reference} has no response for the prompt {shown(missing[0])} "
                f"({len(missing)} missing); add them or drop eval_reference",
                exit_code=1,
            )
        references = [refs[p] for p in prompts]
    else:
        # theta_0's response of the same row: a prompt held out twice has a reference per row, not one per text
        base = read_jsonl(store.samples(0))
        if [r["prompt"] for r in base] != prompts:
            raise TrainError(
                f"{store.samples(t)}: its prompts are not those of {store.samples(0)}, row by row; delete "
                f"{store.root} and rerun apo-train eval"
            )
        references = [r["responses"][0] for r in base]
    name = cfg.oracle or getattr(oracle, "name", type(oracle).__name__)
    with user_oracle(name, t, "eval judge"):
        prefs = preferences(oracle, prompts, responses, references, cfg.oracle_batch_size, t)
    return [
        {
            "prompt": p,
            "response": r,
            "reference": ref,
            "preference": v,
            "length": len(r),
            "reference_length": len(ref),
        }
        for p, r, ref, v in zip(prompts, responses, references, prefs, strict=True)
    ]


def reference_file(path: Path, prompt_field: str) -> list[tuple[str, str]]:
    """(prompt, output) per line of an ``eval_reference`` JSONL file; a prompt given twice is refused (which
    answer is the reference would otherwise depend on the line order)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config: eval_reference {path} is not UTF-8 text (byte {e.start}); save it as UTF-8", exit_code=1
        ) from None
    except OSError as e:
        raise ConfigError(f"config: cannot read eval_reference {path} ({e.strerror or e})", exit_code=1) from None
    out: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        key = obj.get(prompt_field, obj.get("instruction")) if isinstance(obj, dict) else None
        if not isinstance(key, str) or not isinstance(obj.get("output"), str):
            raise ConfigError(
                f"{path}:{lineno}: expected an object with the prompt under '{prompt_field}' or 'instruction' and "
                "the response under 'output'",
                exit_code=1,
            )
        if key in seen:
            raise ConfigError(
                f"{path}:{lineno}: the prompt {shown(key)} is already on line {seen[key]}; keep one reference "
                "response per prompt",
                exit_code=1,
            )
        seen[key] = lineno
        out.append((key, obj["output"]))
    return out


def _check_settings(store: RunStore, cfg: APOConfig) -> None:
    now = {k: getattr(cfg, k) for k in ("oracle", *EVAL_KEYS)}
    # the shortest answer comes from training's key: recorded too, so that rounds sampled otherwise never mix
    # (folders made before it was recorded sampled with 0)
    now["min_new_tokens"] = eval_sampling(cfg).min_new_tokens
    path = store.root / "settings.json"
    if path.is_file():
        before = {"min_new_tokens": 0, **json.loads(path.read_text(encoding="utf-8"))}
        changed = [k for k in now if before.get(k) != now[k]]
        if changed:
            detail = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed[:3])
            raise ConfigError(
                f"{store.root} was made with other eval settings ({detail}); restore them or delete {store.root}",
                exit_code=1,
            )
        return
    store.write_text(path, dumps(now, path, sort_keys=True) + "\n")


# ---------------------------------------------------------------- table and plot
def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """A Markdown table: run, round, win rate [95% interval], LC win rate, mean length (characters)."""
    lines = [
        "| run | round | win rate [95% CI] | LC win rate | length |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, records in results.items():
        for r in records:
            lines.append(
                f"| {label} | {r['round']} | {r['win_rate']:.3f} [{r['win_rate_ci_low']:.3f}, "
                f"{r['win_rate_ci_high']:.3f}] | {r['lc_win_rate']:.3f} | {r['mean_length']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> Path:
    """Win rate (with its interval) and LC win rate per round, every run on one pair of axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    for label, records in results.items():
        x = [r["round"] for r in records]
        (line,) = axes[0].plot(x, [r["win_rate"] for r in records], marker="o", label=label)
        axes[0].fill_between(
            x,
            [r["win_rate_ci_low"] for r in records],
            [r["win_rate_ci_high"] for r in records],
            color=line.get_color(),
            alpha=0.15,
            linewidth=0,
        )
        axes[1].plot(x, [r["lc_win_rate"] for r in records], marker="o", color=line.get_color(), label=label)
    for ax, name in zip(axes, ("win rate (95% CI)", "length-controlled win rate"), strict=True):
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("round")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path
