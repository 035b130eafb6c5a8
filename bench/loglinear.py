"""APO in the paper's own setting: a log-linear policy over a finite response set, exact DPO steps.

The policy is pi_theta(y|x) = softmax_y(theta . phi(x, y)) with features ``phi`` of shape (X, Y, d), and the reward
is realizable, r(x, y) = w . phi(x, y). The exact DPO (proximal) step from a reference pi_t is
pi_hat_{t+1} ∝ pi_t exp(r / beta); in parameter space it is theta_hat_{t+1} = theta_t + w / beta. Everything here
runs in float64 so that the identities the paper relies on can be checked to machine precision.

Analysis, not runtime: it lives outside the installed packages. bench/loglinear_apo.py prints the evidence tables
of docs/demo.md from it, and tests/bench/test_loglinear.py pins its identities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Anchor = Literal["raw", "extrapolated"]


@dataclass(frozen=True)
class LogLinearProblem:
    """Features (X, Y, d), reward weights (d,), initial parameters (d,) and the DPO temperature beta."""

    features: torch.Tensor
    weights: torch.Tensor
    theta0: torch.Tensor
    beta: float

    @property
    def reward(self) -> torch.Tensor:
        """r(x, y) = w . phi(x, y), shape (X, Y)."""
        return self.features @ self.weights

    def log_policy(self, theta: torch.Tensor) -> torch.Tensor:
        """log pi_theta(y|x), shape (X, Y)."""
        return torch.log_softmax(self.features @ theta, dim=-1)

    def policy(self, theta: torch.Tensor) -> torch.Tensor:
        """pi_theta(y|x), shape (X, Y)."""
        return torch.softmax(self.features @ theta, dim=-1)


def make_problem(
    n_prompts: int = 16,
    n_responses: int = 64,
    dim: int = 8,
    beta: float = 0.1,
    seed: int = 0,
    weights: torch.Tensor | None = None,
) -> LogLinearProblem:
    """A random problem: feature 0 is uniform on [0, 1], the others standard normal.

    Without ``weights`` the reward is feature 0, so rewards are spread evenly up to the best response, the regime
    in which the sub-optimality gap of softmax policies falls as 1/(effective step) rather than exponentially.
    """
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_prompts, n_responses, dim, generator=g, dtype=torch.float64)
    features[..., 0] = torch.rand(n_prompts, n_responses, generator=g, dtype=torch.float64)
    if weights is None:
        weights = torch.zeros(dim, dtype=torch.float64)
        weights[0] = 1.0
    theta0 = 0.5 * torch.randn(dim, generator=g, dtype=torch.float64)
    theta0[0] = 0.0
    return LogLinearProblem(features, weights.to(torch.float64), theta0, beta)


def proximal_step(problem: LogLinearProblem, theta: torch.Tensor) -> torch.Tensor:
    """The exact DPO step in parameter space: argmax E_pi[r] - beta KL(pi || pi_theta) is theta + w / beta."""
    return theta + problem.weights / problem.beta


def dpo_population_loss(problem: LogLinearProblem, theta: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """DPO loss with infinite data: pairs (y, y') ~ pi_ref x pi_ref, labels from Bradley-Terry on the reward."""
    log_ref = problem.log_policy(ref)
    h = problem.beta * (problem.log_policy(theta) - log_ref)  # implicit reward, (X, Y)
    margin = h[:, :, None] - h[:, None, :]  # (X, Y, Y)
    prefer = torch.sigmoid(problem.reward[:, :, None] - problem.reward[:, None, :])
    pair_weight = log_ref.exp()[:, :, None] * log_ref.exp()[:, None, :]
    loss = -(prefer * torch.nn.functional.logsigmoid(margin))
    return (pair_weight * loss).sum(dim=(1, 2)).mean()


def dpo_population_step(problem: LogLinearProblem, theta: torch.Tensor, iterations: int = 200) -> torch.Tensor:
    """Minimise the population DPO loss against reference ``theta`` numerically (L-BFGS from ``theta``).

    Its minimiser is the proximal step ``theta + w / beta``: DPO with a moving reference is a proximal point method.
    """
    x = theta.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [x],
        lr=1.0,
        max_iter=iterations,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = dpo_population_loss(problem, x, theta)
        loss.backward()
        return loss

    opt.step(closure)
    return x.detach()


def apo_parameters(problem: LogLinearProblem, alpha: float, rounds: int, anchor: Anchor = "raw") -> list[torch.Tensor]:
    """theta_0 .. theta_rounds of APO with exact steps, in parameter space.

    ``anchor="raw"`` is the paper's rule theta_{t+1} = theta_hat_{t+1} + alpha (theta_hat_{t+1} - theta_hat_t);
    ``anchor="extrapolated"`` is the tempting variant that extrapolates against theta_t instead of theta_hat_t.
    """
    theta, theta_hat = problem.theta0.clone(), problem.theta0.clone()
    out = [theta]
    for _ in range(rounds):
        new_hat = proximal_step(problem, theta)
        prev = theta_hat if anchor == "raw" else theta
        theta, theta_hat = new_hat + alpha * (new_hat - prev), new_hat
        out.append(theta)
    return out


def apo_probabilities(problem: LogLinearProblem, alpha: float, rounds: int) -> list[torch.Tensor]:
    """pi_0 .. pi_rounds of APO computed on probability tables only, never touching parameters.

    pi_hat_{t+1} ∝ pi_t exp(r / beta) and pi_{t+1} ∝ pi_hat_{t+1} (pi_hat_{t+1} / pi_hat_t)^alpha.
    """
    pi = problem.policy(problem.theta0)
    pi_hat = pi
    out = [pi]
    tilt = torch.exp(problem.reward / problem.beta)
    for _ in range(rounds):
        new_hat = _normalise(pi * tilt)
        pi, pi_hat = _normalise(new_hat * (new_hat / pi_hat) ** alpha), new_hat
        out.append(pi)
    return out


def effective_steps(alpha: float, rounds: int, anchor: Anchor = "raw") -> list[float]:
    """c_0 .. c_rounds with log pi_t = log pi_0 + c_t r / beta (+ a constant per prompt), from the recurrences.

    Plain iterative DPO has c_t = t. With the raw anchor the step c_{t+1} - c_t is 1 + alpha + ... + alpha^(t+1)
    (momentum, tending to 1/(1-alpha)); with the extrapolated anchor it stays 1 + alpha.
    """
    c, c_hat = 0.0, 0.0
    out = [c]
    for _ in range(rounds):
        new_hat = c + 1.0
        prev = c_hat if anchor == "raw" else c
        c, c_hat = new_hat + alpha * (new_hat - prev), new_hat
        out.append(c)
    return out


def fitted_step(problem: LogLinearProblem, theta: torch.Tensor) -> float:
    """The c with log pi_theta = log pi_0 + c r / beta (+ const per prompt), fitted by least squares on policies."""
    delta = problem.log_policy(theta) - problem.log_policy(problem.theta0)
    u = problem.reward / problem.beta
    delta = delta - delta.mean(dim=-1, keepdim=True)
    u = u - u.mean(dim=-1, keepdim=True)
    return float((delta * u).sum() / (u * u).sum())


def suboptimality_gap(problem: LogLinearProblem, pi: torch.Tensor) -> float:
    """Mean over prompts of max_y r(x, y) - E_{y ~ pi(.|x)} r(x, y)."""
    r = problem.reward
    return float((r.max(dim=-1).values - (pi * r).sum(dim=-1)).mean())


def gap_bound(problem: LogLinearProblem, step: float) -> float:
    """Upper bound beta * mean_x log(1 / pi_0(y*|x)) / c for pi ∝ pi_0 exp(c r / beta).

    From the convexity of log Z: the bound behind the paper's O(1/t) (c_t = t) and O((1-alpha)/t) rates.
    """
    if step <= 0:
        return math.inf
    best = problem.reward.argmax(dim=-1, keepdim=True)
    log_p0 = problem.log_policy(problem.theta0).gather(-1, best)
    return float(problem.beta * (-log_p0).mean() / step)


def _normalise(p: torch.Tensor) -> torch.Tensor:
    return p / p.sum(dim=-1, keepdim=True)
