"""apo-train's extrapolate phase: apo_merge's in-memory extrapolation, its mismatches worded for apo-train users."""

from __future__ import annotations

import pytest
import torch

from apo_kernels import extrapolate
from apo_trainer.errors import TrainError
from apo_trainer.extrapolate import extrapolate_state_


def _pair():
    prev = {"w": torch.zeros(4, dtype=torch.bfloat16), "v": torch.ones(3)}
    cur = {"w": torch.ones(4, dtype=torch.bfloat16), "v": torch.full((3,), 2.0)}
    return prev, cur


def test_in_place_and_counted():
    prev, cur = _pair()
    want = {n: extrapolate(prev[n], cur[n], 0.5) for n in cur}
    assert extrapolate_state_(prev=prev, cur=cur, alpha=0.5) == 2
    assert all(torch.equal(cur[n], want[n]) for n in cur)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p.pop("v"), r"theta_hat_t and theta_hat_t\+1 differ in tensor names \(v\); both must be"),
        (lambda p: p.__setitem__("v", torch.ones(4)), r"v: shape \(4,\) in theta_hat_t, \(3,\) in theta_hat_t\+1"),
        (lambda p: p.__setitem__("v", torch.ones(3, dtype=torch.int64)), r"do not match: v: dtype torch.int64"),
    ],
    ids=["names", "shape", "dtype"],
)
def test_mismatch_is_a_one_line_train_error(edit, message):
    prev, cur = _pair()
    edit(prev)
    with pytest.raises(TrainError, match=message) as e:
        extrapolate_state_(prev=prev, cur=cur, alpha=0.5)
    assert str(e.value).count("\n") == 0
    assert torch.equal(cur["w"], torch.ones(4, dtype=torch.bfloat16))
