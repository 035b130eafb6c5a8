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
from tests.merge.helpers import assert_one_line_error, run_cli_in_process  # noqa: E402

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
    for d in (prev, cur):  # the adapters name their base: name the bf16 copy (another base is refused)
        _with_config(d, tmp_path / d.name, base_model_name_or_path=str(base16))
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
    with pytest.raises(MergeError, match="full checkpoint but PREV .* is a LoRA adapter"):
        run_merge(prev, setup["base"], MergeOptions(ALPHA), tmp_path / "o4")
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


# ---------------------------------------------------------------- a full checkpoint as PREV, an adapter over it as CUR


def _scale(config: dict, module: str, r: int) -> float:
    """PEFT's scaling of one module, from the config alone (patterns matched as PEFT does)."""
    import math
    import re

    alpha = next(
        (v for k, v in (config.get("alpha_pattern") or {}).items() if re.match(rf"(.*\.)?({k})$", module)), None
    )
    alpha = config["lora_alpha"] if alpha is None else alpha
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _base_step_reference(base: Path, adapter: Path, alpha: float, magnitude: bool = False) -> dict[str, torch.Tensor]:
    """BASE + (1 + alpha) * delta in float64, from the files (independent of apo_merge.lora). ``magnitude``: the
    same sums over absolute values, the scale of fp32 rounding errors."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    f = torch.abs if magnitude else (lambda x: x)
    w = {k: f(v.double()) for k, v in load_file(base / "model.safetensors").items()}
    t = {
        k.removeprefix("base_model.model."): f(v.double())
        for k, v in load_file(adapter / "adapter_model.safetensors").items()
    }
    out = dict(w)
    for key, A in t.items():
        for a_suffix, b_suffix, transposed in (
            (".lora_A.weight", ".lora_B.weight", False),
            (".lora_embedding_A", ".lora_embedding_B", True),
        ):
            if key.endswith(a_suffix):
                module = key[: -len(a_suffix)]
                B = t[module + b_suffix]
                d = (1 + alpha) * _scale(config, module, A.shape[0]) * (B @ A)
                out[module + ".weight"] = out[module + ".weight"] + (d.T if transposed else d)
                if module + ".lora_B.bias" in t:
                    bias = (1 + alpha) * _scale(config, module, A.shape[0]) * t[module + ".lora_B.bias"]
                    out[module + ".bias"] = out[module + ".bias"] + bias
        if not any(part.startswith("lora_") for part in key.split(".")):  # modules_to_save: W_c + a (W_c - W_base)
            name = key.replace(".base_layer.", ".")
            out[name] = t[key] + alpha * (t[key] + w[name] if magnitude else t[key] - w[name])
    return out


def _implied_full(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The full weights an adapter over BASE stands for, in float64 (the same reading of the files)."""
    return _base_step_reference(base, adapter, 0.0)


@pytest.mark.parametrize("pair", ["plain", "fancy"])
def test_base_and_adapter_written_as_adapter_is_exact(setup, pair, tmp_path):
    _, cur = setup[pair]
    out = tmp_path / "apo"
    report = run_merge(setup["base"], cur, MergeOptions(ALPHA), out)
    assert report.kind == "lora adapter"
    want = _base_step_reference(setup["base"], cur, ALPHA)
    got = _implied_full(setup["base"], out)
    config, cur_config = (json.loads((d / "adapter_config.json").read_text()) for d in (out, cur))
    assert config["lora_alpha"] == (1 + ALPHA) * cur_config["lora_alpha"]  # the scale folded, factors untouched
    got_t, cur_t = load_file(out / "adapter_model.safetensors"), load_file(cur / "adapter_model.safetensors")
    for key, c in cur_t.items():
        if any(part.startswith("lora_") for part in key.split(".")):
            assert torch.equal(got_t[key], c), key
    cur_full, eps = _implied_full(setup["base"], cur), torch.finfo(torch.float32).eps
    for name in want:
        ref = want[name]
        err = (got[name] - ref).abs()
        # modules_to_save: W_c + a (W_c - W_b) in fp32 (the kernel's bound); LoRA layers: the factors' bytes and a
        # float64 scale, so nothing rounds at fp32 precision
        whole = name == "lm_head.weight"
        bound = 2 * eps * (ref.abs() + cur_full[name].abs()) if whole else 1e-12 * (ref.abs() + 1)
        assert bool((err <= bound).all()), name
    # PEFT reads it as BASE + (1 + alpha) delta.
    model = LlamaForCausalLM.from_pretrained(setup["base"])
    model.load_state_dict({k: v.float() for k, v in want.items()})
    torch.testing.assert_close(_adapter_logits(setup, out), _logits(model, setup["ids"]), **TOL)


