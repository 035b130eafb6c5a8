"""Phase 1, sample: K responses per prompt from the current policy theta_t.

Prompts are sorted by length and dealt round-robin across processes; each process generates its share in batches
(left padding, KV cache) and the main process gathers everything into ``round-<t>/samples.jsonl``.

Every sample has its own seed, :func:`sample_seed` of (the phase's seed, the prompt's index in the prompt list, the
sample's index), recorded in samples.jsonl as ``seeds``: who computes a row (the process count, the batch it lands
in) does not choose its random numbers. The transformers backends draw each row's noise from its own generator
(:class:`RowSampler`, Gumbel-max); vLLM gets one request per sample with that seed. Backends:

- ``generate``: transformers' generate with the default dynamic cache (works everywhere);
- ``static``: transformers' generate with ``cache_implementation="static"`` sized once per round
  (``max_cache_len``) and a fixed batch shape, so that on a GPU the decode step compiles once;
- ``vllm``: vLLM's offline engine, when vllm is importable (single process);
- ``server``: an OpenAI-compatible ``/v1/completions`` server at ``server_url`` (:class:`ServerSampler`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from apo_kernels.dtypes import torch_name
from apo_trainer.errors import ConfigError
from apo_trainer.prompts import round_prompts
from apo_trainer.runtime import RunContext, free_memory, phase_seed
from apo_trainer.store import read_jsonl


def select_sampler(
    requested: str, *, cuda: bool, num_processes: int, vllm_available: bool, server_url: str = ""
) -> str:
    """The backend to use: ``auto`` picks vllm (importable, CUDA, one process), else static on CUDA, else generate.
    ``vllm`` asked for by name also runs under several processes (one engine each, vLLM's external launcher)."""
    if requested == "auto":
        if cuda and vllm_available and num_processes == 1:
            return "vllm"
        return "static" if cuda else "generate"
    if requested == "server":
        if not server_url:
            raise ConfigError("config: sampler 'server' needs server_url (e.g. http://127.0.0.1:8000)")
        return requested
    if requested == "vllm" and not vllm_available:
        raise ConfigError("config: sampler 'vllm' needs the vllm package; install it or use sampler: auto", exit_code=1)
    return requested


def sample_seed(base: int, source: int, index: int) -> int:
    """The 63-bit seed of sample ``index`` of prompt ``source`` (its index in the prompt list) in a phase whose
    seed is ``base``: independent of processes, batches and the other prompts."""
    digest = hashlib.sha256(f"apo-train-sample:{base}:{source}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class RowSampler:
    """A logits processor that samples each row from its own ``torch.Generator`` (generate then takes the argmax).

    Gumbel-max: argmax(filtered logits / T + G), G = -log(-log U) with U uniform from the row's generator, is an exact
    draw from softmax(filtered logits / T). Temperature, top-k and top-p are transformers' own warpers (per row), and
    every row draws one vocabulary-sized U per step whatever its batch, so a row's tokens depend on its seed alone (up
    to the float rounding of batched logits).
    """

    def __init__(self, seeds: Sequence[int], config: Any, device: torch.device) -> None:
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.warpers: list[Any] = [TemperatureLogitsWarper(config.temperature)]
        if config.top_k > 0:
            self.warpers.append(TopKLogitsWarper(config.top_k))
        if config.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(config.top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators])
        return scores.float() - torch.log(-torch.log(u))


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def encode_prompt(tokenizer: Any, prompt: str, use_chat_template: bool) -> list[int]:
    """Token ids of one prompt, wrapped as a user turn in the chat template when the tokenizer has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def eos_ids(model_path: str | Path, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the checkpoint's generation config's (there may be several), else the tokenizer's."""
    from transformers import GenerationConfig

    try:
        ids = GenerationConfig.from_pretrained(str(model_path)).eos_token_id
    except OSError:  # no generation_config.json
        ids = None
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def trim_response(ids: Sequence[int], eos: Sequence[int]) -> tuple[list[int], bool]:
    """Cut generated ids after the first end-of-sequence token (kept); returns (ids, finished)."""
    for i, tok in enumerate(ids):
        if tok in eos:
            return list(ids[: i + 1]), True
    return list(ids), False


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, length - len(r) :] = 1
    return ids, mask


