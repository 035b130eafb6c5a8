"""APO's identities in the paper's own setting (log-linear policy, exact DPO steps), checked in float64."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from bench.loglinear import (
    apo_parameters,
    apo_probabilities,
    dpo_population_step,
    effective_steps,
    fitted_step,
    gap_bound,
    make_problem,
    proximal_step,
    suboptimality_gap,
)


def _problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    weights = 0.3 * torch.randn(6, generator=g, dtype=torch.float64)
    return make_problem(n_prompts=5, n_responses=24, dim=6, beta=0.5, seed=seed, weights=weights)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.7])
def test_parameter_step_equals_probability_step(alpha):
    # theta_{t+1} = theta_hat_{t+1} + a (theta_hat_{t+1} - theta_hat_t)  <=>  pi_hat_{t+1} (pi_hat_{t+1} / pi_hat_t)^a
    problem = _problem()
    thetas = apo_parameters(problem, alpha, rounds=6)
    tables = apo_probabilities(problem, alpha, rounds=6)
    assert len(thetas) == len(tables) == 7
    for t, (theta, pi) in enumerate(zip(thetas, tables, strict=True)):
        assert torch.allclose(problem.policy(theta), pi, rtol=1e-12, atol=1e-15), f"round {t}"
        assert (problem.log_policy(theta) - pi.log()).abs().max() < 1e-12, f"round {t}"


def test_probability_step_differs_from_a_wrong_anchor():
    # The identity above is specific to the raw anchor: extrapolating against theta_t gives other policies.
    problem = _problem()
    wrong = apo_parameters(problem, 0.3, rounds=3, anchor="extrapolated")[-1]
    right = apo_probabilities(problem, 0.3, rounds=3)[-1]
    assert (problem.policy(wrong) - right).abs().max() > 1e-3


def test_alpha_zero_is_iterative_dpo():
    problem = _problem()
    theta = problem.theta0
    for t, got in enumerate(apo_parameters(problem, 0.0, rounds=4)):
        assert torch.equal(got, theta), f"round {t}"
        theta = proximal_step(problem, theta)


def test_population_dpo_minimiser_is_the_proximal_step():
    problem = _problem(seed=2)
    ref = problem.theta0 + 0.1
    assert (dpo_population_step(problem, ref) - proximal_step(problem, ref)).abs().max() < 1e-6


def test_momentum_step_grows_toward_one_over_one_minus_alpha():
    alpha = 0.3
    problem = _problem()
    fitted = [fitted_step(problem, theta) for theta in apo_parameters(problem, alpha, rounds=12)]
    assert fitted == pytest.approx(effective_steps(alpha, 12), abs=1e-9)
    # three APO rounds move as far as 4.107 plain rounds, two as far as 2.69
    assert fitted[2] == pytest.approx(2.69, abs=1e-9)
    assert fitted[3] == pytest.approx(4.107, abs=1e-9)
    steps = [b - a for a, b in pairwise(fitted)]
    assert all(b > a for a, b in pairwise(steps))
    for t, step in enumerate(steps):  # round t+1 moves 1 + alpha + ... + alpha^(t+1) plain rounds
        assert step == pytest.approx((1 - alpha ** (t + 2)) / (1 - alpha), abs=1e-9)
    assert steps[-1] == pytest.approx(1 / (1 - alpha), abs=1e-6)


def test_extrapolated_anchor_gives_a_constant_step():
    alpha = 0.3
    problem = _problem()
    fitted = [fitted_step(problem, t) for t in apo_parameters(problem, alpha, rounds=8, anchor="extrapolated")]
    assert fitted == pytest.approx([t * (1 + alpha) for t in range(9)], abs=1e-9)
    assert effective_steps(alpha, 8, anchor="extrapolated") == pytest.approx(fitted, abs=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5])
def test_suboptimality_gap_within_its_bound(alpha):
    problem = make_problem(n_prompts=8, n_responses=400, dim=4, beta=0.1, seed=3)
    thetas = apo_parameters(problem, alpha, rounds=8)
    gaps = [suboptimality_gap(problem, problem.policy(theta)) for theta in thetas]
    assert all(b < a for a, b in pairwise(gaps))
    for t, (gap, c) in enumerate(zip(gaps[1:], effective_steps(alpha, 8)[1:], strict=True), start=1):
        assert gap <= gap_bound(problem, c), f"round {t}"
