"""The one configuration of an APO run: a dataclass whose every field carries its help text.

Load it from YAML and override single fields from the command line::

    cfg = APOConfig.from_yaml("run.yaml", ["alpha=0.5", "rounds=4"])
    cfg.validate()          # files, oracle spec, ranges: one-line ConfigError before any work starts

Unknown keys, wrong types and values outside the allowed choices raise :class:`ConfigError` (exit code 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from apo_trainer.errors import ConfigError

_LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)


def _f(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    resume_safe: bool = False,
    group: str | None = None,
) -> Any:
    # `group` opens a section of the config reference; the fields after it belong to it until the next one.
    metadata = {"help": help, "choices": choices, "resume_safe": resume_safe, "group": group}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# The `peft:` group: key -> (allowed types, default). A non-empty group turns LoRA rounds on.
PEFT_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "r": ((int,), 16),
    "lora_alpha": ((int, float), 32),
    "lora_dropout": ((int, float), 0.0),
    "target_modules": ((str, list), "all-linear"),
    "use_rslora": ((bool,), False),
}


@dataclass
class APOConfig:
    """Settings of an APO run (arXiv 2410.06293). Field names are the YAML keys; see each field's help."""

    model: str = _f(
        "",
        "Initial policy theta_0 = theta_hat_0: a local Hugging Face model folder or a Hub id. Required. theta_hat_0 "
        "is the initial model as loaded in `dtype` (with bfloat16 and an fp32 checkpoint, round 0 extrapolates "
        "against the bf16-rounded weights, not the file's).",
        group="Model, prompts and oracle",
    )
    tokenizer: str = _f("", "Tokenizer folder or Hub id; empty means the model's own.")
    prompts: str = _f(
        "",
        "Prompts: a JSONL file with one object per line holding `prompt_field`, or a folder of "
        "*.jsonl files, or a folder written by datasets' save_to_disk, or a Hub dataset id org/name (the last "
        "two need `datasets`: pip install 'apo-merge[data]'). Required.",
    )
    prompt_field: str = _f(
        "prompt",
        "Name of the prompt field in each JSONL object or dataset row; in a dataset, a chat (a list of "
        "{role, content} messages) gives its last user turn.",
    )
    prompts_split: str = _f("train", "Split of a Hub dataset `prompts` (e.g. train_prefs).")
    prompts_revision: str = _f(
        "", "Branch, tag or commit of a Hub dataset `prompts`; empty = the default branch (pin it for resumes)."
    )
    oracle: str = _f(
        "",
        "Preference oracle: 'reward-model:PATH' (AutoModelForSequenceClassification with one scalar "
        "output), 'callable:module:function' (called with lists of prompts and responses, returns "
        "one float per pair), 'pairwise:module:function' (called with prompts, responses_a, responses_b, "
        "returns P(a beats b) per triple; both orders are asked and averaged) or 'pairrm:PATH_OR_HUB_ID' "
        "(PairRM, llm-blender's pairwise ranker, run on transformers). Required unless an Oracle object is passed to loop.run().",
    )
    trust_remote_code: bool = _f(
        False,
        "Let the reward model's own Python code run (its folder or Hub repo ships modeling code, as some reward "
        "models need). A security choice: that code runs with your permissions. Off by default.",
    )
    output_dir: str = _f(
        "runs/apo",
        "Run folder: round-<t>/ per round, metrics.jsonl, config.yaml. Rerunning the "
        "same command resumes from the last finished phase.",
    )

    rounds: int = _f(
        3, "Number of rounds T; the run ends with theta_T in round-<T-1>/policy.", resume_safe=True, group="APO rounds"
    )
    alpha: float = _f(
        0.3,
        "Extrapolation weight: theta_{t+1} = theta_hat_{t+1} + alpha (theta_hat_{t+1} - "
        "theta_hat_t). 0 is plain iterative DPO/SPPO; the paper uses 0.3.",
    )
    restart: str = _f(
        "none",
        "Momentum restart (O'Donoghue and Candes 2015): 'score' extrapolates with alpha 0 after any round whose mean "
        "oracle score falls below the previous round's (then the configured alpha again); 'none' never restarts. "
        "Restarts show as `restart: true` and alpha 0 in that round's record.",
        choices=("none", "score"),
    )
    loss: str = _f(
        "dpo",
        "Preference loss: 'dpo' (sigmoid, best vs worst) or 'sppo' (squared loss to win-rate targets).",
        choices=("dpo", "sppo"),
    )
    beta: float = _f(0.1, "Inverse temperature of the loss (DPO 0.01-0.1, SPPO ~0.001).")
    final_eval: bool = _f(
        True,
        "After the last round, sample and judge theta_T once more so that T rounds give T+1 log records (rounds 0..T).",
        resume_safe=True,
    )

    prompts_per_round: int = _f(
        0,
        "Fresh prompts each round: round t takes the next prompts_per_round prompts of a "
        "seeded shuffle of the set (reshuffled when exhausted). 0 = every prompt every "
        "round.",
        group="Prompts and sampling",
    )
    shuffle_prompts: bool = _f(True, "Shuffle the prompt set (seeded) before splitting it into rounds.")
    samples_per_prompt: int = _f(5, "K: responses sampled per prompt (at least 2).")
    max_new_tokens: int = _f(256, "Longest response, in tokens.")
    min_new_tokens: int = _f(0, "Shortest response, in tokens (end-of-sequence is suppressed before).")
    temperature: float = _f(1.0, "Sampling temperature (1.0 samples the policy itself).")
    top_p: float = _f(1.0, "Nucleus sampling threshold (1.0 = off).")
    top_k: int = _f(0, "Sample among the k most likely tokens only (0 = off).")
    use_generation_config: bool = _f(
        False,
        "Also apply the checkpoint's generation_config.json sampling settings (repetition_penalty, "
        "no_repeat_ngram_size, min_p, ...). Off: samples follow exactly the keys above, i.e. pi_theta itself.",
    )
    max_prompt_tokens: int = _f(1024, "Prompts longer than this (after the chat template) are skipped and counted.")
    chat_template: bool = _f(True, "Wrap each prompt in the tokenizer's chat template when it has one.")
    sampler: str = _f(
        "auto",
        "Generation backend: 'generate' (transformers, dynamic KV cache), 'static' "
        "(transformers, static KV cache, compiled on GPU), 'vllm', or 'auto' (vllm when "
        "importable on a single GPU process, else static on GPU, else generate), or 'server' (an "
        "OpenAI-compatible /v1/completions server at server_url).",
        choices=("auto", "generate", "static", "vllm", "server"),
    )
    generation_batch_size: int = _f(64, "Sequences per generate call (prompts x K), prompts grouped by length.")
    vllm_tensor_parallel_size: int = _f(1, "sampler: vllm: GPUs per engine (tensor parallel; one process only).")
    server_url: str = _f(
        "", "sampler: server: the server's base URL, e.g. http://127.0.0.1:8000 (vllm serve).", resume_safe=True
    )
    server_model: str = _f("", "sampler: server: the model name sent; empty = the round's policy path.")
    server_concurrency: int = _f(8, "sampler: server: requests in flight at once (per process).", resume_safe=True)
    server_timeout: float = _f(600.0, "sampler: server: seconds one request may take.", resume_safe=True)
    server_retries: int = _f(
        4, "sampler: server: retries of a failed request (backoff 0.5 s, doubling).", resume_safe=True
    )

    oracle_batch_size: int = _f(
        16, "(prompt, response) pairs per oracle call.", group="Judging and reference log-probs"
    )
    logprob_batch_size: int = _f(8, "Sequences per forward pass when computing reference log-probs.")

    learning_rate: float = _f(5e-7, "Peak AdamW learning rate (restarted every round).", group="Training")
    lr_scheduler: str = _f(
        "linear", "Learning-rate schedule after warm-up (transformers' get_scheduler names).", choices=_LR_SCHEDULERS
    )
    warmup_ratio: float = _f(0.1, "Fraction of each round's optimizer steps spent warming up linearly from 0.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this when gradients sync (0 = no clipping).")
    epochs_per_round: int = _f(1, "Passes over each round's preference data.")
    batch_size: int = _f(4, "Preference pairs per process per micro-batch (each pair is two sequences).")
    grad_accum: int = _f(
        1, "Micro-batches accumulated per optimizer step (effective batch = batch_size x grad_accum x processes)."
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    disable_dropout: bool = _f(
        True,
        "Turn dropout off in the training forward passes (as TRL does for DPO), so that policy and stored "
        "reference log-probs agree at the first step and log-ratios carry no dropout noise.",
    )
    peft: dict = _f(
        {},
        "LoRA rounds (needs the `peft` package: pip install 'apo-merge[peft]'). Empty = full fine-tuning. A "
        "mapping with any of `r` (16), `lora_alpha` (32), `lora_dropout` (0.0), `target_modules` ('all-linear', "
        "or a list of Linear module names such as [q_proj, v_proj]) and `use_rslora` (false) trains a fresh "
        "adapter on the frozen theta_t each round and merges it exactly (float64 sums, one rounding into `dtype`, "
        "scale lora_alpha/r or lora_alpha/sqrt(r) with rsLoRA) into theta_hat_{t+1}; the adapter is saved in "
        "round-<t>/adapter. Override one key with --set peft.r=8.",
    )
    train_command: str = _f(
        "",
        "Run another trainer as the train phase (TRL, OpenRLHF, an accelerate launch line...): a command template "
        "with placeholders {policy} (theta_t, also the DPO reference), {reference} (the same), {pairs} (a folder "
        "holding train.jsonl, the round's pairs as a TRL preference dataset), {pairs_jsonl} (that file), "
        "{pairs_openrlhf} (a JSONL file for OpenRLHF's default keys), {output} (where theta_hat_{t+1} must be "
        "saved: an HF folder, checkpoint-N folders, a LoRA adapter or DCP), {round}, {seed} and {run_dir}. Split "
        "into words like a shell line but run without a shell (write bash -c '...' for one); its output goes to "
        "the console and round-<t>/train.log. Empty = apo-train's own DPO/SPPO step. See docs/train.md.",
    )
    dtype: str = _f(
        "float32",
        "Dtype the policy is loaded, trained and saved in. Keep float32 master weights with "
        "mixed_precision bf16: at lr 5e-7 most bf16 weight updates round to nothing.",
        choices=("float32", "bfloat16", "float16"),
    )
    mixed_precision: str = _f(
        "no",
        "accelerate mixed precision for forward passes: 'no', 'bf16' or 'fp16' (GPU).",
        choices=("no", "bf16", "fp16"),
    )
    checkpoint_format: str = _f(
        "hf",
        "How each round's trained/ and policy/ are written: 'hf' (a Hugging Face folder, the weights gathered on "
        "the main process) or 'dcp' (torch DCP: under FSDP2 every process writes and extrapolates its own shards, "
        "nothing is gathered; the last policy is exported once to OUTPUT/final-policy as a Hugging Face folder).",
        choices=("hf", "dcp"),
    )
    seed: int = _f(
        0, "Seed; every phase reseeds from (seed, round, phase), so a resumed run matches an uninterrupted one."
    )

    eval_prompts: str = _f(
        "",
        "Held-out prompts for `apo-train eval` and the final evaluation: a file or folder like `prompts`. "
        "Empty: see eval_fraction.",
        group="Evaluation (apo-train eval)",
    )
    eval_fraction: float = _f(
        0.05,
        "Fraction of the prompt set held out of training for evaluation when eval_prompts is empty (a fixed "
        "split that does not depend on the seed; at least one prompt), so that `apo-train eval` works on a run "
        "started with the defaults. 0 = no held-out prompts (train on every prompt).",
    )
    eval_reference: str = _f(
        "",
        "Reference responses for the win rate: a JSONL file of objects with the prompt (under prompt_field or "
        "'instruction') and its response under 'output', as AlpacaEval's baseline outputs. Empty: theta_0's "
        "responses on the held-out prompts.",
        resume_safe=True,
    )
    eval_temperature: float = _f(0.7, "Sampling temperature of the evaluation responses.", resume_safe=True)
    eval_top_p: float = _f(1.0, "Nucleus threshold of the evaluation responses.", resume_safe=True)
    eval_top_k: int = _f(0, "Top-k of the evaluation responses (0 = off).", resume_safe=True)
    eval_max_new_tokens: int = _f(0, "Longest evaluation response in tokens (0 = max_new_tokens).", resume_safe=True)
    eval_bootstrap: int = _f(
        1000, "Bootstrap resamples over prompts for the 95% interval of the win rate (seeded).", resume_safe=True
    )

    log_with: str = _f(
        "",
        "Comma-separated accelerate trackers (e.g. 'tensorboard', 'wandb'); empty = JSONL and console only.",
        resume_safe=True,
        group="Logging and publishing",
    )
    push_to_hub: bool = _f(
        False,
        "Upload each round's extrapolated policy theta_{t+1} to branch `round-<t+1>` of "
        "`hub_repo_id` (created private when missing); off by default.",
        resume_safe=True,
    )
    hub_repo_id: str = _f("", "Hub repository for push_to_hub, e.g. 'me/apo-mistral'.", resume_safe=True)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> APOConfig:
        """Build a config from a mapping, refusing unknown keys and wrong types with a one-line ConfigError."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(values).__name__}")
        cfg = cls()
        for key, value in values.items():
            cfg._assign(str(key), value, source)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> APOConfig:
        """Load ``path`` (YAML mapping; None for defaults only), then apply ``key=value`` overrides in order."""
        values: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            try:
                text = p.read_text(encoding="utf-8")
            except OSError as e:
                raise ConfigError(
                    f"{p}: cannot read config file ({e.strerror or e}); check the path", exit_code=1
                ) from None
            try:
                loaded = yaml.safe_load(text)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}" if mark is not None else ""
                raise ConfigError(f"{p}: not valid YAML{where}; fix the file's syntax") from None
            values = {} if loaded is None else loaded
        cfg = cls.from_dict(values, source=str(path) if path is not None else "config")
        for item in overrides:
            cfg.set(item)
        return cfg

    def set(self, item: str) -> None:
        """Apply one ``key=value`` override; the value is parsed as YAML (``alpha=0.5``, ``final_eval=false``)."""
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set alpha=0.5")
        if key.startswith("peft."):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                raise ConfigError(f"--set {item!r}: cannot parse the value as YAML") from None
            self.peft = peft_group({**self.peft, key[len("peft.") :]: value}, "--set")
            return
        hint = _field_types().get(key)
        if hint is str:
            value: Any = text
        else:
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                raise ConfigError(f"--set {item!r}: cannot parse the value as YAML") from None
        self._assign(key, value, "--set")

    def _assign(self, key: str, value: Any, source: str) -> None:
        types = _field_types()
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(types)}"
            raise ConfigError(f"{source}: unknown config key '{key}'{hint}")
        want = types[key]
        if key == "peft":
            self.peft = peft_group(value, source)
            return
        if want is bool:
            ok = isinstance(value, bool)
        elif want is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif want is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, want)
        if not ok:
            raise ConfigError(f"{source}: '{key}' must be {want.__name__}, got {type(value).__name__} {value!r}")
        choices = _fields()[key].metadata["choices"]
        if choices and value not in choices:
            raise ConfigError(f"{source}: '{key}' must be one of {', '.join(choices)}; got {value!r}")
        setattr(self, key, value)

    # ---------------------------------------------------------------- checks
    def validate(self, *, need_oracle: bool = True) -> None:
        """Check everything that can be checked before work starts; raise a one-line ConfigError otherwise.

        Ranges, required keys, the prompts file (exists, first record has the prompt field), the model and
        tokenizer (existing folder or a Hub id), the oracle spec (importable callable / reward-model folder),
        and the sampler's availability. ``need_oracle=False`` when an Oracle object is supplied in code.
        """
        for f in dataclasses.fields(self):
            for key, value in _floats(f.name, getattr(self, f.name)):
                if not math.isfinite(value):
                    raise ConfigError(f"config: '{key}' must be finite; got {value}")
        _check_alpha(self.alpha)
        positive = (
            "rounds",
            "samples_per_prompt",
            "max_new_tokens",
            "max_prompt_tokens",
            "generation_batch_size",
            "oracle_batch_size",
            "logprob_batch_size",
            "epochs_per_round",
            "batch_size",
            "grad_accum",
        )
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"config: '{key}' must be at least 1; got {getattr(self, key)}")
        if self.samples_per_prompt < 2:
            raise ConfigError("config: 'samples_per_prompt' must be at least 2 (preferences need two responses)")
        if not 0 <= self.eval_fraction < 1 or self.eval_temperature <= 0 or not 0 < self.eval_top_p <= 1:
            raise ConfigError(
                "config: 'eval_fraction' must be in [0, 1), 'eval_temperature' positive and 'eval_top_p' in (0, 1]"
            )
        if self.eval_bootstrap < 1:
            raise ConfigError(f"config: 'eval_bootstrap' must be at least 1; got {self.eval_bootstrap}")
        for key in ("eval_prompts", "eval_reference"):
            if getattr(self, key) and not Path(getattr(self, key)).exists():
                raise ConfigError(f"config: {key} {getattr(self, key)} does not exist; check the path", exit_code=1)
        for key in (
            "prompts_per_round",
            "min_new_tokens",
            "weight_decay",
            "max_grad_norm",
            "alpha",
            "top_k",
            "eval_top_k",
            "eval_max_new_tokens",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"config: '{key}' must not be negative; got {getattr(self, key)}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError("config: 'min_new_tokens' exceeds 'max_new_tokens'")
        if self.beta <= 0 or self.learning_rate <= 0 or self.temperature <= 0:
            raise ConfigError("config: 'beta', 'learning_rate' and 'temperature' must be positive")
        if not 0 < self.top_p <= 1 or not 0 <= self.warmup_ratio <= 1:
            raise ConfigError("config: 'top_p' must be in (0, 1] and 'warmup_ratio' in [0, 1]")
        if not self.output_dir:
            raise ConfigError("config: 'output_dir' must not be empty")
        if self.restart == "score" and self.oracle.partition(":")[0] in ("pairwise", "pairrm", "llm"):
            raise ConfigError(
                "config: restart: score reads each round's mean oracle score, which a pairwise oracle does not give; "
                "use a scalar oracle or restart: none"
            )
        if self.checkpoint_format == "dcp" and (self.peft or self.push_to_hub):
            raise ConfigError(
                "config: checkpoint_format: dcp does not combine with peft (rounds save adapters) or push_to_hub "
                "(pushes Hugging Face folders); set checkpoint_format: hf"
            )
        if self.push_to_hub and not self.hub_repo_id:
            raise ConfigError("config: push_to_hub needs 'hub_repo_id' (e.g. me/apo-model)")
        _check_model_ref("model", self.model, required=True)
        if self.train_command:
            from apo_trainer.external import check_command

            if self.peft:
                raise ConfigError(
                    "config: peft configures apo-train's own LoRA rounds, but train_command trains instead; drop the "
                    "peft group and pass LoRA options to the trainer (its output adapter is merged exactly)"
                )
            check_command(self.train_command)
        if self.peft:
            from apo_trainer.lora import check_peft_config

            check_peft_config(self)
        _check_model_ref("tokenizer", self.tokenizer, required=False)
        _check_prompts(self.prompts, self.prompt_field)
        if need_oracle:
            check_oracle_spec(self.oracle)
        for tracker in filter(None, (x.strip() for x in self.log_with.split(","))):
            modules = _TRACKERS.get(tracker)
            if modules is None:
                raise ConfigError(f"config: log_with tracker '{tracker}' is unknown; use one of {', '.join(_TRACKERS)}")
            if not any(importlib.util.find_spec(m) for m in modules):
                raise ConfigError(
                    f"config: log_with '{tracker}' needs the {modules[0]} package; install it or drop it from log_with",
                    exit_code=1,
                )
        if self.sampler == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "config: sampler 'vllm' needs the vllm package; install it or use sampler: auto", exit_code=1
            )

    # ---------------------------------------------------------------- output
    def to_dict(self) -> dict[str, Any]:
        """Plain mapping of every field (what config.yaml in the run folder holds)."""
        return dataclasses.asdict(self)

    def changed_fields(self, previous: dict[str, Any]) -> list[str]:
        """Fields (not marked safe to change on resume) whose value differs from ``previous``; unknown keys too."""
        now = self.to_dict()
        # A key newer than the run folder is unchanged while it holds its default (older runs still resume).
        was = {k: f.default for k, f in _fields().items() if k not in previous} | previous
        keys = sorted(set(now) | set(was))
        return [
            k
            for k in keys
            if now.get(k) != was.get(k) and not (k in _fields() and _fields()[k].metadata["resume_safe"])
        ]

    @classmethod
    def reference_yaml(cls) -> str:
        """Every field with its default and help text, as a commented YAML file (``apo-train config``)."""
        lines = ["# apo-train configuration: every key with its default."]
        for group, fields in config_groups():
            lines += ["", f"# ---- {group} ----"]
            for f in fields:
                for chunk in _wrap(f.metadata["help"], 100):
                    lines.append(f"# {chunk}")
                lines.append(yaml.safe_dump({f.name: _default(f)}, default_flow_style=False, width=1000).rstrip())
        return "\n".join(lines) + "\n"

    @classmethod
    def reference_markdown(cls) -> str:
        """The config reference as Markdown, one table per group (``apo-train config --markdown``; docs/train.md)."""
        lines: list[str] = []
        for group, fields in config_groups():
            lines += [f"#### {group}", "", "| key | default | meaning |", "| --- | --- | --- |"]
            for f in fields:
                choices = f.metadata["choices"]
                extra = f" One of: {', '.join(choices)}." if choices and "'" not in f.metadata["help"] else ""
                meaning = _markdown_text(f"{f.metadata['help']}{extra}")
                meaning += " *May change when resuming.*" if f.metadata["resume_safe"] else ""
                lines.append(f"| `{f.name}` | `{json.dumps(_default(f))}` | {meaning} |")
            lines.append("")
        return "\n".join(lines)


def config_groups() -> list[tuple[str, list[dataclasses.Field]]]:
    """The fields in declaration order, split into the groups their ``group`` metadata opens."""
    groups: list[tuple[str, list[dataclasses.Field]]] = []
    for f in dataclasses.fields(APOConfig):
        if f.metadata["group"] or not groups:
            groups.append((f.metadata["group"] or "General", []))
        groups[-1][1].append(f)
    return groups


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def peft_group(value: Any, source: str) -> dict[str, Any]:
    """The `peft:` mapping checked and completed with defaults; None or {} is full fine-tuning ({})."""
    if value is None or value == {}:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: 'peft' must be a mapping (e.g. peft: {{r: 16}}), got {type(value).__name__}")
    out = {}
    for key, (types, default) in PEFT_KEYS.items():
        v = value.get(key, default)
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            want = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{source}: 'peft.{key}' must be {want}, got {type(v).__name__} {v!r}")
        out[key] = float(v) if key in ("lora_alpha", "lora_dropout") else v
    unknown = sorted(set(map(str, value)) - set(PEFT_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key 'peft.{unknown[0]}'; the peft group takes {', '.join(PEFT_KEYS)}")
    targets = out["target_modules"]
    if isinstance(targets, str):
        targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    if isinstance(targets, list) and (not targets or not all(isinstance(t, str) and t for t in targets)):
        raise ConfigError(f"{source}: 'peft.target_modules' must be 'all-linear' or a list of module names")
    out["target_modules"] = targets
    for key in ("lora_alpha", "lora_dropout"):
        if not math.isfinite(out[key]):
            raise ConfigError(f"{source}: 'peft.{key}' must be finite; got {out[key]}")
    if out["r"] < 1 or out["lora_alpha"] <= 0 or not 0 <= out["lora_dropout"] < 1:
        raise ConfigError(f"{source}: peft needs r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1")
    return out


def _floats(key: str, value: Any) -> list[tuple[str, float]]:
    """Every float in a config value, nested groups (``peft``) and lists included, as (dotted key, value)."""
    if isinstance(value, float):
        return [(key, value)]
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in _floats(f"{key}.{k}", v)]
    if isinstance(value, (list, tuple)):
        return [x for i, v in enumerate(value) for x in _floats(f"{key}[{i}]", v)]
    return []


def _check_alpha(alpha: float) -> None:
    """alpha must survive its one rounding into fp32, the step's arithmetic: 1e39 would become inf (every weight
    NaN), and 1e-50 would become 0 (plain iterative DPO, silently)."""
    import torch

    from apo_kernels.ops import round_alpha

    rounded = round_alpha(alpha, torch.float32)
    if not math.isfinite(rounded) or (rounded == 0.0) != (alpha == 0.0):
        raise ConfigError(
            f"config: 'alpha' {alpha!r} is not representable in fp32, the arithmetic of the extrapolation step "
            f"(it would become {rounded!r}); use a magnitude between about 1.4e-45 and 3.4e38 (the paper uses 0.3)"
        )


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(APOConfig)}


def _field_types() -> dict[str, type]:
    return get_type_hints(APOConfig)


def _markdown_text(text: str) -> str:
    """Help text as one Markdown table cell: `|` escaped, and outside `code` spans `<` and `*` too (else
    `round-<t>` would read as an HTML tag and `*.jsonl` could open emphasis)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace("*", "\\*")
    return "`".join(parts).replace("|", "\\|")


