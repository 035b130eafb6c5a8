"""The CPU twin on numpy, over raw byte buffers: what the merge engine computes with on the CPU.

Same contract as the other backends (see ``apo_kernels``), bit for bit. It exists for start-up: numpy imports
in 0.05 s, torch in about 3 s, a third of a 1 GB merge on a 2-core machine. numpy has no bfloat16, so bf16
is handled as its bit pattern: widening is a 16-bit shift, rounding to nearest-even is integer arithmetic on
the fp32 bits. Buffers are worked through in pieces that keep the scratch in L2, with in-place ufuncs only;
numpy rounds each ufunc's result to its dtype and never fuses a multiply and an add.

Every output piece is checked with a max and a min of the wide result: when both lie inside the output dtype's
finite range there is no NaN to make canonical and no new inf to count (the common case); otherwise the piece
takes the exact, slower path.
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Sequence

import numpy as np

from apo_kernels.dtypes import BY_NAME, KERNEL_NAMES

# Per-dtype views of the table (apo_kernels.dtypes), by safetensors name, for the dtypes this twin reads and writes.
_ROWS = {n: BY_NAME[n] for n in KERNEL_NAMES}
_BITS = {n: np.dtype(f"u{d.itemsize}") for n, d in _ROWS.items()}  # the raw bit patterns
_FLOAT = {n: np.dtype(d.numpy) for n, d in _ROWS.items() if d.numpy}  # numpy's own float dtypes (no bf16)

PIECE = 1 << 16  # elements per step: measured fastest; the scratch (1 MiB) about fills one core's L2
_scratch = threading.local()


def round_alpha(alpha: float, wide: type) -> float:
    """``alpha`` rounded to nearest-even in ``wide`` (overflowing to inf), as an exact Python float."""
    alpha = float(alpha)
    if wide is np.float64:
        return alpha
    try:
        return struct.unpack("<f", struct.pack("<f", alpha))[0]  # C's double -> float conversion
    except OverflowError:
        return math.copysign(math.inf, alpha)


def compute_dtype(*names: str) -> type[np.floating]:
    """The compute dtype of a (out, prev, cur) triple: float64 if any is F64, else float32; each must be a kernel
    dtype (``TypeError`` otherwise)."""
    for name in names:
        if name not in _ROWS:
            raise TypeError(f"dtype {name!r} is not one of {', '.join(KERNEL_NAMES)}")
    return np.float64 if "F64" in names else np.float32


@np.errstate(over="ignore", invalid="ignore")  # overflow to inf and NaN are the contract's, not warnings
def extrapolate_into(
    outs: Sequence[np.ndarray],
    out_dtype: str,
    prev: np.ndarray,
    prev_dtype: str,
    cur: np.ndarray,
    cur_dtype: str,
    alphas: Sequence[float],
) -> list[int]:
    """Write ``cur + alpha * (cur - prev)`` for each alpha into the matching buffer of ``outs``.

    Buffers are contiguous uint8 arrays holding the same number of elements in the named dtypes (``F16``,
    ``BF16``, ``F32``, ``F64``); ``prev`` and ``cur`` are read once for all alphas. An output may not share memory
    with an input. Returns, per output, the count of non-finite results whose inputs were both finite.
    """
    wide = compute_dtype(out_dtype, prev_dtype, cur_dtype)
    size = {name: _ROWS[name].itemsize for name in (out_dtype, prev_dtype, cur_dtype)}
    n = cur.nbytes // size[cur_dtype]
    if prev.nbytes != n * size[prev_dtype] or any(o.nbytes != n * size[out_dtype] for o in outs):
        raise ValueError("prev, cur and every out must hold the same number of elements")
    a = [wide(round_alpha(x, wide)) for x in alphas]
    # |r| from which rounding gives inf (inf for fp32 math into fp32: as np.float32 the fp32 threshold is inf)
    limit = wide(_ROWS[out_dtype].overflow)
    o_bits = [o.view(_BITS[out_dtype]) for o in outs]
    p_in, c_in = prev.view(_BITS[prev_dtype]), cur.view(_BITS[cur_dtype])
    found = [0] * len(outs)
    piece = PIECE
    c_buf, d_buf, r_buf, u32, f32 = _buffers(wide, piece)
    for start in range(0, n, piece):
        stop = min(n, start + piece)
        if stop - start < piece:
            m = stop - start
            c_buf, d_buf, r_buf, u32, f32 = c_buf[:m], d_buf[:m], r_buf[:m], u32[:m], f32[:m]
        c_bits, p_bits = c_in[start:stop], p_in[start:stop]
        c = _widen(c_bits, cur_dtype, wide, c_buf, u32)
        d = None
        for k, ak in enumerate(a):
            o = o_bits[k][start:stop]
            if ak == 0:  # cur, rounded once (its own bytes in its own dtype), even where prev is inf or NaN
                if out_dtype == cur_dtype:
                    o[...] = c_bits
                    continue
                r = r_buf
                r[...] = c
            else:
                if d is None:  # d = cur - prev, once for every alpha
                    d = np.subtract(c, _widen(p_bits, prev_dtype, wide, d_buf, u32), out=d_buf)
                r = np.multiply(d, ak, out=r_buf)  # t = alpha * d
                np.add(c, r, out=r)  # r = cur + t
            if not (r.max() < limit and r.min() > -limit):  # NaN, inf or overflow (rare): the exact path
                found[k] += _store_exact(o, out_dtype, r, c, p_bits, prev_dtype, u32, f32)
            else:
                _store(o, out_dtype, r, u32, f32)
    return found


def _buffers(wide: type, size: int) -> tuple[np.ndarray, ...]:
    """This thread's scratch: widened cur, widened prev then d, r, uint32 and fp32 scratch."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    key = (wide, size)
    if key not in bufs:
        bufs.clear()
        bufs[key] = (*(np.zeros(size, wide) for _ in range(3)), np.zeros(size, np.uint32), np.zeros(size, np.float32))
    return bufs[key]


