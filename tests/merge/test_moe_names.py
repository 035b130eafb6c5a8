"""MoE experts per expert on one side and packed on the other (issue 28, part 3): transformers 5 saves the layout it
loaded (checked here), so a trainer's save_pretrained output pairs with its base; a raw ``state_dict`` save
(accelerate's save_model) writes the packed names beside a per-expert base. apo-merge reads PREV under CUR's names,
exactly as transformers' own conversion lays the tensors out (checked by loading both with transformers)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from apo_merge.api import run_merge
from apo_merge.engine import Tuning, use_tuning
from apo_merge.options import MergeOptions
from apo_merge.verify import verify_output
from tests.kernels.oracle import assert_bits_equal, contract
from tests.merge.helpers import assert_one_line_error, run_cli_in_process, tree_state

ALPHA = 0.3
pytestmark = pytest.mark.filterwarnings("ignore")


def _config(kind: str):
    from transformers import MixtralConfig, Qwen3MoeConfig

    common = dict(vocab_size=32, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=4, num_experts_per_tok=2)  # fmt: skip
    if kind == "mixtral":
        return MixtralConfig(intermediate_size=6, num_local_experts=3, **common)
    return Qwen3MoeConfig(intermediate_size=6, moe_intermediate_size=6, num_experts=3, **common)


def _model(kind: str, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_config(kind)).to(torch.bfloat16)


def per_expert(folder, kind: str, seed: int):
    """transformers' own save_pretrained of a fresh model: the release's per-expert names."""
    _model(kind, seed).save_pretrained(folder)
    return folder


def packed(folder, kind: str, seed: int):
    """What a raw state_dict save writes (accelerate's save_model): transformers 5's packed names."""
    model = _model(kind, seed)
    folder.mkdir()
    model.config.save_pretrained(folder)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def files(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def loaded(folder) -> dict[str, torch.Tensor]:
    """The checkpoint through transformers' loader: its conversion to the packed module names."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_transformers_saves_the_layout_it_loaded(tmp_path):
    """The finding the mapping rests on: legacy in -> legacy out, packed in -> packed out."""
    from transformers import AutoModelForCausalLM

    for kind in ("mixtral", "qwen3_moe"):
        for make, marker in ((per_expert, ".experts.0."), (packed, ".experts.gate_up_proj")):
            src = make(tmp_path / f"{kind}-{make.__name__}", kind, 0)
            AutoModelForCausalLM.from_pretrained(src).save_pretrained(tmp_path / f"{kind}-{make.__name__}-again")
            names = sorted(files(tmp_path / f"{kind}-{make.__name__}-again"))
            assert names == sorted(files(src)) and any(marker in n for n in names), (kind, make.__name__)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("prev_layout", ["per_expert", "packed"])
def test_merge_across_layouts(tmp_path, kind, prev_layout):
    make = {"per_expert": per_expert, "packed": packed}
    cur_layout = "packed" if prev_layout == "per_expert" else "per_expert"
    prev = make[prev_layout](tmp_path / "prev", kind, 0)
    cur = make[cur_layout](tmp_path / "cur", kind, 1)
    before = tree_state(tmp_path)
    with use_tuning(Tuning(chunk_elems=29, copy_chunk_bytes=4096)):  # chunks across experts and halves
        run_merge(prev, cur, MergeOptions(ALPHA), tmp_path / "out")
    assert tree_state(tmp_path, skip=tmp_path / "out") == before
    out = files(tmp_path / "out")
    assert sorted(out) == sorted(files(cur)), "the output keeps CUR's names"
    p, c, o = loaded(prev), loaded(cur), loaded(tmp_path / "out")  # all three in transformers' packed names
    assert sorted(o) == sorted(p) == sorted(c)
    for name in o:
        assert_bits_equal(o[name], contract(p[name], c[name], ALPHA, torch.bfloat16))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| prev MoE names | PREV's MoE experts read under CUR's names" in card
    verify_output(tmp_path / "out")


def test_same_layout_needs_no_mapping(tmp_path):
    prev, cur = per_expert(tmp_path / "prev", "mixtral", 0), per_expert(tmp_path / "cur", "mixtral", 1)
    run_merge(prev, cur, MergeOptions(ALPHA), tmp_path / "out")
    assert "MoE names" not in (tmp_path / "out" / "README.md").read_text()


def test_missing_expert_is_one_line(tmp_path, keep_sigterm):
    prev = per_expert(tmp_path / "prev", "qwen3_moe", 0)
    cur = packed(tmp_path / "cur", "qwen3_moe", 1)
    t = files(prev)
    del t["model.layers.1.mlp.experts.2.up_proj.weight"]
    for f in prev.glob("*.safetensors*"):
        f.unlink()
    save_file(t, prev / "model.safetensors", metadata={"format": "pt"})
    before = tree_state(tmp_path)
    res = run_cli_in_process(prev, cur, "--alpha", ALPHA, "-o", tmp_path / "out")
    assert_one_line_error(res, (1, 2), "model.layers.1.mlp.experts.gate_up_proj", "per-expert")
    assert not (tmp_path / "out").exists() and tree_state(tmp_path) == before
    assert json.loads((prev / "config.json").read_text())["model_type"] == "qwen3_moe"


def test_fp8_per_expert_base_under_packed_names(tmp_path):
    """A Qwen3-MoE FP8 release (per-expert F8_E4M3 weights + weight_scale_inv) as PREV, a packed bf16 trainer
    output as CUR: each expert dequantized exactly, read in transformers' packed order."""
    from tests.merge import quant_build as qb
    from tests.merge.test_quant import reference_dequant

    prev = per_expert(tmp_path / "prev", "qwen3_moe", 0)
    t = files(prev)
    for name in [n for n in t if ".experts." in n or "self_attn.q_proj" in n]:
        t[name], t[name + "_scale_inv"] = qb.quantize(t[name])
    for f in prev.glob("*.safetensors*"):
        f.unlink()
    config = json.loads((prev / "config.json").read_text())
    (prev / "config.json").write_text(json.dumps({**config, "quantization_config": dict(qb.QCONFIG)}))
    qb.write(prev / "shards", t, {})  # two shards, scales in the second, then moved up beside config.json
    for f in (prev / "shards").iterdir():
        if f.name != "config.json":
            f.rename(prev / f.name)
    cur = packed(tmp_path / "cur", "qwen3_moe", 1)
    with use_tuning(Tuning(chunk_elems=29)):  # chunks across experts, halves and quantized parts
        run_merge(prev, cur, MergeOptions(ALPHA), tmp_path / "out")
    deq = {n: reference_dequant(v, t[n + "_scale_inv"]) if v.dtype == torch.float8_e4m3fn else v for n, v in t.items()}
    p = {}
    for name in files(cur):
        if name.endswith("experts.gate_up_proj"):
            pre = name.removesuffix("gate_up_proj")
            p[name] = torch.stack(
                [torch.cat([deq[f"{pre}{e}.gate_proj.weight"], deq[f"{pre}{e}.up_proj.weight"]]) for e in range(3)]
            )
        elif name.endswith("experts.down_proj"):
            p[name] = torch.stack([deq[f"{name.removesuffix('down_proj')}{e}.down_proj.weight"] for e in range(3)])
        else:
            p[name] = deq[name]
    out, c = files(tmp_path / "out"), files(cur)
    assert sorted(out) == sorted(c)
    for name, got in out.items():
        assert_bits_equal(got, contract(p[name], c[name], ALPHA, torch.bfloat16))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| prev dequantized | " in card and "| prev MoE names | " in card
    # --quantize would write PREV's per-expert FP8 layout back under CUR's packed names: refused, nothing written
    before = tree_state(tmp_path)
    res = run_cli_in_process(prev, cur, "--alpha", str(ALPHA), "--quantize", "fp8-block", "-o", tmp_path / "fp8")
    assert_one_line_error(res, (1, 2), "MoE experts", "drop --quantize")
    assert not (tmp_path / "fp8").exists() and tree_state(tmp_path) == before
