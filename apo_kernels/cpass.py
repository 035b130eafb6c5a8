"""The compiled CPU pass (``apo_kernels._cpass``, C built at install by setup.py): the numpy twin's interface and
bytes, in one pass per buffer instead of about fifteen numpy passes, with the GIL released while it runs.

The install builds it where a C compiler is found (``optional=True``); elsewhere ``available()`` is False and
``best()`` returns the numpy twin, which stays the reference for the bytes. Both are torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from apo_kernels import numpy_twin
from apo_kernels.dtypes import KERNEL_NAMES

_VERSION = 3  # VERSION in _cpass.c: a build left from older C source in a checkout is not used

try:
    from apo_kernels import _cpass
except ImportError:  # built without a compiler (or not built in a source checkout): the numpy twin computes
    _cpass = None
if getattr(_cpass, "VERSION", None) != _VERSION:
    _cpass = None  # stale: rebuild with pip install -e . (or python setup.py build_ext --inplace)

_CODES = {"F16": 0, "BF16": 1, "F32": 2, "F64": 3}  # the C code's dtype numbers
assert set(_CODES) == set(KERNEL_NAMES), "apo_kernels/_cpass.c knows exactly the kernel dtypes"

_GROUP = 64  # MAX_ALPHAS in _cpass.c
Into = Callable[..., list[int]]  # extrapolate_into's signature
# An FP8 block-scaled side, as dequant_fp8 takes it: (the 256 fp32 values of its fp8 dtype, its block scales as
# float32 [rows / bo, cols / bi], (begin, cols, bo, bi, scols)): the buffer's first element is element ``begin`` of
# the flattened [rows, cols] weight, scols the scales' columns
Fp8 = tuple[np.ndarray, np.ndarray, tuple[int, int, int, int, int]]


def available() -> bool:
    """Whether the compiled pass was built and loads."""
    return _cpass is not None


def extrapolate_into(
    outs: Sequence[np.ndarray],
    out_dtype: str,
    prev: np.ndarray,
    prev_dtype: str,
    cur: np.ndarray,
    cur_dtype: str,
    alphas: Sequence[float],
    prev_fp8: Fp8 | None = None,
    cur_fp8: Fp8 | None = None,
) -> list[int]:
    """``numpy_twin.extrapolate_into``, compiled: same arguments, same bytes, same counts. ``prev_fp8`` /
    ``cur_fp8``: that side's buffer holds its fp8 bytes (one per element, its dtype ``F32``), dequantized tile by
    tile inside the pass to the bits ``dequant_fp8`` gives in place: the fp32 never goes through memory."""
    if _cpass is None:
        raise RuntimeError("apo_kernels._cpass is not built; reinstall apo-merge with a C compiler present")
    wide = numpy_twin.compute_dtype(out_dtype, prev_dtype, cur_dtype)
    rounded = [numpy_twin.round_alpha(a, wide) for a in alphas]
    outs, found = list(outs), []
    if len(outs) != len(rounded):
        raise ValueError("one output per alpha")
    codes = _CODES[out_dtype], _CODES[prev_dtype], _CODES[cur_dtype]
    for i in range(0, len(rounded), _GROUP):  # the C code takes up to 64 alphas per call
        group = slice(i, i + _GROUP)
        found += _cpass.extrapolate_into(
            outs[group], codes[0], prev, codes[1], cur, codes[2], rounded[group], prev_fp8, cur_fp8
        )
    return found


def dequant_fp8() -> Callable[..., None] | None:
    """The compiled in-place FP8 dequantization (``apo_merge.quant.dequant`` documents it), None where not built:
    ``(buf, n, table, scales, (begin, cols, bo, bi, scols))``."""
    return getattr(_cpass, "dequant_fp8", None)


def dequant_mxfp4() -> Callable[..., None] | None:
    """The compiled MXFP4 dequantization of one expert (``apo_merge.quant.mxfp4`` documents it), None where not
    built: ``(out, blocks, scales, fp4, pow2, (rows, groups, lo, hi))``."""
    return getattr(_cpass, "dequant_mxfp4", None)


def best() -> Into:
    """The fastest ``extrapolate_into`` here: the compiled pass if built, else the numpy twin."""
    return extrapolate_into if _cpass is not None else numpy_twin.extrapolate_into
