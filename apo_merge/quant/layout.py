"""Which tensors of a checkpoint are quantized, and how: config.json's ``quantization_config`` and the tensor
names/dtypes must agree, or the merge stops before any output exists.

- FP8 block-scaled (DeepSeek-V3/R1, Kimi-K2, Qwen3 FP8): a ``F8_E4M3`` weight ``W`` [out, in] beside a ``F32``
  ``W_scale_inv`` [ceil(out/bo), ceil(in/bi)], config ``{quant_method: fp8, fmt: e4m3, weight_block_size: [bo, bi]}``.
- compressed-tensors FP8 (``quant_method: compressed-tensors``, format ``float-quantized``): a ``F8_E4M3``
  ``X.weight`` beside ``X.weight_scale`` per tensor ([] / [1]), per channel ([out, 1]) or per block; the static
  activation scales ``X.input_scale`` are dropped (they describe activations, not the weight).
- MXFP4 (gpt-oss, ``quant_method: mxfp4``): see ``quant.mxfp4``.

``fold`` turns each quantized weight and its scales into one ``QuantInfo`` source that the kernel sees as F32; the
scales leave the plan. FP8 scales of both layouts are one 2-D grid of blocks (per tensor: one block; per channel:
blocks of one row), so one dequantizer serves both.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from apo_merge.errors import MergeError, shown
from apo_merge.io.checkpoint import Checkpoint
from apo_merge.io.header import FileHeader, TensorInfo, read_regular_file

SCALE_SUFFIX = "_scale_inv"
CONFIG_NAME = "config.json"
_MAX_CONFIG_BYTES = 16 << 20
# names of quantized parts: MXFP4 blocks/scales, compressed-tensors, GPTQ/AWQ, bitsandbytes
_PACKED_SUFFIXES = ("_blocks", "_scales", "_scale", "weight_packed", "zero_point", "qweight", "qzeros", "absmax")
READS = "apo-merge reads fp8 e4m3 block-scaled, compressed-tensors float-quantized fp8 and mxfp4 checkpoints"
CT_SCALE = "_scale"  # compressed-tensors: X.weight -> X.weight_scale
CT_DROPPED = ".input_scale"  # compressed-tensors' static activation scales: no part of any weight
_FP8_WHAT = "FP8 block-scaled weights (F8_E4M3, {}x{} blocks): fp32(w) * its block's weight_scale_inv"
_CT_WHAT = "compressed-tensors FP8 weights (F8_E4M3, per {}): fp32(w) * its weight_scale (input_scale dropped)"
_ROUNDING = " (one fp32 rounding), then the fp32 step; scale tensors dropped"


@dataclass(frozen=True)
class QuantInfo(TensorInfo):
    """A quantized weight read as fp32: ``dtype`` is F32 (what the kernel sees), ``raw_dtype`` the stored dtype,
    ``begin``/``end`` the stored bytes; ``scale`` is where its block scales live (any shard)."""

    raw_dtype: str = "F8_E4M3"
    block: tuple[int, int] = (128, 128)
    scale: tuple[FileHeader, TensorInfo] | None = None
    kind: str = "fp8"  # "fp8": fp32(w) * its block's scale; "mxfp4": see quant.mxfp4


@dataclass(frozen=True)
class Folded:
    """A checkpoint's tensors as the plan sees them, and what was folded (for the card and the config)."""

    tensors: dict[str, tuple[FileHeader, TensorInfo]]
    dequantized: tuple[str, ...] = ()  # names of the quantized weights, read as fp32
    what: str = ""  # for the card: the layout and the formula

    def describe(self) -> str:
        return f"{len(self.dequantized)} {self.what}"


def _short(name: str) -> str:
    return shown(name, 80, quote=False)


def quantization_config(ckpt: Checkpoint) -> dict | None:
    """config.json's ``quantization_config`` (None when there is no config.json or no such key)."""
    path = ckpt.root / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        config = json.loads(read_regular_file(path, _MAX_CONFIG_BYTES))
    except (OSError, ValueError) as e:
        raise MergeError(f"{path}: cannot be read as JSON ({e}); restore the checkpoint's config.json") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if qc is not None and not isinstance(qc, dict):
        raise MergeError(f"{path}: quantization_config is not an object; restore the checkpoint's config.json")
    return qc


def _packed(source: tuple[FileHeader, TensorInfo]) -> bool:
    """Whether a tensor looks like part of a quantized weight (copied as bytes, it would be silently wrong)."""
    info = source[1]
    return info.dtype in ("U8", "I8", "I32", "U32") or info.name.endswith(_PACKED_SUFFIXES)


