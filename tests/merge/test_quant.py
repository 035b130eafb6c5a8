"""FP8 block-scaled inputs (issue 28): read exactly as DeepSeek's ``weight_dequant``, on either side or both, and
every inconsistency one line with nothing left."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from apo_kernels import cpass, extrapolate_
from apo_merge.api import Hooks, run_merge, run_merges
from apo_merge.engine import Tuning, use_tuning
from apo_merge.options import MergeOptions
from apo_merge.quant.dequant import dequant_block, fp8_values
from apo_merge.quant.layout import QuantInfo
from apo_merge.verify import verify_output
from tests.kernels.oracle import assert_bits_equal, contract
from tests.merge import quant_build as qb
from tests.merge.helpers import assert_damage_refused, assert_one_line_error, run_cli_in_process, tree_state

ALPHA = 0.3


def e4m3_f64(bits: np.ndarray) -> np.ndarray:
    """An independent e4m3fn decoder in float64 (OCP FP8: bias 7, no inf, S.1111.111 NaN)."""
    b = bits.astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * np.exp2(exp - 7.0))
    return np.where((b & 0x7F) == 0x7F, np.nan, sign * val)


def reference_dequant(w: torch.Tensor, scale: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """fp32(w) * scale per block, in float64 (the product of an fp8 and an fp32 value is exact there) rounded once
    to fp32: the one fp32 rounding of the contract."""
    x = e4m3_f64(w.view(torch.uint8).numpy())
    rows, cols = w.shape
    s = np.repeat(np.repeat(scale.double().numpy(), block[0], 0), block[1], 1)[:rows, :cols]
    return torch.from_numpy((x * s).astype(np.float32))  # bf16 scales: .double() of a bf16 is exact too


def test_fp8_table_matches_torch():
    bits = torch.arange(256, dtype=torch.uint8)
    want = bits.view(torch.float8_e4m3fn).float().numpy()
    got = fp8_values("F8_E4M3")
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(got).sum() == 2
    assert np.array_equal(got.view(np.uint32)[~np.isnan(got)], want.view(np.uint32)[~np.isnan(want)])
    assert np.array_equal(e4m3_f64(bits.numpy()).astype(np.float32)[~np.isnan(got)], got[~np.isnan(got)])


@pytest.mark.parametrize("shape", [(256, 128), (200, 300), (130, 129), (1, 5), (129, 1)])
@pytest.mark.parametrize("chunk", [7, 128, 1000, 1 << 20])
def test_dequant_chunks_exact(shape, chunk):
    g = torch.Generator().manual_seed(shape[0] * 7 + chunk)
    w = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    w[w & 0x7F == 0x7F] = 1  # no NaN bytes here (the table test covers them)
    scale = torch.rand(math.ceil(shape[0] / 128), math.ceil(shape[1] / 128), generator=g) * 3e-3 + 1e-5
    info = QuantInfo("w", "F32", shape, 0, w.numel(), scale=None)
    out = np.empty(w.numel(), np.float32)
    flat = w.reshape(-1).numpy()
    for begin in range(0, w.numel(), chunk):
        n = min(chunk, w.numel() - begin)
        dequant_block(flat[begin : begin + n], begin, info, scale.numpy(), out[begin : begin + n])
    got = torch.from_numpy(out).reshape(shape)
    assert_bits_equal(got, reference_dequant(w.view(torch.float8_e4m3fn), scale))
    wf = w.view(torch.float8_e4m3fn).to(torch.float32)  # torch: w.to(float32) * scale expanded over its block
    expanded = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    assert_bits_equal(got, wf * expanded)
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    ours = _dequantize_fp8_weight(w.view(torch.float8_e4m3fn), scale, [128, 128], torch.float32)
    assert_bits_equal(got, ours)  # transformers' own dequantization (ceil blocks)


@pytest.mark.skipif(cpass.dequant_fp8() is None, reason="the compiled pass is not built")
@pytest.mark.parametrize(
    ("shape", "block"), [((256, 128), (128, 128)), ((200, 300), (128, 128)), ((130, 129), (1, 129)), ((7, 5), (7, 5))]
)
@pytest.mark.parametrize("chunk", [1, 777, 5000, 1 << 20])
def test_compiled_dequant_is_the_numpy_bits(shape, block, chunk):
    """The compiled in-place pass writes the numpy lines' bits: every byte pattern (NaN payloads of both signs,
    subnormals), scales whose products underflow to fp32 subnormals or overflow to inf, chunks mid-row/mid-block."""
    g = np.random.default_rng(shape[0] * 31 + chunk)
    flat = g.integers(0, 256, shape[0] * shape[1], dtype=np.uint8)
    flat[:256] = np.arange(256)[: flat.size]
    grid = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    scale = (g.random(grid, dtype=np.float32) * np.float32(3e-3)).astype(np.float32)
    scale.reshape(-1)[:3] = np.array([1e-38, 3e38, 0.0], np.float32)[: scale.size]
    info = QuantInfo("w", "F32", shape, 0, flat.size, block=block)
    table = fp8_values("F8_E4M3")
    for begin in range(0, flat.size, chunk):
        n = min(chunk, flat.size - begin)
        want = np.empty(n, np.float32)
        with np.errstate(over="ignore"):
            dequant_block(flat[begin : begin + n], begin, info, scale, want)
        buf = np.full(4 * n, 0xA5, np.uint8)
        buf[:n] = flat[begin : begin + n]
        cpass.dequant_fp8()(buf, n, table, scale, (begin, shape[1], block[0], block[1], grid[1]))
        assert np.array_equal(buf.view(np.uint32), want.view(np.uint32)), (begin, n)
    with pytest.raises(ValueError, match="scales too small"):  # a geometry beyond the scales is refused, not read
        cpass.dequant_fp8()(np.zeros(4 * flat.size, np.uint8), flat.size, table, scale[:-1], (0, shape[1], *block, 9))


def _load(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(folder / fname, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def _side(folder) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors as the merge must read them: quantized weights dequantized by the reference."""
    t = _load(folder)
    return {
        n: reference_dequant(v, t[n + "_scale_inv"]) if v.dtype == torch.float8_e4m3fn else v
        for n, v in t.items()
        if not n.endswith("_scale_inv")
    }


