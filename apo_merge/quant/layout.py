"""Which tensors of a checkpoint are quantized, and how: config.json's ``quantization_config`` and the tensor
names/dtypes must agree, or the merge stops before any output exists.

FP8 block-scaled (DeepSeek-V3/R1, Kimi-K2, Qwen3 FP8): a ``F8_E4M3`` weight ``W`` [out, in] beside a ``F32``
``W_scale_inv`` [ceil(out/bo), ceil(in/bi)], config ``{quant_method: fp8, fmt: e4m3, weight_block_size: [bo, bi]}``.
``fold`` turns each such pair into one ``QuantInfo`` source that the kernel sees as F32; the scales leave the plan.
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


@dataclass(frozen=True)
class QuantInfo(TensorInfo):
    """A quantized weight read as fp32: ``dtype`` is F32 (what the kernel sees), ``raw_dtype`` the stored dtype,
    ``begin``/``end`` the stored bytes; ``scale`` is where its block scales live (any shard)."""

    raw_dtype: str = "F8_E4M3"
    block: tuple[int, int] = (128, 128)
    scale: tuple[FileHeader, TensorInfo] | None = None


@dataclass(frozen=True)
class Folded:
    """A checkpoint's tensors as the plan sees them, and what was folded (for the card and the config)."""

    tensors: dict[str, tuple[FileHeader, TensorInfo]]
    dequantized: tuple[str, ...] = ()  # names of the quantized weights, read as fp32
    block: tuple[int, int] | None = None

    def describe(self) -> str:
        return f"{len(self.dequantized)} FP8 block-scaled weights (F8_E4M3, {self.block[0]}x{self.block[1]} blocks)"


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
    if qc is None:
        raise MergeError(
            f"{where}: holds F8 weights or *{SCALE_SUFFIX} scales but its config.json has no quantization_config; "
            "put the release's config.json (quant_method fp8, weight_block_size) beside the weights"
        )
    method, fmt, block = qc.get("quant_method"), qc.get("fmt", "e4m3"), qc.get("weight_block_size")
    if method != "fp8" or fmt != "e4m3":
        raise MergeError(
            f"{where}: quantization_config quant_method {shown(method, 40)} fmt {shown(fmt, 20)} is not supported "
            "(apo-merge reads fp8 e4m3 block-scaled checkpoints); dequantize it to bf16 first"
        )
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and 0 < b <= 1 << 20 for b in block)):
        raise MergeError(
            f"{where}: quantization_config.weight_block_size is {shown(block, 40)}, not two positive block sizes "
            "(e.g. [128, 128]); restore the release's config.json"
        )
    return block[0], block[1]


def fold(ckpt: Checkpoint, side: str) -> Folded:
    """``ckpt``'s tensors with every FP8 weight and its ``_scale_inv`` folded into one ``QuantInfo`` (F32 to the
    plan). ``side`` ("PREV" / "CUR") names the input in messages. Any other quantization is refused."""
    tensors = ckpt.tensors
    f8 = [n for n, (_, i) in tensors.items() if i.dtype.startswith("F8")]
    scales = [n for n in tensors if n.endswith(SCALE_SUFFIX)]
    qc = quantization_config(ckpt)
    if not f8 and not scales:
        if qc is not None and qc.get("quant_method") != "fp8" and any(map(_packed, tensors.values())):
            raise MergeError(
                f"{side} {ckpt.label}: quantization_config quant_method {shown(qc.get('quant_method'), 40)} is not "
                "supported (apo-merge reads fp8 e4m3 block-scaled checkpoints); dequantize it to bf16 first"
            )
        return Folded(tensors)
    bo, bi = _block(qc, ckpt, side)
    for s in scales:
        w = tensors.get(s[: -len(SCALE_SUFFIX)])
        if w is None or not w[1].dtype.startswith("F8"):
            raise MergeError(
                f"{side} {ckpt.label}: scale {_short(s)} ({tensors[s][0].path.name}) has no F8 weight "
                f"{_short(s[: -len(SCALE_SUFFIX)])}; the checkpoint is incomplete, download every shard again"
            )
    out: dict[str, tuple[FileHeader, TensorInfo]] = {}
    for name, (header, info) in tensors.items():
        if name in scales:
            continue
        if name in f8:
            info = _quant_info(ckpt, side, (header, info), (bo, bi))
        out[name] = (header, info)
    return Folded(out, tuple(f8), (bo, bi))


def _quant_info(ckpt: Checkpoint, side: str, weight: tuple[FileHeader, TensorInfo], block) -> QuantInfo:
    header, info = weight
    where = f"{side} {ckpt.label}: {_short(info.name)} ({header.path.name})"
    if info.dtype != "F8_E4M3":
        raise MergeError(f"{where}: dtype {info.dtype} is not the config's fp8 e4m3; dequantize it to bf16 first")
    scale = ckpt.tensors.get(info.name + SCALE_SUFFIX)
    if scale is None:
        raise MergeError(
            f"{where}: is F8_E4M3 but has no {_short(info.name + SCALE_SUFFIX)} tensor; the checkpoint is incomplete, "
            "download every shard again"
        )
    if len(info.shape) != 2:
        raise MergeError(
            f"{where}: an FP8 block-scaled weight of shape {list(info.shape)} is not 2-D, which apo-merge does not read; dequantize it to bf16 first"
        )
    want = [math.ceil(info.shape[0] / block[0]), math.ceil(info.shape[1] / block[1])]
    if scale[1].dtype not in ("F32", "BF16"):
        raise MergeError(f"{where}: its scale is {scale[1].dtype}, not F32 or BF16; dequantize it to bf16 first")
    if list(scale[1].shape) != want:
        raise MergeError(
            f"{where}: its scale has shape {list(scale[1].shape)} but weight_block_size {list(block)} needs "
            f"{want}; the config's block size does not match the weights"
        )
    return QuantInfo(info.name, "F32", info.shape, info.begin, info.end, raw_dtype=info.dtype, block=block, scale=scale)


def card_rows(dequantized: dict[str, str]) -> list[tuple[str, str]]:
    """The model card's rows saying what was read dequantized (none for unquantized inputs)."""
    return [
        (
            f"{side.lower()} dequantized",
            f"{what}: fp32(w) * its block's weight_scale_inv (one fp32 rounding), then the fp32 step; "
            "scale tensors dropped",
        )
        for side, what in dequantized.items()
    ]


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
