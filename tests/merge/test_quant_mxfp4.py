"""MXFP4 inputs as gpt-oss stores its experts (issue 28): dequantized exactly as transformers'
``convert_moe_packed_tensors`` (names, shape, orientation, values), on either side or both; every inconsistency one
line with nothing left."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from apo_kernels import cpass
from apo_merge.api import run_merge
from apo_merge.engine import Tuning, use_tuning
from apo_merge.options import MergeOptions
from apo_merge.quant.layout import QuantInfo
from apo_merge.quant.mxfp4 import FP4, POW2, dequant_experts, spans
from apo_merge.verify import verify_output
from tests.kernels.oracle import assert_bits_equal, contract
from tests.merge import quant_build as qb
from tests.merge.helpers import assert_damage_refused, assert_one_line_error, run_cli_in_process, tree_state
from tests.merge.test_quant import _load

ALPHA = 0.3
E, H, I = 3, 64, 96  # experts, hidden, intermediate: blocks [E, 2I, H/32, 16] and [E, H, I/32, 16]
QCONFIG = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}
EXPERTS = {"model.layers.0.mlp.experts.gate_up_proj": (E, 2 * I, H), "model.layers.0.mlp.experts.down_proj": (E, H, I)}
PLAIN = {
    "model.embed_tokens.weight": (40, H),
    "model.layers.0.self_attn.q_proj.weight": (H, H),
    "model.layers.0.self_attn.sinks": (4,),
    "model.layers.0.mlp.router.weight": (E, H),
    "model.layers.0.mlp.router.bias": (E,),
    "model.layers.0.mlp.experts.gate_up_proj_bias": (E, 2 * I),
    "model.layers.0.mlp.experts.down_proj_bias": (E, H),
    "model.norm.weight": (H,),
    "lm_head.weight": (40, H),
}


def e2m1_f64(nibbles: np.ndarray) -> np.ndarray:
    """An independent e2m1 decoder (OCP MX: 1 sign, 2 exponent bits with bias 1, 1 mantissa bit, subnormal 0.5)."""
    n = nibbles.astype(np.int64)
    sign = np.where(n & 8, -1.0, 1.0)
    exp, man = (n >> 1) & 3, n & 1
    return sign * np.where(exp == 0, man * 0.5, (1 + man / 2) * np.exp2(exp - 1.0))


def reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[E, R, G, 16] + [E, R, G] -> [E, G*32, R] in float64 (exact), rounded once to fp32."""
    b = blocks.numpy()
    vals = np.stack([e2m1_f64(b & 0x0F), e2m1_f64(b >> 4)], axis=-1)  # low nibble first
    vals = vals * np.exp2(scales.numpy().astype(np.float64) - 127)[..., None, None]
    e, r, g = scales.shape
    with np.errstate(over="ignore"):  # scales >= 253 overflow fp32: inf, as IEEE rounding gives
        return torch.from_numpy(vals.reshape(e, r, g * 32).transpose(0, 2, 1).astype(np.float32).copy())


