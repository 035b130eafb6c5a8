"""The fused Triton kernel: one pass over prev and cur in their own dtypes, math in fp32 or fp64, one rounding.

Three layers: the private ``_kernel``, typed launchers (``_launch_one``, ``_launch_grouped``) that make inputs
contiguous and compute the grid, and ``extrapolate_`` / ``extrapolate_many_`` called by ``apo_kernels.ops``.
Every function here takes its tensors in the kernel's order: prev, cur, out.

CUDA tensors run the compiled kernel. CPU tensors run the very same kernel body under Triton's interpreter:
``_interpreted(kernel)`` wraps ``kernel.fn`` (the undecorated Python function) in ``InterpretedFunction`` explicitly,
so no TRITON_INTERPRET environment variable is needed and one process can run both (e.g. a pytest session on a
GPU machine comparing the interpreter, the compiled kernel and the CPU twin). The interpreter patches
``triton.language`` globally while it runs, hence the lock around it.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from apo_kernels.dtypes import of_torch

_BLOCK = 4096  # elements per program; BLOCK * element size is a multiple of 16 bytes for every dtype
_NUM_WARPS = 8
# Tensors up to this many elements are grouped into one launch per dtype triple (a launch costs a few us of GPU
# time however small its tensor); larger tensors amortize their own launch.
_GROUP_MAX_NUMEL = 1 << 20
# Without this the compiler contracts a * d + c into one fma (triton's default), which rounds once and no longer
# matches the CPU twin; with it, ptxas also gets --fmad=false.
_FP_OPTIONS = {"enable_fp_fusion": False}


@triton.jit(do_not_specialize=["alpha_hi", "alpha_lo"])
def _kernel(
    prev_ptr,
    cur_ptr,
    out_ptr,
    table_ptr,
    n,
    alpha_hi,
    alpha_lo,
    WIDE: tl.constexpr,
    NAN: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if GROUPED:
        # One table row per BLOCK-sized piece of a small tensor; the host only groups tensors whose addresses
        # and sizes are multiples of 16 (bytes, elements), so the hints below are true and loads vectorize.
        # prev_ptr, cur_ptr and out_ptr are members of the group: they only supply the pointer types.
        row = table_ptr + pid * 4
        prev_base = tl.multiple_of(tl.load(row).to(prev_ptr.dtype), 16)
        cur_base = tl.multiple_of(tl.load(row + 1).to(cur_ptr.dtype), 16)
        out_base = tl.multiple_of(tl.load(row + 2).to(out_ptr.dtype), 16)
        left = tl.multiple_of(tl.load(row + 3), 16)
    else:
        start = pid * BLOCK  # int64: tensors may exceed 2**31 elements
        prev_base = prev_ptr + start
        cur_base = cur_ptr + start
        out_base = out_ptr + start
        left = n - start
    offs = tl.arange(0, BLOCK)
    mask = offs < left
    p = tl.load(prev_base + offs, mask=mask)
    c = tl.load(cur_base + offs, mask=mask)

    # Exact upcasts. bf16 is widened with integer ops: the interpreter's bf16 -> fp32 cast mishandles subnormals.
    if p.dtype.is_bf16():
        p = (p.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    if c.dtype.is_bf16():
        c = (c.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    p = p.to(WIDE)
    c = c.to(WIDE)
    # alpha arrives as raw bits (already rounded to WIDE on the host), so every path sees the same value.
    if WIDE.is_fp64():
        a = ((alpha_hi.to(tl.int64) << 32) | alpha_lo.to(tl.uint32, bitcast=True).to(tl.int64)).to(
            tl.float64, bitcast=True
        )
    else:
        a = alpha_hi.to(tl.float32, bitcast=True)

    # Three separately rounded operations: no fused multiply-add (the launch passes enable_fp_fusion=False).
    d = c - p
    t = a * d
    r = tl.where(a == 0.0, c, c + t)  # alpha == 0 returns cur exactly, even where prev is inf or NaN

    # NaN becomes NAN, the output dtype's canonical pattern (apo_kernels.dtypes), as a same-width integer.
    OUT = out_ptr.dtype.element_ty
    if WIDE.is_fp64() and OUT.primitive_bitwidth == 16:
        # fp64 -> fp32 rounding to odd, then one round-to-nearest-even into 16 bits: with 24 >= 11 + 2 bits
        # this equals a direct correct rounding of the fp64 value (no double-rounding error).
        f = r.to(tl.float32)
        back = f.to(tl.float64)
        fb = f.to(tl.uint32, bitcast=True)
        inexact = back != r
        fb = tl.where(inexact & (tl.abs(back) > tl.abs(r)), fb - 1, fb)
        r = tl.where(inexact, fb | 1, fb).to(tl.float32, bitcast=True)
    if OUT.is_bf16():
        # Round to nearest even by hand: x.to(tl.bfloat16) truncates under the interpreter.
        b = r.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        y = tl.where(r != r, NAN, b).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif OUT.is_fp16():
        # fp32 -> fp16 rounds to nearest even both compiled (cvt.rn) and interpreted (numpy astype).
        h = r.to(tl.float16).to(tl.uint16, bitcast=True)
        y = tl.where(r != r, NAN, h).to(tl.uint16).to(tl.float16, bitcast=True)
    elif OUT.is_fp32():
        s = r.to(tl.float32).to(tl.uint32, bitcast=True)
        y = tl.where(r != r, NAN, s).to(tl.uint32).to(tl.float32, bitcast=True)
    else:
        w = r.to(tl.int64, bitcast=True)
        y = tl.where(r != r, NAN, w).to(tl.int64).to(tl.float64, bitcast=True)
    tl.store(out_base + offs, y, mask=mask)


_interpreter_lock = threading.Lock()
_interpreted_kernels: dict = {}  # a kernel's Python function -> its InterpretedFunction


def _interpreted(kernel):
    if kernel.fn not in _interpreted_kernels:
        from triton.runtime.interpreter import InterpretedFunction

        _interpreted_kernels[kernel.fn] = InterpretedFunction(kernel.fn)
    return _interpreted_kernels[kernel.fn]


def _is_compiled() -> bool:
    # False when TRITON_INTERPRET=1 was set before import: then ``_kernel`` itself is an interpreted function.
    return isinstance(_kernel, triton.runtime.JITFunction)


def _alpha_bits(alpha: float, wide: torch.dtype) -> tuple[int, int]:
    """``alpha`` (exact in ``wide``) as two signed 32-bit integers: high and low word of its bit pattern."""
    if wide == torch.float64:
        lo, hi = struct.unpack("<ii", struct.pack("<d", alpha))
        return hi, lo
    (bits,) = struct.unpack("<i", struct.pack("<f", alpha))
    return bits, 0


def _kernel_args(
    prev: torch.Tensor,
    cur: torch.Tensor,
    out: torch.Tensor,
    table: torch.Tensor | None,
    n: int,
    alpha: float,
    wide: torch.dtype,
) -> tuple[tuple, dict]:
    hi, lo = _alpha_bits(alpha, wide)
    const = {
        "WIDE": tl.float64 if wide == torch.float64 else tl.float32,
        "NAN": of_torch(out.dtype).nan,
        "GROUPED": table is not None,
        "BLOCK": _BLOCK,
    }
    return (prev, cur, out, table, n, hi, lo), const


def _launch_options() -> dict:
    return {"num_warps": _NUM_WARPS, **_FP_OPTIONS}


def _run(
    grid: tuple[int],
    prev: torch.Tensor,
    cur: torch.Tensor,
    out: torch.Tensor,
    table: torch.Tensor | None,
    n: int,
    alpha: float,
    wide: torch.dtype,
) -> None:
    args, const = _kernel_args(prev, cur, out, table, n, alpha, wide)
    _launch(_kernel, grid, out.device, args, const)


def _launch(kernel, grid: tuple[int], device: torch.device, args: tuple, const: dict) -> None:
    """Run one of this module's kernels: compiled on CUDA, else under the interpreter."""
    if device.type == "cuda" and _is_compiled():
        with torch.cuda.device(device):
            kernel[grid](*args, **const, **_launch_options())
    else:  # CPU tensors; or any device under TRITON_INTERPRET=1 (the interpreter copies through host memory)
        import numpy as np  # the interpreter computes with numpy; overflow to inf and NaN are expected here

        with _interpreter_lock, np.errstate(all="ignore"):
            _interpreted(kernel)[grid](*args, **const)


