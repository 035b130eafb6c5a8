"""``apo-train eval RUN_DIR``: each round's policy against a reference on held-out prompts, as the paper reports.

For every policy of a run (theta_0 = the configured model, theta_t = round-<t-1>/policy), one response per held-out
prompt is sampled with the ``eval_*`` keys and judged against a reference response by the run's oracle: the
reference is theta_0's response (round 0's) unless ``eval_reference`` names a JSONL of responses keyed by prompt.
A pairwise oracle is asked both orders (``(f(x, y, ref) + 1 - f(x, ref, y)) / 2``), a scalar one through
Bradley-Terry ``sigmoid(s(y) - s(ref))``; equal scores count one half. Per round:

- ``win_rate``: the mean preference, with a 95% percentile bootstrap interval over prompts (seeded);
- ``lc_win_rate``: AlpacaEval 2.0's length-controlled win rate (:func:`lc_win_rate`).

Layout, beside the run's rounds::

    RUN_DIR/eval/settings.json            the eval keys the folder was made with (other values are refused)
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from apo_trainer.config import APOConfig
from apo_trainer.errors import ConfigError
from apo_trainer.oracle import Oracle, PairwiseOracle, compare_batched, is_pairwise, load_oracle, user_oracle
from apo_trainer.runtime import RunContext, phase_seed, seed_everything
from apo_trainer.store import RunStore, read_jsonl

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
    d = torch.tensor(list(reference_lengths), dtype=torch.float64) - torch.tensor(
        list(policy_lengths), dtype=torch.float64
    )
    sd = d.std() if len(d) > 1 else torch.tensor(0.0, dtype=torch.float64)
    x_len = torch.tanh(d / sd) if sd > 0 else torch.zeros_like(d)
    x = torch.stack([x_len, torch.ones_like(d)], dim=1)
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
    oracle: Oracle | PairwiseOracle, prompts: list[str], responses: list[str], references: list[str], batch: int
) -> list[float]:
    """P(response beats reference) per prompt: pairwise both orders averaged, scalar sigmoid(s - s_ref)."""
    n = len(prompts)
    if is_pairwise(oracle):
        both = [[r, ref] for r, ref in zip(responses, references, strict=True)]
        q = [(i, 0, 1) for i in range(n)] + [(i, 1, 0) for i in range(n)]
        f = compare_batched(oracle, q, prompts, both, batch)
        return [(f[i] + 1.0 - f[n + i]) / 2 for i in range(n)]
    s = []
    texts = list(responses) + list(references)
    ps = list(prompts) * 2
    for start in range(0, len(texts), batch):
        s.extend(float(v) for v in oracle.score(ps[start : start + batch], texts[start : start + batch]))
    diff = torch.tensor(s[:n], dtype=torch.float64) - torch.tensor(s[n:], dtype=torch.float64)
    return torch.sigmoid(diff).tolist()


def summarise(rows: list[dict[str, Any]], resamples: int, seed: int) -> dict[str, Any]:
    """The round's summary from its eval.jsonl rows."""
    prefs = [r["preference"] for r in rows]
    lo, hi = bootstrap_interval(prefs, resamples, seed)
    return {
        "prompts": len(rows),
        "win_rate": sum(prefs) / len(prefs),
        "win_rate_ci_low": lo,
        "win_rate_ci_high": hi,
        "lc_win_rate": lc_win_rate(prefs, [r["length"] for r in rows], [r["reference_length"] for r in rows]),
        "mean_length": sum(r["length"] for r in rows) / len(rows),
    }


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
    from accelerate.state import AcceleratorState

    try:
        return _evaluate(run_dir, cfg, held_out, oracle, quiet)
    finally:
        AcceleratorState._reset_state()  # lets a later run() in this process choose another mixed precision


def _evaluate(
    run_dir: Path, cfg: APOConfig, held_out: list[str], oracle: Oracle | PairwiseOracle | None, quiet: bool
) -> list[dict[str, Any]]:
    from accelerate import Accelerator

    from apo_trainer.runtime import load_tokenizer

    store = RunStore(run_dir / "eval")
    run_store = RunStore(run_dir)
    with store.lock():
        _check_settings(store, cfg)
        store.remove_stale_temporaries()
        sampling = dataclasses.replace(
            cfg,
            samples_per_prompt=1,
            temperature=cfg.eval_temperature,
            top_p=cfg.eval_top_p,
            top_k=cfg.eval_top_k,
            max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
            min_new_tokens=0,
            use_generation_config=cfg.use_generation_config,
        )
        ctx = RunContext(
            config=sampling,
            accelerator=Accelerator(cpu=not torch.cuda.is_available()),
            store=store,
            tokenizer=load_tokenizer(cfg),
            prompts=held_out,
            oracle=oracle,
            quiet=quiet,
        )
        judge = oracle
        records = []
        t = 0
        while t == 0 or run_store.done(t - 1, "extrapolate") is not None:
            policy = cfg.model if t == 0 else str(run_store.policy(t - 1))
            if store.done(t, "sample") is None:
                seed = phase_seed(cfg.seed, t, "eval-sample")
                seed_everything(seed)
                rows, summary = _sample(ctx, sampling, policy, held_out, t, seed)
                store.write_jsonl(store.samples(t), rows)
                store.mark_done(t, "sample", {k: v for k, v in summary.items() if k != "new_tokens_per_second"})
            if store.done(t, "judge") is None:
                judge = judge or load_oracle(
                    cfg.oracle,
                    device=ctx.device,
                    batch_size=cfg.oracle_batch_size,
                    trust_remote_code=cfg.trust_remote_code,
                    cache_dir=store.root,
                )
                with user_oracle(cfg.oracle or getattr(judge, "name", type(judge).__name__), t, "eval judge"):
                    rows = _judge(store, cfg, judge, t)
                store.write_jsonl(store.round_dir(t) / "eval.jsonl", rows)
                store.mark_done(t, "judge", summarise(rows, cfg.eval_bootstrap, phase_seed(cfg.seed, t, "eval-ci")))
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


def _judge(store: RunStore, cfg: APOConfig, oracle: Any, t: int) -> list[dict[str, Any]]:
    rows = read_jsonl(store.samples(t))
    prompts = [r["prompt"] for r in rows]
    responses = [r["responses"][0] for r in rows]
    if cfg.eval_reference:
        refs = _reference_file(Path(cfg.eval_reference), cfg.prompt_field)
        missing = [p for p in prompts if p not in refs]
        if missing:
            raise ConfigError(
                f"config: eval_reference {cfg.eval_reference} has no response for the prompt {missing[0][:60]!r} "
                f"({len(missing)} missing); add them or drop eval_reference",
                exit_code=1,
            )
        references = [refs[p] for p in prompts]
    else:
        base = {r["prompt"]: r["responses"][0] for r in read_jsonl(store.samples(0))}
        references = [base[p] for p in prompts]
    prefs = preferences(oracle, prompts, responses, references, cfg.oracle_batch_size)
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


def _reference_file(path: Path, prompt_field: str) -> dict[str, str]:
    out = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
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
        out[key] = obj["output"]
    return out


def _check_settings(store: RunStore, cfg: APOConfig) -> None:
    now = {k: getattr(cfg, k) for k in ("oracle", *EVAL_KEYS)}
    path = store.root / "settings.json"
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in now if before.get(k) != now[k]]
        if changed:
            detail = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed[:3])
            raise ConfigError(
                f"{store.root} was made with other eval settings ({detail}); restore them or delete {store.root}",
                exit_code=1,
            )
        return
    store.write_text(path, json.dumps(now, sort_keys=True) + "\n")


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
