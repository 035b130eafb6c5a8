"""The train phase run by another trainer (apo_trainer.external): train_command and run(train_fn=...)."""

from __future__ import annotations

import json
import shlex
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apo_merge.state import extrapolate_state_dict_
from apo_trainer import loop
from apo_trainer.errors import ConfigError, TrainError
from tests.trainer import ext_trainer
from tests.trainer.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _check_anchor(out: Path, raw: list[Path], alpha: float) -> None:
    """theta_{t+1} = raw_{t+1} + alpha (raw_{t+1} - raw_t), bit for bit, from the trainer's own files."""
    for t in range(len(raw) - 1):
        prev, cur = _weights(raw[t]), _weights(raw[t + 1])
        extrapolate_state_dict_(prev=prev, cur=cur, alpha=alpha)
        got = _weights(out / f"round-{t}" / "policy")
        assert got.keys() == cur.keys()
        for name in cur:
            assert torch.equal(got[name], cur[name]), name


@pytest.mark.slow
def test_command_round_trip_checkpoints_and_anchor(tiny, tmp_path):
    out = tmp_path / "out"
    command = f"{shlex.quote(sys.executable)} -m tests.trainer.ext_trainer checkpoints {{policy}} {{pairs}} {{output}}"
    cfg = tiny_config(tiny, out, train_command=command, final_eval=False)
    records = loop.run(cfg, quiet=True)
    assert [r["round"] for r in records] == [0, 1]
    for t, rec in enumerate(records):
        assert rec["train"] == "external" and rec["output"] == "hf"
        assert rec["output_path"] == f"round-{t}/external/checkpoint-10"  # the last checkpoint, not checkpoint-1
        assert "-m tests.trainer.ext_trainer checkpoints" in rec["train_command"]
        assert str(out / f"round-{t}" / "external") in rec["train_command"]
        assert (out / f"round-{t}" / "train.log").is_file()
        trl_rows = [json.loads(x) for x in (out / f"round-{t}" / "pairs-trl" / "train.jsonl").read_text().splitlines()]
        pairs = [json.loads(x) for x in (out / f"round-{t}" / "pairs.jsonl").read_text().splitlines()]
        assert len(trl_rows) == len(pairs) == rec["train_pairs"] > 0
        assert trl_rows[0]["p_chosen"] == pairs[0]["p_chosen"] and isinstance(trl_rows[0]["chosen"], str)
        orlhf = json.loads((out / f"round-{t}" / "pairs-openrlhf.jsonl").read_text().splitlines()[0])
        assert orlhf["chosen"].endswith(trl_rows[0]["chosen"]) and orlhf["chosen"].startswith(trl_rows[0]["prompt"])
    theta0 = out / "theta0"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny / "policy", dtype=torch.float32).save_pretrained(theta0)
    raw = [theta0] + [out / f"round-{t}" / "external" / "checkpoint-10" for t in range(2)]
    _check_anchor(out, raw, cfg.alpha)
    # train_fn in process: the same trainer as a function gives the same bytes
    out2 = tmp_path / "out2"
    loop.run(tiny_config(tiny, out2, final_eval=False), quiet=True, train_fn=ext_trainer.train)
    for t in range(2):
        assert (out2 / f"round-{t}" / "policy" / "model.safetensors").read_bytes() == (
            out / f"round-{t}" / "policy" / "model.safetensors"
        ).read_bytes()
    assert json.loads((out2 / "round-0" / "done" / "train.json").read_text())["train_fn"].endswith("ext_trainer.train")


@pytest.mark.parametrize(
    ("command", "message", "code"),
    [
        ("bash -c 'echo {policy} {nope}'", "unknown placeholder {nope}", 2),
        ("no-such-trainer-xyz {policy}", "'no-such-trainer-xyz', which is not an executable", 1),
        ("bash -c 'echo {policy}", "close its quotes", 2),
    ],
)
def test_bad_command_refused_before_anything(tiny, tmp_path, command, message, code):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")) as e:
        loop.run(tiny_config(tiny, out, train_command=command), quiet=True)
    assert e.value.exit_code == code
    assert not out.exists()


