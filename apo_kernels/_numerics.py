"""Tables both backends share: the supported dtypes, their bit-pattern views, the canonical NaNs.

The per-call decisions (compute dtype, alpha's single rounding, alpha == 0) are taken once, in ``apo_kernels.ops``.
"""

from __future__ import annotations

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

# The safetensors name of each dtype: how the numpy twin (apo_kernels._numpy), which has no torch, names them.
SAFETENSORS_NAME: dict[torch.dtype, str] = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}
