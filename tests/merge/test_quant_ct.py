"""compressed-tensors FP8 inputs (issue 28): ``X.weight`` F8_E4M3 + ``X.weight_scale`` per tensor, channel or block
(llm-compressor's FP8 / FP8_DYNAMIC / FP8_BLOCK schemes), ``X.input_scale`` dropped; read as fp32(w) * scale with
one fp32 rounding, on either side or both; every inconsistency one line with nothing left."""

from __future__ import annotations

import json
import math

import pytest
import torch

from apo_merge.api import run_merge
from apo_merge.engine import Tuning, use_tuning
from apo_merge.options import MergeOptions
from apo_merge.verify import verify_output
from tests.kernels.oracle import assert_bits_equal, contract
from tests.merge import quant_build as qb
from tests.merge.helpers import assert_damage_refused, tree_state
from tests.merge.test_quant import _load, reference_dequant

ALPHA = 0.3


def qconfig(strategy: str, static: bool = False) -> dict:
    """config.json's quantization_config as llm-compressor writes it (one group, Linear targets)."""
    weights = {
        "block_structure": [128, 128] if strategy == "block" else None,
        "dynamic": False,
        "num_bits": 8,
        "observer": "minmax",
        "strategy": strategy,
        "symmetric": True,
        "type": "float",
    }
    acts = {"dynamic": not static, "num_bits": 8, "strategy": "tensor" if static else "token", "type": "float"}
    return {
        "config_groups": {"group_0": {"input_activations": acts, "output_activations": None, "targets": ["Linear"],
                                      "weights": weights}},
        "format": "float-quantized",
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }  # fmt: skip


