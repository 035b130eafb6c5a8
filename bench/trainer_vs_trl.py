"""apo-train's train phase against TRL's DPOTrainer on the same work, and the phase shares of one apo-train round.

    python bench/trainer_vs_trl.py --trl /work/venvs/trl                 # CPU: ~19 M-param Llama, fp32
    python bench/trainer_vs_trl.py --trl VENV --shape tinyllama --bf16   # GPU: TinyLlama-1.1B-shaped, bf16

TRL lives in its own virtual environment (``--trl``, a venv with ``pip install torch trl``); it is never a dependency
of this project. One apo-train round (sample, judge, reference, data, train, extrapolate) runs first on a
random-init Llama-shaped model with a word-level tokenizer (nothing downloaded); its phase times are printed as
shares of the round. Its ``pairs.jsonl`` is then exported with the token ids and the reference log-probs of the
reference phase into TRL's prompt/chosen/rejected format (plus ``ref_chosen_logps`` / ``ref_rejected_logps``, so
TRL's ``precompute_ref_log_probs`` has nothing to compute), in the order apo-train trains on.

Each side then trains the same model from the same weights on the same pairs: same batch size, lr, schedule,
AdamW, gradient clipping, precision and number of steps, DPO sigmoid loss, one process. Sides alternate, ``--runs``
each, each run in a fresh subprocess (``bench/_trl_driver.py`` under the TRL venv's python). Per run: wall time
of the train phase (model load, training steps, checkpoint save) and of the steps alone, pairs/s and tokens/s
(non-padding tokens of chosen + rejected sequences), peak memory (CPU: the process's peak RSS and its rise over the
RSS before the model loads; CUDA: max allocated), and the first step's loss. Ratios are TRL time / apo-train time
(above 1: apo-train is faster) and apo-train memory / TRL memory. Results go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.trainer_phases import SHAPES  # noqa: E402

SHAPES = dict(
    SHAPES,
    bench=dict(
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=16384,
    ),
)
PHASES = ("sample", "judge", "reference", "data", "train", "extrapolate")


def apo_round(args: argparse.Namespace, folder: Path) -> tuple[dict, Path]:
    """One apo-train round on a fresh random-init model; returns its record and the run folder."""
    import bench.trainer_phases as phases
    from apo_trainer.config import APOConfig
    from apo_trainer.loop import run
    from apo_trainer.oracle import CallableOracle
    from bench.trainer_phases import build
    from tests.trainer.tiny import word_sum

    phases.SHAPES = SHAPES
    policy, prompts = build(folder, args.shape, args.prompts, seed=0)
    cfg = APOConfig.from_dict(
        dict(
            model=str(policy),
            prompts=str(prompts),
            output_dir=str(folder / "run"),
            rounds=1,
            final_eval=False,
            alpha=0.3,
            samples_per_prompt=args.k,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens // 2,
            prompts_per_round=args.prompts,
            generation_batch_size=args.prompts * args.k,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            warmup_ratio=0.1,
            loss="dpo",
            beta=0.1,
            mixed_precision="bf16" if args.bf16 else "no",
            logprob_batch_size=16,
            oracle_batch_size=256,
            eval_fraction=0.0,  # every prompt trains, as when the recorded timings were taken
        )
    )
    record = run(cfg, CallableOracle(word_sum), quiet=True)[0]
    return record, folder / "run"


def export(run_dir: Path, out: Path) -> dict:
    """The round's pairs in training order, as TRL rows: text, token ids and reference log-probs."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from apo_trainer.config import APOConfig
    from apo_trainer.runtime import phase_seed
    from apo_trainer.store import RunStore
    from apo_trainer.train import training_items

    store = RunStore(run_dir)
    cfg = APOConfig.from_yaml(str(store.config))
    items = training_items(SimpleNamespace(store=store, config=cfg), 0)
    g = torch.Generator().manual_seed(phase_seed(cfg.seed, 0, "train-order"))
    order = torch.randperm(len(items), generator=g).tolist()  # what train.run draws (epochs_per_round = 1)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    rows = []
    for i in order:
        it = items[i]
        rows.append(
            {
                "prompt": tok.decode(it["prompt_ids"]),
                "chosen": tok.decode(it["chosen_ids"]),
                "rejected": tok.decode(it["rejected_ids"]),
                "prompt_ids": it["prompt_ids"],
                "chosen_ids": it["chosen_ids"],
                "rejected_ids": it["rejected_ids"],
                "ref_chosen_logps": it["ref_chosen"],
                "ref_rejected_logps": it["ref_rejected"],
            }
        )
    with open(out, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    tokens = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    return {
        "model": cfg.model,
        "pairs": len(rows),
        "tokens": tokens,
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "beta": cfg.beta,
        "warmup_ratio": cfg.warmup_ratio,
        "lr_scheduler": cfg.lr_scheduler,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "bf16": cfg.mixed_precision == "bf16",
        "seed": cfg.seed,
    }


def apo_side(spec_path: str, full_logits: bool = False) -> None:
    """Child process: apo-train's train phase on the exported round, then one JSON line on stdout.
    ``full_logits``: with the unoptimized log-prob computation (logits at every position), to measure that lever."""
    spec = json.loads(Path(spec_path).read_text())
    base_rss = _rss()
    from accelerate import Accelerator
    from transformers.utils import logging as hf_logging

    from apo_trainer import train
    from apo_trainer.config import APOConfig
    from apo_trainer.runtime import RunContext, load_tokenizer
    from apo_trainer.store import RunStore

    hf_logging.disable_progress_bar()
    store = RunStore(spec["run_dir"])
    cfg = APOConfig.from_yaml(str(store.config))
    acc = Accelerator(mixed_precision=cfg.mixed_precision)
    ctx = RunContext(config=cfg, accelerator=acc, store=store, tokenizer=load_tokenizer(cfg), prompts=[], quiet=True)
    loop_time = []
    inner = train._train_loop

    def timed_loop(*a, **kw):
        _sync()
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        _sync()
        loop_time.append(time.perf_counter() - t0)
        return out

    train._train_loop = timed_loop
    if full_logits:
        from apo_trainer.sequences import sequence_logps_full

        train.sequence_logps = sequence_logps_full
    base_rss = _rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary, _model = train.run(ctx, 0, cfg.model)
    _sync()
    wall = time.perf_counter() - t0
    log = [json.loads(line) for line in (store.round_dir(0) / "train_log.jsonl").read_text().splitlines()]
    print(json.dumps(_result(wall, loop_time[0], log[0]["loss"], summary["steps"], base_rss)))


def _result(wall: float, loop: float, first_loss: float, steps: int, base_rss: int) -> dict:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"wall_s": wall, "loop_s": loop, "first_loss": first_loss, "steps": steps}
    out.update(peak_rss=peak, rss_rise=peak - base_rss)
    if torch.cuda.is_available():
        out["max_allocated"] = torch.cuda.max_memory_allocated()
    return out


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _child(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0:
        sys.exit(f"trainer_vs_trl: {' '.join(cmd[:2])} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trl", default="/work/venvs/trl", help="A virtual environment with trl installed.")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    ap.add_argument("--prompts", type=int, default=24, help="Prompts in the round (= preference pairs, less ties).")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU).")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=None, help="Results JSON (default bench/results/trainer_vs_trl-DEVICE.json).")
    ap.add_argument(
        "--full-logits", action="store_true", help="Add apo-train with logits at every position (the lever's effect)."
    )
    ap.add_argument("--side", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return apo_side(args.side, args.full_logits)
    trl_python = Path(args.trl) / "bin" / "python"
    if not trl_python.is_file():
        sys.exit(f"trainer_vs_trl: {trl_python} not found; make a venv with trl (pip install torch trl) and pass --trl")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        record, run_dir = apo_round(args, folder)
        round_wall = time.perf_counter() - t0
        spec = export(run_dir, folder / "pairs_trl.jsonl")
        spec.update(run_dir=str(run_dir), data=str(folder / "pairs_trl.jsonl"), save_dir=str(folder / "trl-out"))
        spec_path = folder / "spec.json"
        spec_path.write_text(json.dumps(spec))
        sides = {
            "apo-train": [sys.executable, str(Path(__file__).resolve()), "--side", str(spec_path)],
            "TRL": [str(trl_python), str(ROOT / "bench" / "_trl_driver.py"), str(spec_path)],
        }
        if args.full_logits:
            sides["apo, full"] = [*sides["apo-train"], "--full-logits"]
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        for i in range(args.runs):
            for name, cmd in sides.items():
                runs[name].append(_child(cmd))
                r = runs[name][-1]
                print(
                    f"run {i + 1} {name:9s} phase {r['wall_s']:7.2f} s  steps {r['loop_s']:7.2f} s  "
                    f"first loss {r['first_loss']:.8f}",
                    flush=True,
                )
    report(args, record, round_wall, spec, runs, trl_python)


def report(args, record: dict, round_wall: float, spec: dict, runs: dict, trl_python: Path) -> None:
    shares = {p: record.get(f"time_{p}", 0.0) for p in PHASES}
    total = sum(shares.values())
    print(
        f"\none apo-train round ({spec['pairs']} pairs, {args.prompts} prompts x K={args.k}, "
        f"{args.max_new_tokens} new tokens): {total:.1f} s in phases"
    )
    for p in PHASES:
        print(f"  {p:12s} {shares[p]:7.2f} s  {100 * shares[p] / total:5.1f} %")
    med = {
        n: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
        for n, rs in runs.items()
    }
    apo, trl = med["apo-train"], med["TRL"]
    loss_diff = abs(runs["apo-train"][0]["first_loss"] - runs["TRL"][0]["first_loss"])
    mem_key = "max_allocated" if "max_allocated" in apo else "rss_rise"
    print(
        f"\ntrain phase, {spec['pairs']} pairs, batch {spec['batch_size']}, {apo['steps']:.0f} steps, "
        f"medians of {args.runs} alternating runs"
    )
    print(
        f"{'':10s} {'phase s':>8s} {'steps s':>8s} {'pairs/s':>8s} {'tok/s':>8s} {'peak RSS MB':>12s} "
        f"{'rise MB':>8s}" + (f" {'max alloc MB':>12s}" if mem_key == "max_allocated" else "")
    )
    for n, m in med.items():
        line = (
            f"{n:10s} {m['wall_s']:8.2f} {m['loop_s']:8.2f} {spec['pairs'] / m['loop_s']:8.2f} "
            f"{spec['tokens'] / m['loop_s']:8.0f} {m['peak_rss'] / 2**20:12.0f} {m['rss_rise'] / 2**20:8.0f}"
        )
        if mem_key == "max_allocated":
            line += f" {m['max_allocated'] / 2**20:12.0f}"
        print(line)
    ratios = {
        "phase_speed": trl["wall_s"] / apo["wall_s"],
        "steps_speed": trl["loop_s"] / apo["loop_s"],
        "memory": apo[mem_key] / trl[mem_key],
        "peak_rss": apo["peak_rss"] / trl["peak_rss"],
    }
    if "apo, full" in med:
        ratios["full_logits_steps_over_apo"] = med["apo, full"]["loop_s"] / apo["loop_s"]
        ratios["full_logits_rise_over_apo"] = med["apo, full"]["rss_rise"] / apo["rss_rise"]
        print(
            f"lever: logits at every position take {ratios['full_logits_steps_over_apo']:.2f}x the steps' time and "
            f"{ratios['full_logits_rise_over_apo']:.2f}x the memory rise of response positions only"
        )
    print(
        f"ratios (apo-train / TRL): speed {ratios['phase_speed']:.2f}x phase, {ratios['steps_speed']:.2f}x steps "
        f"(above 1 = apo-train faster); memory {ratios['memory']:.2f}x ({mem_key}), "
        f"{ratios['peak_rss']:.2f}x peak RSS (below 1 = apo-train smaller)"
    )
    print(
        f"first-step loss: apo-train {runs['apo-train'][0]['first_loss']:.9f}  TRL "
        f"{runs['TRL'][0]['first_loss']:.9f}  |diff| {loss_diff:.2e} ({'within' if loss_diff <= 1e-5 else 'OVER'} 1e-5)"
    )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU"
    versions = subprocess.run(
        [
            str(trl_python),
            "-c",
            "import trl, transformers, torch; print(trl.__version__, transformers.__version__, torch.__version__)",
        ],
        capture_output=True,
        text=True,
    )
    out = (
        Path(args.out)
        if args.out
        else ROOT
        / "bench"
        / "results"
        / (f"trainer_vs_trl-{args.shape}-{'gpu' if torch.cuda.is_available() else f'{os.cpu_count()}cpu'}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": "python bench/trainer_vs_trl.py " + " ".join(sys.argv[1:]),
                "device": device,
                "machine": platform.platform(),
                "load_average": os.getloadavg(),
                "trl_transformers_torch": versions.stdout.split(),
                "args": {k: v for k, v in vars(args).items() if k != "side"},
                "work": spec | {"steps": apo["steps"]},
                "round_phases_s": shares,
                "round_wall_s": round_wall,
                "runs": runs,
                "medians": med,
                "ratios": ratios,
                "first_loss_abs_diff": loss_diff,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
