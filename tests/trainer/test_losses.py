"""DPO and SPPO losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from apo_trainer.losses import dpo_loss, sppo_loss


def test_dpo_loss_matches_hand_computed_values():
    logr_w = torch.tensor([0.0, 2.0, -1.0])
    logr_l = torch.tensor([0.0, 1.0, 1.0])
    got = dpo_loss(logr_w, logr_l, beta=0.5)
    # -log sigmoid(0.5 * (w - l)) = log(1 + exp(-0.5 (w - l)))
    want = [math.log(2.0), math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.0))]
    assert got.tolist() == pytest.approx(want, rel=1e-6)


def test_dpo_loss_is_float32_for_bf16_inputs_and_stable_for_large_margins():
    got = dpo_loss(torch.tensor([200.0], dtype=torch.bfloat16), torch.tensor([-200.0], dtype=torch.bfloat16), 1.0)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(0.0, abs=1e-30)
    got = dpo_loss(torch.tensor([-200.0]), torch.tensor([200.0]), 1.0)
    assert got.item() == pytest.approx(400.0)


def test_sppo_loss_matches_hand_computed_values():
    logr_w = torch.tensor([1.0, 0.0])
    logr_l = torch.tensor([-2.0, 0.0])
    p_w = torch.tensor([0.75, 0.5])
    p_l = torch.tensor([0.25, 0.5])
    beta = 0.1
    got = sppo_loss(logr_w, logr_l, p_w, p_l, beta)
    # targets (p - 1/2) / beta: +2.5 and -2.5; loss = ((1 - 2.5)^2 + (-2 + 2.5)^2) / 2 = (2.25 + 0.25) / 2
    assert got.tolist() == pytest.approx([1.25, 0.0], abs=1e-6)


def test_sppo_gradient_pushes_toward_the_win_rate_targets():
    logr_w = torch.zeros(1, requires_grad=True)
    logr_l = torch.zeros(1, requires_grad=True)
    sppo_loss(logr_w, logr_l, torch.tensor([0.9]), torch.tensor([0.1]), 0.01).sum().backward()
    # d/dx ((x - 40)^2 / 2) at 0 = -40; d/dy ((y + 40)^2 / 2) at 0 = +40
    assert logr_w.grad.item() == pytest.approx(-40.0)
    assert logr_l.grad.item() == pytest.approx(40.0)
