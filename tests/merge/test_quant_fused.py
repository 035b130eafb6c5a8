"""FP8 sides dequantized inside the compiled pass (issue 28): the slot keeps the fp8 bytes and each tile is made
in fp32 by the pass itself. The bytes and the counts must be those of the two-step path (``dequant_fp8`` in place,
then the pass over fp32) and of the numpy lines (``dequant_block``, then the numpy twin), for any fp8 byte, any
scale, any chunk of any shape; and a merge writes the same bytes with the fused path on and off."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from apo_kernels import cpass, numpy_twin
from apo_merge.api import run_merge, run_merges
from apo_merge.engine import Tuning, use_tuning
from apo_merge.engine.compute import NumpyCompute
from apo_merge.options import MergeOptions
from apo_merge.quant import dequant
from apo_merge.quant.dequant import dequant_block, fp8_values
from apo_merge.quant.layout import QuantInfo
from tests.kernels.test_numpy_twin import _random_bits
from tests.merge import quant_build as qb
from tests.merge.test_quant import _load, _tamper, e4m3_f64

pytestmark = pytest.mark.skipif(not cpass.available(), reason="apo_kernels._cpass is not built")

ITEM = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}
TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
ALPHAS = [0.3, 0.0, -2.5, 1e39]  # alpha 0: CUR's own value; 1e39 overflows fp32
# (shape, block): odd shapes (not multiples of 128, rows not a multiple of the block), a per-row block, one block
GEOMETRIES = [((200, 300), (128, 128)), ((130, 129), (1, 129)), ((7, 5), (7, 5)), ((260, 1000), (128, 128))]
CHUNKS = [777, 5000, 1 << 20]  # chunks that begin mid-row and mid-block, and a whole tensor


class Side:
    """An FP8 block-scaled weight: every byte pattern (NaN bytes 0x7f / 0xff, subnormals, both zeros) and scales
    whose products underflow to fp32 subnormals or overflow, scales that are 0, subnormal, inf and NaN."""

    def __init__(self, shape, block, dtype: str, seed: int) -> None:
        g = np.random.default_rng(seed)
        self.raw = g.integers(0, 256, shape[0] * shape[1], dtype=np.uint8)
        self.raw[:256] = np.roll(np.arange(256), seed)[: self.raw.size]
        grid = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
        self.scale = (g.random(grid, dtype=np.float32) * np.float32(3e-3)).astype(np.float32)
        extremes = np.array([1e-38, 3e38, 0.0, 1e-40, np.inf, np.nan, -(2.0**-149)], np.float32)
        picks = g.choice(self.scale.size, min(self.scale.size // 3, extremes.size), replace=False)
        self.scale.reshape(-1)[picks] = extremes[: picks.size]
        self.info = QuantInfo("w", "F32", shape, 0, self.raw.size, raw_dtype=dtype, block=block)

    def operand(self, way: str, begin: int, n: int):
        """(buffer, dtype, descriptor) of elements begin..begin+n as each path gets them: the fp8 bytes for the
        fused pass; fp32 dequantized in place by the compiled code (two-step) or by the numpy lines."""
        raw = self.raw[begin : begin + n]
        side = dequant.fp8_side(self.info, self.scale, begin)
        if way == "fused":
            return raw.copy(), "F32", side
        if way == "two-step":
            buf = np.full(4 * n, 0xA5, np.uint8)
            buf[:n] = raw
            cpass.dequant_fp8()(buf, n, *side)
            return buf, "F32", None
        out = np.empty(n, np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            dequant_block(raw, begin, self.info, self.scale, out)
        return out.view(np.uint8), "F32", None


class Plain:
    """The other side: ordinary weights and, every fourth element, any bit pattern (NaN payloads, inf, subnormal)."""

    def __init__(self, n: int, dtype: str, seed: int) -> None:
        t = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.05).to(TORCH[dtype])
        t[::4] = _random_bits(len(t[::4]), TORCH[dtype], seed)
        self.bytes, self.dtype = t.view(torch.uint8).numpy(), dtype

    def operand(self, way: str, begin: int, n: int):
        return self.bytes[begin * ITEM[self.dtype] : (begin + n) * ITEM[self.dtype]], self.dtype, None


def _three_ways(prev, cur, out_dtype: str, begin: int, n: int):
    """Each path's (output bytes per alpha, counts): fused, two-step, numpy lines."""
    results = []
    for way in ("fused", "two-step", "numpy"):
        (pb, pd, pq), (cb, cd, cq) = prev.operand(way, begin, n), cur.operand(way, begin, n)
        kwargs = {k: v for k, v in (("prev_fp8", pq), ("cur_fp8", cq)) if v is not None}
        outs = [np.full(n * ITEM[out_dtype], 0x5A, np.uint8) for _ in ALPHAS]
        into = numpy_twin.extrapolate_into if way == "numpy" else cpass.extrapolate_into
        with np.errstate(all="ignore"):
            found = into(outs, out_dtype, pb, pd, cb, cd, ALPHAS, **kwargs)
        results.append((outs, found))
    return results