def _widen(bits: np.ndarray, name: str, wide: type, buf: np.ndarray, u32: np.ndarray) -> np.ndarray:
    """The values as ``wide`` (exact): a view of the input when it already is ``wide``, else ``buf``."""
    if name == "BF16":
        u = buf.view(np.uint32) if wide is np.float32 else u32
        np.copyto(u, bits)  # two plain passes: a casting shift is three times slower
        np.left_shift(u, 16, out=u)
        if wide is np.float32:
            return buf
        np.copyto(buf, u.view(np.float32))
        return buf
    values = bits.view(_FLOAT[name])
    if values.dtype == wide:
        return values
    np.copyto(buf, values)
    return buf


def _store(o: np.ndarray, name: str, r: np.ndarray, u32: np.ndarray, f32: np.ndarray) -> None:
    """Round ``r`` once into ``o`` (the output's bits). ``r`` is overwritten; ``u32`` and ``f32`` are scratch."""
    if r.dtype == np.float64 and name in ("F16", "BF16"):
        r = _round_to_odd_fp32(r, f32)  # then rounding to 16 bits below is one correct rounding
    if name == "BF16":
        u = r.view(np.uint32)  # nearest-even on the bits: add 0x7FFF plus the kept part's lowest bit, drop 16 bits
        np.right_shift(u, 16, out=u32)
        np.bitwise_and(u32, 1, out=u32)
        np.add(u, u32, out=u)
        np.add(u, 0x7FFF, out=u)  # NaN bits may carry into the sign: NaN goes through _store_exact
        np.right_shift(u, 16, out=u)
        np.copyto(o, u, casting="unsafe")
    else:
        np.copyto(o.view(_FLOAT[name]), r, casting="same_kind")  # nearest-even, subnormals included


def _store_exact(
    o: np.ndarray,
    name: str,
    r: np.ndarray,
    c: np.ndarray,
    p_bits: np.ndarray,
    p_name: str,
    u32: np.ndarray,
    f32: np.ndarray,
) -> int:
    """``_store``, then NaN made canonical; returns the count of non-finite outputs whose inputs were finite.

    PREV is widened again (its scratch now holds d), into fresh buffers: this path is rare."""
    nan = np.isnan(r)
    _store(o, name, r, u32, f32)
    o[nan] = _ROWS[name].nan  # canonical
    row = _ROWS[name]  # 16 bits are checked as bits (numpy has no bf16): sign cleared, exponent all ones
    bad = ((o & 0x7FFF) >= row.nonfinite_from) if row.itemsize == 2 else ~np.isfinite(o.view(_FLOAT[name]))
    p = _widen(p_bits, p_name, c.dtype.type, np.empty(len(c), c.dtype), np.empty(len(c), np.uint32))
    return int(np.count_nonzero(bad & np.isfinite(c) & np.isfinite(p)))


def _round_to_odd_fp32(x: np.ndarray, f: np.ndarray) -> np.ndarray:
    """fp64 -> fp32 rounding to odd, into ``f`` (the torch twin's steps, on numpy)."""
    np.copyto(f, x, casting="same_kind")
    u32 = f.view(np.uint32)
    back = f.astype(np.float64)
    inexact = back != x
    u32 -= (inexact & (np.abs(back) > np.abs(x))).view(np.uint8)  # step the magnitude down to truncation
    u32 |= inexact.view(np.uint8)
    return f