def _quantize(x: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    if strategy == "block":
        return qb.quantize(x)
    x = x.float()
    amax = x.abs().amax(dim=1, keepdim=True) if strategy == "channel" else x.abs().max().reshape(1)
    scale = amax / 448.0
    w = (x / (scale if strategy == "channel" else scale[0])).to(torch.float8_e4m3fn)
    return w, scale.to(torch.bfloat16) if strategy == "channel" else scale  # channel scales in the model's dtype


def checkpoint(folder, seed: int, strategy: str | None, static: bool = False):
    """A release-shaped checkpoint of ``qb.source(seed)`` in compressed-tensors FP8 (``strategy``), or bf16."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16"}
    tensors = dict(qb.source(seed))
    if strategy:
        config["quantization_config"] = qconfig(strategy, static)
        for name in qb.LINEAR:
            tensors[name], tensors[name + "_scale"] = _quantize(tensors[name], strategy)
            if static:
                tensors[name.removesuffix("weight") + "input_scale"] = torch.tensor([0.01], dtype=torch.float32)
    return qb.write(folder, tensors, config, split=lambda n: int(n.endswith("_scale") or n.startswith("lm_head")))


def side(folder) -> dict[str, torch.Tensor]:
    """The checkpoint as the merge must read it, the strategy taken from its config (DeepSeek's: 128x128 blocks)."""
    t = _load(folder)
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    groups = qc.get("config_groups", {"g": {"weights": {"strategy": "block"}}})
    strategy = groups["group_0" if "group_0" in groups else "g"]["weights"]["strategy"]
    out = {}
    for n, v in t.items():
        if n.endswith(("_scale", "_scale_inv")):
            continue
        if v.dtype == torch.float8_e4m3fn:
            rows, cols = v.shape
            block = {"block": (128, 128), "channel": (1, cols), "tensor": (rows, cols)}[strategy]
            s = t.get(n + "_scale", t.get(n + "_scale_inv"))
            v = reference_dequant(v, s.reshape(math.ceil(rows / block[0]), -1), block)
        out[n] = v
    return out


CASES = [("channel", None), (None, "channel"), ("tensor", "tensor"), ("block", None), (None, "tensor"), (None, None)]


@pytest.mark.parametrize(("prev_s", "cur_s"), CASES)
def test_merge_every_combination(tmp_path, prev_s, cur_s):
    prev = checkpoint(tmp_path / "prev", 0, prev_s, static=prev_s == "tensor")
    cur = checkpoint(tmp_path / "cur", 1, cur_s, static=cur_s == "tensor")
    before = tree_state(tmp_path)
    with use_tuning(Tuning(chunk_elems=333, copy_chunk_bytes=4096)):
        report = run_merge(prev, cur, MergeOptions(ALPHA), tmp_path / "out")
    assert tree_state(tmp_path, skip=tmp_path / "out") == before
    out, p, c = _load(tmp_path / "out"), side(prev), side(cur)
    assert sorted(out) == sorted(qb.source(0)), "scales and input scales are gone"
    for name, got in out.items():
        assert got.dtype == torch.bfloat16, name
        assert_bits_equal(got, contract(p[name], c[name], ALPHA, torch.bfloat16))
    assert report.n_extrapolated == len(out)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    card = (tmp_path / "out" / "README.md").read_text()
    for s, strategy in (("prev", prev_s), ("cur", cur_s)):
        row = f"| {s} dequantized | 4 compressed-tensors FP8 weights (F8_E4M3, per {strategy})"
        assert (row in card) == bool(strategy)
    verify_output(tmp_path / "out")


def test_scalar_scale_and_deepseek_layout_on_the_other_side(tmp_path):
    """A per-tensor scale stored as a 0-d tensor; PREV in compressed-tensors, CUR in DeepSeek's block layout."""
    prev = checkpoint(tmp_path / "prev", 0, "tensor")
    _rewrite(prev, lambda t: t.update({k: v.reshape(()) for k, v in t.items() if k.endswith("weight_scale")}))
    cur = qb.checkpoint(tmp_path / "cur", 1, True)
    with use_tuning(Tuning(chunk_elems=1000)):
        run_merge(prev, cur, MergeOptions(ALPHA), tmp_path / "out")
    out, p, c = _load(tmp_path / "out"), side(prev), side(cur)
    for name, got in out.items():
        assert_bits_equal(got, contract(p[name], c[name], ALPHA, torch.bfloat16))


def _rewrite(folder, edit) -> None:
    qb.rewrite(folder, edit, "_scale")


W = "model.layers.0.mlp.down_proj.weight"


def _set(name, fn):
    return lambda f: _rewrite(f, lambda t: t.update({name: fn(t[name].clone())}))


def _config(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        qc = config["quantization_config"]
        for key, value in changes.items():
            if key == "weights":
                qc["config_groups"]["group_0"]["weights"].update(value)
            else:
                qc[key] = value
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def _nan(s):
    s[3, 0] = math.nan
    return s


BAD = {
    "nan scale": (_set(W + "_scale", _nan), "scales are inf or NaN"),
    "inf scale": (_set(W + "_scale", lambda s: s.fill_(math.inf)), "scales are inf or NaN"),
    "weight without scale": (lambda f: _rewrite(f, lambda t: t.pop(W + "_scale")), "has no " + W + "_scale tensor"),
    "scale without weight": (lambda f: _rewrite(f, lambda t: t.pop(W)), "has no F8 weight"),
    "scale shape": (_set(W + "_scale", lambda s: s[:-1].contiguous()), "fits none of the config's"),
    "int weights": (_config(weights={"type": "int"}), "is not supported"),
    "packed format": (_config(format="pack-quantized"), "pack-quantized"),
    "group strategy": (_config(weights={"strategy": "group"}), "strategy 'group'"),
    "no groups": (_config(config_groups=None), "has no config_groups"),
    "zero point": (
        lambda f: _rewrite(f, lambda t: t.update({W + "_zero_point": torch.zeros(200, 1, dtype=torch.bfloat16)})),
        "a zero point or group index",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("which", ["prev", "cur"])
def test_bad_input_one_line_nothing_left(tmp_path, case, which, keep_sigterm):
    paths = {s: checkpoint(tmp_path / s, i, "channel") for i, s in enumerate(("prev", "cur"))}
    damage, needle = BAD[case]
    assert_damage_refused(tmp_path, paths["prev"], paths["cur"], lambda: damage(paths[which]), needle, ALPHA)


@pytest.mark.gpu
@pytest.mark.parametrize(("prev_s", "cur_s"), [("channel", None), (None, "tensor"), ("block", "channel")])
def test_cuda_writes_the_cpu_bytes(tmp_path, prev_s, cur_s):
    prev, cur = checkpoint(tmp_path / "prev", 0, prev_s), checkpoint(tmp_path / "cur", 1, cur_s)
    with use_tuning(Tuning(chunk_elems=333, gpu_chunk_elems=1000, gpu_slots=2)):
        cpu = run_merge(prev, cur, MergeOptions(ALPHA, device="cpu"), tmp_path / "cpu")
        gpu = run_merge(prev, cur, MergeOptions(ALPHA, device="cuda"), tmp_path / "gpu")
    assert gpu.digests == cpu.digests
