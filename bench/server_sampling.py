"""Sampling throughput of ``sampler: server`` against the stand-in server (tests/trainer/standin_server.py), by
concurrency: what the client adds on top of a server whose every answer takes ``--latency`` seconds.

    python bench/server_sampling.py [--samples 256] [--latency 0.05] [--concurrency 1,8,32]

With a real server the answer time is generation time and grows with the server's batch; the stand-in's is fixed,
so these figures bound the client's overhead, not a server's speed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apo_trainer.sample import ServerSampler  # noqa: E402
from tests.trainer.standin_server import StandIn  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", default="1,8,32")
    args = ap.parse_args()
    prompts = [[1, 5 + i % 50, 9] for i in range(args.samples // 4)]
    seeds = [[i * 4 + s for s in range(4)] for i in range(len(prompts))]
    print(f"{len(prompts) * 4} samples (max_new_tokens 64), stand-in answer time {args.latency * 1000:.0f} ms")
    for c in (int(x) for x in args.concurrency.split(",")):
        cfg = types.SimpleNamespace(
            server_url="",
            server_concurrency=c,
            server_timeout=60.0,
            server_retries=0,
            max_new_tokens=64,
            min_new_tokens=0,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
        )
        with StandIn() as server, tempfile.TemporaryDirectory() as tmp:
            server.faults["latency"] = args.latency
            cfg.server_url = server.url
            sampler = ServerSampler(cfg, "policy", tokenizer=None, eos=[2])
            bar = types.SimpleNamespace(advance=lambda n=1: None)
            t0 = time.perf_counter()
            out = sampler.run(prompts, seeds, Path(tmp) / "rows.jsonl", bar)
            dt = time.perf_counter() - t0
        tokens = sum(len(r) for rows in out for r in rows)
        print(f"concurrency {c:2d}: {len(prompts) * 4 / dt:7.1f} samples/s, {tokens / dt:8.0f} tokens/s ({dt:.2f} s)")


if __name__ == "__main__":
    main()
