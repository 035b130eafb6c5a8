"""LoRA adapters: the extrapolated adapter is exact (same logits as extrapolating the merged full weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from apo_merge import extrapolate_state_dict  # noqa: E402
from apo_merge.api import run_merge
from apo_merge.errors import MergeError  # noqa: E402
from apo_merge.options import MergeOptions  # noqa: E402
from tests.checkpoints import make_checkpoint  # noqa: E402

ALPHA = 0.3
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: same math in another order


def _adapter(base_dir: Path, out: Path, seed: int, **config) -> Path:
    model = LlamaForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:  # LoRA factors, biases, modules_to_save copies: all "trained"
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_checkpoint(root / "base", seed=0, attention_bias=True)
    # Pair 1: different ranks, trained lora_B biases.
    plain = dict(target_modules=["q_proj", "v_proj"], lora_alpha=8, lora_bias=True)
    # Pair 2: rsLoRA, per-module rank / alpha patterns, an embedding LoRA and a fully trained lm_head.
    fancy = dict(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "o_proj", "embed_tokens"],
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 3},
        modules_to_save=["lm_head"],
    )
    return {
        "root": root,
        "base": base,
        "plain": (_adapter(base, root / "p-prev", 1, r=4, **plain), _adapter(base, root / "p-cur", 2, r=6, **plain)),
        "fancy": (_adapter(base, root / "f-prev", 3, **fancy), _adapter(base, root / "f-cur", 4, **fancy)),
        "ids": torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0)),
    }


def _logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _merged_state(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _reference(setup, pair: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Extrapolate the two adapters' merged full weights: the definition of the APO step."""
    prev, cur = setup[pair]
    state = extrapolate_state_dict(
        prev=_merged_state(setup["base"], prev), cur=_merged_state(setup["base"], cur), alpha=ALPHA
    )
    model = LlamaForCausalLM.from_pretrained(setup["base"])
    model.load_state_dict(state)
    return state, _logits(model, setup["ids"])


def _adapter_logits(setup, adapter: Path) -> torch.Tensor:
    return _logits(PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(setup["base"]), adapter), setup["ids"])


@pytest.mark.parametrize("pair", ["plain", "fancy"])
def test_extrapolated_adapter_is_exact_and_the_naive_one_is_not(setup, pair, tmp_path):
    prev, cur = setup[pair]
    out = tmp_path / "apo"
    report = run_merge(prev, cur, MergeOptions(ALPHA), out)
    assert report.kind == "lora adapter"
    _, want = _reference(setup, pair)
    got = _adapter_logits(setup, out)
    torch.testing.assert_close(got, want, **TOL)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"]
    tensors = load_file(out / "adapter_model.safetensors")
    if pair == "plain":
        assert config["r"] == 10 and config["rank_pattern"] == {}
        assert any(k.endswith("lora_B.bias") for k in tensors)
    else:  # layers.1 q_proj had rank 2: 2 + 2 there, 4 + 4 elsewhere
        assert config["r"] == 8 and list(config["rank_pattern"].values()) == [4]
        assert config["alpha_pattern"] == config["rank_pattern"]
        assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape[0] == 4

    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "| prev content sha256 |" in card

    if pair == "fancy":  # same ranks: the naive per-factor extrapolation can be built, and it is wrong
        naive_dir = tmp_path / "naive"
        shutil.copytree(cur, naive_dir)
        p, c = load_file(prev / "adapter_model.safetensors"), load_file(cur / "adapter_model.safetensors")
        save_file({k: c[k] + ALPHA * (c[k] - p[k]) for k in c}, naive_dir / "adapter_model.safetensors")
        naive = _adapter_logits(setup, naive_dir)
        exact_err, naive_err = (got - want).abs().max().item(), (naive - want).abs().max().item()
        assert naive_err > 1e-2 and naive_err > 1000 * exact_err


