"""Preference oracles: anything that scores (prompt, response) pairs, batched.

- :class:`RewardModelOracle`: a reward model folder (AutoModelForSequenceClassification with one scalar output).
- :class:`CallableOracle`: a Python function ``f(prompts: list[str], responses: list[str]) -> list[float]``.
- :func:`bradley_terry`: pairwise preference probabilities ``P[i, j] = sigmoid(s_i - s_j)`` from scores.

Spec strings (the ``oracle`` config key): ``reward-model:PATH`` or ``callable:module:function``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from apo_trainer.errors import ConfigError, TrainError


@runtime_checkable
class Oracle(Protocol):
    """Scores responses: higher is better. ``score`` gets equally long lists and returns one float per pair."""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]: ...


def bradley_terry(scores: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Pairwise preference matrix from scalar scores: ``P[i, j] = sigmoid(s_i - s_j)`` (float64, diagonal 0.5).

    >>> bradley_terry([0.0, 0.0])
    tensor([[0.5000, 0.5000],
            [0.5000, 0.5000]], dtype=torch.float64)
    """
    s = torch.as_tensor(scores, dtype=torch.float64)
    return torch.sigmoid(s[:, None] - s[None, :])


def judge_failed(name: str, t: int, e: Exception) -> TrainError:
    """The one line for a judge (user code) that raised: who, where, its own error, and how to go on."""
    from apo_merge.shell import DEBUG_ENV

    detail = " ".join(str(e).split()) or "no message"
    return TrainError(
        f"round {t}, judge phase: the oracle {name} failed ({type(e).__name__}: {detail}); fix it and rerun the "
        f"same command to resume at the judge phase ({DEBUG_ENV}=1 shows the oracle's traceback)"
    )


def resolve_callable(target: str) -> Callable[..., Any]:
    """Import ``module:function`` (dots allowed in both parts); ConfigError with the cause when it fails."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"config: oracle callable {target!r} must be 'module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # the user's module may fail in any way while importing
        raise ConfigError(
            f"config: cannot import oracle module '{module_name}' ({type(e).__name__}: {e}); "
            "check the name and PYTHONPATH",
            exit_code=1,
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(
                f"config: module '{module_name}' has no attribute '{attr}'; check the oracle spec", exit_code=1
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"config: oracle '{target}' is not callable", exit_code=1)
    return obj


class CallableOracle:
    """Wraps ``fn(prompts, responses) -> list[float]`` as an Oracle, calling it on batches of ``batch_size``."""

    def __init__(
        self, fn: Callable[[list[str], list[str]], Sequence[float]], batch_size: int = 256, name: str | None = None
    ) -> None:
        self.fn = fn
        self.batch_size = batch_size
        self.name = name or getattr(fn, "__qualname__", repr(fn))

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            ps, rs = prompts[i : i + self.batch_size], responses[i : i + self.batch_size]
            got = [float(x) for x in self.fn(ps, rs)]
            if len(got) != len(ps):
                raise TrainError(
                    f"oracle {self.name} returned {len(got)} scores for {len(ps)} responses; "
                    "it must return one float per (prompt, response)"
                )
            out.extend(got)
        return out


class RewardModelOracle:
    """A sequence-classification reward model with one scalar output; batched, longest-first, on ``device``.

    The reward model's own chat template is applied when its tokenizer has one (user prompt, assistant response);
    otherwise prompt and response are concatenated. Inputs longer than ``max_length`` tokens are truncated.
    """

    def __init__(
        self,
        path: str,
        *,
        device: torch.device | str = "cpu",
        batch_size: int = 16,
        dtype: torch.dtype | None = None,
        max_length: int = 4096,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        trust = {"trust_remote_code": trust_remote_code}  # passed even when False: transformers would ask on stdin
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype or "auto", **trust)
            self.tokenizer = AutoTokenizer.from_pretrained(path, **trust)
        except ValueError as e:
            if trust_remote_code or "trust_remote_code" not in str(e):
                raise
            raise ConfigError(
                f"reward model {path} needs its own Python code to load; if you trust that code, set "
                "trust_remote_code: true in the config (it then runs with your permissions)",
                exit_code=1,
            ) from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(device)
        self.model.eval()
        if self.model.config.num_labels != 1:
            raise TrainError(
                f"reward model {path} has {self.model.config.num_labels} outputs; the oracle needs a "
                "scalar head (num_labels=1)"
            )
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length

    def _text(self, prompt: str, response: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
            )
        return prompt + response

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        texts = [self._text(p, r) for p, r in zip(prompts, responses, strict=True)]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = [math.nan] * len(texts)
        self.tokenizer.padding_side = "right"
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            enc = self.tokenizer(
                [texts[j] for j in idx],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=not self.tokenizer.chat_template,
            )
            logits = self.model(**enc.to(self.device)).logits.float()[:, 0].tolist()
            for j, v in zip(idx, logits, strict=True):
                out[j] = v
        return out

    def close(self) -> None:
        """Free the reward model's memory (the judge phase calls this when done)."""
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_oracle(
    spec: str, *, device: torch.device | str = "cpu", batch_size: int = 16, trust_remote_code: bool = False
) -> Oracle:
    """Build the Oracle a spec string names: ``reward-model:PATH`` or ``callable:module:function``."""
    kind, _, rest = spec.partition(":")
    if kind == "callable":
        return CallableOracle(resolve_callable(rest), batch_size=batch_size, name=rest)
    if kind == "reward-model":
        return RewardModelOracle(rest, device=device, batch_size=batch_size, trust_remote_code=trust_remote_code)
    raise ConfigError(f"config: oracle {spec!r} must be 'reward-model:PATH' or 'callable:module:function'")