@pytest.mark.parametrize(("prev_q", "cur_q"), [(True, False), (False, True), (True, True), (False, False)])
def test_merge_every_combination(tmp_path, prev_q, cur_q):
    prev = qb.checkpoint(tmp_path / "prev", 0, prev_q)
    cur = qb.checkpoint(tmp_path / "cur", 1, cur_q)
    before = tree_state(tmp_path)
    with use_tuning(Tuning(chunk_elems=333, copy_chunk_bytes=4096)):  # chunks end mid-row and mid-block
        report = run_merge(prev, cur, MergeOptions(ALPHA), tmp_path / "out")
    assert tree_state(tmp_path, skip=tmp_path / "out") == before
    out, p, c = _load(tmp_path / "out"), _side(prev), _side(cur)
    assert sorted(out) == sorted(c)  # the scales are gone
    for name, got in out.items():
        assert got.dtype == torch.bfloat16, name
        assert_bits_equal(got, contract(p[name], c[name], ALPHA, torch.bfloat16))
    assert report.n_extrapolated == len(out)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "deepseek_v3"
    card = (tmp_path / "out" / "README.md").read_text()
    for side, q in (("prev", prev_q), ("cur", cur_q)):
        assert (f"| {side} dequantized | 4 FP8 block-scaled weights (F8_E4M3, 128x128 blocks)" in card) == q
    verify_output(tmp_path / "out")


