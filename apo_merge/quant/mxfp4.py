"""MXFP4 as gpt-oss stores its experts, read exactly as transformers' ``convert_moe_packed_tensors`` dequantizes it.

On disk (config ``quantization_config: {quant_method: mxfp4, modules_to_not_convert: [...]}``): ``P_blocks`` U8
[E, R, G, 16] (two e2m1 values per byte, the low nibble first) and ``P_scales`` U8 [E, R, G] (E8M0: 2^(s-127) per
group of 32 values). transformers loads them as ``P`` = [E, G*32, R]: each row of R decoded to G*32 values, then
dims 1 and 2 swapped (``gate_up_proj`` [E, hidden, 2*intermediate], ``down_proj`` [E, intermediate, hidden]), which
is what a trainer that loaded the base dequantized saves. ``fold`` names and shapes the source that way.

Exact: every e2m1 value times 2^(s-127), s in 0..254, is one fp32 product (2^-127 is an fp32 subnormal; the result
is exact or, for s >= 253, overflows to inf exactly as transformers' ``ldexp`` does); s = 255 is E8M0's NaN: refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from apo_merge.errors import MergeError, shown
from apo_merge.io.checkpoint import Checkpoint
from apo_merge.io.header import FileHeader, TensorInfo
from apo_merge.quant.layout import Folded, QuantInfo

BLOCKS, SCALES = "_blocks", "_scales"
GROUP = 32  # values per scale: 16 bytes of two nibbles
FP4 = np.array([0.0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
POW2 = np.append(np.ldexp(np.float64(1), np.arange(255) - 127), np.nan).astype(np.float32)  # s -> 2^(s-127), exact
WHAT = (
    "MXFP4 weights (U8 *_blocks + E8M0 *_scales, groups of 32): e2m1(nibble, low first) * 2^(scale-127), "
    "dims 1 and 2 swapped as transformers' convert_moe_packed_tensors does (one fp32 product, exact), "
    "then the fp32 step; *_blocks/*_scales read as the tensor without the suffix"
)

Pread = Callable[[FileHeader, memoryview, int], None]


def _short(name: str) -> str:
    return shown(name, 80, quote=False)


def fold(ckpt: Checkpoint, side: str, qc: dict | None) -> Folded:
    """``ckpt``'s tensors with every ``P_blocks`` + ``P_scales`` folded into one ``QuantInfo`` named ``P``."""
    where = f"{side} {ckpt.label}"
    tensors = ckpt.tensors
    if qc is None or qc.get("quant_method") != "mxfp4":
        raise MergeError(
            f"{where}: holds U8 *{BLOCKS} tensors but its config.json's quantization_config is "
            f"{shown(qc and qc.get('quant_method'), 40)}, not mxfp4; put the release's config.json beside the weights"
        )
    for name, (header, _) in tensors.items():
        if name.endswith(SCALES) and name.removesuffix(SCALES) + BLOCKS not in tensors:
            raise MergeError(
                f"{where}: scales {_short(name)} ({header.path.name}) have no {_short(name.removesuffix(SCALES))}"
                f"{BLOCKS} tensor; the checkpoint is incomplete, download every shard again"
            )
    out: dict[str, tuple[FileHeader, TensorInfo]] = {}
    folded = []
    for name, (header, info) in tensors.items():
        if name.endswith(SCALES):
            continue
        if name.endswith(BLOCKS):
            target = name.removesuffix(BLOCKS)
            if target in tensors:
                raise MergeError(
                    f"{where}: holds both {_short(name)} and {_short(target)}; the checkpoint mixes two layouts, "
                    "download it again"
                )
            info = _info(ckpt, where, (header, info), target)
            folded.append(target)
            name = target
        out[name] = (header, info)
    return Folded(out, tuple(folded), WHAT)


def _info(ckpt: Checkpoint, where: str, blocks: tuple[FileHeader, TensorInfo], target: str) -> QuantInfo:
    header, info = blocks
    where = f"{where}: {_short(info.name)} ({header.path.name})"
    scale = ckpt.tensors.get(target + SCALES)
    if scale is None:
        raise MergeError(
            f"{where}: has no {_short(target + SCALES)} tensor; the checkpoint is incomplete, download every shard again"
        )
    shape, sshape = list(info.shape), list(scale[1].shape)
    if info.dtype != "U8" or scale[1].dtype != "U8" or len(shape) != 4 or shape[3] != GROUP // 2:
        raise MergeError(
            f"{where}: MXFP4 blocks must be U8 [experts, rows, groups, 16] with U8 scales, not {info.dtype} {shape} "
            f"with {scale[1].dtype} scales; dequantize it to bf16 first"
        )
    if sshape != shape[:3]:
        raise MergeError(
            f"{where}: its scales have shape {sshape} but blocks {shape} need {shape[:3]} (one scale per 32 values); "
            "the checkpoint is damaged, download it again"
        )
    experts, rows, groups, _ = shape
    return QuantInfo(
        target, "F32", (experts, groups * GROUP, rows), info.begin, info.end, raw_dtype="U8", scale=scale, kind="mxfp4"
    )


