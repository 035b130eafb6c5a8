"""FP8 block-scaled dequantization of one chunk: ``out[i] = fp32(w[i]) * scale[row // bo, col // bi]``.

The contract (DeepSeek's ``weight_dequant``, transformers' FP8 dequantization): every fp8 value is exact in fp32,
so the only rounding is the one fp32 product per element; numpy's float32 multiply is IEEE, so this is bit for
bit what torch's ``w.to(torch.float32) * scale_expanded`` gives, on any device.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from functools import cache

import numpy as np

from apo_kernels import cpass
from apo_kernels.dtypes import BY_NAME
from apo_merge.errors import MergeError, shown
from apo_merge.io.header import FileHeader
from apo_merge.quant import mxfp4
from apo_merge.quant.layout import QuantInfo

# pread(header, view, data_offset): fills ``view`` with the file's bytes at ``data_offset`` of its data buffer
Pread = Callable[[FileHeader, memoryview, int], None]


@cache
def fp8_values(name: str) -> np.ndarray:
    """The 256 values of an fp8 dtype as float32, indexed by bit pattern, from its row of the dtype table."""
    row = BY_NAME[name]
    _, e, m = row.bits
    bias = (1 << (e - 1)) - 1
    out = np.empty(256, np.float32)
    for b in range(256):
        sign = -1.0 if b >> (e + m) else 1.0
        exp, man = (b >> m) & ((1 << e) - 1), b & ((1 << m) - 1)
        if row.finite_top and b & 0x7F == 0x7F:  # E4M3FN: S.1111.111 is NaN, the rest of that exponent finite
            out[b] = math.nan
        elif exp == (1 << e) - 1 and not row.finite_top:  # IEEE: all-ones exponent is inf or NaN
            out[b] = math.nan if man else sign * math.inf
        elif exp == 0:
            out[b] = sign * math.ldexp(man, 1 - bias - m)
        else:
            out[b] = sign * math.ldexp((1 << m) | man, exp - bias - m)
    return out


@cache
def _fp8_pairs(name: str) -> np.ndarray:
    """Two values per entry, indexed by two bytes read as one little-endian uint16 (512 KiB): one gather per
    two elements (the gather is most of the dequantization's time)."""
    i = np.arange(1 << 16)
    values = fp8_values(name)
    return np.stack([values[i & 0xFF], values[i >> 8]], axis=1).view(np.uint64).reshape(-1)


def decode(raw: np.ndarray, name: str, out: np.ndarray) -> None:
    """``out[i] = fp32(raw[i])`` for fp8 bytes ``raw`` of dtype ``name`` (exact: every fp8 value is an fp32)."""
    half = len(raw) // 2
    np.take(_fp8_pairs(name), raw[: 2 * half].view(np.uint16), out=out[: 2 * half].view(np.uint64), mode="clip")
    if len(raw) % 2:
        out[-1] = fp8_values(name)[raw[-1]]


def dequant_block(raw: np.ndarray, begin: int, info: QuantInfo, scale: np.ndarray, out: np.ndarray) -> None:
    """Dequantize ``raw`` (uint8: elements ``begin..`` of ``info``'s flattened 2-D weight) into ``out`` (float32)."""
    decode(raw, info.raw_dtype, out)
    cols = info.shape[1]
    bo, bi = info.block
    pos, idx, n = 0, begin, len(raw)
    while pos < n:
        r, c = divmod(idx, cols)
        srow = np.repeat(scale[r // bo], bi)[:cols]  # this block row's scale for each column
        if c or n - pos < cols:  # part of one row
            k = min(cols - c, n - pos)
            out[pos : pos + k] *= srow[c : c + k]
        else:  # whole rows inside one block row
            k = min((n - pos) // cols, bo - r % bo) * cols
            seg = out[pos : pos + k].reshape(-1, cols)  # a view: multiplied in place
            seg *= srow
        pos, idx = pos + k, idx + k


def fp8_side(info: QuantInfo, scale: np.ndarray, begin: int) -> cpass.Fp8:
    """Elements ``begin..`` of FP8 weight ``info`` as the compiled code takes them (``apo_kernels.cpass.Fp8``)."""
    return fp8_values(info.raw_dtype), scale, (begin, info.shape[1], *info.block, scale.shape[1])


def split_whole(task, kinds: tuple[str, ...]) -> tuple[list, list]:
    """``task``'s quantized sides as (those of these kinds whose raw bytes fill the whole chunk, the rest): the
    first a compute stage may dequantize inside its kernel; parts of a packed tensor are the rest."""
    whole, rest = [], []
    for q in task.quant:
        (whole if q[1].kind in kinds and q[3][0] == 0 and q[3][2] == task.count else rest).append(q)
    return whole, rest


_local = threading.local()  # each compute thread's copy of the raw bytes
_COMPILED = cpass.dequant_fp8()  # apo_kernels' compiled pass where built, else the numpy lines below
_COMPILED_MXFP4 = cpass.dequant_mxfp4()  # likewise, else quant.mxfp4's numpy lines


def dequantize(task, parts=None) -> None:
    """The compute stage's part: each quantized side of ``task`` (an engine Task; or only ``parts``, some of its
    ``quant`` entries) from the raw bytes the reader left at the front of its slot buffer (of a part of it:
    ``offset``) to fp32 over the same buffer."""
    for side, info, scale, (offset, begin, count) in task.quant if parts is None else parts:
        view = task.slot.views[side][offset * 4 :]  # a part of a packed tensor starts past the chunk's front
        if info.kind == "mxfp4":  # ``scale``: the experts' blocks and scales
            mxfp4.dequant_experts(scale, begin, info, np.frombuffer(view, np.float32, count), _COMPILED_MXFP4)
            continue
        if _COMPILED is not None:  # one pass, in place, the same products (tests/merge/test_quant.py)
            _COMPILED(view, count, *fp8_side(info, scale, begin))
            continue
        raw = getattr(_local, "raw", None)
        if raw is None or raw.size < count:
            raw = _local.raw = np.empty(count, np.uint8)
        raw = raw[:count]
        raw[:] = np.frombuffer(view, np.uint8, count)
        out = np.frombuffer(view, np.float32, count)  # the slot's bytes: little-endian hosts only, as elsewhere
        dequant_block(raw, begin, info, scale, out)


class Dequantizer:
    """The read stage's part: a quantized chunk's raw bytes into the slot, and its tensor's scales (kept for the
    tensor's next chunks; at most two scale tensors at a time)."""

    def __init__(self, pread: Pread) -> None:
        self.pread = pread
        self._scales: dict[tuple, np.ndarray] = {}
        self._experts: dict[tuple, tuple] = {}

    def read(self, header: FileHeader, info: QuantInfo, view: memoryview, begin: int, count: int):
        """Read the raw bytes of elements ``begin..begin+count`` of ``info`` to the front of ``view``; return the
        tensor's scales (MXFP4: the blocks and scales of the experts the chunk spans, ``view`` untouched)."""
        if info.kind == "mxfp4":
            return mxfp4.read_experts(self.pread, (header, info), begin, count, self._experts)
        self.pread(header, view[:count], info.begin + begin)
        return self._scale(info)

    def _scale(self, info: QuantInfo) -> np.ndarray:
        sh, si = info.scale
        key = (sh.path, si.name)
        if key not in self._scales:
            if len(self._scales) >= 2:
                self._scales.clear()
            rows, cols = info.shape
            grid = (math.ceil(rows / info.block[0]), math.ceil(cols / info.block[1]))  # per tensor [] / [1]: 1x1
            arr = np.empty(grid, np.float32)
            if si.dtype in ("BF16", "F16"):  # widened exactly: a bf16 is the top half of an fp32
                half = np.empty(grid, np.uint16)
                self.pread(sh, memoryview(half.reshape(-1).view(np.uint8)), si.begin)
                if si.dtype == "BF16":
                    arr.view(np.uint32)[...] = half.astype(np.uint32) << 16
                else:
                    arr[...] = half.view(np.float16)
            else:
                self.pread(sh, memoryview(arr.reshape(-1).view(np.uint8)), si.begin)
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            if bad:
                raise MergeError(
                    f"{shown(si.name, 80, quote=False)} ({sh.path}): {bad} of {arr.size} scales are inf or NaN, so "
                    "its weight cannot be dequantized; the checkpoint is damaged, download it again"
                )
            self._scales[key] = arr
        return self._scales[key]
