"""The response-only log-prob path against the full-vocabulary computation: values and gradients."""

from __future__ import annotations

import pytest
import torch

from apo_trainer.losses import dpo_loss
from apo_trainer.sequences import _keeps_logits_by_mask, collate, sequence_logps, sequence_logps_full
from tests.checkpoints import make_model

PAIRS = [([1, 5, 6, 11], [7, 8, 2]), ([1, 9], [10]), ([1, 4, 4, 4, 4, 4], [12, 13, 14, 15, 2]), ([1], [3, 3])]


def _grads(model: torch.nn.Module, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    enc = collate(PAIRS, pad_id=0)
    logps = fn(model, **enc)
    ref = torch.tensor([-3.0, -1.5, -7.0, -2.5])
    loss = dpo_loss(logps[:2] - ref[:2], logps[2:] - ref[2:], 0.1).mean()
    loss.backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_llama_takes_the_masked_path():
    assert _keeps_logits_by_mask(make_model(0))


def test_masked_path_equals_the_full_logits_in_value_and_gradient():
    model = make_model(0).double()  # float64 on both paths: differences are the computation's, not rounding's
    fast, g_fast = _grads(model, sequence_logps)
    full, g_full = _grads(model, sequence_logps_full)
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-10)
    assert g_fast.keys() == g_full.keys() and g_fast
    for name in g_full:
        torch.testing.assert_close(g_fast[name], g_full[name], rtol=1e-9, atol=1e-12, msg=name)


def test_masked_path_in_float32_within_rounding_of_a_float64_reference():
    model = make_model(0)
    fast = sequence_logps(model, **collate(PAIRS, pad_id=0))
    want = sequence_logps_full(make_model(0).double(), **collate(PAIRS, pad_id=0))
    torch.testing.assert_close(fast.double(), want, rtol=0, atol=1e-4)
    assert fast.dtype == torch.float32


def test_a_model_without_logits_to_keep_takes_the_full_path():
    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = make_model(0)

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    model = Plain()
    assert not _keeps_logits_by_mask(model)
    enc = collate(PAIRS, pad_id=0)
    assert sequence_logps(model, **enc).tolist() == sequence_logps_full(model.inner, **enc).tolist()


@pytest.mark.parametrize("row", range(len(PAIRS)))
def test_padding_does_not_change_a_row(row):
    model = make_model(0).double()
    alone = sequence_logps(model, **collate([PAIRS[row]], pad_id=0))
    batched = sequence_logps(model, **collate(PAIRS, pad_id=0))
    torch.testing.assert_close(batched[row : row + 1], alone, rtol=0, atol=1e-10)