def test_bf16_scales_and_several_alphas(tmp_path):
    """Scales stored in bf16 are widened exactly (transformers multiplies by scales.to(float32)); several alphas
    from one read give each alpha's bytes."""
    prev = qb.checkpoint(tmp_path / "prev", 0, True)
    cur = qb.checkpoint(tmp_path / "cur", 1, False)
    _tamper(prev, lambda t: t.update({k: v.bfloat16() for k, v in t.items() if k.endswith("_scale_inv")}))
    with use_tuning(Tuning(chunk_elems=500)):
        reports = run_merges(prev, cur, MergeOptions((0.3, -0.5)), tmp_path / "out{alpha}")
    p, c = _side(prev), _side(cur)
    for alpha, report in zip((0.3, -0.5), reports):
        for name, got in _load(report.output).items():
            assert_bits_equal(got, contract(p[name], c[name], alpha, torch.bfloat16))


def test_torch_kernel_and_fp32_output(tmp_path):
    """The torch twin writes the numpy twin's bytes; --dtype fp32 keeps the dequantized values' fp32 step."""
    prev, cur = qb.checkpoint(tmp_path / "prev", 0, True), qb.checkpoint(tmp_path / "cur", 1, True)
    with use_tuning(Tuning(chunk_elems=1000)):
        run_merge(prev, cur, MergeOptions(ALPHA), tmp_path / "a")
        run_merge(prev, cur, MergeOptions(ALPHA), tmp_path / "b", hooks=Hooks(kernel=extrapolate_))
        run_merge(prev, cur, MergeOptions(ALPHA, dtype="fp32"), tmp_path / "c")
    for fname in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert (tmp_path / "a" / fname).read_bytes() == (tmp_path / "b" / fname).read_bytes()
    out, p, c = _load(tmp_path / "c"), _side(prev), _side(cur)
    for name, got in out.items():
        assert_bits_equal(got, contract(p[name], c[name], ALPHA, torch.float32))


def test_numpy_fallback_writes_the_compiled_bytes(tmp_path, monkeypatch):
    """Where the compiled pass is not built, the numpy lines dequantize: the same output bytes."""
    from apo_merge.engine.compute import NumpyCompute
    from apo_merge.quant import dequant

    prev, cur = qb.checkpoint(tmp_path / "prev", 0, True), qb.checkpoint(tmp_path / "cur", 1, True)
    with use_tuning(Tuning(chunk_elems=777)):
        a = run_merge(prev, cur, MergeOptions(ALPHA), tmp_path / "a")
        monkeypatch.setattr(dequant, "_COMPILED", None)
        monkeypatch.setattr(NumpyCompute, "fuse_fp8", False)  # else the pass dequantizes the whole FP8 sides
        b = run_merge(prev, cur, MergeOptions(ALPHA), tmp_path / "b")
    assert a.digests == b.digests


