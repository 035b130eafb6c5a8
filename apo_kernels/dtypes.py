"""The one dtype table: one row per safetensors dtype, every per-dtype fact in it; other maps derive from it.

torch-free: the merge's CPU path reads headers and computes with numpy before (or without) torch being imported;
torch dtypes are looked up by name on first use (``DType.torch_dtype``, ``torch_dtype``).

A new format (e.g. an fp8 or MXFP4 block layout the kernel learns to read) is a new row or new values in a row,
not a new map: the header parser accepts exactly the rows' names, the kernel and the numpy twin exactly the rows
with ``kernel=True``, ``apo-merge --dtype`` exactly the rows with a ``cli`` name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    """The facts of one dtype as a safetensors file names it."""

    name: str  # the safetensors name: "BF16"
    itemsize: int  # bytes per element
    floating: bool = False
    bits: tuple[int, int, int] | None = None  # floating layout: (sign, exponent, mantissa) bits
    nan: int | None = None  # the one NaN bit pattern the kernel writes (positive, quiet, zero payload)
    numpy: str | None = None  # numpy's dtype name; None where numpy has none (bf16, fp8)
    torch: str | None = None  # the torch attribute name ("bfloat16"), resolved on first use
    cli: str | None = None  # its name on the command line (apo-merge --dtype, the trainer's mixed_precision)
    kernel: bool = False  # the kernels read and write it: apo-merge extrapolates it; other dtypes are copied
    finite_top: bool = False  # the all-ones exponent holds numbers, no inf (OCP E4M3FN: only S.1111.111 is NaN)

    @property
    def nonfinite_from(self) -> int:
        """The smallest sign-cleared bit pattern that is inf or NaN (IEEE layouts: the exponent all ones)."""
        _, e, m = self.bits
        return ((1 << e) - 1) << m

    @property
    def overflow(self) -> float:
        """|x| from which rounding to nearest-even into this dtype gives inf: halfway between its largest finite
        value and the next power of two (IEEE layouts); inf for fp64, where no wider value exists."""
        _, e, m = self.bits
        try:
            return math.ldexp(2.0 - 2.0 ** -(m + 1), 2 ** (e - 1) - 1)
        except OverflowError:
            return math.inf

    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype (imports torch); None where this torch has none."""
        import torch

        return getattr(torch, self.torch, None) if self.torch else None


DTYPES: tuple[DType, ...] = (
    DType("BOOL", 1, numpy="bool", torch="bool"),
    DType("U8", 1, numpy="uint8", torch="uint8"),
    DType("I8", 1, numpy="int8", torch="int8"),
    DType("F8_E4M3", 1, floating=True, bits=(1, 4, 3), nan=0x7F, torch="float8_e4m3fn", finite_top=True),
    DType("F8_E5M2", 1, floating=True, bits=(1, 5, 2), nan=0x7E, torch="float8_e5m2"),
    DType("F8_E8M0", 1, floating=True, bits=(0, 8, 0), torch="float8_e8m0fnu"),
    DType("F8_E4M3FNUZ", 1, floating=True, bits=(1, 4, 3), torch="float8_e4m3fnuz"),
    DType("F8_E5M2FNUZ", 1, floating=True, bits=(1, 5, 2), torch="float8_e5m2fnuz"),
    DType("I16", 2, numpy="int16", torch="int16"),
    DType("U16", 2, numpy="uint16", torch="uint16"),
    DType(
        "F16", 2, floating=True, bits=(1, 5, 10), nan=0x7E00, numpy="float16", torch="float16", cli="fp16", kernel=True
    ),
    DType("BF16", 2, floating=True, bits=(1, 8, 7), nan=0x7FC0, torch="bfloat16", cli="bf16", kernel=True),
    DType("I32", 4, numpy="int32", torch="int32"),
    DType("U32", 4, numpy="uint32", torch="uint32"),
    DType(
        "F32",
        4,
        floating=True,
        bits=(1, 8, 23),
        nan=0x7FC00000,
        numpy="float32",
        torch="float32",
        cli="fp32",
        kernel=True,
    ),
    DType("I64", 8, numpy="int64", torch="int64"),
    DType("U64", 8, numpy="uint64", torch="uint64"),
    DType(
        "F64", 8, floating=True, bits=(1, 11, 52), nan=0x7FF8000000000000, numpy="float64", torch="float64", kernel=True
    ),
    DType("C64", 8, numpy="complex64", torch="complex64"),
)

# Derived views, for callers that look names up.
BY_NAME: dict[str, DType] = {d.name: d for d in DTYPES}
ITEMSIZE: dict[str, int] = {d.name: d.itemsize for d in DTYPES}  # every name a header may hold
KERNEL_NAMES: tuple[str, ...] = tuple(d.name for d in DTYPES if d.kernel)  # F16, BF16, F32, F64
CLI_NAMES: dict[str, str] = {d.cli: d.name for d in DTYPES if d.cli}  # "bf16" -> "BF16"


def lookup(name: str) -> DType | None:
    """The row of a safetensors (``BF16``) or command-line (``bf16``) name; None for any other string."""
    return BY_NAME.get(CLI_NAMES.get(name, name))


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a dtype the kernels take, by safetensors (``BF16``) or command-line (``bf16``) name;
    None for any other name (integers, fp8, "keep", "no"): such tensors are copied or refused, never computed."""
    row = lookup(name)
    return row.torch_dtype() if row is not None and row.kernel else None


def torch_name(name: str) -> str | None:
    """``torch_dtype``'s attribute name ("bfloat16"), without importing torch."""
    row = lookup(name)
    return row.torch if row is not None and row.kernel else None


@cache
def _by_torch() -> dict[torch.dtype, DType]:
    return {d.torch_dtype(): d for d in DTYPES if d.kernel}


def of_torch(dtype: torch.dtype) -> DType | None:
    """The row of a torch dtype the kernels take; None for any other dtype."""
    return _by_torch().get(dtype)
