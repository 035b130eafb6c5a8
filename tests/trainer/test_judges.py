"""Pairwise judges: the K x K matrix with both orders averaged, win rates p_i, best/worst pairs (PairRM: test_pairrm)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from apo_trainer.data import build_pairs, win_rates
from apo_trainer.demo.task import ToyOracle, ToyPairwiseJudge, ToyTask
from apo_trainer.errors import TrainError
from apo_trainer.oracle import (
    CallableOracle,
    PairwiseCallableOracle,
    bradley_terry,
    preference_matrices,
)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_matrix_asks_both_orders_and_averages_them():
    f = {(0, 1): 0.9, (1, 0): 0.3, (0, 2): 0.6, (2, 0): 0.6, (1, 2): 0.2, (2, 1): 0.7}
    table = {("x", f"r{a}", f"r{b}"): v for (a, b), v in f.items()}
    oracle = PairwiseCallableOracle(lambda ps, a, b: [table[(p, x, y)] for p, x, y in zip(ps, a, b)])
    (m,), scores = preference_matrices(oracle, ["x"], [["r0", "r1", "r2"]], batch_size=4)
    assert scores is None
    want = [[0.5, (0.9 + 1 - 0.3) / 2, (0.6 + 1 - 0.6) / 2], [0, 0.5, (0.2 + 1 - 0.7) / 2], [0, 0, 0.5]]
    for i in range(3):
        for j in range(i + 1, 3):
            want[j][i] = 1 - want[i][j]
    assert torch.allclose(m, torch.tensor(want, dtype=torch.float64), atol=1e-15, rtol=0)
    # p_i = mean_j P_ij (P_ii = 1/2), by hand: p_0 = (0.5 + 0.8 + 0.5) / 3, p_1 = (0.2 + 0.5 + 0.25) / 3
    p = m.mean(dim=1).tolist()
    assert p == pytest.approx([1.8 / 3, 0.95 / 3, (0.5 + 0.75 + 0.5) / 3], abs=1e-15)
    pairs, ties = build_pairs(None, [p])
    assert ties == 0 and pairs == [{"prompt": 0, "chosen": 0, "rejected": 1, "p_chosen": p[0], "p_rejected": p[1]}]


def test_pairwise_calls_are_batched_across_prompts():
    calls = []

    def fn(ps, a, b):
        calls.append(len(ps))
        return [0.5] * len(ps)

    preference_matrices(PairwiseCallableOracle(fn, batch_size=1000), ["x", "y"], [["a"] * 3, ["b"] * 3], 5)
    assert calls == [5, 5, 2]  # 2 prompts x 6 ordered pairs, in batches of 5
    with pytest.raises(TrainError, match="probabilities in \\[0, 1\\]"):
        preference_matrices(PairwiseCallableOracle(lambda ps, a, b: [1.5] * len(ps)), ["x"], [["a", "b"]], 4)
    with pytest.raises(TrainError, match="returned 1 probabilities for 2 comparisons"):
        preference_matrices(PairwiseCallableOracle(lambda ps, a, b: [0.5]), ["x"], [["a", "b"]], 4)


def test_the_demo_judges_position_bias_is_removed_by_the_averaging():
    task = ToyTask()
    judge = ToyPairwiseJudge(task, bias=0.3)
    prompt = "a b c d ="
    # true rewards 0.5, 0.55, 0.0 (12 words each): response 1 is the best
    responses = ["a b c d a b x x x x x x", "a b c d a b c x x x x x", "x y z x y z x y z x y z"]
    exact = ToyOracle(task).score([prompt] * 3, responses)
    assert exact[1] > exact[0] > exact[2]
    f = {(i, j): judge.compare([prompt], [responses[i]], [responses[j]])[0] for i in range(3) for j in range(3)}
    assert f[(0, 1)] > 0.5 and f[(1, 0)] > 0.5  # each wins when shown first: the bias
    # Asking each pair once (first index first) lets the bias pick the wrong best response.
    once = torch.full((3, 3), 0.5, dtype=torch.float64)
    for i in range(3):
        for j in range(i + 1, 3):
            once[i, j], once[j, i] = f[(i, j)], 1 - f[(i, j)]
    assert int(once.mean(dim=1).argmax()) == 0
    (m,), _ = preference_matrices(judge, [prompt], [responses], batch_size=4)
    unbiased = 0.7 * (bradley_terry([10 * r for r in exact]) - 0.5) + 0.5
    assert torch.allclose(m, unbiased, atol=1e-15, rtol=0)
    assert torch.allclose(m + m.T, torch.ones(3, 3, dtype=torch.float64), atol=1e-15, rtol=0)
    pairs, _ = build_pairs(None, [m.mean(dim=1).tolist()])
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == (1, 2)


def _old_build_pairs(scores):
    """The scalar-only pair rule before pairwise judges: best and worst score, first index on ties."""
    out = []
    for i, s in enumerate(scores):
        best = max(range(len(s)), key=s.__getitem__)
        worst = min(range(len(s)), key=s.__getitem__)
        if s[best] != s[worst]:
            out.append((i, best, worst))
    return out


def test_a_scalar_judge_gives_the_same_pairs_through_the_shared_path():
    rng = random.Random(0)
    scores = [[rng.choice([0.0, 0.25, 0.5, 1.0, rng.random()]) for _ in range(rng.randint(2, 8))] for _ in range(500)]
    scores += [[0.3, 0.3, 0.3], [1e-3, 2e-3, 1e-3], [5.0, -5.0, 5.0, -5.0]]
    oracle = CallableOracle(lambda ps, rs: [float(r) for r in rs])
    mats, got_scores = preference_matrices(oracle, ["p"] * len(scores), [[repr(v) for v in s] for s in scores], 7)
    assert got_scores == scores
    pairs, ties = build_pairs(got_scores, [m.mean(dim=1).tolist() for m in mats])
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == _old_build_pairs(scores)
    assert ties == len(scores) - len(pairs)
    assert all(p["p_chosen"] == pytest.approx(win_rates(scores[p["prompt"]])[p["chosen"]]) for p in pairs)


@pytest.mark.slow
def test_a_run_with_a_pairwise_judge_trains_on_its_win_rates(tiny, tmp_path):
    from apo_trainer.loop import run
    from tests.trainer.conftest import tiny_config

    out = tmp_path / "out"
    records = run(tiny_config(tiny, out, rounds=1, oracle="pairwise:tests.trainer.tiny:word_sum_pairwise"), quiet=True)
    judged = json.loads((out / "round-0" / "scores.json").read_text())
    assert judged["scores"] is None and len(judged["win_rates"]) == 6
    for m in judged["matrices"]:
        t = torch.tensor(m, dtype=torch.float64)
        assert torch.allclose(t + t.T, torch.ones_like(t), atol=1e-15, rtol=0)
    pairs = [json.loads(x) for x in (out / "round-0" / "pairs.jsonl").read_text().splitlines()]
    for p in pairs:
        w = judged["win_rates"][p["prompt"]]
        assert p["p_chosen"] == max(w) and p["p_rejected"] == min(w)
    assert records[0]["judge"] == "pairwise" and records[0]["steps"] >= 1


@pytest.mark.parametrize("f", [0.4, 0.9, 0.15, sig(1.0), 0.5])
def test_a_judge_that_cannot_tell_answers_apart_gives_exact_ties_and_no_pair(f):
    # (f + 1 - f) / 2 rounds f + 1 first: 1/2 +- 1 ulp for these f, and the tied prompt became a training pair.
    oracle = PairwiseCallableOracle(lambda ps, a, b: [f] * len(ps))
    mats, _ = preference_matrices(oracle, ["x", "y"], [["a", "b", "c"], ["a", "b"]], batch_size=4)
    assert all(bool((m == 0.5).all()) for m in mats)
    pairs, ties = build_pairs(None, [m.mean(dim=1).tolist() for m in mats])
    assert pairs == [] and ties == 2
    # Ties inside a prompt stay exact while others are told apart: 0 and 1 tie, 2 loses to both.
    table = {("a", "b"): f, ("b", "a"): f, ("a", "c"): 0.9, ("c", "a"): 0.2, ("b", "c"): 0.8, ("c", "b"): 0.1}
    oracle = PairwiseCallableOracle(lambda ps, a, b: [table[(x, y)] for x, y in zip(a, b)])
    (m,), _ = preference_matrices(oracle, ["x"], [["a", "b", "c"]], batch_size=4)
    assert m[0, 1] == m[1, 0] == 0.5
