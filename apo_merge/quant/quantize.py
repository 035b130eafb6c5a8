"""FP8 block-scaled output (``--quantize fp8-block``): the merged fp32 result written back in the inputs' layout.

Per block of ``bo x bi`` elements (edge blocks partial), in fp32 as torch computes it::

    scale_inv = max(amax(|r|) / 448, 2**-126)        # the smallest normal fp32 keeps 1/scale_inv finite
    q = e4m3fn(r / scale_inv)                         # (r / s).to(torch.float8_e4m3fn): round to nearest even,
                                                      # saturating at +-448 as torch does
so ``fp32(q) * scale_inv`` (DeepSeek's ``weight_dequant``, vLLM's FP8 path) reads it back. An all-zero block
gets the floor scale and dequantizes to exact zeros. A non-finite merged value would poison its block's amax:
the merge stops instead.

``QuantTarget`` (which weights, which block, which config) is decided by the plan; ``quantize_task`` runs in the
compute stage after the kernel, in place over the slot; the writer gathers each tensor's scales and error sums
(``TensorError``) in plan order, so the card's numbers never depend on how the work was cut.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

import numpy as np

from apo_merge.card import escape_name
from apo_merge.errors import MergeError, shorten, shown
from apo_merge.quant.dequant import fp8_values
from apo_merge.quant.layout import CONFIG_NAME, SCALE_SUFFIX, Folded, QuantInfo, quantization_config

E4M3_MAX = np.float32(448.0)
MIN_SCALE = np.float32(2.0**-126)
_MAX_TABLE = 50  # per-tensor rows in the card; the rest are counted
_PIECE = 1 << 16  # elements per step of the quantizer


@dataclass(frozen=True)
class QuantTarget:
    """What ``--quantize fp8-block`` writes back: ``side``'s FP8 weights (CUR's when CUR is quantized, else
    PREV's), in ``block``s, with that side's ``quantization_config``."""

    side: str
    block: tuple[int, int]
    names: frozenset[str]
    config: dict | None


def target(folded: dict[str, Folded], ckpts: dict, quantize: str) -> QuantTarget | None:
    """The weights to write back in FP8, or None without ``--quantize``; refused when neither input is FP8."""
    if quantize == "none":
        return None
    side = "CUR" if folded["CUR"].dequantized else "PREV"
    if not folded[side].dequantized:
        raise MergeError(
            "--quantize fp8-block writes the inputs' FP8 block-scaled layout back, but neither PREV nor CUR holds "
            "FP8 block-scaled weights (which weights to quantize and in which blocks would be a guess); drop "
            "--quantize"
        )
    config = quantization_config(ckpts[side]) or {}
    if config.get("quant_method") != "fp8" or not config.get("weight_block_size"):
        raise MergeError(
            f"--quantize fp8-block writes the FP8 block-scaled layout back, but {side} {ckpts[side].label} is "
            f"{shown(config.get('quant_method'), 30)}-quantized, not fp8 with weight_block_size; drop --quantize"
        )
    block = tuple(config["weight_block_size"])  # checked when the weights were folded
    return QuantTarget(side, block, frozenset(folded[side].dequantized), config)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def quant_pieces(piece, quant: QuantTarget) -> list:
    """A plan Piece of a weight in ``quant.names`` -> the output's FP8 weight and its scales. A CUR-only weight
    already in FP8 (read only to be copied) keeps its bytes and scales as they are."""
    info = piece.cur[1]
    if piece.convert and isinstance(info, QuantInfo):
        header, sinfo = info.scale
        return [
            replace(piece, dtype=info.raw_dtype, prev=None, convert=False),
            replace(
                piece, name=sinfo.name, dtype=sinfo.dtype, shape=sinfo.shape, cur=info.scale, prev=None, convert=False
            ),
        ]
    shape = scale_shape(piece.shape, quant.block)
    return [
        replace(piece, dtype="F8_E4M3", block=quant.block),
        replace(
            piece, name=scale_name(piece.name), dtype="F32", shape=shape, prev=None, convert=False, scales_of=piece.name
        ),
    ]


def to_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 -> e4m3fn bytes as torch's ``.to(torch.float8_e4m3fn)`` gives them for finite values: round to
    nearest even, -0 kept, beyond +-448 saturated to +-448 (torch 2.x on CPU and CUDA)."""
    u32 = np.uint32
    a = x.view(u32) & u32(0x7FFFFFFF)
    # normal results: 3 mantissa bits kept with round-to-nearest-even; the carry may bump the exponent
    enc = a >> u32(20)
    enc &= u32(1)
    enc += a
    enc += u32(0x7FFFF)
    enc >>= u32(20)
    enc -= u32(120 << 3)  # exponent bias 127 -> 7 (wraps below 2**-6: those are replaced below)
    np.minimum(enc, u32(0x7E), out=enc)  # 0x7F is NaN: beyond 448, 448
    out = enc.astype(np.uint8)
    small = a < u32(121 << 23)
    if small.any():  # below 2**-6 (subnormal e4m3, steps of 2**-9): fp32 addition to 2**14 rounds to that step
        tiny = a[small].view(np.float32) + np.float32(16384.0)
        out[small] = (tiny.view(u32) - u32(0x46800000)).astype(np.uint8)
    out |= ((x.view(u32) >> u32(24)) & u32(0x80)).astype(np.uint8)
    return out


