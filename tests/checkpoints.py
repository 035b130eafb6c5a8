"""Tiny Hugging Face checkpoints built locally (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(**overrides) -> LlamaConfig:
    kw = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**config_overrides)).to(dtype)


def make_checkpoint(
    path: Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str = "50GB",
    **config_overrides,
) -> Path:
    """Save a tiny random Llama at ``path`` with ``save_pretrained`` and return the path."""
    make_model(seed, dtype, **config_overrides).save_pretrained(path, max_shard_size=max_shard_size)
    return Path(path)