def test_merge_into_writes_the_extrapolated_full_weights(setup, tmp_path):
    prev, cur = setup["fancy"]
    out = tmp_path / "full"
    report = run_merge(prev, cur, MergeOptions(ALPHA, merge_into=setup["base"], hash_inputs=True), out)
    assert report.kind == "merged lora"
    want_state, want_logits = _reference(setup, "fancy")
    got = load_file(out / "model.safetensors")
    assert set(got) == set(load_file(setup["base"] / "model.safetensors"))
    for name, t in got.items():
        torch.testing.assert_close(t, want_state[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_logits(LlamaForCausalLM.from_pretrained(out), setup["ids"]), want_logits, **TOL)
    card = (out / "README.md").read_text()
    assert "| base content sha256 |" in card and "merged into" in card and (out / "config.json").is_file()


def test_merge_into_bf16_base_rounds_once(setup, tmp_path):
    prev, cur = setup["plain"]
    base16 = tmp_path / "base16"
    LlamaForCausalLM.from_pretrained(setup["base"]).to(torch.bfloat16).save_pretrained(base16)
    for d in (prev, cur):  # the adapters name their base; give the bf16 copy the same name
        shutil.copytree(d, tmp_path / d.name)
    run_merge(tmp_path / prev.name, tmp_path / cur.name, MergeOptions(ALPHA, merge_into=base16), tmp_path / "out")
    want, _ = _reference(setup, "plain")  # fp32 base; the bf16 base differs from it by its own rounding
    base_fp32 = load_file(setup["base"] / "model.safetensors")
    base_bf16 = load_file(base16 / "model.safetensors")
    got = load_file(tmp_path / "out" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = (base_bf16[name].float() + (want[name] - base_fp32[name])).to(torch.bfloat16)
    assert got[name].dtype == torch.bfloat16
    assert (got[name].view(torch.int16) - expected.view(torch.int16)).abs().max() <= 1  # fp32 sum order only


def _with_config(src: Path, dest: Path, **changes) -> Path:
    shutil.copytree(src, dest)
    config = json.loads((dest / "adapter_config.json").read_text())
    config.update(changes)
    (dest / "adapter_config.json").write_text(json.dumps(config))
    return dest


def test_refuses_adapters_that_cannot_be_combined_exactly(setup, tmp_path):
    prev, cur = setup["plain"]
    other_base = _with_config(cur, tmp_path / "other-base", base_model_name_or_path="org/other-model")
    with pytest.raises(MergeError, match="different base models"):
        run_merge(prev, other_base, MergeOptions(ALPHA), tmp_path / "o1")
    other_targets = _with_config(cur, tmp_path / "other-targets", target_modules=["q_proj", "k_proj"])
    with pytest.raises(MergeError, match="target modules"):
        run_merge(prev, other_targets, MergeOptions(ALPHA), tmp_path / "o2")
    dora = _with_config(cur, tmp_path / "dora", use_dora=True)
    with pytest.raises(MergeError, match="DoRA"):
        run_merge(prev, dora, MergeOptions(ALPHA), tmp_path / "o3")
    with pytest.raises(MergeError, match="full checkpoint but .* is a LoRA adapter"):
        run_merge(setup["base"], cur, MergeOptions(ALPHA), tmp_path / "o4")
    with pytest.raises(MergeError, match="--merge-into applies to LoRA adapters"):
        run_merge(setup["base"], setup["base"], MergeOptions(ALPHA, merge_into=setup["base"]), tmp_path / "o5")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def _without_bias(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    tensors = load_file(dest / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("lora_B.bias")}, dest / "adapter_model.safetensors")
    return dest


@pytest.mark.parametrize("side", ["prev", "cur"])
def test_lora_bias_in_one_adapter_only_is_exact(setup, tmp_path, side):
    """A lora_B.bias missing from one adapter (lora_bias true) is PEFT's zero init: the step keeps the other's."""
    prev, cur = setup["plain"]
    if side == "prev":
        prev = _without_bias(prev, tmp_path / "p-prev")
    else:
        cur = _without_bias(cur, tmp_path / "p-cur")
    pair = {"root": setup["root"], "base": setup["base"], "ids": setup["ids"], "x": (prev, cur)}
    want_state, want = _reference(pair, "x")
    run_merge(prev, cur, MergeOptions(ALPHA), tmp_path / "apo")
    torch.testing.assert_close(_adapter_logits(setup, tmp_path / "apo"), want, **TOL)
    run_merge(prev, cur, MergeOptions(ALPHA, merge_into=setup["base"]), tmp_path / "full")
    for name, t in load_file(tmp_path / "full" / "model.safetensors").items():
        torch.testing.assert_close(t, want_state[name], rtol=1e-6, atol=1e-6)


def test_lora_bias_without_lora_bias_in_the_config_is_refused(setup, tmp_path):
    prev, cur = setup["plain"]
    no_flag = _with_config(cur, tmp_path / "cur", lora_bias=False)
    prev2 = _with_config(prev, tmp_path / "prev", lora_bias=False)
    with pytest.raises(MergeError, match="lora_B.bias .* lora_bias is not true"):
        run_merge(prev2, no_flag, MergeOptions(ALPHA), tmp_path / "o")
    assert not (tmp_path / "o").exists()
