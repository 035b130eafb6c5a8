"""Preference oracles: anything that scores (prompt, response) pairs, batched.

- :class:`RewardModelOracle`: a reward model folder (AutoModelForSequenceClassification with one scalar output).
- :class:`CallableOracle`: a Python function ``f(prompts: list[str], responses: list[str]) -> list[float]``.
- :class:`PairwiseCallableOracle`: a Python function ``f(prompts, responses_a, responses_b) -> list[float]``, each
  the probability that a beats b.
- :class:`PairRMOracle`: PairRM, reimplemented on transformers in :mod:`apo_trainer.pairrm`.
- :func:`bradley_terry`: pairwise preference probabilities ``P[i, j] = sigmoid(s_i - s_j)`` from scores.
- :func:`preference_matrices`: the K x K matrix per prompt that both kinds share (pairwise: both orders asked and
  averaged, ``P_ij = 1/2 + (f(i, j) - f(j, i)) / 2``, cancelling position bias; scalar: Bradley-Terry).

Spec strings (the ``oracle`` config key): ``reward-model:PATH``, ``callable:module:function``,
``pairwise:module:function``, ``pairrm:PATH_OR_HUB_ID`` or ``llm:URL:MODEL`` (:mod:`apo_trainer.llm_judge`).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from apo_trainer.errors import ConfigError, TrainError


@runtime_checkable
class Oracle(Protocol):
    """Scores responses: higher is better. ``score`` gets equally long lists and returns one float per pair."""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]: ...


@runtime_checkable
class PairwiseOracle(Protocol):
    """Compares responses: ``compare`` returns, per (prompt, a, b), the probability that a beats b."""

    def compare(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]: ...


def is_pairwise(oracle: object) -> bool:
    return hasattr(oracle, "compare")


def bradley_terry(scores: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Pairwise preference matrix from scalar scores: ``P[i, j] = sigmoid(s_i - s_j)`` (float64, diagonal 0.5).

    >>> bradley_terry([0.0, 0.0])
    tensor([[0.5000, 0.5000],
            [0.5000, 0.5000]], dtype=torch.float64)
    """
    s = torch.as_tensor(scores, dtype=torch.float64)
    return torch.sigmoid(s[:, None] - s[None, :])


@contextmanager
def user_oracle(name: str, t: int, phase: str) -> Iterator[None]:
    """The oracle is user code: whatever it raises becomes one line naming it, the round, the phase, its own
    error, and how to go on (APO_DEBUG=1 prints its traceback, run_cli reads the exception's cause)."""
    from apo_merge.shell import DEBUG_ENV

    try:
        yield
    except TrainError:
        raise
    except Exception as e:
        detail = " ".join(str(e).split()) or "no message"
        raise TrainError(
            f"round {t}, {phase} phase: the oracle {name} failed ({type(e).__name__}: {detail}); fix it and rerun "
            f"the same command to resume at the {phase} phase ({DEBUG_ENV}=1 shows the oracle's traceback)"
        ) from e


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


