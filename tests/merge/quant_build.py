"""Tiny FP8 block-scaled checkpoints with the names, dtypes, shapes and config keys of the DeepSeek-V3 / Qwen3 FP8
releases: F8_E4M3 ``*.weight`` + F32 ``*.weight_scale_inv`` [ceil(out/128), ceil(in/128)], norms, embeddings and
lm_head in bf16, ``quantization_config: {quant_method: fp8, fmt: e4m3, activation_scheme: dynamic,
weight_block_size: [128, 128]}``; the scales sit in another shard than their weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

QCONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
# name -> shape; the linear weights are quantized in an FP8 release; odd shapes: 200 and 300 are not multiples of 128
LINEAR = {
    "model.layers.0.self_attn.q_proj.weight": (256, 200),
    "model.layers.0.mlp.down_proj.weight": (200, 300),
    "model.layers.0.mlp.gate_proj.weight": (256, 128),
    "model.layers.1.mlp.up_proj.weight": (130, 129),
}
PLAIN = {
    "model.embed_tokens.weight": (64, 200),
    "model.layers.0.input_layernorm.weight": (200,),
    "model.norm.weight": (200,),
    "lm_head.weight": (64, 200),
}


def quantize(x: torch.Tensor, block=(128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise e4m3 with scale = amax / 448 (DeepSeek's weight_quant): (fp8 weight, fp32 scale_inv)."""
    rows, cols = x.shape
    sr, sc = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    scale = torch.empty(sr, sc, dtype=torch.float32)
    w = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(sr):
        for j in range(sc):
            blk = x[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]].float()
            s = blk.abs().max() / 448.0
            scale[i, j] = s
            w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (blk / s).to(torch.float8_e4m3fn)
    return w, scale


def source(seed: int) -> dict[str, torch.Tensor]:
    """The unquantized model of ``seed`` (bf16)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in {**LINEAR, **PLAIN}.items():
        out[name] = (torch.randn(shape, generator=g) * 0.02 * (1 + seed)).to(torch.bfloat16)
    return out


def write(folder: Path, tensors: dict[str, torch.Tensor], config: dict, split=lambda name: 0) -> Path:
    """Two shards (``split(name)`` picks 0 or 1) with an index, and config.json."""
    folder.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    for name, t in tensors.items():
        shards[split(name)][name] = t.contiguous()
    names = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, folder / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def rewrite(folder: Path, edit, scale_suffix: str) -> None:
    """Write ``folder`` again (two shards, scales ending in ``scale_suffix`` in the second) with ``edit(tensors)``
    applied to its tensors; the index and config.json follow."""
    from safetensors.torch import load_file

    tensors = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    edit(tensors)
    config = json.loads((folder / "config.json").read_text())
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    write(folder, tensors, config, split=lambda n: int(n.endswith(scale_suffix)))


def checkpoint(folder: Path, seed: int, quantized: bool) -> Path:
    """A release-shaped checkpoint of ``source(seed)``: FP8 block-scaled (scales in the second shard) or bf16."""
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "torch_dtype": "bfloat16"}
    tensors = dict(source(seed))
    if quantized:
        config["quantization_config"] = dict(QCONFIG)
        for name in LINEAR:
            tensors[name], tensors[name + "_scale_inv"] = quantize(tensors[name])
    return write(folder, tensors, config, split=lambda n: int(n.endswith("_scale_inv") or n.startswith("lm_head")))