@torch.no_grad()
def generate_transformers(
    model: Any,
    prompt_ids: list[list[int]],
    *,
    k: int,
    config: Any,
    pad_id: int,
    eos: list[int],
    static: bool,
    progress: Any = None,
    seeds: list[list[int]] | None = None,
) -> list[list[list[int]]]:
    """K sampled responses (token ids, untrimmed) per prompt with ``model.generate``, longest prompts first.

    ``seeds[i][s]``: the seed of prompt i's sample s (:class:`RowSampler`); without them, generate's own sampling
    from the global generator (a row's sample then depends on its batch). ``static``: a static KV cache sized for
    the longest prompt of the call list and a constant batch (the last batch is filled with copies), so a compiled
    decode step sees one shape.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    per_call = max(1, config.generation_batch_size // k)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    longest = max((len(p) for p in prompt_ids), default=0)
    if not getattr(config, "use_generation_config", False):
        # generate() fills every key left unset from model.generation_config (the checkpoint's
        # generation_config.json: repetition_penalty, no_repeat_ngram_size, ...); keep only its token ids so the
        # samples come from the policy itself.
        own = model.generation_config
        model.generation_config = GenerationConfig(
            bos_token_id=own.bos_token_id, eos_token_id=own.eos_token_id, pad_token_id=own.pad_token_id
        )
    sampling = {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k}
    gen = GenerationConfig(
        **({"do_sample": False} if seeds is not None else sampling),
        max_new_tokens=config.max_new_tokens,
        min_new_tokens=config.min_new_tokens,
        num_return_sequences=1 if seeds is not None else k,
        pad_token_id=pad_id,
        eos_token_id=eos or None,
        use_cache=True,
        cache_implementation="static" if static else None,
        max_cache_len=longest + config.max_new_tokens if static else None,
    )
    results: list[list[list[int]]] = [[] for _ in prompt_ids]
    model.eval()
    for start in range(0, len(order), per_call):
        idx = order[start : start + per_call]
        rows = [prompt_ids[i] for i in idx]
        if static:
            rows += [rows[-1]] * (per_call - len(rows))
        input_ids, mask = _left_pad(rows, pad_id)
        extra: dict[str, Any] = {}
        if seeds is not None:  # one row per sample, each drawing from its own generator
            input_ids, mask = input_ids.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0)
            row_seeds = [x for i in idx for x in seeds[i]]
            row_seeds += [0] * (input_ids.shape[0] - len(row_seeds))  # a static batch's filler rows
            extra["logits_processor"] = LogitsProcessorList([RowSampler(row_seeds, config, model.device)])
        out = model.generate(
            input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device), generation_config=gen, **extra
        )
        new = out[:, input_ids.shape[1] :].tolist()  # (rows * k, new tokens)
        for j, i in enumerate(idx):
            results[i] = new[j * k : (j + 1) * k]
        if progress is not None:
            progress.advance(len(idx))
    return results


def generate_vllm(
    model_path: str | Path,
    tokenizer_path: str,
    prompt_ids: list[list[int]],
    *,
    k: int,
    config: Any,
    seed: int,
    eos: list[int],
    quiet: bool,
    seeds: list[list[int]] | None = None,
) -> list[list[list[int]]]:
    """K sampled responses per prompt with vLLM's offline engine; the engine is torn down afterwards.

    ``seeds[i][s]``: one request per sample, seeded (vLLM's per-request ``seed``; its batched kernels may still
    change a token in the last bits between batch compositions, see docs/train.md). Under a launcher with several
    processes (``WORLD_SIZE`` > 1) each process runs its own engine on its GPU with vLLM's ``external_launcher``
    (data parallel, its shard of the prompts), and the launcher's process group is left alone at teardown. Not yet
    run on a device."""
    import os

    from vllm import LLM, SamplingParams

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = getattr(config, "vllm_tensor_parallel_size", 1)
    if world > 1 and tp > 1:
        raise ConfigError(
            "config: vllm_tensor_parallel_size > 1 runs in one process (vLLM starts its own workers); launch one "
            "process, or use sampler: server with vllm serve --tensor-parallel-size",
            exit_code=1,
        )
    dtype = torch_name(config.mixed_precision) or config.dtype
    # generation_config="vllm": vLLM's neutral defaults rather than the checkpoint's generation_config.json.
    extra: dict[str, Any] = {} if config.use_generation_config else {"generation_config": "vllm"}
    if world > 1:
        extra["distributed_executor_backend"] = "external_launcher"
    if tp > 1:
        extra["tensor_parallel_size"] = tp
    llm = LLM(model=str(model_path), tokenizer=tokenizer_path, dtype=dtype, seed=seed, **extra)
    keys = {
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k if config.top_k > 0 else -1,
        "max_tokens": config.max_new_tokens,
        "min_tokens": config.min_new_tokens,
    }
    if seeds is None:
        requests, params = [{"prompt_token_ids": ids} for ids in prompt_ids], SamplingParams(n=k, **keys)
    else:
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids for _ in range(k)]
        params = [SamplingParams(n=1, seed=x % 2**63, **keys) for row in seeds for x in row]
    try:
        outs = llm.generate(requests, params, use_tqdm=not quiet)
        if seeds is not None:  # k one-sample requests per prompt, in order
            outs = [_Joined([c for o in outs[i * k : (i + 1) * k] for c in o.outputs]) for i in range(len(prompt_ids))]
        results = []
        for o in outs:
            rows = []
            for c in o.outputs:
                ids = list(c.token_ids)
                # vLLM may leave the end-of-sequence token out of token_ids; keep it, as generate does.
                if c.finish_reason == "stop" and eos and (not ids or ids[-1] not in eos):
                    ids.append(eos[0])
                rows.append(ids)
            results.append(rows)
        return results
    finally:
        del llm
        try:
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            if world == 1:  # under a launcher the process group is the launcher's (accelerate gathers with it)
                destroy_distributed_environment()
        except Exception:  # teardown helpers move between vLLM versions; memory is freed below regardless
            pass
        free_memory()


class _Joined:
    """One prompt's k single-sample vLLM outputs, seen as one output with k completions."""

    def __init__(self, outputs: list[Any]) -> None:
        self.outputs = outputs


