"""The demo's toy task: copy prompt words, with a reward the code knows exactly.

A prompt is a few distinct words followed by ``=``; a response is a sequence of words; the reward is the fraction
of response words that occur in the prompt (a uniformly random response scores about prompt_words / 32). The
policy is a tiny GPT-2 built from a config (no download) with a word-level tokenizer built locally, saved together
as a normal Hugging Face folder so that the generic trainer pipeline runs on it unchanged. A short supervised
warm-up on responses that copy a prompt word with a small probability gives a "SFT model" whose responses vary.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from apo_merge.cliopts import setting

WORDS: tuple[str, ...] = tuple(chr(ord("a") + i) for i in range(26)) + tuple(str(i) for i in range(6))
PAD, EOS, UNK, SEP = "<pad>", "<eos>", "<unk>", "="
SPECIALS: tuple[str, ...] = (PAD, EOS, UNK, SEP)


@dataclass(frozen=True)
class ToyTask:
    """Shape of the task and of its warm-up.

    Attributes:
        prompt_words: distinct words per prompt.
        response_words: response length; with ``free_length`` the longest a warm-up response gets.
        free_length: responses end with an end-of-sequence token at a length the policy chooses; the warm-up
            shows lengths uniform in [min_response_words, response_words].
        min_response_words: the shortest warm-up response with ``free_length``.
        copy_prob: the probability that a warm-up response word copies a prompt word (else a uniform word).
        warmup_steps, warmup_batch, warmup_lr: the supervised warm-up.
    """

    prompt_words: int = 4
    response_words: int = 12
    free_length: bool = setting(
        False,
        "Let the policy choose its response length (end-of-sequence token) instead of exactly 12 words.",
        flag="--free-length/--no-free-length",
    )
    min_response_words: int = 4
    copy_prob: float = 0.25
    warmup_steps: int = setting(150, "Supervised warm-up steps of the starting policy.", min=0)
    warmup_batch: int = 64
    warmup_lr: float = 1e-3


def reward(prompt: str, response: str, min_words: int = 0) -> float:
    """The exact reward: the fraction of response words that occur among the prompt's words.

    Words are the whitespace-separated pieces of the decoded response ("=" counts as a word that is never a
    prompt word). The fraction is over at least ``min_words`` words: with fixed-length responses, tokens that
    decoding drops (padding, unknown) count as misses instead of shrinking the denominator.

    >>> reward("a b c d =", "a x b b")
    0.75
    """
    allowed = set(prompt.split()) - {SEP}
    words = [w for w in response.split() if w not in (PAD, EOS, UNK)]
    n = max(len(words), min_words)
    return sum(w in allowed for w in words) / n if n else 0.0


def rewards(prompts: list[str], responses: list[str]) -> list[float]:
    """The oracle of the fixed-length task as a "callable:apo_trainer.demo.task:rewards" spec."""
    return ToyOracle(ToyTask()).score(prompts, responses)


def rewards_free_length(prompts: list[str], responses: list[str]) -> list[float]:
    """The oracle of the free-length task as a "callable:apo_trainer.demo.task:rewards_free_length" spec."""
    return ToyOracle(ToyTask(free_length=True)).score(prompts, responses)


class ToyOracle:
    """The known reward behind the trainer's Oracle interface (preferences from Bradley-Terry on the scores)."""

    def __init__(self, task: ToyTask) -> None:
        self.min_words = 0 if task.free_length else task.response_words

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [reward(p, r, self.min_words) for p, r in zip(prompts, responses, strict=True)]


POSITION_BIAS = 0.3
SHARPNESS = 10.0


