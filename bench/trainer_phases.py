"""Per-phase wall times of a small apo-train run, and (on CUDA) sampling throughput of the fast path vs plain generate.

    python bench/trainer_phases.py                        # tiny model on the CPU: phase times of 2 rounds
    python bench/trainer_phases.py --shape tinyllama      # on a GPU: TinyLlama-1.1B-shaped, random init, bf16
    python bench/trainer_phases.py --shape tinyllama --sampling-only --json out.json   # the sampling figures only
    python bench/trainer_phases.py --memory               # peak memory of the train phase, LoRA vs full

``--memory`` runs round 0 up to its data phase once, then the train phase alone in a fresh process per mode (full
fine-tuning, then LoRA r=16 on every Linear layer) and prints the peak RSS while it runs (sampled every 2 ms from
/proc; CPU) or the peak GPU memory (CUDA), with the ratio LoRA / full. The RSS after start-up (imports) is the
same in both and is printed as the baseline.

The model is random-init from a transformers config and the tokenizer a word-level one built here: nothing is
downloaded. On CUDA the sampling comparison runs the same prompts through transformers' generate with the
default dynamic cache (the baseline), with the static cache (compiled; first call includes the compile), and through
vLLM when it is importable; it prints new tokens per second and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apo_trainer.config import APOConfig  # noqa: E402
from apo_trainer.oracle import CallableOracle  # noqa: E402
from tests.trainer.tiny import make_tokenizer, word_sum  # noqa: E402

SHAPES = {
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4096,
    ),
    "tinyllama": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}


def build(folder: Path, shape: str, n_prompts: int, seed: int) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = SHAPES[shape]
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **dims, max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder / "policy")
    make_tokenizer(vocab_size=dims["vocab_size"]).save_pretrained(folder / "policy")
    g = torch.Generator().manual_seed(seed)
    n_words = dims["vocab_size"] - 8
    with open(folder / "prompts.jsonl", "w") as fh:
        for _ in range(n_prompts):
            length = int(torch.randint(8, 48, (1,), generator=g))
            words = torch.randint(0, n_words, (length,), generator=g).tolist()
            fh.write(json.dumps({"prompt": " ".join(f"w{w}" for w in words)}) + "\n")
    return folder / "policy", folder / "prompts.jsonl"


def phase_times(args: argparse.Namespace, policy: Path, prompts: Path, out: Path) -> dict:
    from apo_trainer.loop import run

    cuda = torch.cuda.is_available()
    cfg = APOConfig.from_dict(
        dict(
            model=str(policy),
            prompts=str(prompts),
            output_dir=str(out),
            rounds=args.rounds,
            alpha=0.3,
            samples_per_prompt=args.k,
            max_new_tokens=args.max_new_tokens,
            prompts_per_round=args.prompts_per_round,
            generation_batch_size=args.generation_batch_size,
            batch_size=args.batch_size,
            learning_rate=1e-5,
            mixed_precision="bf16" if cuda else "no",
            logprob_batch_size=16,
            oracle_batch_size=256,
            eval_fraction=0.0,  # every prompt trains, as when the recorded timings were taken
        )
    )
    start = time.perf_counter()
    records = run(cfg, CallableOracle(word_sum), quiet=True)
    wall = time.perf_counter() - start
    phases = ("sample", "judge", "reference", "data", "train", "extrapolate")
    print(
        f"\nphase wall times (s), {args.prompts_per_round} prompts x K={args.k}, {args.max_new_tokens} new tokens, "
        f"sampler {records[0].get('sampler')}"
    )
    print("round  " + "  ".join(f"{p:>11}" for p in phases) + "        total  new tok/s")
    for r in records:
        cells = "  ".join(f"{r[f'time_{p}']:11.2f}" if f"time_{p}" in r else f"{'-':>11}" for p in phases)
        print(f"{r['round']:5d}  {cells}  {r['time_total']:11.2f}  {r.get('new_tokens_per_second', 0):9.0f}")
    print(f"whole run (imports excluded, start-up and final evaluation included): {wall:.1f} s")
    keep = ("round", "sampler", "time_total", "new_tokens_per_second", *(f"time_{p}" for p in phases))
    return {"wall_s": wall, "rounds": [{k: r[k] for k in keep if k in r} for r in records]}


# Runs the train phase of round 0 alone (the earlier phases are done in RUN) and prints peak memory as JSON.
_TRAIN_ONLY = """
import json, sys, torch
import accelerate, peft, transformers  # start-up, the same for both modes
from apo_trainer import store
from apo_trainer.config import APOConfig
from apo_trainer.loop import run
from apo_trainer.oracle import CallableOracle
from tests.trainer.tiny import word_sum