def test_base_and_adapter_merged_into_full_weights(setup, tmp_path):
    _, cur = setup["fancy"]
    out = tmp_path / "full"
    report = run_merge(setup["base"], cur, MergeOptions(ALPHA, merge_into=setup["base"]), out)
    assert report.kind == "merged lora"
    want = _base_step_reference(setup["base"], cur, ALPHA)
    size = _base_step_reference(setup["base"], cur, ALPHA, magnitude=True)
    got = load_file(out / "model.safetensors")
    assert got.keys() == want.keys()
    for name, t in got.items():
        assert t.dtype == torch.float32
        err = (t.double() - want[name]).abs()
        # fp32 products and sums (rank-many terms), one rounding: within a few eps of the magnitudes summed
        assert bool((err <= 16 * torch.finfo(torch.float32).eps * (size[name] + want[name].abs())).all()), name
    assert "merged into" in (out / "README.md").read_text() and (out / "config.json").is_file()


def test_base_and_adapter_refused_when_the_adapter_is_not_over_prev(setup, tmp_path):
    _, cur = setup["plain"]
    other = make_checkpoint(tmp_path / "other", seed=5, attention_bias=True)
    with pytest.raises(MergeError, match="is an adapter of .* but PREV is") as e:
        run_merge(other, cur, MergeOptions(ALPHA), tmp_path / "o1")
    assert "\n" not in str(e.value)
    wider = make_checkpoint(tmp_path / "wider", seed=0, attention_bias=True, hidden_size=48)
    unnamed = _with_config(cur, tmp_path / "unnamed", base_model_name_or_path=None)
    with pytest.raises(MergeError, match="q_proj.weight with shape .* but PREV .* has"):
        run_merge(wider, unnamed, MergeOptions(ALPHA), tmp_path / "o2")
    hub_named = _with_config(cur, tmp_path / "hub-named", base_model_name_or_path="org/some-base")
    run_merge(setup["base"], hub_named, MergeOptions(ALPHA), tmp_path / "ok")  # a local PREV names no Hub model
    with pytest.raises(MergeError, match="give PREV .* as --merge-into"):
        run_merge(setup["base"], cur, MergeOptions(ALPHA, merge_into=other), tmp_path / "o3")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 4))


def test_base_and_adapter_reads_the_base_through_sha256_only_with_hash_inputs(setup, tmp_path, monkeypatch):
    from apo_merge.io import hashing

    _, cur = setup["plain"]
    read = []
    real = hashing.hash_file
    monkeypatch.setattr(hashing, "hash_file", lambda path, *a, **k: read.append(Path(path).name) or real(path, *a, **k))
    plain = run_merge(setup["base"], cur, MergeOptions(ALPHA), tmp_path / "plain")
    assert not [n for n in read if n.endswith(".safetensors") and n != "adapter_model.safetensors"]
    assert (
        plain.input_hashes["prev"].sha256 is None
        and "prev content sha256" not in (tmp_path / "plain/README.md").read_text()
    )
    hashed = run_merge(setup["base"], cur, MergeOptions(ALPHA, hash_inputs=True), tmp_path / "hashed")
    assert hashed.input_hashes["prev"].sha256 is not None
    assert f"`{hashed.input_hashes['prev'].sha256}`" in (tmp_path / "hashed/README.md").read_text()


# ---------------------------------------------------------------- the base an adapter records, on both paths (issue 24)