@pytest.mark.parametrize("fp8", ["F8_E4M3", "F8_E5M2"])
@pytest.mark.parametrize("where", ["prev", "cur", "both"])
@pytest.mark.parametrize("other", ["BF16", "F16", "F32", "F64"])
@pytest.mark.parametrize("out_dtype", ["BF16", "F16", "F32", "F64"])
def test_fused_is_the_two_step_and_numpy_bytes(fp8, where, other, out_dtype):
    """Every alpha's output bytes and the non-finite counts, for chunks of every geometry; F64 on either side or
    out goes through the fp64 pass."""
    for gi, (shape, block) in enumerate(GEOMETRIES):
        numel = shape[0] * shape[1]
        seed = gi * 7 + len(where) + ITEM[other]
        prev = Side(shape, block, fp8, seed) if where in ("prev", "both") else Plain(numel, other, seed)
        cur_dtype = "F8_E4M3" if where == "both" else fp8  # both: one of each dtype where fp8 is E5M2
        cur = Side(shape, block, cur_dtype, seed + 1) if where in ("cur", "both") else Plain(numel, other, seed)
        for chunk in CHUNKS:
            for begin in range(0, numel, chunk):
                n = min(chunk, numel - begin)
                (fused, f_found), (two, t_found), (ref, r_found) = _three_ways(prev, cur, out_dtype, begin, n)
                for k, alpha in enumerate(ALPHAS):
                    assert np.array_equal(fused[k], two[k]), (shape, begin, alpha)
                    assert np.array_equal(fused[k], ref[k]), (shape, begin, alpha)
                assert f_found == t_found == r_found, (shape, begin)


def test_fused_counts_new_nonfinite_results():
    """Large scales make finite fp8 values whose extrapolation overflows: counted as the two-step path counts."""
    side = Side((256, 256), (128, 128), "F8_E4M3", 3)
    side.raw[side.raw & 0x7F == 0x7F] = 0x7E
    side.scale[...] = np.float32(5e35)  # 448 * 5e35 is finite; -2.5 * (c - p) is not
    cur = Plain(side.raw.size, "BF16", 4)
    (_, f_found), (_, t_found), (_, r_found) = _three_ways(side, cur, "BF16", 0, side.raw.size)
    assert f_found == t_found == r_found and f_found[2] > 1000


def test_e4m3_by_bits_is_the_table():
    """The compiled code decodes e4m3fn by bit arithmetic where the table given is e4m3fn's: all 256 bytes (NaN
    0x7f and 0xff, subnormals, -0) against the table bit for bit, an independent decoder and torch; any other table
    (e5m2's, or e4m3fn's with one value changed) is looked up."""
    table = fp8_values("F8_E4M3")
    raw = np.arange(256, dtype=np.uint8)
    geometry = (0, 256, 1, 256, 1)
    for scale in (1.0, 2.0**-20, 3e38):
        s = np.array([[scale]], np.float32)
        buf = np.zeros(1024, np.uint8)
        buf[:256] = raw
        cpass.dequant_fp8()(buf, 256, table, s, geometry)
        with np.errstate(over="ignore"):
            want = table * s[0, 0]
        assert np.array_equal(buf.view(np.uint32), want.view(np.uint32)), scale
        out, zeros = np.empty(256 * 4, np.uint8), np.zeros(256 * 4, np.uint8)
        cpass.extrapolate_into([out], "F32", zeros, "F32", raw, "F32", [0.0], cur_fp8=(table, s, geometry))
        assert np.array_equal(out.view(np.uint32), want.view(np.uint32)), scale  # alpha 0: cur's fp32 bits
    got = buf.view(np.float32)
    assert np.array_equal(table.view(np.uint32)[[0x7F, 0xFF]], [0x7FC00000] * 2)
    finite = ~np.isnan(table)
    assert np.array_equal(e4m3_f64(raw).astype(np.float32)[finite], table[finite])
    torch_values = torch.from_numpy(raw).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(torch_values[finite].view(np.uint32), table[finite].view(np.uint32))
    changed = table.copy()
    changed[5] = np.float32(1.0)  # no longer e4m3fn's: looked up
    buf[:256] = raw
    cpass.dequant_fp8()(buf, 256, changed, np.ones((1, 1), np.float32), (0, 256, 1, 256, 1))
    assert got[5] == 1.0 and np.array_equal(got[6:].view(np.uint32), changed[6:].view(np.uint32))