def _launch_one(prev: torch.Tensor, cur: torch.Tensor, out: torch.Tensor, alpha: float, wide: torch.dtype) -> None:
    n = out.numel()
    if n == 0:
        return
    o = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    _run((-(-n // _BLOCK),), prev.contiguous(), cur.contiguous(), o, None, n, alpha, wide)
    if o is not out:
        out.copy_(o)


def _groupable(prev: torch.Tensor, cur: torch.Tensor, out: torch.Tensor) -> bool:
    return (
        0 < out.numel() <= _GROUP_MAX_NUMEL
        and out.numel() % 16 == 0
        and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (prev, cur, out))
    )


def _launch_grouped(
    members: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], alpha: float, wide: torch.dtype
) -> None:
    """One launch over many small contiguous tensors sharing a dtype triple, through a table of addresses: per
    BLOCK-sized piece, the addresses of its prev, cur and out elements and the count of elements left."""
    rows = []
    for p, c, o in members:
        starts = torch.arange(0, o.numel(), _BLOCK, dtype=torch.int64)
        rows.append(
            torch.stack(
                [
                    p.data_ptr() + starts * p.element_size(),
                    c.data_ptr() + starts * c.element_size(),
                    o.data_ptr() + starts * o.element_size(),
                    o.numel() - starts,
                ],
                dim=1,
            )
        )
    table = torch.cat(rows)
    p, c, o = members[0]
    if o.device.type == "cuda":
        # Pinned and non-blocking: the upload queues on the stream without a host sync; the caching host
        # allocator keeps the pinned block until the copy has run.
        table = table.pin_memory().to(o.device, non_blocking=True)
    _run((table.shape[0],), p, c, o, table, 0, alpha, wide)


def extrapolate_(prev: torch.Tensor, cur: torch.Tensor, out: torch.Tensor, a: float, wide: torch.dtype) -> None:
    """``out = cur + a * (cur - prev)`` with the kernel, computing in ``wide``.

    ``apo_kernels.ops`` has validated the tensors, rounded ``a`` to ``wide`` and handled the alpha == 0 copy.
    """
    _launch_one(prev, cur, out, a, wide)


def extrapolate_many_(jobs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, torch.dtype]]) -> None:
    """``extrapolate_`` over ``(prev, cur, out, a, wide)`` jobs: small tensors grouped per (device, dtypes) into
    one launch (a, wide follow from the dtypes), large ones alone."""
    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    decided: dict[tuple, tuple[float, torch.dtype]] = {}
    for p, c, o, a, wide in jobs:
        if not _groupable(p, c, o) or not _can_group(o.device):
            _launch_one(p, c, o, a, wide)
        else:
            key = (o.device, p.dtype, c.dtype, o.dtype)
            groups.setdefault(key, []).append((p, c, o))
            decided[key] = (a, wide)
    for key, members in groups.items():
        if len(members) == 1:
            _launch_one(*members[0], *decided[key])
        else:
            _launch_grouped(members, *decided[key])


