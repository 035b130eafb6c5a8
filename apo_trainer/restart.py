"""Momentum restart (``restart: score``): drop the extrapolation for one step when progress reverses.

Adaptive restart of accelerated methods (O'Donoghue and Candes 2015, "function scheme"): when round t's policy
theta_t scores below theta_{t-1}, the momentum that produced theta_t overshot, so round t's extrapolation uses
alpha 0 (theta_{t+1} = theta_hat_{t+1}); the next round extrapolates with the configured alpha again, its step
theta_hat_{t+2} - theta_hat_{t+1} being one round of training from the restart point.

The decision is a pure function of a score history (higher is better), so that any per-round measure can drive
it. Today the history is each round's mean oracle score, read back from the stored judge outputs
(round-<i>/scores.json), never from process memory: a resumed run makes the same decisions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import NamedTuple

from apo_trainer.errors import TrainError
from apo_trainer.store import RunStore

MODES = ("none", "score")


class Decision(NamedTuple):
    """The alpha of one extrapolation step and whether momentum was dropped for it."""

    alpha: float
    restarted: bool


def decide(history: Sequence[float], alpha: float, mode: str) -> Decision:
    """Alpha for the extrapolation that follows the last entry of ``history`` (the scores of theta_0 .. theta_t).

    With ``mode`` 'score', a score strictly below the one before it restarts (alpha 0); a tie, the first round and
    any rise keep ``alpha``. ``restarted`` is true only when momentum was actually dropped (``alpha`` > 0).

    >>> decide([0.5, 0.4], 0.3, "score")
    Decision(alpha=0.0, restarted=True)
    >>> decide([0.5, 0.5], 0.3, "score")
    Decision(alpha=0.3, restarted=False)
    """
    if mode not in MODES:
        raise ValueError(f"restart mode {mode!r}; use one of {', '.join(MODES)}")
    if not history:
        raise ValueError("restart needs the score of the current round")
    drop = mode == "score" and len(history) >= 2 and history[-1] < history[-2]
    if drop and alpha > 0:
        return Decision(0.0, True)
    return Decision(alpha, False)


def mean_score(store: RunStore, t: int) -> float:
    """Round ``t``'s mean oracle score over all samples, from round-<t>/scores.json (as the judge phase reports it)."""
    rows = json.loads(store.scores(t).read_text(encoding="utf-8"))["scores"]
    if rows is None:
        raise TrainError(
            "restart: score reads each round's mean oracle score, which a pairwise oracle does not give (its win "
            "rates average 1/2 by construction); use a scalar oracle or restart: none"
        )
    flat = [float(v) for row in rows for v in row]
    return sum(flat) / len(flat)


def score_history(store: RunStore, t: int) -> list[float]:
    """Mean oracle scores of rounds 0 .. t (the history ``decide`` reads)."""
    return [mean_score(store, i) for i in range(t + 1)]
