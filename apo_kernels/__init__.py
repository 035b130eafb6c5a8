"""The APO extrapolation arithmetic: ``out = cur + alpha * (cur - prev)``.

Numerics (every path): inputs are upcast exactly to the compute dtype (fp64 if any of prev, cur, out is fp64,
else fp32), then ``d = cur - prev``, ``t = alpha * d``, ``r = cur + t``, each rounded in the compute dtype
(no fused multiply-add), then ONE round-to-nearest-even into the output dtype. NaN outputs are canonical quiet
NaNs. ``alpha == 0`` returns ``cur`` exactly (cast if the output dtype differs).

The CPU twin (plain torch) and the Triton kernel (GPU, or the interpreter on CPU tensors) agree bit for bit.
"""

from apo_kernels.ops import extrapolate, extrapolate_, extrapolate_many_, supported_dtypes

__all__ = ["extrapolate", "extrapolate_", "extrapolate_many_", "supported_dtypes"]