def test_peft_with_train_command_refused(tiny, tmp_path):
    with pytest.raises(ConfigError, match="drop the peft group"):
        loop.run(tiny_config(tiny, tmp_path / "o", train_command="bash -c true", peft={"r": 2}), quiet=True)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_failed_command_names_round_code_and_log_then_rerun_runs_again(tiny, tmp_path):
    out = tmp_path / "out"
    flag = tmp_path / "fixed"
    script = (
        f"echo starting; test -e {flag} || {{{{ echo partial > {{output}}/stale; echo boom >&2; exit 3; }}}}; "
        f"{shlex.quote(sys.executable)} -m tests.trainer.ext_trainer hf {{policy}} {{pairs}} {{output}}"
    )
    cfg = tiny_config(tiny, out, train_command=f"bash -c {shlex.quote(script)}", rounds=1, final_eval=False)
    with pytest.raises(TrainError) as e:
        loop.run(cfg, quiet=True)
    msg = e.value.message
    assert "round 0" in msg and "exited with code 3" in msg and "starting | boom" in msg and "train.log" in msg
    assert "\n" not in msg
    assert (out / "round-0" / "external" / "stale").is_file()
    assert not (out / "round-0" / "trained").exists() and (out / "round-0" / "done" / "data.json").is_file()
    flag.touch()
    records = loop.run(cfg, quiet=True)
    assert records[0]["output"] == "hf" and records[0]["train"] == "external"
    assert not (out / "round-0" / "external" / "stale").exists()  # the failed attempt's output was cleared
    assert (out / "round-0" / "policy" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("nothing", "exited with code 0 but wrote no model"),
        ("wide", "differs from theta_t's architecture"),
    ],
)
def test_bad_output_refused(tiny, tmp_path, kind, message):
    out = tmp_path / "out"
    with pytest.raises(TrainError, match=message) as e:
        loop.run(tiny_config(tiny, out, rounds=1), quiet=True, train_fn=partial(ext_trainer.train, kind=kind))
    assert "round 0" in e.value.message
    assert not (out / "round-0" / "trained").exists() and not (out / "round-0" / "done" / "train.json").exists()


def test_lora_adapter_output_merged_exactly(tiny, tmp_path):
    pytest.importorskip("peft")
    from apo_trainer.lora import merged_weight

    out = tmp_path / "out"
    loop.run(
        tiny_config(tiny, out, rounds=1, final_eval=False),
        quiet=True,
        train_fn=partial(ext_trainer.train, kind="lora"),
    )
    rec = json.loads((out / "round-0" / "done" / "train.json").read_text())
    assert rec["output"] == "lora"
    base, trained = _weights(tiny / "policy"), _weights(out / "round-0" / "trained")
    adapter = load_file(out / "round-0" / "external" / "adapter_model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    A = adapter[f"base_model.model.{name}.lora_A.weight"]
    B = adapter[f"base_model.model.{name}.lora_B.weight"]
    assert torch.equal(trained[f"{name}.weight"], merged_weight(base[f"{name}.weight"], A, B, 2.0))
    assert torch.equal(trained["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_output_exported_and_read(tiny, tmp_path):
    out = tmp_path / "out"
    loop.run(tiny_config(tiny, out, rounds=1), quiet=True, train_fn=partial(ext_trainer.train, kind="dcp"))
    rec = json.loads((out / "round-0" / "done" / "train.json").read_text())
    assert rec["output"] == "dcp" and rec["output_path"] == "round-0/external"
    want = ext_trainer._step(str(tiny / "policy"), str(out / "round-0" / "pairs-trl"), 2).state_dict()
    got = _weights(out / "round-0" / "trained")
    assert got.keys() <= want.keys() and len(got) > 0
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name]), name


def test_round_without_pairs_runs_no_trainer(tiny, tmp_path):
    def never(policy, pairs, output):
        raise AssertionError("the trainer ran on a round without pairs")

    out = tmp_path / "out"
    cfg = tiny_config(tiny, out, rounds=1, oracle="callable:tests.trainer.ext_trainer:flat", final_eval=False)
    (rec,) = loop.run(cfg, quiet=True, train_fn=never)
    assert rec["pairs"] == 0 and rec["output"] == "none" and rec["steps"] == 0
    base = _weights(tiny / "policy")
    for folder in ("trained", "policy"):
        got = _weights(out / "round-0" / folder)
        assert all(torch.equal(got[k], base[k]) for k in got)


def test_resume_keeps_the_train_phase_kind(tiny, tmp_path):
    out = tmp_path / "out"
    cfg = tiny_config(tiny, out, rounds=1, final_eval=False)
    loop.run(cfg, quiet=True, train_fn=partial(ext_trainer.train, kind="hf"))
    cfg.rounds = 2
    with pytest.raises(
        ConfigError, match="round 0 was trained by train_fn tests.trainer.ext_trainer.train; resume it the same way"
    ):
        loop.run(cfg, quiet=True)
    assert not (out / "round-1").exists()
    records = loop.run(cfg, quiet=True, train_fn=partial(ext_trainer.train, kind="hf"))
    assert [r["train"] for r in records] == ["external", "external"]


def test_killed_trainer_named_by_its_signal(tiny, tmp_path):
    out = tmp_path / "out"
    cfg = tiny_config(tiny, out, rounds=1, train_command="bash -c 'echo step 1 {round}; kill -9 $$'")
    with pytest.raises(
        TrainError, match=r"round 0: the train command was killed by signal 9; last lines of .*: step 1 0;"
    ):
        loop.run(cfg, quiet=True)
    assert not (out / "round-0" / "train.pid").exists() and not (out / "round-0" / "trained").exists()