def test_adapter_pair_merged_into_another_base_is_refused_as_with_a_full_prev(setup, tmp_path):
    """The adapters record their base; --merge-into with another model is refused with the full-PREV rule and
    wording, before any output exists."""
    prev, cur = setup["plain"]
    other = make_checkpoint(tmp_path / "other", seed=5, attention_bias=True)
    res = run_cli_in_process(prev, cur, "--alpha", ALPHA, "--merge-into", other, "-o", tmp_path / "o1")
    line = assert_one_line_error(res, 1, "is an adapter of", "but --merge-into is", "base_model_name_or_path")
    with pytest.raises(MergeError, match="is an adapter of .* but PREV is"):  # the same words on the full-PREV path
        run_merge(other, cur, MergeOptions(ALPHA), tmp_path / "o2")
    assert "give the adapter's base as --merge-into" in line
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2))
    # A Hub name recorded and a local BASE: the folder does not say which model it is (as for a full PREV).
    hub_prev = _with_config(prev, tmp_path / "hub-prev", base_model_name_or_path="org/some-base")
    hub_cur = _with_config(cur, tmp_path / "hub-cur", base_model_name_or_path="org/some-base")
    run_merge(hub_prev, hub_cur, MergeOptions(ALPHA, merge_into=setup["base"]), tmp_path / "ok")


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        (dict(lora_alpha=float("nan")), "lora_alpha"),
        (dict(lora_alpha=float("inf")), "lora_alpha"),
        (dict(lora_alpha=1e39), "lora_alpha"),  # finite as a double, inf in fp32
        (dict(lora_alpha=True), "lora_alpha"),
        (dict(alpha_pattern={"v_proj": float("-inf")}), "alpha_pattern"),
        (dict(alpha_pattern={"nothing_matches": "3"}), "alpha_pattern"),
        (dict(lora_dropout=float("nan")), "lora_dropout"),  # copied into the output config: strict JSON or nothing
        (dict(rank_pattern={"layers.1.self_attn.q_proj": float("nan")}), "rank_pattern"),
    ],
)
@pytest.mark.parametrize("prev_kind", ["adapter", "base"])
def test_adapter_config_numbers_must_be_finite_and_in_range(setup, tmp_path, changes, key, prev_kind):
    prev, cur = setup["plain"]
    bad = _with_config(cur, tmp_path / "cur", **changes)
    prev = prev if prev_kind == "adapter" else setup["base"]
    res = run_cli_in_process(prev, bad, "--alpha", ALPHA, "-o", tmp_path / "o")
    assert_one_line_error(res, 1, str(bad / "adapter_config.json"), key, "fix the config")
    assert not (tmp_path / "o").exists()


def test_base_step_adapter_refuses_an_alpha_beyond_float32(setup, tmp_path):
    """(1 + alpha) * lora_alpha once overflowed into an ``Infinity`` config; such an alpha is now refused up front."""
    _, cur = setup["plain"]
    res = run_cli_in_process(setup["base"], cur, "--alpha", "1e308", "-o", tmp_path / "o")
    assert_one_line_error(res, 2, "--alpha 1e+308", "overflows float32")
    assert not (tmp_path / "o").exists()


def test_output_adapter_configs_are_strict_json(setup, tmp_path):
    _, cur = setup["fancy"]
    run_merge(setup["base"], cur, MergeOptions(ALPHA), tmp_path / "a")
    run_merge(*setup["fancy"], MergeOptions(ALPHA), tmp_path / "b")
    for out in ("a", "b"):
        constants = []
        json.loads((tmp_path / out / "adapter_config.json").read_text(), parse_constant=constants.append)
        assert constants == [], out


# ---------------------------------------------------------------- every LoRA output against one float64 reference


