"""apo_kernels.dtypes, the one dtype table: its facts checked against torch and numpy, and the views derived from it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from apo_kernels import supported_dtypes
from apo_kernels.dtypes import (
    BY_NAME,
    CLI_NAMES,
    DTYPES,
    ITEMSIZE,
    KERNEL_NAMES,
    lookup,
    of_torch,
    torch_dtype,
    torch_name,
)

KERNEL_ROWS = [d for d in DTYPES if d.kernel]


def test_header_names_and_sizes_are_the_safetensors_ones():
    # The header parser accepts exactly these names (safetensors' own list): a new row must not widen it by accident.
    assert {
        **dict.fromkeys(["BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"], 1),
        **dict.fromkeys(["I16", "U16", "F16", "BF16"], 2),
        **dict.fromkeys(["I32", "U32", "F32"], 4),
        **dict.fromkeys(["I64", "U64", "F64", "C64"], 8),
    } == ITEMSIZE
    assert len(BY_NAME) == len(DTYPES)


def test_views_the_product_relies_on():
    assert KERNEL_NAMES == ("F16", "BF16", "F32", "F64")
    assert CLI_NAMES == {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}  # apo-merge --dtype's choices, besides keep
    assert supported_dtypes() == (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    assert [torch_dtype(n) for n in ("bf16", "fp16", "fp32", "F64", "BF16")] == [
        torch.bfloat16,
        torch.float16,
        torch.float32,
        torch.float64,
        torch.bfloat16,
    ]
    # Only the kernel's dtypes have a compute dtype: the rest are copied or refused.
    for name in ("keep", "no", "I64", "U8", "BOOL", "F8_E4M3", "C64", "float32"):
        assert torch_dtype(name) is None and torch_name(name) is None
    assert torch_name("bf16") == "bfloat16" and lookup("fp16") is BY_NAME["F16"]
    assert all(of_torch(d.torch_dtype()) is d for d in KERNEL_ROWS) and of_torch(torch.int8) is None


@pytest.mark.parametrize("row", DTYPES, ids=lambda d: d.name)
def test_row_facts_match_torch_and_numpy(row):
    dt = row.torch_dtype()
    if dt is not None:  # an older torch may lack a dtype (float8_e8m0fnu came in 2.7)
        assert torch.empty(0, dtype=dt).element_size() == row.itemsize
        assert dt.is_floating_point == row.floating
    if row.numpy is not None:
        assert np.dtype(row.numpy).itemsize == row.itemsize
    if row.floating:
        assert sum(row.bits) == 8 * row.itemsize
        if dt is not None and not row.name.endswith("FNUZ"):  # torch's finfo.eps is off for the FNUZ formats
            assert torch.finfo(dt).eps == 2.0 ** -row.bits[2]
    else:
        assert row.bits is None and row.nan is None and not row.kernel


@pytest.mark.parametrize("row", KERNEL_ROWS, ids=lambda d: d.name)
def test_kernel_rows_nan_and_overflow(row):
    dt = row.torch_dtype()
    _, e, m = row.bits
    assert row.nan == row.nonfinite_from | 1 << (m - 1)  # positive, quiet, zero payload
    bits = getattr(torch, f"int{8 * row.itemsize}")
    assert torch.tensor([float("nan")], dtype=torch.float64).to(dt).view(bits).item() == row.nan
    assert torch.tensor([float("inf")], dtype=dt).view(bits).item() == row.nonfinite_from
    # overflow: the smallest |x| that rounds to inf (halfway between the largest finite value and 2**(bias + 1))
    if row.name == "F64":
        assert row.overflow == float("inf")
        return
    big = torch.finfo(dt).max
    assert row.overflow == big + 2.0 ** (2 ** (e - 1) - 1 - m - 1)
    if row.itemsize == 2:  # fp32 -> 16 bits is one nearest-even rounding in torch; the threshold is exact in fp32
        edge = torch.tensor([row.overflow, np.nextafter(np.float32(row.overflow), 0)], dtype=torch.float32).to(dt)
    else:  # fp64 -> fp32 in numpy is one nearest-even rounding
        with np.errstate(over="ignore"):
            edge = torch.from_numpy(np.array([row.overflow, np.nextafter(row.overflow, 0)]).astype(np.float32))
    assert edge[0].item() == float("inf") and edge[1].item() == big


def test_import_does_not_load_torch():
    code = "import sys, apo_kernels.dtypes; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
