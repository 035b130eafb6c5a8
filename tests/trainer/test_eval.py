"""apo-train eval: win rates against a reference with a bootstrap interval and AlpacaEval's length control;
held-out prompts; sampling that follows the config alone; dropout off in training."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil

import pytest
import torch

from apo_trainer import evaluation, store
from apo_trainer.evaluation import bootstrap_interval, lc_win_rate, preferences
from apo_trainer.oracle import CallableOracle, PairwiseCallableOracle
from tests.trainer.conftest import tiny_config

# A fixed toy annotation set: preference of the policy's response over the reference's, with lengths.
PREFS = [1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 1.0, 0.5, 0.9, 0.2, 1.0, 0.7]
LEN_POLICY = [120, 40, 80, 150, 200, 60, 170, 90, 130, 50, 160, 110]
LEN_REFERENCE = [100, 90, 80, 100, 100, 100, 100, 90, 100, 100, 100, 100]


def test_bootstrap_interval_is_the_percentile_interval_of_seeded_resamples():
    lo, hi = bootstrap_interval(PREFS, 500, seed=7)
    assert (lo, hi) == bootstrap_interval(PREFS, 500, seed=7)
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(len(PREFS), (500, len(PREFS)), generator=g).tolist()
    means = sorted(sum(PREFS[i] for i in row) / len(row) for row in idx)

    def quantile(q):  # linear interpolation between order statistics
        pos = q * (len(means) - 1)
        below = math.floor(pos)
        return means[below] + (pos - below) * (means[min(below + 1, len(means) - 1)] - means[below])

    assert lo == pytest.approx(quantile(0.025), abs=1e-12) and hi == pytest.approx(quantile(0.975), abs=1e-12)
    assert lo < sum(PREFS) / len(PREFS) < hi


def test_preferences_pairwise_both_orders_scalar_bradley_terry_ties_half():
    first = PairwiseCallableOracle(lambda ps, a, b: [0.9 if x == "good" else 0.6 for x in a])
    got = preferences(first, ["p", "p"], ["good", "bad"], ["bad", "good"], batch=3)
    assert got == pytest.approx([(0.9 + 1 - 0.6) / 2, (0.6 + 1 - 0.9) / 2], abs=1e-15)
    scalar = CallableOracle(lambda ps, rs: [float(len(r)) for r in rs])
    got = preferences(scalar, ["p"] * 3, ["aaa", "a", "aa"], ["a", "aaa", "bb"], batch=2)
    assert got == pytest.approx([1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2)), 0.5], abs=1e-15)


def test_lc_win_rate_removes_a_pure_length_preference():
    # The judge prefers whatever is longer; the policy is longer on 3 of 4 prompts: raw 0.75, length-free 0.5.
    n = 40
    pol = [200 if i % 4 else 0 for i in range(n)]
    ref = [100] * n
    prefs = [0.95 if p > r else 0.05 for p, r in zip(pol, ref, strict=True)]
    raw = sum(prefs) / n
    lc = lc_win_rate(prefs, pol, ref)
    assert raw == pytest.approx(0.725) and abs(lc - 0.5) < 0.01
    # no length difference at all: the LC win rate follows the raw preference
    assert lc_win_rate([0.8] * 20, [10] * 20, [10] * 20) == pytest.approx(0.8, abs=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("alpaca_eval") is None, reason="alpaca-eval is not installed")
def test_lc_win_rate_matches_alpaca_evals_glm():
    import random

    import pandas as pd
    from alpaca_eval.metrics import glm_winrate as ae

    rng = random.Random(0)
    for case in range(5):
        n = 60 + 20 * case
        pol = [rng.randint(20, 400) for _ in range(n)]
        ref = [rng.randint(50, 250) for _ in range(n)]
        prefs = [
            min(1.0, max(0.0, 0.5 + 0.002 * (p - r) + rng.uniform(-0.4, 0.4) + 0.05 * case)) for p, r in zip(pol, ref)
        ]
        theirs = _alpaca_eval_lc(ae, pd, prefs, pol, ref)
        assert lc_win_rate(prefs, pol, ref) == pytest.approx(theirs, abs=1e-4)


def _alpaca_eval_lc(ae, pd, prefs, pol, ref):
    """AlpacaEval's own featurisation and fit (glm "length_controlled_minimal"), without its Hub download."""
    delta = pd.Series(ref, dtype=float) - pd.Series(pol, dtype=float)  # output_1 = reference, output_2 = policy
    df = pd.DataFrame({"preference": prefs, "std_delta_len": delta / delta.std(), "not_gamed_baseline": True})
    test = df[["not_gamed_baseline"]].copy()
    test["std_delta_len"] = 0
    train, x_test = ae.make_dmatrix_for_model(df, test, formula=ae.GLM_INFO["length_controlled_minimal"]["formula"])
    model = ae.fit_LogisticRegressionCV(train, "preference", is_ytrue_proba=True, n_splits=5)
    return float(model.predict_proba(x_test)[:, 1].mean())


