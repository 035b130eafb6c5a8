"""apo-train as real processes: SIGKILL in every phase then a rerun, and two processes under accelerate launch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from apo_merge import extrapolate_state_dict
from apo_trainer.store import PHASES, RunStore
from tests.trainer.conftest import tiny_config
from tests.trainer.helpers import artifacts, weights

ROOT = Path(__file__).resolve().parents[2]


# `apo-train run CONFIG --quiet` with SIGKILL at one fault point (round, phase, where), set through the store's seam.
KILL_AT = """
import os, signal, sys
from apo_trainer import store
from apo_trainer.cli import main

target = (int(sys.argv[1]), sys.argv[2], sys.argv[3])
store.fault_hook = lambda *at: at == target and os.kill(os.getpid(), signal.SIGKILL)
sys.argv = ["apo-train", "run", sys.argv[4], "--quiet"]
main()
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # One thread, like the in-process reference run: results depend on the thread count.
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def _write_config(path: Path, cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


@pytest.mark.slow
def test_sigkill_in_every_phase_then_rerun_gives_the_same_bytes(tiny, tmp_path, reference_run):
    ref_out, _ = reference_run
    out = tmp_path / "out"
    cfg = _write_config(tmp_path / "run.yaml", tiny_config(tiny, out, alpha=0.3))
    cmd = [sys.executable, "-m", "apo_trainer", "run", str(cfg), "--quiet"]
    kills = [
        (0, "sample", "mid"),
        (0, "judge", "end"),
        (0, "reference", "mid"),
        (0, "data", "end"),
        (0, "train", "mid"),
        (1, "extrapolate", "mid"),
    ]
    assert {p for _, p, _ in kills} == set(PHASES)
    for t, phase, where in kills:
        proc = subprocess.run(
            [sys.executable, "-c", KILL_AT, str(t), phase, where, str(cfg)],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert RunStore(out).done(t, phase) is None
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert artifacts(out) == artifacts(ref_out)
    assert not list(out.rglob(".tmp-*"))


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_complete_a_round_and_agree(tiny, tmp_path):
    out = tmp_path / "out"
    cfg = _write_config(
        tmp_path / "run.yaml", tiny_config(tiny, out, rounds=1, final_eval=False, prompts_per_round=7, grad_accum=1)
    )
    # `accelerate launch --cpu` starts several processes only through MPI; --multi_gpu with ACCELERATE_USE_CPU=1
    # starts them with torchrun on the CPU (gloo).
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "apo_trainer",
        "run",
        str(cfg),
        "--quiet",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = json.loads((out / "round-0" / "done" / "train.json").read_text())
    assert train["processes"] == 2
    assert len(train["data_digests"]) == 2 and len(set(train["data_digests"])) == 1
    # 7 pairs at most, batch 2 per process: 4 batches dealt over 2 processes = 2 optimizer steps.
    assert train["train_pairs"] <= 7 and train["steps"] == 2
    rows = [json.loads(line) for line in (out / "round-0" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and all(len(r["response_ids"]) == 4 for r in rows)
    want = extrapolate_state_dict(prev=weights(tiny / "policy"), cur=weights(out / "round-0" / "trained"), alpha=0.3)
    got = weights(out / "round-0" / "policy")
    assert all(torch.equal(got[n], want[n]) for n in want)