def _bf16(x: np.ndarray) -> np.ndarray:
    """``x`` (finite float32) rounded to bf16 (nearest even), as float32."""
    u = x.view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)).view(np.float32)


@dataclass
class TensorError:
    """A quantized tensor's error against its bf16-rounded result, summed per block row in plan order."""

    max_abs: float = 0.0
    err2: list[float] = field(default_factory=list)  # per block row: sum of squared errors
    ref2: list[float] = field(default_factory=list)  # per block row: sum of squared bf16 results

    def add(self, other: TensorError) -> None:
        self.max_abs = max(self.max_abs, other.max_abs)
        self.err2 += other.err2
        self.ref2 += other.ref2

    @property
    def rel_rms(self) -> float:
        """RMS of the error over RMS of the bf16 result (0 for an all-zero tensor, which quantizes exactly)."""
        err, ref = math.fsum(self.err2), math.fsum(self.ref2)
        return math.sqrt(err / ref) if ref > 0 else 0.0


def quantize_rows(r: np.ndarray, block: tuple[int, int], name: str) -> tuple[np.ndarray, np.ndarray, TensorError]:
    """``r`` (float32, whole rows of a tensor, starting at a block row) -> (e4m3 bytes, scale_inv rows, error).
    Worked through in pieces of about ``_PIECE`` elements, so a worker's scratch stays a few MiB."""
    bo, bi = block
    rows, cols = r.shape
    bad = r.size - int(np.count_nonzero(np.isfinite(r)))
    if bad:
        raise MergeError(
            f"{shown(name, 80, quote=False)}: {bad} merged values are inf or NaN, which an FP8 block scale cannot "
            "hold (--quantize fp8-block); lower --alpha, or drop --quantize to see them in bf16"
        )
    starts = np.arange(0, cols, bi)
    q = np.empty(r.shape, np.uint8)
    scales = np.empty((math.ceil(rows / bo), len(starts)), np.float32)
    error = TensorError()
    table = fp8_values("F8_E4M3")
    step = max(1, _PIECE // cols)  # rows per piece, counted from the block row's start: the same in every run
    for i in range(scales.shape[0]):
        end = min(rows, (i + 1) * bo)
        pieces = [(a, min(a + step, end)) for a in range(i * bo, end, step)]
        colmax = np.zeros(cols, np.float32)
        for a, b in pieces:
            np.maximum(colmax, np.abs(r[a:b]).max(axis=0), out=colmax)
        scales[i] = np.maximum(np.maximum.reduceat(colmax, starts) / E4M3_MAX, MIN_SCALE)
        expanded = np.repeat(scales[i], bi)[:cols]
        for a, b in pieces:
            x = r[a:b]
            q[a:b] = to_e4m3(x / expanded)
            back = table[q[a:b]] * expanded  # fp32(q) * scale_inv, as a loader dequantizes
            ref = _bf16(x).astype(np.float64).reshape(-1)
            diff = back.reshape(-1) - ref
            error.max_abs = max(error.max_abs, float(np.abs(diff).max(initial=0.0)))
            error.err2.append(float(np.einsum("i,i->", diff, diff)))  # not BLAS: its threads cost 100x here
            error.ref2.append(float(np.einsum("i,i->", ref, ref)))
    return q.reshape(-1), scales, error


def quantize_task(task, n_out: int) -> None:
    """After the kernel: each output's fp32 rows in ``task``'s output buffers become e4m3 bytes at the front of the same
    buffer; ``task.qout`` gets (scale rows, error) per output (one for a chunk every output shares)."""
    if task.ready is not None:  # a GPU chunk: its fp32 rows are copied back asynchronously
        task.ready.synchronize()
    piece = task.piece
    cols = piece.shape[1]
    out = []
    for buf in task.out.arrays[: 1 if task.shared else n_out]:
        r = np.frombuffer(buf, np.float32, task.count).reshape(-1, cols)
        q, scales, error = quantize_rows(r, piece.block, piece.name)
        buf[: task.count] = q
        out.append((scales, error))
    task.qout = out


class Gathered:
    """The writer's part, per output: each quantized weight's scale rows (until its scales piece is written) and
    its error sums, gathered in plan order."""

    def __init__(self, n_out: int) -> None:
        self.scales: list[dict[str, bytearray]] = [{} for _ in range(n_out)]
        self.errors: list[dict[str, TensorError]] = [{} for _ in range(n_out)]

    def add(self, k: int, task) -> None:
        piece = task.piece
        scales, error = task.qout[0 if task.shared else k]
        buf = self.scales[k].get(piece.name)
        if buf is None:
            buf = self.scales[k][piece.name] = bytearray(math.prod(scale_shape(piece.shape, piece.block)) * 4)
        offset = task.begin // (piece.shape[1] * piece.block[0]) * scales.shape[1] * 4
        buf[offset : offset + scales.nbytes] = scales.astype("<f4").tobytes()
        self.errors[k].setdefault(piece.name, TensorError()).add(error)

    def take(self, k: int, name: str) -> memoryview:
        """Weight ``name``'s scale bytes for output ``k`` (all its rows are written by now: plan order)."""
        return memoryview(self.scales[k].pop(name))


def chunk_elems(piece, chunk_elems: int) -> int:
    """Elements per task of a quantized piece: whole block rows (at least one), about ``chunk_elems``."""
    row = piece.block[0] * piece.shape[1]
    return max(1, chunk_elems // row) * row


def write_config(folder, config: dict) -> None:
    """Give the output's config.json (copied from an unquantized CUR) PREV's ``quantization_config``: its
    weights are FP8 again, and loaders follow the key. Written anew, never in place; no config.json, nothing."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data["quantization_config"] = config
        tmp = path.with_name(CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)


def card_rows(dequant_rows: list[tuple[str, str]], quant: QuantTarget, errors: dict[str, TensorError]):
    """The card's rows (the dequantization rows, now saying the scales are written again, and a summary of the
    quantization error) and its per-tensor error table, worst first, at most ``_MAX_TABLE`` rows."""
    rows = [(k, v.replace("scale tensors dropped", "written back in FP8 (below)")) for k, v in dequant_rows]
    worst = sorted(errors.items(), key=lambda kv: (-kv[1].rel_rms, kv[0]))
    bo, bi = quant.block
    summary = (
        f"{len(errors)} weights in F8_E4M3 with F32 {SCALE_SUFFIX} per {bo}x{bi} block ({quant.side}'s layout): "
        "scale_inv = max(amax / 448, 2^-126), q = e4m3(r / scale_inv), nearest even"
    )
    if worst:
        summary += (
            f"; error against the bf16 result: max abs {max(e.max_abs for _, e in worst):.3g}, worst RMS "
            f"{worst[0][1].rel_rms:.3g} of its RMS"
        )
    rows.append(("quantized output", summary))
    lines = [
        "FP8 quantization error per tensor, against the merged result rounded once to bf16 (max abs; RMS of the "
        "error over RMS of the bf16 result), worst first:",
        "",
        "| tensor | max abs error | relative RMS error |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| `{escape_name(shorten(n, 120))}` | {e.max_abs:.3g} | {e.rel_rms:.3g} |" for n, e in worst[:_MAX_TABLE]
    ]
    if len(worst) > _MAX_TABLE:
        lines.append(f"| ... and {len(worst) - _MAX_TABLE} more tensors, each within the rows above | | |")
    return rows, "\n".join(lines) + "\n"