@pytest.fixture(scope="module")
def eval_run(tiny, tmp_path_factory):
    from apo_trainer.loop import run

    out = tmp_path_factory.mktemp("evalrun") / "out"
    run(tiny_config(tiny, out, rounds=2, eval_fraction=0.25), quiet=True)
    return out


@pytest.mark.slow
def test_the_final_round_is_judged_on_held_out_prompts(tiny, eval_run):
    from apo_trainer.config import APOConfig
    from apo_trainer.prompts import split_prompts

    train, held = split_prompts(APOConfig.from_dict({"prompts": str(tiny / "prompts.jsonl"), "eval_fraction": 0.25}))
    assert len(held) == 4 and len(train) == 12

    def rows(t):
        return [json.loads(x) for x in (eval_run / f"round-{t}/samples.jsonl").read_text().splitlines()]

    assert sorted(r["prompt"] for r in rows(2)) == sorted(held)
    for t in range(2):
        assert not {r["prompt"] for r in rows(t)} & set(held)


@pytest.mark.slow
def test_raising_rounds_after_a_held_out_final_round_samples_it_again_from_training_prompts(eval_run, tmp_path):
    from apo_trainer.loop import run

    out = tmp_path / "run"
    shutil.copytree(eval_run, out)
    held = {json.loads(x)["prompt"] for x in (out / "round-2/samples.jsonl").read_text().splitlines()}
    import yaml

    from apo_trainer.config import APOConfig

    values = yaml.safe_load((out / "config.yaml").read_text())
    cfg = APOConfig.from_dict({**values, "rounds": 3, "output_dir": str(out)})
    records = run(cfg, quiet=True, allow_changed_config=True)  # output_dir differs: the run was copied
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    trained_on = {json.loads(x)["prompt"] for x in (out / "round-2/samples.jsonl").read_text().splitlines()}
    assert not trained_on & held and records[2]["pairs"] >= 1
    final = {json.loads(x)["prompt"] for x in (out / "round-3/samples.jsonl").read_text().splitlines()}
    assert final == held


