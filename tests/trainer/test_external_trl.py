"""End to end with a real trainer: TRL's own CLI (``trl dpo``) as apo-train's train phase, 2 APO rounds.

TRL trains each round (reference = policy: its first logged loss is ln 2); apo-train samples, judges, builds the
pairs, extrapolates raw vs raw (checked bit for bit on TRL's own output files) and resumes after a kill -9 that
lands during TRL's training. Skips when TRL is not installed (``pip install trl``, or point APO_TRL_BIN at the
``trl`` script of another venv).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.trainer.conftest import tiny_config
from tests.trainer.test_external import _check_anchor

ROOT = Path(__file__).resolve().parents[2]


def _trl_bin() -> Path | None:
    given = os.environ.get("APO_TRL_BIN")
    if given:
        return Path(given)
    local = Path(sys.executable).parent / "trl"
    try:
        import trl  # noqa: F401
    except ImportError:
        return None
    return local if local.is_file() else None


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    return env


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_trl_dpo_cli_drives_two_apo_rounds_and_resumes_after_kill(tiny, tmp_path):
    trl = _trl_bin()
    if trl is None:
        pytest.skip("trl is not installed (pip install trl, or set APO_TRL_BIN to a trl script)")
    out = tmp_path / "out"
    command = (
        f"{shlex.quote(str(trl))} dpo --model_name_or_path {{policy}} --dataset_name {{pairs}} "
        "--output_dir {output} --per_device_train_batch_size 2 --learning_rate 1e-2 --beta 0.5 "
        "--logging_steps 1 --save_steps 1 --report_to none --use_cpu true --disable_tqdm true --seed {seed} "
        "--gradient_checkpointing false --dataloader_num_workers 0"
    )
    cfg = tiny_config(tiny, out, train_command=command, final_eval=False)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    cmd = [sys.executable, "-m", "apo_trainer", "run", str(config), "-q"]

    # kill -9 the run while TRL trains round 0: after its first checkpoint, before its last
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    external, pid_file = out / "round-0" / "external", out / "round-0" / "train.pid"
    deadline = time.monotonic() + 240
    while not (external / "checkpoint-1").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    pgid = int(pid_file.read_text())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / "round-0" / "done" / "train.json").exists()  # killed during TRL's training

    rerun = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not _group_alive(pgid)  # the killed run's trainer processes are gone
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    for t, rec in enumerate(records):
        assert rec["train"] == "external" and rec["output"] == "hf" and rec["output_path"] == f"round-{t}/external"
        assert rec["train_command"].startswith(f"{trl} dpo --model_name_or_path {out}/round-" if t else f"{trl} dpo")
        assert abs(rec["train_first_loss"] - math.log(2)) < 1e-5  # reference = policy at TRL's first step
        assert rec["steps"] > 0 and math.isfinite(rec["train_final_loss"])
    assert "--model_name_or_path " + str(tiny / "policy") in records[0]["train_command"]
    assert "--model_name_or_path " + str(out / "round-0" / "policy") in records[1]["train_command"]

    from transformers import AutoModelForCausalLM

    theta0 = tmp_path / "theta0"
    AutoModelForCausalLM.from_pretrained(tiny / "policy").save_pretrained(theta0)
    _check_anchor(out, [theta0, out / "round-0" / "external", out / "round-1" / "external"], cfg.alpha)


def trl_dpo(policy: str, pairs: str, output: str) -> None:
    """A notebook user's train_fn: TRL's DPOTrainer on the round's pairs, reference = policy (TRL's default)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(x) for x in (Path(pairs) / "train.jsonl").read_text().splitlines()]
    args = DPOConfig(
        output_dir=output,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        beta=0.5,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        gradient_checkpointing=False,
        seed=3,
    )
    trainer = DPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(rows))
    trainer.train()
    trainer.save_model(output)
    trainer.state.save_to_json(str(Path(output) / "trainer_state.json"))


@pytest.mark.slow
def test_trl_dpo_trainer_in_process_on_conversational_pairs(tmp_path):
    pytest.importorskip("trl")
    from tests.trainer.tiny import make_policy, make_prompts

    make_policy(tmp_path / "policy", chat_template=True)
    make_prompts(tmp_path / "prompts.jsonl", n=8)
    out = tmp_path / "out"
    from apo_trainer import loop

    records = loop.run(tiny_config(tmp_path, out, final_eval=False, rounds=1), quiet=True, train_fn=trl_dpo)
    row = json.loads((out / "round-0" / "pairs-trl" / "train.jsonl").read_text().splitlines()[0])
    assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert isinstance(row["p_chosen"], float)
    orlhf = json.loads((out / "round-0" / "pairs-openrlhf.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in orlhf["chosen"]] == ["user", "assistant"]
    assert records[0]["train_fn"].endswith("trl_dpo") and abs(records[0]["train_first_loss"] - math.log(2)) < 1e-5
    theta0 = tmp_path / "theta0"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "policy").save_pretrained(theta0)
    _check_anchor(out, [theta0, out / "round-0" / "external"], 0.3)