def _block(qc: dict | None, ckpt: Checkpoint, side: str) -> tuple[int, int]:
    where = f"{side} {ckpt.label}"
    if qc is not None and qc.get("quant_method") == "compressed-tensors":
        return ct_strategies(qc, where)
    if qc is None:
        raise MergeError(
            f"{where}: holds F8 weights or *{SCALE_SUFFIX} scales but its config.json has no quantization_config; "
            "put the release's config.json (quant_method fp8, weight_block_size) beside the weights"
        )
    method, fmt, block = qc.get("quant_method"), qc.get("fmt", "e4m3"), qc.get("weight_block_size")
    if method != "fp8" or fmt != "e4m3":
        raise MergeError(
            f"{where}: quantization_config quant_method {shown(method, 40)} fmt {shown(fmt, 20)} is not supported "
            f"({READS}); dequantize it to bf16 first"
        )
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and 0 < b <= 1 << 20 for b in block)):
        raise MergeError(
            f"{where}: quantization_config.weight_block_size is {shown(block, 40)}, not two positive block sizes "
            "(e.g. [128, 128]); restore the release's config.json"
        )
    return block[0], block[1]


def ct_strategies(qc: dict, where: str) -> dict:
    """compressed-tensors' weight strategies from ``config_groups`` ({"tensor": None, "channel": None, "block":
    [bo, bi]}); anything but 8-bit float weights in the float-quantized format is refused."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise MergeError(
            f"{where}: quantization_config (compressed-tensors) has no config_groups; restore the release's config.json"
        )
    out: dict = {}
    for group in groups.values():
        group = group if isinstance(group, dict) else {}
        weights = group.get("weights") if isinstance(group.get("weights"), dict) else {}
        fmt = group.get("format") or qc.get("format")
        kind, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
        if fmt not in ("float-quantized", "naive-quantized") or kind != "float" or bits != 8:
            raise MergeError(
                f"{where}: compressed-tensors format {shown(fmt, 30)} with {shown(kind, 10)} {shown(bits, 10)}-bit "
                f"weights is not supported ({READS}); dequantize it to bf16 first"
            )
        block = weights.get("block_structure")
        if strategy not in ("tensor", "channel", "block") or (
            strategy == "block"
            and not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block))
        ):
            raise MergeError(
                f"{where}: compressed-tensors weight strategy {shown(strategy, 20)} (block_structure "
                f"{shown(block, 30)}) is not supported (per tensor, channel or block); dequantize it to bf16 first"
            )
        out[strategy] = tuple(block) if strategy == "block" else None
    return out


def fold(ckpt: Checkpoint, side: str) -> Folded:
    """``ckpt``'s tensors with every quantized weight and its scales folded into one ``QuantInfo`` (F32 to the
    plan). ``side`` ("PREV" / "CUR") names the input in messages. Any other quantization is refused."""
    tensors = ckpt.tensors
    qc = quantization_config(ckpt)
    method = qc.get("quant_method") if qc is not None else None
    if method == "mxfp4" or any(n.endswith("_blocks") and i.dtype == "U8" for n, (_, i) in tensors.items()):
        from apo_merge.quant import mxfp4  # it builds on this module

        return mxfp4.fold(ckpt, side, qc)
    ct = method == "compressed-tensors"
    suffix = CT_SCALE if ct else SCALE_SUFFIX
    f8 = [n for n, (_, i) in tensors.items() if i.dtype.startswith("F8")]
    scales = [n for n in tensors if n.endswith("weight" + CT_SCALE if ct else SCALE_SUFFIX)]
    if not f8 and not scales:
        if qc is not None and method != "fp8" and any(map(_packed, tensors.values())):
            raise MergeError(
                f"{side} {ckpt.label}: quantization_config quant_method {shown(method, 40)} is not "
                f"supported ({READS}); dequantize it to bf16 first"
            )
        return Folded(tensors)
    block = _block(qc, ckpt, side)
    odd = [n for n in tensors if ct and n.endswith(("weight_zero_point", "weight_g_idx"))]
    if odd:  # an asymmetric or reordered weight: fp32(w) * scale alone would be silently wrong
        raise MergeError(
            f"{side} {ckpt.label}: holds {_short(odd[0])}, a zero point or group index that compressed-tensors FP8 "
            "as apo-merge reads it (symmetric) does not have; dequantize it to bf16 first"
        )
    for s in scales:
        w = tensors.get(s[: -len(suffix)])
        if w is None or not w[1].dtype.startswith("F8"):
            raise MergeError(
                f"{side} {ckpt.label}: scale {_short(s)} ({tensors[s][0].path.name}) has no F8 weight "
                f"{_short(s[: -len(suffix)])}; the checkpoint is incomplete, download every shard again"
            )
    out: dict[str, tuple[FileHeader, TensorInfo]] = {}
    kinds = set()
    for name, (header, info) in tensors.items():
        if name in scales or (ct and name.endswith(CT_DROPPED)):
            continue
        if name in f8:
            info = _quant_info(ckpt, side, (header, info), suffix, block)
            kinds.add("tensor" if info.block == info.shape else "channel" if info.block[0] == 1 else "block")
        out[name] = (header, info)
    what = _CT_WHAT.format("/".join(sorted(kinds))) if ct else _FP8_WHAT.format(*block)
    return Folded(out, tuple(f8), what + _ROUNDING)


def _ct_block(shape: tuple[int, ...], grid: list[int], strategies: dict) -> tuple[int, int] | None:
    """The block of a compressed-tensors weight whose scale has shape ``grid`` (None: no strategy fits)."""
    rows, cols = shape
    if "tensor" in strategies and math.prod(grid) == 1 and len(grid) <= 2:
        return max(rows, 1), max(cols, 1)
    if "channel" in strategies and grid == [rows, 1]:
        return 1, max(cols, 1)
    block = strategies.get("block")
    if block and grid == [math.ceil(rows / block[0]), math.ceil(cols / block[1])]:
        return block
    return None


def _quant_info(ckpt: Checkpoint, side: str, weight: tuple[FileHeader, TensorInfo], suffix: str, block) -> QuantInfo:
    header, info = weight
    where = f"{side} {ckpt.label}: {_short(info.name)} ({header.path.name})"
    if info.dtype != "F8_E4M3":
        raise MergeError(f"{where}: dtype {info.dtype} is not the config's fp8 e4m3; dequantize it to bf16 first")
    scale = ckpt.tensors.get(info.name + suffix)
    if scale is None:
        raise MergeError(
            f"{where}: is F8_E4M3 but has no {_short(info.name + suffix)} tensor; the checkpoint is incomplete, "
            "download every shard again"
        )
    if len(info.shape) != 2:
        raise MergeError(
            f"{where}: an FP8 weight of shape {list(info.shape)} is not 2-D, which apo-merge does not read; "
            "dequantize it to bf16 first"
        )
    if scale[1].dtype not in ("F32", "BF16", "F16"):
        raise MergeError(f"{where}: its scale is {scale[1].dtype}, not F32, BF16 or F16; dequantize it to bf16 first")
    grid = list(scale[1].shape)
    if isinstance(block, dict):  # compressed-tensors: the scale's shape says which strategy
        found = _ct_block(info.shape, grid, block)
        if found is None:
            raise MergeError(
                f"{where}: its weight_scale has shape {grid}, which fits none of the config's compressed-tensors "
                f"strategies {sorted(block)} (per tensor [] / [1], per channel [{info.shape[0]}, 1], per block); "
                "the config does not match the weights"
            )
        block = found
    want = [math.ceil(info.shape[0] / block[0]), math.ceil(info.shape[1] / block[1])]
    if grid != want and not (math.prod(grid) == 1 == math.prod(want)):
        raise MergeError(
            f"{where}: its scale has shape {grid} but weight_block_size {list(block)} needs "
            f"{want}; the config's block size does not match the weights"
        )
    return QuantInfo(info.name, "F32", info.shape, info.begin, info.end, raw_dtype=info.dtype, block=block, scale=scale)


def card_rows(dequantized: dict[str, str]) -> list[tuple[str, str]]:
    """The model card's rows saying what was read dequantized (none for unquantized inputs)."""
    return [(f"{side.lower()} dequantized", what) for side, what in dequantized.items()]


def strip_config(folder) -> None:
    """Remove ``quantization_config`` from the output's config.json (copied from a quantized CUR): its weights are
    no longer quantized, and a loader following the key would misread them. Written anew, never in place."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return
    config = json.loads(read_regular_file(path, _MAX_CONFIG_BYTES))
    if isinstance(config, dict) and config.pop("quantization_config", None) is not None:
        tmp = path.with_name(CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
