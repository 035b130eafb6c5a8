"""Summed log-probabilities of responses given prompts: the one computation shared by reference and training."""

from __future__ import annotations

import inspect
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

    Only the positions that predict a response token are projected onto the vocabulary (the model's own
    ``logits_to_keep`` with a boolean mask, so soft-capping and scaling stay the model's); prompt and padding
    positions never reach the LM head. Models without that argument take the full computation,
    ``sequence_logps_full``.
    """
    if not _keeps_logits_by_mask(model):
        return sequence_logps_full(model, input_ids, attention_mask, response_mask)
    target = response_mask[:, 1:].bool()
    keep = torch.nn.functional.pad(target, (0, 1), value=False)  # position j predicts token j + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits  # (N, V)
    labels = input_ids[:, 1:][target]
    token_logps = _token_logps(logits, labels)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(target)[target]
    return torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=input_ids.device).index_add(
        0, rows, token_logps
    )


def sequence_logps_full(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """The same sums from logits at every position (B, L, V): the unoptimized computation."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, L-1, V)
    token_logps = _token_logps(logits, input_ids[:, 1:])
    return (token_logps * response_mask[:, 1:]).sum(-1)


def _token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log-softmax at ``labels`` in float32 (float64 for a float64 model) as ``logit[label] - logsumexp(logits)``,
    without a second vocabulary-sized tensor."""
    wide = torch.promote_types(logits.dtype, torch.float32)
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).to(wide)
    return picked - torch.logsumexp(logits.to(wide), dim=-1)


_MASK_SUPPORT: dict[type, bool] = {}


def _keeps_logits_by_mask(model: torch.nn.Module) -> bool:
    """Whether the model's forward slices its hidden states with a boolean ``logits_to_keep`` (B, L) mask before
    the LM head (transformers' ``slice_logits_to_keep``), looking through DDP and PEFT wrappers."""
    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    kind = type(inner)
    if kind not in _MASK_SUPPORT:
        try:
            from transformers import modeling_utils

            source = inspect.getsource(kind.forward)
            _MASK_SUPPORT[kind] = (
                hasattr(modeling_utils, "slice_logits_to_keep")
                and "logits_to_keep" in inspect.signature(kind.forward).parameters
                and "slice_logits_to_keep(" in source
            )
        except (OSError, TypeError):
            _MASK_SUPPORT[kind] = False
    return _MASK_SUPPORT[kind]
