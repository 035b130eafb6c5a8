"""The training loop's step log: records read from the device at flush time, non-finite losses located exactly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from apo_trainer.errors import TrainError
from apo_trainer.train import _StepLog


def _log(grad_accum: int = 1) -> tuple[_StepLog, list]:
    logged = []
    acc = SimpleNamespace(reduce=lambda x, op: x.clone(), log=lambda values, step: logged.append((step, values)))
    ctx = SimpleNamespace(accelerator=acc, config=SimpleNamespace(grad_accum=grad_accum), step_offset=10)
    return _StepLog(ctx, 3), logged


def test_flush_turns_pending_sums_into_records_in_order():
    log, logged = _log()
    for i in range(2):
        log.micro_losses.append(torch.tensor(0.5 + i))
        sums = torch.tensor([2.0 * (i + 1), 0.4, 1.0, -20.0, -30.0, 2.0], dtype=torch.float64)
        log.pending.append((sums, 1e-5 * (i + 1), torch.tensor(3.0) if i else None))
    assert log.history == []  # nothing read before the flush
    log.flush()
    assert [r["step"] for r in log.history] == [1, 2]
    assert log.history[0] == {
        "round": 3,
        "step": 1,
        "loss": 1.0,
        "margin": 0.2,
        "accuracy": 0.5,
        "logp_chosen": -10.0,
        "logp_rejected": -15.0,
        "lr": 1e-5,
        "grad_norm": None,
    }
    assert log.history[1]["loss"] == 2.0 and log.history[1]["grad_norm"] == 3.0
    assert [s for s, _ in logged] == [11, 12] and log.pending == []


def test_the_first_non_finite_micro_batch_is_named_across_flushes():
    log, _ = _log(grad_accum=2)
    log.micro_losses += [torch.tensor(0.7), torch.tensor(0.6)]
    log.flush()
    log.micro_losses += [torch.tensor(0.5), torch.tensor(float("inf")), torch.tensor(float("nan"))]
    with pytest.raises(TrainError, match=r"round 3 at optimizer step 2 \(micro-batch 4, loss inf\)"):
        log.flush()