@pytest.mark.slow
def test_eval_writes_win_rates_per_round_and_resumes_to_the_same_bytes(eval_run, tmp_path, monkeypatch):
    from apo_trainer.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        shutil.copytree(eval_run, d)
    records = evaluation.evaluate_run(a, quiet=True)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[0]["win_rate"] == 0.5 and records[0]["lc_win_rate"] == pytest.approx(0.5, abs=1e-6)
    for r in records:
        assert 0 <= r["win_rate_ci_low"] <= r["win_rate"] <= r["win_rate_ci_high"] <= 1 and r["prompts"] == 4
    rows = [json.loads(x) for x in (a / "eval/round-2/eval.jsonl").read_text().splitlines()]
    assert records[2]["win_rate"] == pytest.approx(sum(r["preference"] for r in rows) / 4, abs=1e-15)
    assert [json.loads(x) for x in (a / "eval/summary.jsonl").read_text().splitlines()] == records

    class Crash(Exception):
        pass

    def crash(t, phase, where):
        if (t, phase, where) == (1, "judge", "end"):
            raise Crash

    monkeypatch.setattr(store, "fault_hook", crash)
    with pytest.raises(Crash):
        evaluation.evaluate_run(b, quiet=True)
    monkeypatch.setattr(store, "fault_hook", None)
    assert evaluation.evaluate_run(b, quiet=True) == records

    def files(d):
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted((d / "eval").rglob("*")) if p.is_file()}

    assert files(a) == files(b)

    with pytest.raises(SystemExit) as e:
        main(["eval", str(a), str(b), "--output", str(tmp_path / "both"), "--quiet"])
    assert e.value.code == 0
    assert (tmp_path / "both/eval.md").read_text().count("| a |") == 3
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "both/eval.png").stat().st_size > 0
    with pytest.raises(SystemExit) as e:
        main(["eval", str(a), "--set", "eval_temperature=0.3", "--quiet"])
    assert e.value.code == 1  # the folder was made with other eval settings


@pytest.mark.slow
def test_eval_against_a_reference_file_keyed_by_prompt(eval_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(eval_run, out)
    held = [json.loads(x)["prompt"] for x in (eval_run / "round-2/samples.jsonl").read_text().splitlines()]
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps({"instruction": p, "output": ""}) + "\n" for p in held))
    records = evaluation.evaluate_run(out, [f"eval_reference={ref}"], quiet=True)
    # word_sum scores an empty response 0, so any response with a word beats it
    assert all(r["win_rate"] >= 0.5 for r in records)
    ref.write_text(json.dumps({"instruction": held[0], "output": ""}) + "\n")
    shutil.rmtree(out / "eval")
    from apo_trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="has no response for the prompt"):
        evaluation.evaluate_run(out, [f"eval_reference={ref}"], quiet=True)


def test_sampling_ignores_the_checkpoints_generation_config(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from apo_trainer.sample import generate_transformers
    from tests.trainer.tiny import make_policy

    path = make_policy(tmp_path / "p", seed=2)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.repetition_penalty = 50.0
    model.save_pretrained(path)
    prompts = [[1, 5 + i, 9] for i in range(16)]

    def repeats(use_generation_config):
        from apo_trainer.config import APOConfig

        cfg = APOConfig(max_new_tokens=12, min_new_tokens=12, use_generation_config=use_generation_config)
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(path)
        out = generate_transformers(m, prompts, k=4, config=cfg, pad_id=0, eos=[], static=False)
        return sum(len(set(r)) < len(r) for rows in out for r in rows)

    assert repeats(True) == 0  # the checkpoint's config bans repeats ...
    assert repeats(False) > 16  # ... while the policy itself repeats tokens often


@pytest.mark.parametrize("disable", [True, False])
def test_first_training_step_has_margin_zero_with_dropout_disabled(tmp_path, disable):
    from transformers import GPT2Config, GPT2LMHeadModel

    from apo_trainer.loop import run
    from tests.trainer.tiny import make_prompts, make_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=128,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
    )
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "policy")
    make_tokenizer().save_pretrained(tmp_path / "policy")
    make_prompts(tmp_path / "prompts.jsonl", n=8)
    out = tmp_path / "out"
    run(tiny_config(tmp_path, out, rounds=1, final_eval=False, grad_accum=1, disable_dropout=disable), quiet=True)
    first = json.loads((out / "round-0/train_log.jsonl").read_text().splitlines()[0])
    # Reference and training batch the sequences differently: equal up to float rounding, not bit for bit.
    if disable:
        assert abs(first["margin"]) <= 1e-6 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    else:
        assert abs(first["margin"]) > 1e-5  # dropout: orders of magnitude above the rounding
