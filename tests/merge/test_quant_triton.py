"""FP8 dequantization in apo_kernels' Triton kernel (the CUDA path dequantizes on the device), run here under
Triton's interpreter: the same fp32 products as the CPU paths, bit for bit, on every fp8 byte pattern."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apo_kernels import cpass
from apo_merge.quant.dequant import dequant_block, fp8_values
from apo_merge.quant.layout import QuantInfo

triton = pytest.importorskip("triton")
from apo_kernels import _triton  # noqa: E402


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bits, NaN for NaN (a dequantized NaN never reaches an output: the kernel writes its canonical NaN)."""
    return bool(((a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))).all())


@pytest.mark.parametrize("raw_dtype", ["F8_E4M3", "F8_E5M2"])
@pytest.mark.parametrize(
    ("shape", "block", "begin", "count"),
    [
        ((300, 333), (128, 128), 0, 300 * 333),  # partial blocks at both edges
        ((300, 333), (128, 128), 128 * 333 - 7, 4096 + 13),  # starts mid-row, crosses a block row
        ((64, 96), (1, 96), 17, 3000),  # per channel (compressed-tensors): one scale per row
        ((64, 96), (64, 96), 5, 6000),  # per tensor: one scale
    ],
)
def test_triton_dequant_matches_cpu_paths(raw_dtype, shape, block, begin, count):
    rng = np.random.default_rng(sum(shape) + begin)
    rows, cols = shape
    raw = rng.integers(0, 256, rows * cols, dtype=np.uint8)
    raw[:256] = np.arange(256, dtype=np.uint8)  # every pattern: NaN, inf (E5M2), subnormals, zeros of both signs
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    scale = (rng.standard_normal(grid) * 2.0 ** rng.integers(-140, 20, grid)).astype(np.float32)  # subnormals too
    info = QuantInfo("w", "F32", shape, 0, rows * cols, raw_dtype=raw_dtype, block=block, scale=None)
    chunk = raw[begin : begin + count]
    want = np.empty(count, np.float32)
    dequant_block(chunk, begin, info, scale, want)
    got = torch.empty(count, dtype=torch.float32)
    table = torch.from_numpy(fp8_values(raw_dtype))
    _triton.dequant_fp8_(torch.from_numpy(chunk.copy()), table, torch.from_numpy(scale), got, (begin, cols, *block))
    assert _same(got.numpy(), want)
    if cpass.dequant_fp8() is not None:  # and the compiled pass, where built
        buf = np.zeros(count * 4, np.uint8)
        buf[:count] = chunk
        cpass.dequant_fp8()(memoryview(buf), count, fp8_values(raw_dtype), scale, (begin, cols, *block, grid[1]))
        assert _same(buf.view(np.float32), want)


def test_triton_dequant_of_nothing_is_a_no_op():
    out = torch.full((4,), 7.0)
    _triton.dequant_fp8_(torch.empty(0, dtype=torch.uint8), torch.zeros(256), torch.ones(1, 1), out[:0], (0, 4, 1, 4))
    assert out.tolist() == [7.0] * 4
