"""Preference losses on summed response log-ratios ``logr(y) = log pi_theta(y|x) - log pi_ref(y|x)``.

Each function returns the per-pair loss (float32, shape (B,)); the trainer averages over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(logr_chosen: torch.Tensor, logr_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO, sigmoid form: ``-log sigmoid(beta * (logr(y_w) - logr(y_l)))``.

    Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
    NeurIPS 2023, arXiv 2305.18290, Eq. 7.
    """
    return -F.logsigmoid(beta * (logr_chosen.float() - logr_rejected.float()))


def sppo_loss(
    logr_chosen: torch.Tensor,
    logr_rejected: torch.Tensor,
    p_chosen: torch.Tensor,
    p_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """SPPO: ``((logr(y_w) - (p_w - 1/2)/beta)^2 + (logr(y_l) - (p_l - 1/2)/beta)^2) / 2``.

    Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675, Eq. 4.4;
    ``p`` is the estimated probability that the response beats the current policy (mean Bradley-Terry win-rate
    over the K samples, self-comparison 0.5). The two terms are averaged, as in the authors' reference code.
    """
    target_w = (p_chosen.float() - 0.5) / beta
    target_l = (p_rejected.float() - 0.5) / beta
    return ((logr_chosen.float() - target_w) ** 2 + (logr_rejected.float() - target_l) ** 2) / 2