def test_refusals():
    table, scale = fp8_values("F8_E4M3"), np.ones((2, 2), np.float32)
    raw, cur, out = np.zeros(100, np.uint8), np.zeros(200, np.uint8), np.zeros(200, np.uint8)
    q = (table, scale, (0, 10, 5, 5, 2))
    cpass.extrapolate_into([out], "BF16", raw, "F32", cur, "BF16", [0.3], prev_fp8=q)  # fits: 10 x 10
    with pytest.raises(ValueError, match="FP8 side's values are F32"):
        cpass.extrapolate_into([out], "BF16", raw, "BF16", cur, "BF16", [0.3], prev_fp8=q)
    with pytest.raises(ValueError, match="same number of elements"):
        cpass.extrapolate_into([out], "BF16", raw[:99], "F32", cur, "BF16", [0.3], prev_fp8=q)
    for geometry in ((5, 10, 5, 5, 2), (0, 10, 5, 4, 2)):  # a row block past the scales; 3 column blocks in 2
        with pytest.raises(ValueError, match="scales too small"):
            cpass.extrapolate_into([out], "BF16", raw, "F32", cur, "BF16", [0.3], prev_fp8=(table, scale, geometry))
    with pytest.raises(ValueError, match="bad sizes"):
        cpass.extrapolate_into([out], "BF16", raw, "F32", cur, "BF16", [0.3], prev_fp8=(table[:255], scale, q[2]))
    with pytest.raises(TypeError, match="an FP8 side is"):
        cpass.extrapolate_into([out], "BF16", raw, "F32", cur, "BF16", [0.3], prev_fp8=(table, scale))
    shared = np.zeros(300, np.uint8)
    with pytest.raises(ValueError, match="share memory"):  # the output over the fp8 bytes
        cpass.extrapolate_into([shared[50:250]], "BF16", shared[:100], "F32", cur, "BF16", [0.3], prev_fp8=q)


def _merge_both_ways(tmp_path, monkeypatch, prev, cur, options, **tuning):
    """The merge with the fused path, then with every FP8 side dequantized in its slot first: the digests."""
    calls = []
    compiled = dequant._COMPILED
    monkeypatch.setattr(dequant, "_COMPILED", lambda *a: calls.append(a) or compiled(*a))
    digests = []
    for fuse in (True, False):
        monkeypatch.setattr(NumpyCompute, "fuse_fp8", fuse)
        with use_tuning(Tuning(**tuning)):
            reports = run_merges(prev, cur, options, tmp_path / f"out{fuse}-{{alpha}}")
        digests.append([(r.digests, r.new_nonfinite) for r in reports])
        assert bool(calls) == (not fuse)  # the fused path leaves no whole FP8 side to the in-place pass
        calls.clear()
    return digests


@pytest.mark.parametrize(("prev_q", "cur_q"), [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_merge_bytes_fused_on_and_off(tmp_path, monkeypatch, prev_q, cur_q, dtype):
    prev = qb.checkpoint(tmp_path / "prev", 0, prev_q)
    cur = qb.checkpoint(tmp_path / "cur", 1, cur_q)
    options = MergeOptions((0.3, 0.0, -0.5), dtype=dtype)
    fused, two = _merge_both_ways(tmp_path, monkeypatch, prev, cur, options, chunk_elems=333)
    assert fused == two


def test_merge_counts_fused_on_and_off(tmp_path, monkeypatch):
    """Scales large enough that the extrapolation overflows: the same count of new inf/NaN with and without."""
    prev = qb.checkpoint(tmp_path / "prev", 0, True)
    cur = qb.checkpoint(tmp_path / "cur", 1, False)
    _tamper(prev, lambda t: t.update({k: torch.full_like(v, 2e35) for k, v in t.items() if k.endswith("_scale_inv")}))
    fused, two = _merge_both_ways(tmp_path, monkeypatch, prev, cur, MergeOptions((0.3, -4.0)), chunk_elems=1000)
    assert fused == two
    assert fused[0][1] == 0 and fused[1][1] > 0  # the largest values times 2e35 are finite, -4 times them not


def test_quantized_output_fused_on_and_off(tmp_path, monkeypatch):
    """--quantize fp8-block reads the fp32 outputs, not the slot: the same bytes either way."""
    prev = qb.checkpoint(tmp_path / "prev", 0, True)
    cur = qb.checkpoint(tmp_path / "cur", 1, False)
    options = MergeOptions((0.3, -0.5), quantize="fp8-block")
    fused, two = _merge_both_ways(tmp_path, monkeypatch, prev, cur, options)
    assert fused == two


def test_without_the_compiled_pass_the_same_bytes(tmp_path, monkeypatch):
    """The numpy twin and numpy dequantization where nothing is compiled: the fused path's bytes."""
    prev, cur = qb.checkpoint(tmp_path / "prev", 0, True), qb.checkpoint(tmp_path / "cur", 1, True)
    with use_tuning(Tuning(chunk_elems=777)):
        a = run_merge(prev, cur, MergeOptions(0.3), tmp_path / "a")
        monkeypatch.setattr(cpass, "_cpass", None)
        monkeypatch.setattr(dequant, "_COMPILED", None)
        b = run_merge(prev, cur, MergeOptions(0.3), tmp_path / "b")
    assert a.digests == b.digests
    assert sorted(_load(tmp_path / "a")) == sorted(_load(tmp_path / "b"))
