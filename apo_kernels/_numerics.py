"""What both backends must agree on: the compute dtype, alpha's single rounding, canonical NaN bit patterns."""

from __future__ import annotations

import math
import struct

import torch

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Same-width signed integer dtype, used to read and write raw bit patterns.
BITS_DTYPE: dict[torch.dtype, torch.dtype] = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}

# The one NaN each output dtype may hold (positive sign, quiet bit, zero payload); the kernel writes the same.
CANONICAL_NAN: dict[torch.dtype, int] = {
    torch.float16: 0x7E00,
    torch.bfloat16: 0x7FC0,
    torch.float32: 0x7FC00000,
    torch.float64: 0x7FF8000000000000,
}


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any of the given dtypes is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def round_alpha(alpha: float, wide: torch.dtype) -> float:
    """``alpha`` rounded to nearest-even in ``wide`` (overflowing to inf), returned as an exact Python float."""
    alpha = float(alpha)
    if wide == torch.float64:
        return alpha
    try:
        return struct.unpack("<f", struct.pack("<f", alpha))[0]  # C's double -> float conversion
    except OverflowError:
        return math.copysign(math.inf, alpha)