class ToyPairwiseJudge:
    """A pairwise judge on the exact reward with a deliberate position bias: P(a beats b) =
    (1 - bias) * sigmoid(sharpness * (r(a) - r(b))) + bias, so the response shown first wins ``bias`` more often.

    Asked in both orders and averaged (the trainer does that) the bias cancels exactly:
    (f(a, b) + 1 - f(b, a)) / 2 = (1 - bias) * (sigmoid(sharpness * (r(a) - r(b))) - 1/2) + 1/2.
    """

    def __init__(self, task: ToyTask, bias: float = POSITION_BIAS, sharpness: float = SHARPNESS) -> None:
        self.exact = ToyOracle(task)
        self.bias, self.sharpness = bias, sharpness

    def compare(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
        ra, rb = self.exact.score(prompts, responses_a), self.exact.score(prompts, responses_b)
        d = torch.tensor(ra, dtype=torch.float64) - torch.tensor(rb, dtype=torch.float64)
        return ((1 - self.bias) * torch.sigmoid(self.sharpness * d) + self.bias).tolist()


def pairwise_rewards(prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
    """The fixed-length task's position-biased pairwise judge as a "pairwise:apo_trainer.demo.task:pairwise_rewards"
    spec."""
    return ToyPairwiseJudge(ToyTask()).compare(prompts, responses_a, responses_b)


def pairwise_rewards_free_length(prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
    """The free-length task's pairwise judge ("pairwise:apo_trainer.demo.task:pairwise_rewards_free_length")."""
    return ToyPairwiseJudge(ToyTask(free_length=True)).compare(prompts, responses_a, responses_b)


def make_prompts(n: int, task: ToyTask, seed: int) -> list[str]:
    """``n`` prompts of ``task.prompt_words`` distinct random words followed by ``=``."""
    rng = random.Random(seed)
    return [" ".join([*rng.sample(WORDS, task.prompt_words), SEP]) for _ in range(n)]


def write_prompts(path: Path, prompts: list[str]) -> Path:
    """Write prompts as JSONL with a "prompt" field, the trainer's input format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def build_tokenizer():
    """A word-level tokenizer over WORDS and the specials, as a PreTrainedTokenizerFast (no chat template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def build_model(tokenizer, task: ToyTask, seed: int):
    """A 2-layer, width-128 GPT-2 (about 0.4 M parameters), randomly initialised from ``seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=128,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def warmup(
    model, tokenizer, task: ToyTask, seed: int, progress: Callable[[int, float], None] | None = None
) -> list[float]:
    """Supervised warm-up on sampled (prompt, response) pairs; the loss covers response tokens only.

    Runs on one torch thread. Returns the loss per step.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=task.warmup_lr, weight_decay=0.0)
    model.train()
    losses = []
    threads = torch.get_num_threads()
    # A model this small gains little from a second thread, and on a busy machine OpenMP's waits between
    # threads made a two-thread warm-up about 4x slower than a one-thread one (242 s against 65 s).
    torch.set_num_threads(1)
    try:
        for step in range(task.warmup_steps):
            ids, labels, mask = _warmup_batch(tokenizer, task, rng)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step + 1, losses[-1])
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return losses


def warmup_response(prompt: str, task: ToyTask, rng: random.Random) -> str:
    """One warm-up response: each word copies a prompt word with probability ``copy_prob``."""
    allowed = [w for w in prompt.split() if w != SEP]
    n = rng.randint(task.min_response_words, task.response_words) if task.free_length else task.response_words
    words = [rng.choice(allowed) if rng.random() < task.copy_prob else rng.choice(WORDS) for _ in range(n)]
    return " ".join(words)


def make_start(folder: Path, task: ToyTask, seed: int, progress: Callable[[int, float], None] | None = None) -> Path:
    """Build, warm up and save the starting policy with its tokenizer in ``folder`` (a Hugging Face folder)."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, task, seed)
    warmup(model, tokenizer, task, seed, progress)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _warmup_batch(tokenizer, task: ToyTask, rng: random.Random):
    # (B, T) token ids, labels with -100 on prompt and padding, attention mask; right-padded for training
    prompts = make_prompts(task.warmup_batch, task, rng.randrange(2**31))
    rows, label_rows = [], []
    for prompt in prompts:
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        r = tokenizer(warmup_response(prompt, task, rng), add_special_tokens=False).input_ids
        if task.free_length:
            r = r + [tokenizer.eos_token_id]
        rows.append(p + r)
        label_rows.append([-100] * len(p) + r)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, labels, mask