def read_experts(pread: Pread, source: tuple[FileHeader, QuantInfo], begin: int, count: int, cache: dict) -> list:
    """The (expert, blocks [R, G, 16], scales [R, G]) that elements ``begin..begin+count`` come from, read whole
    (one expert's bytes: a chunk of the swapped tensor reads across every row of it) and kept for the next chunks."""
    header, info = source
    experts, width, rows = info.shape
    per = width * rows
    if count == 0:
        return []
    out = []
    groups = width // GROUP
    for e in range(begin // per, (begin + count - 1) // per + 1):
        key = (header.path, info.name, e)
        if key not in cache:
            if len(cache) >= 4:  # two sides, a chunk across two experts; tasks in flight keep theirs alive
                cache.clear()
            blk = np.empty((rows, groups, GROUP // 2), np.uint8)
            pread(header, memoryview(blk.reshape(-1)), info.begin + e * blk.size)
            sh, si = info.scale
            scales = np.empty((rows, groups), np.uint8)
            pread(sh, memoryview(scales.reshape(-1)), si.begin + e * scales.size)
            bad = int(np.count_nonzero(scales == 255))
            if bad:
                raise MergeError(
                    f"{_short(si.name)} ({sh.path}): {bad} of its E8M0 scales are 255 (NaN), so its weight cannot "
                    "be dequantized; the checkpoint is damaged, download it again"
                )
            cache[key] = (blk, scales)
        out.append((e, *cache[key]))
    return out


def spans(experts: list, begin: int, count: int, info: QuantInfo) -> Iterator[tuple]:
    """Per expert the chunk ``begin..begin+count`` reaches: ``(blocks, scales, lo, hi, pos)``, its elements
    ``lo..hi`` within that expert's swapped [width, rows] matrix going to ``pos..`` of the chunk."""
    _, width, rows = info.shape
    per, pos, end = width * rows, 0, begin + count
    for e, blk, scales in experts:
        lo, hi = max(begin, e * per) - e * per, min(end, (e + 1) * per) - e * per
        if lo < hi:
            yield blk, scales, lo, hi, pos
            pos += hi - lo


def dequant_experts(
    experts: list, begin: int, info: QuantInfo, out: np.ndarray, compiled: Callable | None = None
) -> None:
    """``out`` (float32) = elements ``begin..begin+len(out)`` of ``info``'s dequantized, swapped tensor; with
    ``compiled`` (``apo_kernels.cpass.dequant_mxfp4()``) in one pass per expert, the same products."""
    for blk, scales, lo, hi, pos in spans(experts, begin, len(out), info):
        if compiled is not None:
            compiled(out[pos : pos + hi - lo], blk, scales, FP4, POW2, (*scales.shape, lo, hi))
        else:
            _dequant_numpy(blk, scales, lo, hi, out[pos : pos + hi - lo])


def _dequant_numpy(blk: np.ndarray, scales: np.ndarray, lo: int, hi: int, out: np.ndarray) -> None:
    """The numpy lines (the reference of the compiled pass and the Triton kernel): elements ``lo..hi`` of one
    expert into ``out``, over whole stored rows of the groups they reach."""
    rows = scales.shape[0]
    h0, h1 = lo // rows, (hi - 1) // rows + 1  # its rows of the swapped [width, rows] matrix
    g0, g1 = h0 // GROUP, (h1 - 1) // GROUP + 1
    b = blk[:, g0:g1]
    vals = np.empty((rows, g1 - g0, GROUP // 2, 2), np.float32)
    vals[..., 0] = FP4[b & 0x0F]
    vals[..., 1] = FP4[b >> 4]
    with np.errstate(over="ignore"):  # s >= 253: inf, as transformers' ldexp gives
        vals *= POW2[scales[:, g0:g1]][:, :, None, None]
    part = vals.reshape(rows, (g1 - g0) * GROUP)[:, h0 - g0 * GROUP : h1 - g0 * GROUP].T.reshape(-1)
    skip = lo - h0 * rows
    out[:] = part[skip : skip + hi - lo]
