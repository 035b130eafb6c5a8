"""The one table of dtype names: safetensors names, their sizes, ``--dtype`` names and torch's names.

torch loads lazily (``torch_dtype``): the modules that read headers run before torch is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # the dtypes apo-merge extrapolates
OUT_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}  # --dtype name -> safetensors name
TORCH_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}  # floating only


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a safetensors (``BF16``) or ``--dtype`` (``bf16``) name; None when not floating."""
    import torch

    attr = TORCH_NAMES.get(OUT_DTYPES.get(name, name))
    return getattr(torch, attr) if attr else None
