"""PREV + CUR headers -> a complete write plan: every output header is known before any data moves.

All input problems (missing names, shape or dtype mismatches) are found here, before any output exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from apo_kernels.dtypes import CLI_NAMES, ITEMSIZE, KERNEL_NAMES
from apo_merge.errors import MergeError, shown
from apo_merge.io.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint
from apo_merge.io.header import FileHeader, TensorInfo
from apo_merge.moe import align
from apo_merge.options import MergeOptions
from apo_merge.quant.layout import QuantInfo, fold
from apo_merge.quant.quantize import QuantTarget, quant_pieces, target

_MAX_LISTED = 10


@dataclass(frozen=True)
class Piece:
    """One output tensor: where its bytes go and where they come from (``prev is None``: copy CUR's bytes).

    ``convert``: a CUR-only tensor whose output dtype differs from CUR's; ``prev`` is then CUR itself and the
    engine computes it with alpha 0, which is CUR rounded once to the output dtype (raw bytes would be garbage).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute, in the output file
    cur: tuple[FileHeader, TensorInfo]
    prev: tuple[FileHeader, TensorInfo] | None
    convert: bool = False
    block: tuple[int, int] | None = None  # written as FP8 in these blocks (computed in fp32 first)
    scales_of: str | None = None  # holds the block scales computed for this weight (nothing is read)

    @property
    def compute_dtype(self) -> str:
        """What the kernel writes: fp32 for a piece quantized afterwards, else the output dtype."""
        return "F32" if self.block else self.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class OutFile:
    name: str
    header: bytes  # 8-byte length + padded JSON
    pieces: list[Piece]

    @property
    def size(self) -> int:
        return len(self.header) + sum(p.nbytes for p in self.pieces)


@dataclass
class Layout:
    """Output files with their headers and pieces, and the index content when sharded."""

    files: list[OutFile]
    index: dict | None  # model.safetensors.index.json content, when sharded

    @property
    def n_tensors(self) -> int:
        return sum(len(f.pieces) for f in self.files)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(kw_only=True)
class MergePlan(Layout):
    """A Layout whose pieces read PREV and CUR (``prev is None``: copied from CUR)."""

    prev: Checkpoint
    cur: Checkpoint
    alpha: float
    copied_cur_only: list[str] = field(default_factory=list)
    ignored_prev_only: list[str] = field(default_factory=list)
    dequantized: dict[str, str] = field(default_factory=dict)  # "PREV" / "CUR" -> what was read as fp32
    quantize: QuantTarget | None = None  # --quantize fp8-block: which weights are written back in FP8
    renamed: str = ""  # PREV's MoE experts read under CUR's other layout (apo_merge.moe), for the card

    @property
    def n_extrapolated(self) -> int:
        return sum(p.prev is not None and not p.convert for f in self.files for p in f.pieces)


def short(name: str, limit: int = 80) -> str:
    """A tensor name for a message, unquoted and bounded (a file can hold names megabytes long)."""
    return shown(name, limit, quote=False)


def _listed(names: list[str], show=short) -> str:
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(map(show, names[:_MAX_LISTED])) + more


def output_dtype(name: str, cur: TensorInfo, prev: TensorInfo | None, dtype: str, where: str = "") -> tuple[str, bool]:
    """Output dtype under ``--dtype dtype`` and whether the tensor is extrapolated (else copied from CUR).

    ``where`` names the input files in messages."""
    if cur.dtype in KERNEL_NAMES:
        if prev is not None and prev.dtype not in KERNEL_NAMES:
            raise MergeError(
                f"{short(name)}{where}: dtype {prev.dtype} in PREV but {cur.dtype} in CUR; both must be floating"
            )
        return (cur.dtype if dtype == "keep" else CLI_NAMES[dtype]), prev is not None
    if cur.dtype.startswith(("F8", "C")):
        raise MergeError(
            f"{short(name)}{where}: dtype {cur.dtype} is not supported (quantized or complex weights); "
            "dequantize to bf16/fp16/fp32 first"
        )
    return cur.dtype, False


def _header_bytes(entries: list[tuple[Piece, int]], metadata: dict[str, str]) -> bytes:
    body: dict[str, object] = {"__metadata__": metadata}
    for piece, begin in entries:
        body[piece.name] = {
            "dtype": piece.dtype,
            "shape": list(piece.shape),
            "data_offsets": [begin, begin + piece.nbytes],
        }
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the reference writer pads to a multiple of 8
    return len(raw).to_bytes(8, "little") + raw


def _shard_names(n: int) -> list[str]:
    return [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def lay_out(pieces: list[Piece], layout: Checkpoint, max_shard_size: int | None, metadata: dict[str, str]) -> Layout:
    """Place ``pieces`` (in this order; their offsets are ignored) into output files and build the index.

    Without ``max_shard_size`` each piece goes to the file named like the one its ``cur`` source lives in (the
    ``layout`` checkpoint's files: CUR's for a merge, BASE's for a LoRA merge); with it, into HF-named shards of
    at most that many bytes (a larger tensor gets a shard of its own).
    """
    groups: list[list[Piece]] = []
    if max_shard_size is None:
        by_file: dict[str, list[Piece]] = {}
        for piece in pieces:
            by_file.setdefault(piece.cur[0].path.name, []).append(piece)
        groups = list(by_file.values())
        names = list(by_file) if layout.index_name else [layout.files[0].path.name]
        for fname in names:  # kept names must not collide with the card, the index or side files
            if not fname.endswith(".safetensors") or fname == INDEX_NAME:
                raise MergeError(
                    f"{layout.root / (layout.index_name or fname)}: names shard {shown(fname, 80)}, which the output "
                    "cannot keep (a weight file must end in .safetensors; README.md would be replaced by the model "
                    "card); rename the shard in the index, or re-shard with --max-shard-size"
                )
    else:
        size = 0
        for piece in pieces:
            if not groups or (groups[-1] and size + piece.nbytes > max_shard_size):
                groups.append([])
                size = 0
            groups[-1].append(piece)
            size += piece.nbytes
        groups = groups or [[]]
        names = _shard_names(len(groups))

    meta = {"format": "pt", **metadata}
    files: list[OutFile] = []
    for fname, group in zip(names, groups):
        entries, begin = [], 0
        for piece in group:
            entries.append((piece, begin))
            begin += piece.nbytes
        header = _header_bytes(entries, meta)
        placed = [dataclasses.replace(pc, offset=len(header) + b) for pc, b in entries]
        files.append(OutFile(fname, header, placed))

    index = None
    if len(files) > 1 or (max_shard_size is None and layout.index_name):
        index = {
            "metadata": {"total_size": sum(p.nbytes for f in files for p in f.pieces)},
            "weight_map": dict(sorted((p.name, f.name) for f in files for p in f.pieces)),
        }
    return Layout(files, index)


def make_plan(
    prev: Checkpoint, cur: Checkpoint, options: MergeOptions, *, metadata: dict[str, str] | None = None
) -> MergePlan:
    """Match tensors by name across PREV and CUR and lay out the output files."""
    on_missing = options.on_missing
    if not cur.tensors:
        raise MergeError(f"CUR {cur.label}: holds no tensors; give a checkpoint with weights")
    folded = {"PREV": fold(prev, "PREV"), "CUR": fold(cur, "CUR")}  # quantized weights + scales -> fp32 sources
    prev_t, cur_t = folded["PREV"].tensors, folded["CUR"].tensors
    quant = target(folded, {"PREV": prev, "CUR": cur}, options.quantize)
    prev_t, renamed = align(prev_t, cur_t, f"PREV {prev.label}")  # per-expert vs packed MoE names
    if quant is not None and quant.side == "PREV" and renamed:
        raise MergeError(
            f"--quantize fp8-block would write PREV's FP8 layout back, but PREV {prev.label}'s MoE experts are named "
            "as CUR does not name them; drop --quantize, or give a CUR saved in PREV's layout"
        )
    cur_only = [n for n in cur_t if n not in prev_t]
    prev_only = [n for n in prev_t if n not in cur_t]
    if on_missing == "error" and (cur_only or prev_only):
        parts = []
        if cur_only:
            parts.append(f"only in CUR: {_listed(cur_only)}")
        if prev_only:
            parts.append(f"only in PREV: {_listed(prev_only)}")
        raise MergeError(
            f"tensor names differ between PREV ({prev.label}) and CUR ({cur.label}) ({'; '.join(parts)}); "
            "use --on-missing copy to copy CUR-only tensors unchanged"
        )
    mismatched = [
        f"{short(n)} {list(prev_t[n][1].shape)} vs {list(info.shape)}"
        for n, (_, info) in cur_t.items()
        if n in prev_t and prev_t[n][1].shape != info.shape
    ]
    if mismatched:
        raise MergeError(
            f"shape mismatch between PREV ({prev.label}) and CUR ({cur.label}): {_listed(mismatched, str)}; "
            "both must be checkpoints of the same architecture"
        )

    pieces = []  # in CUR's layout order, not yet placed
    for name, (header, info) in cur_t.items():
        p = prev_t.get(name)
        where = f" (PREV {p[0].path}, CUR {header.path})" if p else f" (CUR {header.path})"  # which input, which file
        out_dtype, extrapolated = output_dtype(name, info, p[1] if p else None, options.dtype, where)
        quantized = isinstance(info, QuantInfo)
        if quantized and options.dtype == "keep":
            out_dtype = "BF16"  # a quantized CUR weight keeps no dtype of its own: bf16, as the release's others
        # CUR-only float tensor under --dtype, or quantized (its bytes are never the output's)
        convert = not extrapolated and (out_dtype != info.dtype or quantized)
        source = p if extrapolated else (header, info) if convert else None
        piece = Piece(name, out_dtype, info.shape, 0, (header, info), source, convert)
        pieces += quant_pieces(piece, quant) if quant and name in quant.names else [piece]
    layout = lay_out(pieces, cur, options.max_shard_size, metadata or {})
    return MergePlan(
        files=layout.files,
        index=layout.index,
        prev=prev,
        cur=cur,
        alpha=options.alpha,
        copied_cur_only=cur_only if on_missing == "copy" else [],
        ignored_prev_only=prev_only if on_missing == "copy" else [],
        dequantized={side: f.describe() for side, f in folded.items() if f.dequantized},
        quantize=quant,
        renamed=renamed,
    )