def _wrap(text: str, width: int) -> list[str]:
    out, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return out + ([line] if line else [])


_TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "aim": ("aim",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "trackio": ("trackio",),
    "swanlab": ("swanlab",),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _check_model_ref(key: str, ref: str, *, required: bool) -> None:
    if not ref:
        if required:
            raise ConfigError(f"config: '{key}' is required (a local model folder or a Hub id)")
        return
    p = Path(ref)
    if p.is_dir():
        if key != "tokenizer" and not (p / "config.json").is_file():
            raise ConfigError(
                f"config: {key} folder {ref} has no config.json; point it at a Hugging Face model folder", exit_code=1
            )
        return
    if p.exists() or ref.startswith((".", "/", "~")) or not _HUB_ID.match(ref):
        raise ConfigError(
            f"config: {key} '{ref}' is neither an existing folder nor a Hub id; check the path", exit_code=1
        )


def _check_prompts(path: str, prompt_field: str) -> None:
    if not path:
        raise ConfigError("config: 'prompts' is required (a JSONL file with a 'prompt' field, or a folder)")
    from apo_trainer.prompts import is_hub_dataset, peek_prompt_source, require_datasets

    if is_hub_dataset(path):
        require_datasets(path)
        return
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config: prompts file {path} does not exist; check the path", exit_code=1)

    peek_prompt_source(p, prompt_field)


def check_oracle_spec(spec: str) -> None:
    """Raise ConfigError unless ``spec`` names a loadable oracle (imports a callable; checks a folder exists)."""
    from apo_trainer.oracle import ORACLE_FORMS, ORACLE_KINDS, resolve_callable

    if not spec:
        raise ConfigError(f"config: 'oracle' is required ({ORACLE_FORMS})")
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ORACLE_KINDS or not rest:
        raise ConfigError(f"config: oracle {spec!r} must be {ORACLE_FORMS}")
    if kind in ("callable", "pairwise"):
        resolve_callable(rest)
    elif kind == "pairrm":
        _check_model_ref("oracle PairRM", rest, required=True)
    elif kind == "llm":
        from apo_trainer.llm_judge import parse_spec

        parse_spec(rest)
    else:
        _check_model_ref("oracle reward model", rest, required=True)
