"""A tiny word-level tokenizer, policy and prompt set for trainer tests (built locally, never downloaded)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.checkpoints import make_model

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
_CHAT = ["user", "assistant", ":", ";"]
WORDS = [f"w{i}" for i in range(128 - len(SPECIALS) - len(_CHAT))]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ; {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def make_tokenizer(chat_template: bool = False, vocab_size: int = 128):
    """A PreTrainedTokenizerFast over SPECIALS + words w0, w1, ... + a few chat words (``vocab_size`` entries)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab_size - len(SPECIALS) - len(_CHAT))]
    vocab = {w: i for i, w in enumerate([*SPECIALS, *words, *_CHAT])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_policy(path: Path, seed: int = 0, chat_template: bool = False, **config_overrides) -> Path:
    """Save a tiny random Llama with the tiny tokenizer at ``path`` (a complete HF model folder)."""
    model = make_model(seed, pad_token_id=0, bos_token_id=1, eos_token_id=2, **config_overrides)
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    model.save_pretrained(path)
    make_tokenizer(chat_template).save_pretrained(path)
    return Path(path)


def make_prompts(path: Path, n: int = 16, seed: int = 0, length: tuple[int, int] = (2, 5)) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(*length))]
            fh.write(json.dumps({"prompt": " ".join(words)}) + "\n")
    return Path(path)


def word_sum(prompts: list[str], responses: list[str]) -> list[float]:
    """Test oracle: mean word index of the response (rarely ties; empty responses score 0)."""
    out = []
    for r in responses:
        idx = [int(w[1:]) for w in r.split() if w.startswith("w") and w[1:].isdigit()]
        out.append(sum(idx) / (10.0 * len(idx)) if idx else 0.0)
    return out


def word_sum_pairwise(prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
    """Pairwise test oracle: sigmoid of the word_sum difference, with a bias toward the first response."""
    import math

    sa, sb = word_sum(prompts, responses_a), word_sum(prompts, responses_b)
    return [0.8 / (1 + math.exp(-(a - b))) + 0.2 for a, b in zip(sa, sb, strict=True)]
