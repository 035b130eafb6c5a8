"""The toy task: exact reward, tokenizer, oracle interface, warm-up."""

from __future__ import annotations

import math
import random

import pytest
import torch

from apo_trainer.demo.task import (
    WORDS,
    ToyOracle,
    ToyTask,
    build_model,
    build_tokenizer,
    make_prompts,
    reward,
    rewards,
    warmup,
    warmup_response,
)


@pytest.mark.parametrize(
    ("prompt", "response", "min_words", "expected"),
    [
        ("a b c d =", "a b c d a b c d a b c d", 0, 1.0),
        ("a b c d =", "e f g h e f g h e f g h", 12, 0.0),
        ("a b c d =", "a x b b", 0, 0.75),
        ("a b c d =", "= = a z", 0, 0.25),  # the separator is a word, never a prompt word
        ("a b c d =", "a <eos>", 0, 1.0),  # special tokens are not words
        ("a b c d =", "a b c", 12, 0.25),  # fixed length: dropped tokens count as misses
        ("a b c d =", "", 0, 0.0),
    ],
)
def test_reward_is_the_fraction_of_copied_words(prompt, response, min_words, expected):
    assert reward(prompt, response, min_words) == expected


def test_prompts_are_distinct_words_and_a_separator():
    task = ToyTask(prompt_words=5)
    prompts = make_prompts(50, task, seed=3)
    assert prompts == make_prompts(50, task, seed=3)
    for p in prompts:
        words = p.split()
        assert words[-1] == "=" and len(set(words[:-1])) == 5 and set(words[:-1]) <= set(WORDS)


def test_uniform_responses_score_prompt_words_over_vocabulary():
    rng = random.Random(0)
    task = ToyTask()
    prompts = make_prompts(2000, task, seed=1)
    responses = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in prompts]
    assert sum(rewards(prompts, responses)) / len(prompts) == pytest.approx(4 / 32, abs=0.01)
    copying = [warmup_response(p, task, rng) for p in prompts]
    expected = task.copy_prob + (1 - task.copy_prob) * 4 / 32
    assert sum(rewards(prompts, copying)) / len(prompts) == pytest.approx(expected, abs=0.01)


def test_oracle_goes_through_the_trainer_interface():
    from apo_trainer.oracle import Oracle, bradley_terry, load_oracle

    prompts = ["a b c d =", "a b c d =", "e f g h ="]
    responses = ["a a a a", "a z z z", "e f z z"]
    oracle = ToyOracle(ToyTask(response_words=4))
    assert isinstance(oracle, Oracle)
    scores = oracle.score(prompts, responses)
    assert scores == [1.0, 0.25, 0.5]
    assert load_oracle("callable:apo_trainer.demo.task:rewards_free_length").score(prompts, responses) == scores
    assert load_oracle("callable:apo_trainer.demo.task:rewards").score(prompts, responses) == [1 / 3, 1 / 12, 1 / 6]
    p = bradley_terry(scores)
    assert p[0, 1] == pytest.approx(torch.sigmoid(torch.tensor(0.75, dtype=torch.float64)).item())


def test_tokenizer_round_trips_and_saves(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    assert len(tok) == 36
    text = "a b 5 z ="
    ids = tok(text)["input_ids"]
    assert len(ids) == 5 and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([*tok("q r")["input_ids"], tok.eos_token_id], skip_special_tokens=True) == "q r"
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids and again.pad_token_id == tok.pad_token_id


@pytest.mark.slow
@pytest.mark.parametrize("free_length", [False, True])
def test_warmup_lowers_the_loss(free_length):
    task = ToyTask(warmup_steps=40, warmup_batch=32, free_length=free_length)
    tok = build_tokenizer()
    model = build_model(tok, task, seed=0)
    losses = warmup(model, tok, task, seed=0)
    assert len(losses) == 40
    # 40 steps learn at least which tokens are words (uniform: log 36 = 3.58 nats; words only: log 32 = 3.47)
    assert sum(losses[-5:]) / 5 < math.log(36) - 0.07 < sum(losses[:5]) / 5