def run(ctx: RunContext, t: int, policy_path: str | Path, held_out: bool = False) -> dict[str, Any]:
    """Sample round ``t`` from the policy at ``policy_path``; writes samples.jsonl and returns the phase summary.

    ``held_out``: every held-out prompt (the final evaluation) instead of round ``t``'s training prompts.
    """
    cfg = ctx.config
    if held_out:
        texts, picked, reused = ctx.eval_prompts, list(range(len(ctx.eval_prompts))), False
    else:
        texts = ctx.prompts
        picked, reused = round_prompts(texts, t, cfg.prompts_per_round, seed=cfg.seed, shuffle=cfg.shuffle_prompts)
    rows_out, summary = sample_rows(
        ctx, cfg, policy_path, texts, picked, f"round {t}", phase_seed(cfg.seed, t, "sample")
    )
    if ctx.is_main:
        ctx.store.write_jsonl(ctx.store.samples(t), rows_out, round_index=t, phase="sample")
    return {**summary, "reused_prompts": reused, **({"held_out": True} if held_out else {})}


def sample_rows(
    ctx: RunContext, cfg: Any, policy_path: str | Path, texts: list[str], picked: list[int], label: str, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``cfg.samples_per_prompt`` responses to each prompt ``texts[i]``, i in ``picked``, from the policy at
    ``policy_path`` with ``cfg``'s sampling keys: (rows as samples.jsonl holds them, summary)."""
    acc = ctx.accelerator
    k = cfg.samples_per_prompt
    encoded = [encode_prompt(ctx.tokenizer, texts[i], cfg.chat_template) for i in picked]
    keep = [j for j, ids in enumerate(encoded) if len(ids) <= cfg.max_prompt_tokens]
    if not keep:
        raise ConfigError(
            f"{label}: every prompt is longer than max_prompt_tokens={cfg.max_prompt_tokens}", exit_code=1
        )
    by_length = sorted(keep, key=lambda j: -len(encoded[j]))
    mine = by_length[ctx.rank :: acc.num_processes]
    seeds = {j: [sample_seed(seed, picked[j], s) for s in range(k)] for j in keep}

    backend = select_sampler(
        cfg.sampler,
        cuda=ctx.device.type == "cuda",
        num_processes=acc.num_processes,
        vllm_available=vllm_available(),
        server_url=cfg.server_url,
    )
    policy_path = ctx.hf_view(policy_path)  # a DCP policy: its one Hugging Face export (vLLM reads no DCP)
    eos = eos_ids(policy_path, ctx.tokenizer)
    start = time.perf_counter()
    if backend == "vllm":
        raw = generate_vllm(
            policy_path,
            cfg.tokenizer or str(policy_path),
            [encoded[j] for j in mine],
            k=k,
            config=cfg,
            seed=seed % 2**31,
            eos=eos,
            quiet=ctx.quiet,
            seeds=[seeds[j] for j in mine],
        )
    elif backend == "server":
        cache = ctx.store.root / f".server-rows-{seed:016x}-{ctx.rank}.jsonl"
        sampler = ServerSampler(cfg, cfg.server_model or str(policy_path), ctx.tokenizer, eos)
        with ctx.progress(f"{label}: sampling", len(by_length)) as bar:
            raw = sampler.run(
                [encoded[j] for j in mine], [seeds[j] for j in mine], cache, _Scaled(bar, acc.num_processes)
            )
    else:
        model = ctx.load_policy(policy_path, dtype=ctx.inference_dtype)
        with ctx.progress(f"{label}: sampling", len(by_length)) as bar:
            raw = generate_transformers(
                model,
                [encoded[j] for j in mine],
                k=k,
                config=cfg,
                pad_id=ctx.tokenizer.pad_token_id,
                eos=eos,
                static=backend == "static",
                progress=_Scaled(bar, acc.num_processes),
                seeds=[seeds[j] for j in mine],
            )
        del model
        free_memory()
    seconds = time.perf_counter() - start

    from accelerate.utils import gather_object

    gathered = gather_object([(j, rows) for j, rows in zip(mine, raw, strict=True)])
    by_pos = dict(gathered)
    if backend == "server":
        cache.unlink(missing_ok=True)  # every process has its rows back: the partial rows are not needed
    rows_out = []
    for j in keep:
        trimmed = [trim_response(r, eos) for r in by_pos[j]]
        rows_out.append(
            {
                "index": len(rows_out),
                "source": picked[j],
                "prompt": texts[picked[j]],
                "prompt_ids": encoded[j],
                "response_ids": [ids for ids, _ in trimmed],
                "finished": [fin for _, fin in trimmed],
                "responses": [ctx.tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in trimmed],
                "seeds": seeds[j],
            }
        )
    new_tokens = sum(len(ids) for r in rows_out for ids in r["response_ids"])
    finished = sum(f for r in rows_out for f in r["finished"])
    return rows_out, {
        "prompts": len(rows_out),
        "samples": len(rows_out) * k,
        "skipped_long_prompts": len(picked) - len(keep),
        "sampler": backend,
        "new_tokens": new_tokens,
        "mean_length": new_tokens / (len(rows_out) * k),
        "finished_fraction": finished / (len(rows_out) * k),
        "new_tokens_per_second": new_tokens / seconds if seconds > 0 else 0.0,
    }


class ServerSampler:
    """``sampler: server``: one seeded /v1/completions request per sample (prompt as token ids, ``n`` 1,
    ``seed`` = the sample's seed mod 2**31), ``server_concurrency`` at a time.

    Finished samples are appended to ``cache`` as they arrive, so a rerun after a crash asks only for the rest. The
    response's ``token_ids`` are taken when the server sends them, else its text is tokenized; an end-of-sequence
    token is appended when the server stopped on it (``finish_reason: stop``). A completion longer than
    ``max_new_tokens`` is refused.
    """

    def __init__(self, cfg: Any, model: str, tokenizer: Any, eos: list[int]) -> None:
        from apo_trainer.server import CompletionClient

        self.cfg, self.model, self.tokenizer, self.eos = cfg, model, tokenizer, eos
        self.client = CompletionClient(
            cfg.server_url, concurrency=cfg.server_concurrency, timeout=cfg.server_timeout, retries=cfg.server_retries
        )

    def body(self, prompt_ids: list[int], seed: int) -> dict[str, Any]:
        cfg = self.cfg
        body = {"model": self.model, "prompt": prompt_ids, "max_tokens": cfg.max_new_tokens, "n": 1}
        body.update(temperature=cfg.temperature, top_p=cfg.top_p, seed=seed % 2**31)
        if cfg.top_k > 0:
            body["top_k"] = cfg.top_k  # vLLM / SGLang extensions
        if cfg.min_new_tokens > 0:
            body["min_tokens"] = cfg.min_new_tokens
        return body

    def tokens(self, choice: dict[str, Any]) -> list[int]:
        from apo_trainer.server import ServerError

        ids = choice.get("token_ids")
        if ids is None:
            ids = self.tokenizer(choice.get("text") or "", add_special_tokens=False)["input_ids"]
        ids = [int(x) for x in ids]
        n = (choice.get("usage") or {}).get("completion_tokens", len(ids))
        if n > self.cfg.max_new_tokens or len(ids) > self.cfg.max_new_tokens + 1:
            raise ServerError(
                f"server {self.client.url} returned a completion of {max(n, len(ids))} tokens for max_new_tokens="
                f"{self.cfg.max_new_tokens}; it ignores max_tokens, or serves another tokenizer than the policy's"
            )
        if choice.get("finish_reason") == "stop" and self.eos and (not ids or ids[-1] not in self.eos):
            ids.append(self.eos[0])
        return ids

    def run(self, prompt_ids: list[list[int]], seeds: list[list[int]], cache: Path, progress: Any) -> list:
        import hashlib
        import json

        def key(i: int, s: int) -> str:
            return hashlib.sha256(json.dumps([prompt_ids[i], seeds[i][s]]).encode()).hexdigest()[:32]

        wanted = {key(i, s): (i, s) for i in range(len(prompt_ids)) for s in range(len(seeds[i]))}
        got: dict[tuple[int, int], list[int]] = {}
        if cache.exists():
            for line in cache.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut short by the crash
                    continue
                if rec.get("key") in wanted:
                    got[wanted[rec["key"]]] = rec["ids"]
        todo = [(i, s) for i in range(len(prompt_ids)) for s in range(len(seeds[i])) if (i, s) not in got]
        if todo:
            self.client.wait_healthy()
        with open(cache, "a", encoding="utf-8") as fh:

            def done(item: tuple[int, int], ids: list[int]) -> None:
                got[item] = ids
                fh.write(json.dumps({"key": key(*item), "ids": ids}) + "\n")
                fh.flush()
                if item[1] == len(seeds[item[0]]) - 1:
                    progress.advance(1)

            self.client.map(
                lambda it: self.tokens(self.client.complete(self.body(prompt_ids[it[0]], seeds[it[0]][it[1]]))),
                todo,
                done,
            )
        return [[got[(i, s)] for s in range(len(seeds[i]))] for i in range(len(prompt_ids))]


class _Scaled:
    """Advances a progress bar by ``n * processes`` so the main process's share stands for the whole."""

    def __init__(self, bar: Any, processes: int) -> None:
        self.bar, self.processes = bar, processes

    def advance(self, n: int = 1) -> None:
        self.bar.advance(n * self.processes)


def load_samples(ctx: RunContext, t: int) -> list[dict[str, Any]]:
    """The rows samples.jsonl holds for round ``t``."""
    return read_jsonl(ctx.store.samples(t))