def _can_group(device: torch.device) -> bool:
    # The interpreter reads table addresses as host memory: only CPU tensors, or the compiled kernel on CUDA.
    return device.type == "cpu" or (device.type == "cuda" and _is_compiled())


# -- FP8 dequantization on the device: out = table[byte] * scale[row // bo, col // bi] --------------------------
@triton.jit
def _dequant_fp8_kernel(
    raw_ptr, table_ptr, scale_ptr, out_ptr, n, begin, cols, bo, bi, scale_cols, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    byte = tl.load(raw_ptr + offs, mask=mask, other=0).to(tl.int32)
    value = tl.load(table_ptr + byte, mask=mask, other=0.0)  # the fp8 value, exact in fp32
    idx = begin + offs  # the element's place in the flattened 2-D weight
    row = idx // cols
    col = idx - row * cols
    scale = tl.load(scale_ptr + (row // bo) * scale_cols + col // bi, mask=mask, other=1.0)
    tl.store(out_ptr + offs, value * scale, mask=mask)  # one fp32 product: the only rounding


def dequant_fp8_(
    raw: torch.Tensor, table: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, where: tuple[int, int, int, int]
) -> None:
    """``out[i] = table[raw[i]] * scale[r // bo, c // bi]`` where (r, c) is element ``begin + i`` of a weight with
    ``cols`` columns, ``where = (begin, cols, bo, bi)``: DeepSeek's ``weight_dequant`` (one fp32 product), the
    value the CPU paths give (apo_merge.quant.dequant). ``raw`` uint8, ``table`` the 256 fp32 values of the fp8
    dtype, ``scale`` the fp32 block grid, ``out`` fp32; all contiguous on one device (CPU: the interpreter)."""
    begin, cols, bo, bi = where
    _launch_dequant(_dequant_fp8_kernel, out, (raw, table, scale), (begin, cols, bo, bi, scale.shape[-1]))


def _launch_dequant(kernel, out: torch.Tensor, inputs: tuple, geometry: tuple) -> None:
    """A dequantization kernel over ``out``'s elements, one program per BLOCK: ``kernel(*inputs, out, n,
    *geometry)``."""
    n = out.numel()
    if n:
        _launch(kernel, (-(-n // _BLOCK),), out.device, (*inputs, out, n, *geometry), {"BLOCK": _BLOCK})


# -- MXFP4 dequantization on the device: one expert of gpt-oss's blocks/scales, read swapped --------------------
@triton.jit
def _dequant_mxfp4_kernel(blocks_ptr, scales_ptr, fp4_ptr, pow2_ptr, out_ptr, n, lo, rows, groups, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    k = lo + offs  # element k = h * rows + r of the swapped [groups * 32, rows] matrix: value h of stored row r
    h = k // rows
    r = k - h * rows
    at = r * groups + h // 32  # the (row, group) of its byte and scale
    byte = tl.load(blocks_ptr + at * 16 + (h % 32) // 2, mask=mask, other=0).to(tl.int32)
    nibble = (byte >> ((h % 2) * 4).to(tl.int32)) & 15  # the low nibble first
    value = tl.load(fp4_ptr + nibble, mask=mask, other=0.0)  # the e2m1 value, exact in fp32
    s = tl.load(scales_ptr + at, mask=mask, other=127).to(tl.int32)
    scale = tl.load(pow2_ptr + s, mask=mask, other=1.0)  # 2^(s-127), exact in fp32 (subnormal from s < 1)
    tl.store(out_ptr + offs, value * scale, mask=mask)  # one fp32 product: the only rounding


def dequant_mxfp4_(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor],
    out: torch.Tensor,
    span: tuple[int, int],
) -> None:
    """``out`` = elements ``lo..lo+len(out)`` of one MXFP4 expert's fp32 matrix read swapped, ``span = (lo, rows)``:
    element ``h * rows + r`` is ``fp4[nibble h of row r] * pow2[scales[r, h // 32]]``, transformers'
    ``convert_moe_packed_tensors`` and the CPU paths' value (apo_merge.quant.mxfp4). ``blocks`` uint8 [rows, groups,
    16], ``scales`` uint8 [rows, groups], ``tables`` = (fp4, pow2) fp32, ``out`` fp32; all contiguous on one device
    (CPU: the interpreter)."""
    lo, rows = span
    _launch_dequant(_dequant_mxfp4_kernel, out, (blocks, scales, *tables), (lo, rows, scales.numel() // rows))