class PairwiseCallableOracle:
    """Wraps ``fn(prompts, responses_a, responses_b) -> list[float]`` (P(a beats b)), called on batches."""

    def __init__(self, fn: Callable[..., Sequence[float]], batch_size: int = 256, name: str | None = None) -> None:
        self.fn = fn
        self.batch_size = batch_size
        self.name = name or getattr(fn, "__qualname__", repr(fn))

    def compare(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            sl = slice(i, i + self.batch_size)
            got = [float(x) for x in self.fn(prompts[sl], responses_a[sl], responses_b[sl])]
            if len(got) != len(prompts[sl]):
                raise TrainError(
                    f"pairwise oracle {self.name} returned {len(got)} probabilities for {len(prompts[sl])} "
                    "comparisons; it must return one float per (prompt, a, b)"
                )
            out.extend(got)
        return out


class PairRMOracle:
    """PairRM (llm-blender's pairwise ranker, reimplemented in :mod:`apo_trainer.pairrm`, no llm-blender needed):
    P(a beats b) = sigmoid of llm-blender's comparison logit ``L(a, b) - L(b, a)``.

    The ranker runs both orders of each pair it is asked; the reverse's logit is kept until it is asked (by
    :func:`preference_matrices`, in a later batch), so each ordered pair goes through the encoder once.
    """

    def __init__(
        self, ranker: str, *, batch_size: int = 16, device: torch.device | str = "cpu", model: Any = None
    ) -> None:
        if model is None:
            from apo_trainer.pairrm import load_pairrm

            model = load_pairrm(ranker, device=device, batch_size=batch_size)
        self.model = model
        self.name = f"pairrm:{ranker}"
        self._seen: dict[tuple[str, str, str], float] = {}

    def compare(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
        keys = list(zip(prompts, responses_a, responses_b, strict=True))
        todo = list(dict.fromkeys(k for k in keys if k not in self._seen))
        if todo:
            d = self.model.compare(*(list(c) for c in zip(*todo)))
            if len(d) != len(todo):
                raise TrainError(f"PairRM returned {len(d)} logits for {len(todo)} comparisons")
            for (p, a, b), v in zip(todo, d, strict=True):
                self._seen[(p, a, b)], self._seen[(p, b, a)] = v, -v
        logits = [self._seen[k] for k in keys]
        for k in keys:  # each order is asked once: keep only the reverses still to come
            self._seen.pop(k, None)
        return torch.sigmoid(torch.tensor(logits, dtype=torch.float64)).tolist()

    def close(self) -> None:
        del self.model
        self._seen.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def ordered_pairs(k: int) -> list[tuple[int, int]]:
    """Every ordered pair (i, j), i != j, of K samples: both orders of each comparison."""
    return [(i, j) for i in range(k) for j in range(k) if i != j]


def both_orders(f_ij: float, f_ji: float) -> float:
    """P(i beats j) from the judge asked both ways: ``1/2 + (f_ij - f_ji) / 2``.

    Asking both orders and averaging cancels a judge's preference for the first (or second) position. Written so
    that a tie (f_ij == f_ji) gives exactly 1/2: ``(f_ij + 1 - f_ji) / 2`` rounds ``f_ij + 1`` first and gives
    1/2 +- 1 ulp, which would turn prompts whose answers all tie into training pairs.
    """
    return 0.5 + (f_ij - f_ji) / 2


def matrix_from_comparisons(k: int, probs: dict[tuple[int, int], float]) -> torch.Tensor:
    """P_ij = :func:`both_orders` (f(i, j), f(j, i)) from ``probs[(i, j)] = f(i, j)``, diagonal 1/2 (float64)."""
    m = torch.full((k, k), 0.5, dtype=torch.float64)
    for i, j in ordered_pairs(k):
        m[i, j] = both_orders(probs[(i, j)], probs[(j, i)])
    return m


def preference_matrices(
    oracle: Oracle | PairwiseOracle, prompts: list[str], responses: list[list[str]], batch_size: int
) -> tuple[list[torch.Tensor], list[list[float]] | None]:
    """One K x K preference matrix per prompt (and the scalar scores, None for a pairwise judge).

    Pairwise: every ordered pair of each prompt's responses is asked, in batches of ``batch_size`` across
    prompts, and averaged by :func:`matrix_from_comparisons`. Scalar: ``bradley_terry`` of the scores.
    """
    if not is_pairwise(oracle):
        flat = [(i, s) for i in range(len(prompts)) for s in range(len(responses[i]))]
        got = oracle.score([prompts[i] for i, _ in flat], [responses[i][s] for i, s in flat])
        if len(got) != len(flat):
            raise TrainError(f"oracle returned {len(got)} scores for {len(flat)} responses")
        it = iter(float(x) for x in got)
        scores = [[next(it) for _ in r] for r in responses]
        return [bradley_terry(s) for s in scores], scores
    queries = [(i, a, b) for i in range(len(prompts)) for a, b in ordered_pairs(len(responses[i]))]
    probs = compare_batched(oracle, queries, prompts, responses, batch_size)
    per_prompt: list[dict[tuple[int, int], float]] = [{} for _ in prompts]
    for (i, a, b), p in zip(queries, probs, strict=True):
        per_prompt[i][(a, b)] = p
    return [matrix_from_comparisons(len(responses[i]), per_prompt[i]) for i in range(len(prompts))], None


def compare_batched(
    oracle: PairwiseOracle,
    queries: list[tuple[int, int, int]],
    prompts: list[str],
    responses: list[list[str]],
    batch_size: int,
) -> list[float]:
    """f(prompt i, response a, response b) for each query (i, a, b), asked ``batch_size`` at a time; checked to be
    probabilities."""
    out: list[float] = []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        got = oracle.compare(
            [prompts[i] for i, _, _ in chunk],
            [responses[i][a] for i, a, _ in chunk],
            [responses[i][b] for i, _, b in chunk],
        )
        if len(got) != len(chunk):
            raise TrainError(
                f"pairwise oracle returned {len(got)} probabilities for {len(chunk)} comparisons; it must "
                "return one float per (prompt, a, b)"
            )
        for v in got:
            v = float(v)
            if not 0.0 <= v <= 1.0:  # also refuses NaN
                raise TrainError(f"pairwise oracle returned {v}; it must return probabilities in [0, 1]")
            out.append(v)
    return out


ORACLE_KINDS = ("reward-model", "callable", "pairwise", "pairrm", "llm")
ORACLE_FORMS = (
    "'reward-model:PATH', 'callable:module:function', 'pairwise:module:function', 'pairrm:PATH_OR_HUB_ID' or "
    "'llm:URL:MODEL'"
)


def load_oracle(
    spec: str,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
) -> Oracle | PairwiseOracle:
    """Build the oracle a spec string names (scalar: reward-model, callable; pairwise: pairwise, pairrm, llm).
    ``cache_dir``: where the LLM judge keeps its verdicts (the run folder)."""
    kind, _, rest = spec.partition(":")
    if kind == "llm":
        from apo_trainer.llm_judge import LLMJudge, parse_spec

        url, model = parse_spec(rest)
        return LLMJudge(url, model, concurrency=batch_size, cache_dir=cache_dir)
    if kind == "callable":
        return CallableOracle(resolve_callable(rest), batch_size=batch_size, name=rest)
    if kind == "pairwise":
        return PairwiseCallableOracle(resolve_callable(rest), batch_size=batch_size, name=rest)
    if kind == "reward-model":
        return RewardModelOracle(rest, device=device, batch_size=batch_size, trust_remote_code=trust_remote_code)
    if kind == "pairrm":
        return PairRMOracle(rest, batch_size=batch_size, device=device)
    raise ConfigError(f"config: oracle {spec!r} must be {ORACLE_FORMS}")
