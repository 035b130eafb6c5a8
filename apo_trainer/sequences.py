"""Summed log-probabilities of responses given prompts: the one computation shared by reference and training."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def collate(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (prompt ids, response ids) pairs into ``input_ids`` and ``attention_mask`` (B, L) and
    ``response_mask`` (B, L): 1 where the token is part of the response."""
    length = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(pairs), length), dtype=torch.long)
    resp = torch.zeros((len(pairs), length), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        n, m = len(p), len(r)
        ids[i, : n + m] = torch.tensor([*p, *r], dtype=torch.long)
        attn[i, : n + m] = 1
        resp[i, n : n + m] = 1
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


def sequence_logps(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """log pi(response | prompt) per row, summed over response tokens, in float32: shape (B,).

    The log-softmax is taken in float32 as ``logit[label] - logsumexp(logits)`` to avoid a second vocabulary-sized
    tensor.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, L-1, V)
    labels = input_ids[:, 1:].unsqueeze(-1)
    picked = logits.gather(-1, labels).squeeze(-1).float()
    token_logps = picked - torch.logsumexp(logits.float(), dim=-1)
    return (token_logps * response_mask[:, 1:]).sum(-1)