def test_cur_only_quantized_weight_is_dequantized(tmp_path):
    prev = qb.checkpoint(tmp_path / "prev", 0, False)
    cur = qb.checkpoint(tmp_path / "cur", 1, True)
    name = "model.layers.1.mlp.up_proj.weight"
    index = json.loads((prev / "model.safetensors.index.json").read_text())
    with safe_open(prev / index["weight_map"][name], "pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k != name}  # noqa: SIM118
    from safetensors.torch import save_file

    save_file(kept, prev / index["weight_map"][name], metadata={"format": "pt"})
    del index["weight_map"][name]
    (prev / "model.safetensors.index.json").write_text(json.dumps(index))
    run_merge(prev, cur, MergeOptions(ALPHA, on_missing="copy"), tmp_path / "out")
    got = _load(tmp_path / "out")[name]
    assert_bits_equal(got, _side(cur)[name].to(torch.bfloat16))


def test_one_command(tmp_path, keep_sigterm):
    prev = qb.checkpoint(tmp_path / "base-fp8", 0, True)
    cur = qb.checkpoint(tmp_path / "raw-1", 1, False)
    res = run_cli_in_process(prev, cur, "--alpha", ALPHA, "-o", tmp_path / "apo-1", "--hash-inputs")
    assert res.code == 0, res.stderr
    assert run_cli_in_process("verify", tmp_path / "apo-1").code == 0
    card = (tmp_path / "apo-1" / "README.md").read_text()
    for f in sorted(prev.glob("*.safetensors")):  # the inputs' content hashes, read beside the dequantization
        assert hashlib.sha256(f.read_bytes()).hexdigest() in card


def _tamper(folder, edit) -> None:
    qb.rewrite(folder, edit, "_scale_inv")


SCALE = "model.layers.0.mlp.down_proj.weight_scale_inv"


def _set_scale(value):
    def edit(t):
        t[SCALE] = t[SCALE].clone()
        t[SCALE][1, 2] = value

    return edit


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


BAD = {
    "nan scale": (lambda f: _tamper(f, _set_scale(math.nan)), "scales are inf or NaN"),
    "inf scale": (lambda f: _tamper(f, _set_scale(math.inf)), "scales are inf or NaN"),
    "weight without scale": (
        lambda f: _tamper(f, lambda t: t.pop(SCALE)),
        "but has no model.layers.0.mlp.down_proj.weight_scale_inv tensor",
    ),
    "scale without weight": (
        lambda f: _tamper(f, lambda t: t.pop(SCALE.removesuffix("_scale_inv"))),
        "has no F8 weight",
    ),
    "block size": (
        lambda f: _edit_config(f, quantization_config={**qb.QCONFIG, "weight_block_size": [64, 64]}),
        "does not match the weights",
    ),
    "no config": (lambda f: _edit_config(f, quantization_config=None), "has no quantization_config"),
    "compressed-tensors": (
        lambda f: _edit_config(f, quantization_config={"quant_method": "compressed-tensors"}),
        "compressed-tensors",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("side", ["prev", "cur"])
def test_bad_input_one_line_nothing_left(tmp_path, case, side, keep_sigterm):
    paths = {s: qb.checkpoint(tmp_path / s, i, True) for i, s in enumerate(("prev", "cur"))}
    damage, needle = BAD[case]
    assert_damage_refused(tmp_path, paths["prev"], paths["cur"], lambda: damage(paths[side]), needle, ALPHA)


def test_other_quantization_refused_not_copied(tmp_path, keep_sigterm):
    """Packed GPTQ weights are not read: refused, never copied through as bytes (MXFP4 is read since issue 28's
    reading part: test_quant_mxfp4.py)."""
    tensors = {
        "model.layers.0.mlp.down_proj.qweight": torch.zeros(2, 8, dtype=torch.int32),
        "model.layers.0.mlp.down_proj.scales": torch.ones(1, 8, dtype=torch.float16),
        "model.norm.weight": torch.ones(4, dtype=torch.bfloat16),
    }
    config = {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}}
    prev, cur = (qb.write(tmp_path / s, tensors, config) for s in ("prev", "cur"))
    res = run_cli_in_process(prev, cur, "--alpha", ALPHA, "-o", tmp_path / "out")
    assert_one_line_error(res, (1, 2), "gptq", "not supported")
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.parametrize(("prev_q", "cur_q"), [(True, False), (False, True), (True, True)])
def test_cuda_writes_the_cpu_bytes(tmp_path, prev_q, cur_q):
    prev, cur = qb.checkpoint(tmp_path / "prev", 0, prev_q), qb.checkpoint(tmp_path / "cur", 1, cur_q)
    with use_tuning(Tuning(chunk_elems=333, gpu_chunk_elems=1000, gpu_slots=2)):
        cpu = run_merge(prev, cur, MergeOptions(ALPHA, device="cpu"), tmp_path / "cpu")
        gpu = run_merge(prev, cur, MergeOptions(ALPHA, device="cuda"), tmp_path / "gpu")
    assert gpu.digests == cpu.digests
