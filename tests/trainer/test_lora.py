"""LoRA rounds: the merge is base + s B A (float64 reference), the APO step stays bit for bit, resume, config errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from apo_merge import extrapolate_state_dict
from apo_trainer.config import APOConfig
from apo_trainer.errors import ConfigError
from apo_trainer.loop import run
from tests.trainer.conftest import tiny_config
from tests.trainer.helpers import artifacts, weights

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[2]
PEFT = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "out"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = run(tiny_config(tiny, out, alpha=0.3, peft=PEFT, learning_rate=5e-2), quiet=True)
    finally:
        torch.set_num_threads(before)
    return out, records


@pytest.mark.slow
def test_lora_rounds_write_adapter_and_trained(lora_run):
    out, records = lora_run
    assert [r["round"] for r in records] == [0, 1, 2]
    for t in range(2):
        assert sorted(p.name for p in (out / f"round-{t}" / "adapter").iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        config = json.loads((out / f"round-{t}" / "adapter" / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")
        assert records[t]["steps"] >= 1


@pytest.mark.slow
def test_anchor_rule_bit_for_bit_with_lora(tiny, lora_run):
    out, _ = lora_run
    raw = [weights(tiny / "policy"), weights(out / "round-0" / "trained"), weights(out / "round-1" / "trained")]
    for t in range(2):
        theta = weights(out / f"round-{t}" / "policy")
        want = extrapolate_state_dict(prev=raw[t], cur=raw[t + 1], alpha=0.3)
        assert theta.keys() == want.keys()
        assert all(torch.equal(theta[n], want[n]) for n in theta)
    theta_1 = weights(out / "round-0" / "policy")
    wrong = extrapolate_state_dict(prev=theta_1, cur=raw[2], alpha=0.3)
    theta_2 = weights(out / "round-1" / "policy")
    assert any(not torch.equal(theta_2[n], wrong[n]) for n in theta_2)


@pytest.mark.slow
def test_trained_is_base_plus_scaled_BA_in_float64(tiny, lora_run):
    out, _ = lora_run
    scale = PEFT["lora_alpha"] / PEFT["r"]
    for t in range(2):
        base = weights(tiny / "policy") if t == 0 else weights(out / f"round-{t - 1}" / "policy")
        adapter = load_file(str(out / f"round-{t}" / "adapter" / "adapter_model.safetensors"))
        trained = weights(out / f"round-{t}" / "trained")
        changed = set()
        for key, A in adapter.items():
            if ".lora_A." not in key:
                continue
            B = adapter[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            want = base[name].double() + scale * (B.double() @ A.double())
            got = trained[name]
            assert got.dtype == base[name].dtype
            err = (got.double() - want).abs()
            bound = 0.5 * torch.finfo(torch.float32).eps * want.abs() * (1 + 1e-9) + 1e-45
            assert bool((err <= bound).all()), (name, float((err / bound).max()))
            assert not torch.equal(got, base[name]), name  # training moved the adapter off B = 0
            changed.add(name)
        assert {n.rsplit(".", 2)[-2] for n in changed} == {"q_proj", "v_proj", "down_proj"}
        for name in trained:  # everything the adapter does not target is theta_t's bytes
            if name not in changed:
                assert torch.equal(trained[name], base[name]), name


def test_rslora_scale_is_alpha_over_sqrt_r(tiny, tmp_path):
    from apo_trainer import lora

    assert lora.scaling({"r": 16, "lora_alpha": 8.0, "use_rslora": True}) == 2.0
    assert lora.scaling({"r": 16, "lora_alpha": 8.0, "use_rslora": False}) == 0.5
    w = torch.randn(5, 7)
    A, B = torch.randn(3, 7), torch.randn(5, 3)
    got = lora.merged_weight(w, A, B, 8 / math.sqrt(3))
    want = (w.double() + (8 / math.sqrt(3)) * (B.double() @ A.double())).float()
    assert torch.equal(got, want)
    # GPT-2's Conv1D stores (in, out): the delta is transposed
    got = lora.merged_weight(w.T.contiguous(), A, B, 0.5, fan_in_fan_out=True)
    assert torch.equal(got, (w.T.double() + 0.5 * (B.double() @ A.double()).T).float())


@pytest.mark.parametrize(
    "peft, needle",
    [
        ({"target_modules": ["q_proj", "qq_proj"]}, "peft.target_modules names 'qq_proj', which model"),
        ({"target_modules": ["embed_tokens"]}, "is not a Linear layer"),
        ({"r": 0}, "peft needs r >= 1"),
        ({"rank": 4}, "unknown key 'peft.rank'"),
        ({"r": "big"}, "'peft.r' must be int"),
    ],
)
def test_peft_config_errors_are_one_line(tiny, tmp_path, peft, needle):
    with pytest.raises(ConfigError) as e:
        tiny_config(tiny, tmp_path / "out", peft=peft).validate()
    assert needle in e.value.message and "\n" not in e.value.message


def test_peft_set_override_and_defaults(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path / "out")
    assert cfg.peft == {}
    cfg.set("peft.r=8")
    assert cfg.peft == {
        "r": 8,
        "lora_alpha": 32.0,
        "lora_dropout": 0.0,
        "target_modules": "all-linear",
        "use_rslora": False,
    }
    cfg.set("peft.target_modules=q_proj,k_proj")
    assert cfg.peft["target_modules"] == ["q_proj", "k_proj"]
    cfg.validate()
    assert APOConfig.from_dict(cfg.to_dict()).peft == cfg.peft


def test_missing_peft_names_the_extra(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ConfigError) as e:
        tiny_config(tiny, tmp_path / "out", peft={"r": 2}).validate()
    assert "pip install 'apo-merge[peft]'" in e.value.message and e.value.exit_code == 1


KILL_AT = """
import os, signal, sys
from apo_trainer import store
from apo_trainer.cli import main

target = (int(sys.argv[1]), sys.argv[2], sys.argv[3])
store.fault_hook = lambda *at: at == target and os.kill(os.getpid(), signal.SIGKILL)
sys.argv = ["apo-train", "run", sys.argv[4], "--quiet"]
main()
"""


@pytest.mark.slow
def test_sigkill_in_the_lora_train_phase_then_rerun_gives_the_same_bytes(tiny, tmp_path, lora_run):
    ref_out, _ = lora_run
    out = tmp_path / "out"
    cfg = tmp_path / "run.yaml"
    values = tiny_config(tiny, out, alpha=0.3, peft=PEFT, learning_rate=5e-2).to_dict()
    cfg.write_text(yaml.safe_dump(values))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for t, where in ((0, "mid"), (1, "end")):
        proc = subprocess.run([sys.executable, "-c", KILL_AT, str(t), "train", where, str(cfg)], env=env, cwd=ROOT)
        assert proc.returncode == -signal.SIGKILL
        assert not (out / f"round-{t}" / "done" / "train.json").exists()
    subprocess.run([sys.executable, "-m", "apo_trainer", "run", str(cfg), "--quiet"], env=env, cwd=ROOT, check=True)
    # The adapter config names theta_t's folder, so compare with the uninterrupted run moved to the same path.
    got, ref = artifacts(out), artifacts(ref_out)
    for rel in ref:
        if rel.endswith("adapter_config.json"):
            ref[rel] = ref[rel].replace(str(ref_out).encode(), str(out).encode())
    assert got.keys() == ref.keys()
    assert [k for k in ref if got[k] != ref[k]] == []
