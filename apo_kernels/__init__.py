"""The APO extrapolation arithmetic: ``out = cur + alpha * (cur - prev)``.

Numerics (the contract; every backend, every dtype mix):

- The compute dtype ``w`` is float64 if any of prev, cur, out is float64, else float32. Inputs are read in their
  own dtypes (fp16, bf16, fp32, fp64, in any mix, e.g. prev fp32 + cur bf16) and upcast exactly to ``w``; no
  upcast copy of a whole tensor is made.
- ``alpha`` is rounded to ``w`` once (nearest-even). Then ``d = cur - prev``, ``t = alpha * d``,
  ``r = cur + t``, each rounded to nearest-even in ``w``; no fused multiply-add.
- ``r`` is rounded ONCE to nearest-even into the output dtype (fp16, bf16, fp32, fp64), subnormals included,
  overflowing to inf. (From fp64 to 16 bits this is a direct rounding, not fp64 -> fp32 -> 16 bits.)
- NaN results are canonical: bf16 0x7FC0, fp16 0x7E00, fp32 0x7FC00000, fp64 0x7FF8000000000000 (the table
  ``apo_kernels.dtypes``, which holds every per-dtype fact).
- ``alpha == 0`` returns ``cur`` exactly: its bytes (NaN payloads included) when ``out.dtype == cur.dtype``,
  otherwise ``cur`` rounded once as above, even where ``prev`` is inf or NaN.
- ``out`` may be ``cur`` or ``prev`` itself (in place); a partial overlap is refused.

Backends (chosen per call in ``apo_kernels.ops``): CUDA tensors run a fused Triton kernel (one pass, small
tensors grouped per launch); CPU tensors run a CPU twin made of torch ops. ``backend="triton"`` on CPU tensors
runs the same kernel under Triton's interpreter (slow, for tests). A numpy twin over byte buffers
(``apo_kernels.numpy_twin``) is what apo-merge computes with on the CPU: it needs no torch. All paths agree bit
for bit.

torch loads on first use of the names below, so that importing the numpy twin does not start it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from apo_kernels.lazy import lazy_exports

if TYPE_CHECKING:
    from apo_kernels.ops import extrapolate, extrapolate_, extrapolate_many_, supported_dtypes

__all__ = ["extrapolate", "extrapolate_", "extrapolate_many_", "supported_dtypes"]


__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(__all__, "apo_kernels.ops"))