def quantized(shape, g: torch.Generator, low=118, high=124) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blocks and scales whose dequantization has the (swapped) shape ``shape`` = [E, W, R]."""
    e, w, r = shape
    blocks = torch.randint(0, 256, (e, r, w // 32, 16), dtype=torch.uint8, generator=g)
    return blocks, torch.randint(low, high, (e, r, w // 32), dtype=torch.uint8, generator=g)


def checkpoint(folder, seed: int, quant: bool):
    """A gpt-oss-shaped checkpoint: MXFP4 experts (scales in the other shard) or what a trainer saves after
    loading it dequantized (bf16, transformers' names and orientation)."""
    g = torch.Generator().manual_seed(seed)
    config = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "torch_dtype": "bfloat16"}
    tensors = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in PLAIN.items()}
    for name, shape in EXPERTS.items():
        if quant:
            tensors[name + "_blocks"], tensors[name + "_scales"] = quantized(shape, g)
        else:
            tensors[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    if quant:
        config["quantization_config"] = dict(QCONFIG)
    return qb.write(folder, tensors, config, split=lambda n: int(n.endswith("_scales") or n.startswith("lm_head")))


def side(folder) -> dict[str, torch.Tensor]:
    t = _load(folder)
    out = {n: v for n, v in t.items() if not n.endswith(("_blocks", "_scales"))}
    for n in [n for n in t if n.endswith("_blocks")]:
        out[n.removesuffix("_blocks")] = reference(t[n], t[n.removesuffix("_blocks") + "_scales"])
    return out


def _dequant(blocks, scales, chunk, compiled=None) -> torch.Tensor:
    e, r, g, _ = blocks.shape
    info = QuantInfo("w", "F32", (e, g * 32, r), 0, blocks.numel(), raw_dtype="U8", kind="mxfp4")
    experts = [(k, blocks[k].numpy(), scales[k].numpy()) for k in range(e)]
    out = np.empty(e * g * 32 * r, np.float32)
    for begin in range(0, out.size, chunk):
        n = min(chunk, out.size - begin)
        with _guarded(n) as part:
            dequant_experts(experts, begin, info, part.numpy(), compiled)
        out[begin : begin + n] = part
    return torch.from_numpy(out).reshape(e, g * 32, r)


@contextlib.contextmanager
def _guarded(n: int, device="cpu"):
    """A fresh chunk buffer with a sentinel on either side, checked afterwards: nothing written outside it."""
    buf = torch.full((n + 2,), 7.0, device=device)
    yield buf[1:-1]
    assert buf[0].item() == 7.0 and buf[-1].item() == 7.0, "written outside the chunk"


@pytest.mark.parametrize("shape", [(2, 7, 3), (3, 64, 192), (1, 1, 2)])
@pytest.mark.parametrize("chunk", [5, 333, 1 << 20])
def test_dequant_matches_transformers_and_reference(shape, chunk):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(sum(shape) + chunk)
    e, r, groups = shape
    blocks = torch.randint(0, 256, (e, r, groups, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 255, (e, r, groups), dtype=torch.uint8, generator=g)  # every exponent but NaN
    k = min(4, scales.numel())
    scales.view(-1)[:k] = torch.tensor([0, 254, 1, 253][:k], dtype=torch.uint8)  # subnormal results; overflow to inf
    got = _dequant(blocks, scales, chunk)
    assert got.shape == (e, groups * 32, r)
    assert_bits_equal(got, reference(blocks, scales))
    ours = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert ours.shape == got.shape and ours.is_contiguous()
    assert_bits_equal(got, ours)


def test_bf16_dequantization_is_the_same_values():
    """transformers dequantizes into the parameter's dtype (bf16): the same values, since e2m1 * 2^k is a bf16
    for every exponent that does not overflow; our fp32 is that bf16 exactly."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(3)
    blocks, scales = quantized((2, 64, 5), g, low=0, high=253)
    got = _dequant(blocks, scales, 1000)
    assert_bits_equal(got.bfloat16(), convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16))
    assert_bits_equal(got, got.bfloat16().float())


def _cuts(e: int, w: int, r: int, rng: np.random.Generator) -> list[int]:
    """Chunk boundaries: at and beside expert and output-row ends (mid-expert, mid-row), and at random."""
    total, per = e * w * r, w * r
    marks = [k * per + d for k in range(e) for d in (-1, 0, 1, r - 1, r + 1, per // 2)]
    marks += list(rng.integers(0, total, 12))
    return sorted({0, total} | {m for m in marks if 0 < m < total})


def _twins(blocks, scales, cuts, device="cpu") -> dict[str, np.ndarray]:
    """The numpy lines, the compiled pass (where built) and the Triton kernel on ``device`` (the CPU: its
    interpreter), each over the chunks between ``cuts``."""
    from apo_kernels import _triton

    e, r, g, _ = blocks.shape
    info = QuantInfo("w", "F32", (e, g * 32, r), 0, blocks.numel(), raw_dtype="U8", kind="mxfp4")
    experts = [(k, blocks[k].numpy(), scales[k].numpy()) for k in range(e)]
    on = {id(a): torch.from_numpy(a).to(device) for _, b, s in experts for a in (b, s)}
    tables = (torch.from_numpy(FP4).to(device), torch.from_numpy(POW2).to(device))
    ways = {"numpy": None, "C": cpass.dequant_mxfp4()} if cpass.dequant_mxfp4() else {"numpy": None}
    got = {name: np.full(cuts[-1], 7, np.float32) for name in [*ways, "triton"]}
    for begin, end in zip(cuts, cuts[1:]):
        for name, compiled in ways.items():
            with _guarded(end - begin) as part:
                dequant_experts(experts, begin, info, part.numpy(), compiled)
            got[name][begin:end] = part
        with _guarded(end - begin, device) as part:
            for b, s, lo, hi, pos in spans(experts, begin, end - begin, info):
                _triton.dequant_mxfp4_(on[id(b)], on[id(s)], tables, part[pos : pos + hi - lo], (lo, r))
        got["triton"][begin:end] = part.cpu().numpy()
    return got


@pytest.mark.parametrize(
    "shape",
    [(3, 97, 3), (2, 300, 1), (1, 513, 2), (2, 7, 5), (1, 1, 1)],  # rows across the C pass's 256-row tiles too
)
def test_twins_are_the_reference_bits(shape):
    """numpy, the compiled pass and the Triton kernel (interpreted) write the same bits, the independent float64
    reference's: random bytes (every nibble), every scale 0..254 (inf from the largest, fp32 subnormals from the
    smallest), chunks that start and end mid-expert and mid-row."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(sum(shape))
    e, r, groups = shape
    blocks = torch.randint(0, 256, (e, r, groups, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 255, (e, r, groups), dtype=torch.uint8, generator=g)
    k = min(255, scales.numel())
    scales.view(-1)[:k] = torch.arange(255, dtype=torch.uint8)[torch.randperm(255, generator=g)[:k]]
    scales.view(-1)[: min(2, k)] = torch.tensor([0, 254], dtype=torch.uint8)[: min(2, k)]
    want = reference(blocks, scales).reshape(-1).numpy()
    if scales.numel() >= 255:  # the cases the test is for, present
        assert np.isinf(want).any() and ((want != 0) & (np.abs(want) < np.finfo(np.float32).tiny)).any()
    cuts = _cuts(e, groups * 32, r, np.random.default_rng(sum(shape)))
    got = _twins(blocks, scales, cuts)
    assert sorted(got) == (["C", "numpy", "triton"] if cpass.dequant_mxfp4() else ["numpy", "triton"])
    for name, values in got.items():
        assert np.array_equal(values.view(np.uint32), want.view(np.uint32)), name


@pytest.mark.skipif(cpass.dequant_mxfp4() is None, reason="the compiled pass is not built")
@pytest.mark.parametrize("chunk", [1, 31, 257, 5000])
def test_compiled_dequant_every_chunk_start(chunk):
    """The compiled pass over every chunk start of small, odd shapes: the numpy lines' bits."""
    g = torch.Generator().manual_seed(chunk)
    for shape in ((2, 5, 3), (3, 33, 1), (1, 260, 2)):
        blocks, scales = quantized((shape[0], shape[2] * 32, shape[1]), g, low=0, high=255)
        assert_bits_equal(_dequant(blocks, scales, chunk, cpass.dequant_mxfp4()), _dequant(blocks, scales, chunk))


@pytest.mark.skipif(cpass.dequant_mxfp4() is None, reason="the compiled pass is not built")
def test_compiled_dequant_refuses_a_geometry_beyond_its_buffers():
    blk, sc, out = np.zeros((4, 2, 16), np.uint8), np.zeros((4, 2), np.uint8), np.zeros(256, np.float32)
    for geometry, arrays in (
        ((4, 2, 0, 257), (out, blk, sc)),  # past the expert's 256 values
        ((4, 2, 0, 256), (out[:255], blk, sc)),  # out too short
        ((4, 2, 0, 256), (out, blk[:3], sc)),  # blocks too short
        ((4, 2, 0, 256), (out, blk, sc[:3])),  # scales too short
        ((4, 2, 9, 8), (out, blk, sc)),  # hi < lo
    ):
        with pytest.raises(ValueError, match="bad sizes"):
            cpass.dequant_mxfp4()(*arrays, FP4, POW2, geometry)


@pytest.mark.gpu
def test_triton_on_cuda_is_the_reference_bits():
    g = torch.Generator().manual_seed(9)
    blocks, scales = quantized((3, 96, 97), g, low=0, high=255)
    cuts = _cuts(3, 96, 97, np.random.default_rng(9))
    got = _twins(blocks, scales, cuts, device="cuda")["triton"]
    assert_bits_equal(torch.from_numpy(got), reference(blocks, scales).reshape(-1))


@pytest.mark.parametrize(("prev_q", "cur_q"), [(True, False), (False, True), (True, True), (False, False)])
def test_merge_every_combination(tmp_path, prev_q, cur_q):
    prev, cur = checkpoint(tmp_path / "prev", 0, prev_q), checkpoint(tmp_path / "cur", 1, cur_q)
    before = tree_state(tmp_path)
    with use_tuning(Tuning(chunk_elems=333, copy_chunk_bytes=4096)):  # chunks across rows, groups and experts
        report = run_merge(prev, cur, MergeOptions(ALPHA), tmp_path / "out")
    assert tree_state(tmp_path, skip=tmp_path / "out") == before
    out, p, c = _load(tmp_path / "out"), side(prev), side(cur)
    assert sorted(out) == sorted(c) == sorted(p)  # the names a trainer's bf16 output carries
    for name, got in out.items():
        assert got.dtype == torch.bfloat16 and got.shape == c[name].shape, name
        assert_bits_equal(got, contract(p[name], c[name], ALPHA, torch.bfloat16))
    assert report.n_extrapolated == len(out)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "gpt_oss"
    card = (tmp_path / "out" / "README.md").read_text()
    for s, q in (("prev", prev_q), ("cur", cur_q)):
        assert (f"| {s} dequantized | 2 MXFP4 weights" in card) == q
    verify_output(tmp_path / "out")


@pytest.mark.skipif(cpass.dequant_mxfp4() is None, reason="the compiled pass is not built")
def test_numpy_fallback_writes_the_compiled_bytes(tmp_path, monkeypatch):
    """MXFP4 PREV + bf16 CUR with the compiled pass and with the numpy lines (where it is not built): the same
    bytes, the reference's."""
    from apo_merge.quant import dequant

    prev, cur = checkpoint(tmp_path / "prev", 0, True), checkpoint(tmp_path / "cur", 1, False)
    compiled, calls = cpass.dequant_mxfp4(), []
    monkeypatch.setattr(dequant, "_COMPILED_MXFP4", lambda *a: (calls.append(a[-1]), compiled(*a)))
    with use_tuning(Tuning(chunk_elems=333)):  # chunks across rows, groups and experts
        a = run_merge(prev, cur, MergeOptions(ALPHA), tmp_path / "a")
        assert len(calls) > 2 * E  # it ran, over every expert of both weights
        monkeypatch.setattr(dequant, "_COMPILED_MXFP4", None)
        b = run_merge(prev, cur, MergeOptions(ALPHA), tmp_path / "b")
    assert a.digests == b.digests
    out, p, c = _load(tmp_path / "a"), side(prev), side(cur)
    for name in EXPERTS:
        assert_bits_equal(out[name], contract(p[name], c[name], ALPHA, torch.bfloat16))


def test_mxfp4_prev_fp32_output(tmp_path):
    """--dtype fp32 keeps the dequantized step's fp32."""
    prev, cur = checkpoint(tmp_path / "prev", 0, True), checkpoint(tmp_path / "cur", 1, False)
    with use_tuning(Tuning(chunk_elems=4096)):
        run_merge(prev, cur, MergeOptions(-0.5, dtype="fp32"), tmp_path / "out")
    out, p, c = _load(tmp_path / "out"), side(prev), side(cur)
    for name, got in out.items():
        assert_bits_equal(got, contract(p[name], c[name], -0.5, torch.float32))


def test_trainer_output_pairs_with_the_base(tmp_path):
    """A tiny gpt-oss loaded from the MXFP4 checkpoint by transformers (dequantized) and saved again: the names,
    shapes and values apo-merge reads from the MXFP4 base are the saved ones, name for name, bit for bit."""
    from transformers import AutoModelForCausalLM, GptOssConfig, Mxfp4Config

    cfg = GptOssConfig(
        vocab_size=40, hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=E, num_experts_per_tok=2, layer_types=["full_attention"],
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for name, t in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name + "_blocks"], tensors[name + "_scales"] = quantized(tuple(t.shape), g)
        else:
            tensors[name] = t.detach().clone()
    base = tmp_path / "base"
    cfg.quantization_config = dict(QCONFIG)
    config = {**cfg.to_dict(), "quantization_config": dict(QCONFIG)}
    qb.write(base, tensors, config, split=lambda n: int(n.endswith("_scales")))
    loaded = AutoModelForCausalLM.from_pretrained(base, quantization_config=Mxfp4Config(dequantize=True))
    loaded.to(torch.bfloat16).save_pretrained(tmp_path / "raw-1")
    saved = _files(tmp_path / "raw-1")
    ours = side(base)
    assert sorted(saved) == sorted(ours)
    for name, t in saved.items():
        assert t.shape == ours[name].shape, name
        assert_bits_equal(ours[name].to(t.dtype), t)
    run_merge(base, tmp_path / "raw-1", MergeOptions(ALPHA), tmp_path / "apo-1")  # the one command, pairing by name
    out = _files(tmp_path / "apo-1")
    assert sorted(out) == sorted(saved)
    for name, got in out.items():
        assert_bits_equal(got, contract(ours[name], saved[name], ALPHA, torch.bfloat16))


def _files(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _rewrite(folder, edit) -> None:
    qb.rewrite(folder, edit, "_scales")


GU = "model.layers.0.mlp.experts.gate_up_proj"


def _nan_scale(t):
    t[GU + "_scales"] = t[GU + "_scales"].clone()
    t[GU + "_scales"][2, 5, 1] = 255


def _config(folder, qc):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = qc
    if qc is None:
        del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))


BAD = {
    "nan scale": (lambda f: _rewrite(f, _nan_scale), "are 255 (NaN)"),
    "blocks without scales": (lambda f: _rewrite(f, lambda t: t.pop(GU + "_scales")), "has no"),
    "scales without blocks": (lambda f: _rewrite(f, lambda t: t.pop(GU + "_blocks")), "have no"),
    "group mismatch": (
        lambda f: _rewrite(f, lambda t: t.update({GU + "_scales": t[GU + "_scales"][:, :, :1].contiguous()})),
        "one scale per 32 values",
    ),
    "not 16 bytes": (
        lambda f: _rewrite(f, lambda t: t.update({GU + "_blocks": t[GU + "_blocks"][..., :8].contiguous()})),
        "[experts, rows, groups, 16]",
    ),
    "no config": (lambda f: _config(f, None), "not mxfp4"),
    "other config": (lambda f: _config(f, {"quant_method": "fp8"}), "not mxfp4"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("which", ["prev", "cur"])
def test_bad_input_one_line_nothing_left(tmp_path, case, which, keep_sigterm):
    paths = {s: checkpoint(tmp_path / s, i, True) for i, s in enumerate(("prev", "cur"))}
    damage, needle = BAD[case]
    assert_damage_refused(tmp_path, paths["prev"], paths["cur"], lambda: damage(paths[which]), needle, ALPHA)


def test_bf16_base_with_blocks_names_is_not_mxfp4(tmp_path, keep_sigterm):
    """The dequantized name is taken: a checkpoint holding both layouts of one weight is refused."""
    prev = checkpoint(tmp_path / "prev", 0, True)
    _rewrite(prev, lambda t: t.update({GU: torch.zeros(E, H, 2 * I, dtype=torch.bfloat16)}))
    cur = checkpoint(tmp_path / "cur", 1, False)
    res = run_cli_in_process(prev, cur, "--alpha", ALPHA, "-o", tmp_path / "out")
    assert_one_line_error(res, (1, 2), "mixes two layouts")
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.parametrize(("prev_q", "cur_q"), [(True, False), (False, True), (True, True)])
def test_cuda_writes_the_cpu_bytes(tmp_path, monkeypatch, prev_q, cur_q):
    """On CUDA the experts' blocks and scales go to the device and the Triton kernel dequantizes them there (the
    host dequantizes none): the CPU's bytes."""
    from apo_merge.engine import compute

    prev, cur = checkpoint(tmp_path / "prev", 0, prev_q), checkpoint(tmp_path / "cur", 1, cur_q)
    with use_tuning(Tuning(chunk_elems=333, gpu_chunk_elems=1000, gpu_slots=2)):
        cpu = run_merge(prev, cur, MergeOptions(ALPHA, device="cpu"), tmp_path / "cpu")
        on_host, host = [], compute.dequantize

        def counted(task, parts=None):
            on_host.extend(task.quant if parts is None else parts)
            host(task, parts)

        monkeypatch.setattr(compute, "dequantize", counted)
        gpu = run_merge(prev, cur, MergeOptions(ALPHA, device="cuda"), tmp_path / "gpu")
    assert gpu.digests == cpu.digests
    assert not [q for q in on_host if q[1].kind == "mxfp4"]
