"""Sampling throughput of the transformers sampler on this CPU with 1 and 2 processes (accelerate launch, gloo),
and whether samples.jsonl comes out byte-identical (per-sample seeds).

    python bench/sampling_processes.py [--prompts 32] [--hidden 256] [--layers 4] [--tokens 48]

A random Llama (vocabulary 128, the tests' tokenizer) samples one round; the figure is the sample phase's
new_tokens_per_second (tokens of all rows over the main process's sampling time). Each process gets one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from tests.trainer.tiny import make_policy, make_prompts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    make_policy(
        tmp / "policy", hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers
    )
    make_prompts(tmp / "prompts.jsonl", n=args.prompts)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1"}
    outs = {}
    for n in (1, 2):
        out = tmp / f"out{n}"
        cfg = {
            "model": str(tmp / "policy"),
            "prompts": str(tmp / "prompts.jsonl"),
            "oracle": "callable:tests.trainer.tiny:word_sum",
            "output_dir": str(out),
            "rounds": 1,
            "final_eval": False,
            "samples_per_prompt": 4,
            "max_new_tokens": args.tokens,
            "min_new_tokens": args.tokens,
            "generation_batch_size": 64,
            "batch_size": 2,
            "grad_accum": 1,
            "sampler": "generate",
        }
        (tmp / f"run{n}.yaml").write_text(yaml.safe_dump(cfg))
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
        launch += ["--dynamo_backend", "no", "--num_processes", str(n)] + (["--multi_gpu"] if n > 1 else ["--cpu"])
        proc = subprocess.run(
            [*launch, "-m", "apo_trainer", "run", str(tmp / f"run{n}.yaml"), "--quiet"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        done = json.loads((out / "round-0" / "done" / "sample.json").read_text())
        outs[n] = (out / "round-0" / "samples.jsonl").read_bytes()
        summary = done.get("summary", done)
        print(f"{n} process(es): {summary['new_tokens_per_second']:.0f} new tokens/s ({summary['new_tokens']} tokens)")
    print(f"samples.jsonl byte-identical: {outs[1] == outs[2]}")


if __name__ == "__main__":
    main()