class Stop(Exception):
    pass

def stop(t, phase, where):
    if (phase, where) == ("train", "end"):
        raise Stop

import os, threading
page_kib = os.sysconf("SC_PAGE_SIZE") // 1024

def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page_kib

peak, done = [0], threading.Event()

def sample():  # the high-water mark of this phase (ru_maxrss also holds the imports' transient peak)
    while not done.is_set():
        peak[0] = max(peak[0], rss_kib())
        done.wait(0.002)

cfg = APOConfig.from_dict(json.loads(sys.argv[1]))
base = rss_kib()
watcher = threading.Thread(target=sample)
watcher.start()
store.fault_hook = stop
try:
    run(cfg, CallableOracle(word_sum), quiet=True, allow_changed_config=True)
except Stop:
    pass
done.set()
watcher.join()
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print(json.dumps({"rss_kib": peak[0], "start_kib": base, "gpu": gpu}))
"""


def train_memory(args: argparse.Namespace, policy: Path, prompts: Path, tmp: Path) -> None:
    import os
    import shutil
    import subprocess

    from apo_trainer import store
    from apo_trainer.loop import run

    cuda = torch.cuda.is_available()
    values = dict(
        model=str(policy),
        prompts=str(prompts),
        output_dir=str(tmp / "prep"),
        rounds=1,
        final_eval=False,
        samples_per_prompt=args.k,
        max_new_tokens=args.max_new_tokens,
        prompts_per_round=args.prompts_per_round,
        generation_batch_size=args.generation_batch_size,
        batch_size=args.batch_size,
        learning_rate=1e-5,
        mixed_precision="bf16" if cuda else "no",
    )

    class Stop(Exception):
        pass

    def stop(t: int, phase: str, where: str) -> None:
        if phase == "train":
            raise Stop

    store.fault_hook = stop
    try:
        run(APOConfig.from_dict(values), CallableOracle(word_sum), quiet=True)
    except Stop:
        pass
    finally:
        store.fault_hook = None
    results = {}
    root = Path(__file__).resolve().parents[1]
    for mode, peft in (("full", {}), ("lora", {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"})):
        out = tmp / mode
        shutil.copytree(tmp / "prep", out)
        cfg = dict(values, output_dir=str(out), peft=peft)
        proc = subprocess.run(
            [sys.executable, "-c", _TRAIN_ONLY, json.dumps(cfg)],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    from safetensors.torch import load_file

    n_params = sum(t.numel() for t in load_file(str(policy / "model.safetensors")).values())
    print(
        f"\ntrain phase peak memory, shape {args.shape} ({n_params / 1e6:.2f} M parameters), {args.prompts_per_round} prompts x K={args.k}"
    )
    for mode, r in results.items():
        line = (
            f"  {mode:5s} peak RSS {r['rss_kib'] / 1024:8.1f} MiB (start-up {r['start_kib'] / 1024:.1f} MiB, "
            f"train phase adds {(r['rss_kib'] - r['start_kib']) / 1024:.1f} MiB)"
        )
        if r["gpu"] is not None:
            line += f", peak GPU {r['gpu'] / 2**20:.1f} MiB"
        print(line)
    full, lora = results["full"], results["lora"]
    key = "gpu" if full["gpu"] else "rss_kib"
    added = lambda r: r[key] - (0 if key == "gpu" else r["start_kib"])  # noqa: E731
    grew = f", {added(lora) / added(full):.2f}x of what the train phase adds" if added(full) > 1024 else ""
    print(f"  LoRA / full: {lora[key] / full[key]:.2f}x peak{grew}")


def sampling_ratio(args: argparse.Namespace, policy: Path, prompts: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from apo_trainer.prompts import load_prompts
    from apo_trainer.sample import encode_prompt, generate_transformers, generate_vllm, vllm_available

    tok = make_tokenizer(vocab_size=SHAPES[args.shape]["vocab_size"])
    texts = load_prompts(prompts)[: args.prompts_per_round]
    ids = [encode_prompt(tok, p, False) for p in texts]
    cfg = APOConfig(
        samples_per_prompt=args.k,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,
        generation_batch_size=args.generation_batch_size,
        mixed_precision="bf16",
    )
    model = AutoModelForCausalLM.from_pretrained(str(policy), dtype=torch.bfloat16).cuda()
    new_tokens = len(ids) * args.k * args.max_new_tokens

    def timed(static: bool) -> float:
        torch.manual_seed(0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate_transformers(model, ids, k=args.k, config=cfg, pad_id=0, eos=[2], static=static)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    plain = timed(False)
    static_first = timed(True)
    static = timed(True)
    print(
        f"\nsampling on {torch.cuda.get_device_name()}: {len(ids)} prompts x K={args.k} x {args.max_new_tokens} "
        f"tokens, batch {args.generation_batch_size} sequences, bf16"
    )
    print(f"  generate, dynamic cache (baseline)   {new_tokens / plain:10.0f} new tok/s   {plain:7.1f} s   1.00x")
    print(
        f"  generate, static cache, 1st (compile) {new_tokens / static_first:10.0f} new tok/s   "
        f"{static_first:7.1f} s   {plain / static_first:.2f}x"
    )
    print(
        f"  generate, static cache, compiled      {new_tokens / static:10.0f} new tok/s   {static:7.1f} s   "
        f"{plain / static:.2f}x"
    )
    figures = {
        "device": torch.cuda.get_device_name(),
        "sequences": len(ids) * args.k,
        "new_tokens": new_tokens,
        "plain_tokens_per_s": new_tokens / plain,
        "static_first_tokens_per_s": new_tokens / static_first,
        "static_tokens_per_s": new_tokens / static,
        "static_over_plain": plain / static,
    }
    if vllm_available():
        del model
        torch.cuda.empty_cache()
        t0 = time.perf_counter()
        generate_vllm(policy, str(policy), ids, k=args.k, config=cfg, seed=0, eos=[], quiet=True)
        vl = time.perf_counter() - t0
        print(
            f"  vLLM (engine start included)          {new_tokens / vl:10.0f} new tok/s   {vl:7.1f} s   "
            f"{plain / vl:.2f}x"
        )
        figures["vllm_tokens_per_s"] = new_tokens / vl
    else:
        print("  vLLM: not importable, skipped")
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts-per-round", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--generation-batch-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sampling-only", action="store_true", help="Skip the phase timing run (CUDA comparison only).")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    ap.add_argument("--memory", action="store_true", help="Only: peak memory of the train phase, LoRA vs full.")
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    results: dict = {"shape": args.shape, "torch": torch.__version__, "config": vars(args) | {"json": None}}
    with tempfile.TemporaryDirectory() as tmp:
        policy, prompts = build(Path(tmp), args.shape, args.prompts_per_round * (args.rounds + 1), seed=0)
        if args.memory:
            train_memory(args, policy, prompts, Path(tmp))
            return
        if not args.sampling_only:
            results["phases"] = phase_times(args, policy, prompts, Path(tmp) / "run")
        if torch.cuda.is_available():
            results["sampling"] = sampling_ratio(args, policy, prompts)
        else:
            print("\nno CUDA device: sampling comparison (static cache, vLLM vs plain generate) skipped")
            results["sampling"] = None
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