def _scalings(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """PEFT's scaling of every LoRA layer of an adapter (module name without the base_model.model. prefix)."""
    out = {}
    for key, t in tensors.items():
        for suffix in (".lora_A.weight", ".lora_embedding_A"):
            if key.endswith(suffix):
                module = key.removeprefix("base_model.model.")[: -len(suffix)]
                out[module] = _scale(config, module, t.shape[0])
    return out


@pytest.mark.parametrize(
    ("prev_kind", "merged"), [("adapter", False), ("adapter", True), ("base", False), ("base", True)]
)
def test_every_lora_output_against_a_float64_reference(setup, tmp_path, prev_kind, merged):
    """Adapter+adapter, base+adapter and --merge-into, on rsLoRA with rank and alpha patterns, an embedding LoRA and
    a whole lm_head: the implied full weights match BASE + (1 + a) delta_cur - a delta_prev computed in float64 from
    the input files; the parts the method computes in float64 are bit-exact (one rounding)."""
    prev, cur = setup["fancy"]
    base, eps = setup["base"], torch.finfo(torch.float32).eps
    if prev_kind == "base":
        prev = base
    out = tmp_path / "out"
    report = run_merge(prev, cur, MergeOptions(ALPHA, merge_into=base if merged else None), out)
    assert report.kind == ("merged lora" if merged else "lora adapter")
    full_cur = _implied_full(base, cur)
    full_prev = load_file(base / "model.safetensors") if prev_kind == "base" else _implied_full(base, prev)
    want = {k: full_cur[k] + ALPHA * (full_cur[k] - full_prev[k].double()) for k in full_cur}
    size = _base_step_reference(base, cur, ALPHA, magnitude=True)  # the magnitudes summed: the scale of fp32 errors
    if prev_kind == "adapter":
        size = {k: v + _base_step_reference(base, prev, ALPHA, magnitude=True)[k] for k, v in size.items()}
    got = load_file(out / "model.safetensors") if merged else _implied_full(base, out)
    assert got.keys() == want.keys()
    for name, t in got.items():
        err = (t.double() - want[name]).abs()
        assert bool((err <= 16 * eps * (size[name] + want[name].abs())).all()), name
    if merged:
        return
    config = json.loads((out / "adapter_config.json").read_text())
    tensors, cur_t = load_file(out / "adapter_model.safetensors"), load_file(cur / "adapter_model.safetensors")
    cur_config = json.loads((cur / "adapter_config.json").read_text())
    if prev_kind == "base":  # CUR's factors byte for byte; the scale folded into lora_alpha, exact in float64
        assert config["lora_alpha"] == (1 + ALPHA) * cur_config["lora_alpha"]
        assert config["alpha_pattern"] == {k: (1 + ALPHA) * v for k, v in cur_config["alpha_pattern"].items()}
        assert all(torch.equal(tensors[k], t) for k, t in cur_t.items() if ".lora_" in k)
        return
    # B = [(1+a) s_c B_c, -a s_p B_p] rounded once from float64, A = [A_c; A_p] copied
    prev_t, prev_config = (
        load_file(prev / "adapter_model.safetensors"),
        json.loads((prev / "adapter_config.json").read_text()),
    )
    s_cur, s_prev = _scalings(cur_config, cur_t), _scalings(prev_config, prev_t)
    for module, sc in s_cur.items():
        a, b = (".lora_embedding_A", ".lora_embedding_B") if "embed" in module else (".lora_A.weight", ".lora_B.weight")
        key = "base_model.model." + module
        assert torch.equal(tensors[key + a], torch.cat([cur_t[key + a], prev_t[key + a]], 0)), module
        want_b = torch.cat(
            [
                (cur_t[key + b].double() * ((1 + ALPHA) * sc)).float(),
                (prev_t[key + b].double() * (-ALPHA * s_prev[module])).float(),
            ],
            1,
        )
        assert torch.equal(tensors[key + b], want_b), module


def test_the_same_adapter_merge_writes_the_same_bytes(setup, tmp_path):
    """safetensors writes metadata in hash-map order, which changes from one call to the next: the adapter's header
    is written in one order, so a rerun (and a golden comparison) gives the same file."""
    prev, cur = setup["plain"]
    files = set()
    for i in range(4):
        run_merge(prev, cur, MergeOptions(ALPHA), tmp_path / f"o{i}")
        files.add((tmp_path / f"o{i}" / "adapter_model.safetensors").read_bytes())
    assert len(files) == 1
