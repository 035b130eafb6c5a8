"""``oracle: llm:URL:MODEL``: an LLM judge behind an OpenAI-compatible ``/v1/completions`` server, pairwise.

Each comparison sends AlpacaEval 2's pairwise prompt (weighted_alpaca_eval_gpt4_turbo: the instruction and two
outputs named ``m`` and ``M``, "answer with the identifier of the best model") with ``max_tokens`` 1,
``temperature`` 0 and ``logprobs`` 5. P(a beats b) = p(m) / (p(m) + p(M)) from the first token's top logprobs
(tokens equal to ``m`` or ``M`` once stripped, summed) when the server gives them; else the answer is parsed (``m``:
1, ``M``: 0). Any other answer is an error naming it. :func:`~apo_trainer.oracle.preference_matrices` asks both
orders and averages them, which removes the judge's position bias.

Verdicts are cached on disk (``DIR/llm-judge-cache-<pid>.jsonl``, every such file read back) keyed by
(prompt, a, b, judge), so a resumed run, or ``apo-train eval`` on the same run, pays nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from apo_trainer.errors import ConfigError, TrainError
from apo_trainer.server import CompletionClient

SPEC = re.compile(r"^(https?://[^/:\s]+(?::\d+)?(?:/[^:\s]*)?):(\S.*)$")

# AlpacaEval 2.0's weighted_alpaca_eval_gpt4_turbo prompt (alpaca_eval_clf_gpt4_turbo.txt), system and user turns.
PROMPT = """<|im_start|>system
You are a highly efficient assistant, who evaluates and selects the best large language model (LLMs) based on the \
quality of their responses to a given instruction. This process will be used to create a leaderboard reflecting the \
most accurate and human-preferred answers.
<|im_end|>
<|im_start|>user
I require a leaderboard for various large language models. I'll provide you with prompts given to these models and \
their corresponding outputs. Your task is to assess these responses, and select the model that produces the best \
output from a human perspective.

## Instruction

{{
    "instruction": \"\"\"{instruction}\"\"\",
}}

## Model Outputs

Here are the unordered outputs from the models. Each output is associated with a specific model, identified by a \
unique model identifier.

{{
    {{
        "model_identifier": "m",
        "output": \"\"\"{output_1}\"\"\"
    }},
    {{
        "model_identifier": "M",
        "output": \"\"\"{output_2}\"\"\"
    }}
}}

## Task

Evaluate the models based on the quality and relevance of their outputs, and select the model that generated the \
best output. Answer by providing the model identifier of the best model. We will use your output as the name of the \
best model, so make sure your output only contains one of the following model identifiers and nothing else (no \
quotes, no spaces, no new lines, ...): m or M.

## Best Model Identifier
<|im_end|>
<|im_start|>assistant
"""


def parse_spec(rest: str) -> tuple[str, str]:
    """``URL:MODEL`` (the part after ``llm:``) as (url, model); ConfigError naming the form otherwise."""
    m = SPEC.match(rest)
    if not m:
        raise ConfigError(
            f"config: oracle 'llm:{rest}' must be 'llm:URL:MODEL', e.g. llm:http://127.0.0.1:8000:Qwen/Qwen2.5-7B-Instruct"
        )
    return m.group(1), m.group(2)


def preference(choice: dict[str, Any], judge: str) -> float:
    """P(output m is better) from one answer: top logprobs of the first token, else the parsed text."""
    top = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0]
    if isinstance(top, dict):
        mass = {"m": 0.0, "M": 0.0}
        for token, lp in top.items():
            if token.strip() in mass:
                if not isinstance(lp, (int, float)) or math.isnan(lp):
                    raise TrainError(f"LLM judge {judge} gave the logprob {lp!r} for {token!r}; expected a number")
                mass[token.strip()] += math.exp(lp)
        if mass["m"] + mass["M"] > 0:
            return mass["m"] / (mass["m"] + mass["M"])
    text = str(choice.get("text", "")).strip()
    if text in ("m", "M"):
        return 1.0 if text == "m" else 0.0
    raise TrainError(
        f"LLM judge {judge} answered {text[:40]!r}; it must answer m or M (AlpacaEval's pairwise prompt): use an "
        "instruction-following model, or a server that returns logprobs"
    )


class LLMJudge:
    """A pairwise oracle over :class:`~apo_trainer.server.CompletionClient`; see the module doc."""

    def __init__(self, url: str, model: str, *, concurrency: int = 16, cache_dir: str | Path | None = None) -> None:
        self.client = CompletionClient(url, concurrency=concurrency)
        self.model, self.name = model, f"llm:{url}:{model}"
        self.cache: dict[str, float] = {}
        self.cache_file = Path(cache_dir) / f"llm-judge-cache-{os.getpid()}.jsonl" if cache_dir else None
        if cache_dir:
            for path in sorted(Path(cache_dir).glob("llm-judge-cache-*.jsonl")):
                for line in path.read_text(encoding="utf-8").splitlines():
                    try:
                        rec = json.loads(line)
                        self.cache[rec["key"]] = float(rec["p"])
                    except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                        continue

    def key(self, prompt: str, a: str, b: str) -> str:
        return hashlib.sha256(json.dumps([prompt, a, b, self.name]).encode()).hexdigest()

    def ask(self, prompt: str, a: str, b: str) -> float:
        body = {"model": self.model, "prompt": PROMPT.format(instruction=prompt, output_1=a, output_2=b)}
        body.update(max_tokens=1, temperature=0.0, logprobs=5, seed=0)
        return preference(self.client.complete(body), self.name)

    def compare(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
        keys = [self.key(*t) for t in zip(prompts, responses_a, responses_b, strict=True)]
        todo = {k: t for k, t in zip(keys, zip(prompts, responses_a, responses_b)) if k not in self.cache}
        if todo:
            self.client.wait_healthy()
            fh = open(self.cache_file, "a", encoding="utf-8") if self.cache_file else None  # noqa: SIM115
            try:

                def done(k: str, p: float) -> None:
                    self.cache[k] = p
                    if fh:
                        fh.write(json.dumps({"key": k, "p": p}) + "\n")
                        fh.flush()

                self.client.map(lambda k: self.ask(*todo[k]), list(todo), done)
            finally:
                if fh:
                    fh.close()
        return [self.cache[k] for k in keys]
