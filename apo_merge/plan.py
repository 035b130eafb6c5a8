"""PREV + CUR headers -> a complete write plan: every output header is known before any data moves.

All input problems (missing names, shape or dtype mismatches) are found here, before any output exists.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

from apo_merge.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint
from apo_merge.errors import MergeError, usage_error
from apo_merge.header import FLOAT_DTYPES, ITEMSIZE, FileHeader, TensorInfo

OutDtype = Literal["keep", "bf16", "fp16", "fp32"]
OnMissing = Literal["error", "copy"]
_DTYPE_NAMES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
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
class MergePlan:
    prev: Checkpoint
    cur: Checkpoint
    alpha: float
    files: list[OutFile]
    index: dict | None  # model.safetensors.index.json content, when sharded
    copied_cur_only: list[str] = field(default_factory=list)
    ignored_prev_only: list[str] = field(default_factory=list)

    @property
    def n_tensors(self) -> int:
        return sum(len(f.pieces) for f in self.files)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def n_extrapolated(self) -> int:
        return sum(p.prev is not None and not p.convert for f in self.files for p in f.pieces)


def parse_size(text: str | int) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, 1000 -> 1000 (the units huggingface_hub accepts)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise usage_error(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }[unit]
    if len(m.group(1)) > 30:  # more bytes than any disk holds; float() would overflow
        raise usage_error(f"--max-shard-size {short(str(text), 40)!r} is too large; write e.g. 5GB")
    size = int(Fraction(m.group(1)) * scale)
    if size <= 0:
        raise usage_error(f"--max-shard-size {text!r} must be positive")
    return size


def _show(name: str, limit: int = 80) -> str:
    """A name from a file, bounded for a one-line message (names can be megabytes long); repr escapes newlines."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(name: str, limit: int = 80) -> str:
    """A tensor name for a message: at most ``limit`` characters (a file can hold names megabytes long)."""
    return name if len(name) <= limit else name[: limit - 3] + "..."


def _listed(names: list[str], show=short) -> str:
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(map(show, names[:_MAX_LISTED])) + more


def _out_dtype(
    name: str, cur: TensorInfo, prev: TensorInfo | None, dtype: OutDtype, where: str = ""
) -> tuple[str, bool]:
    """Output dtype and whether the tensor is extrapolated (else copied from CUR)."""
    if cur.dtype in FLOAT_DTYPES:
        if prev is not None and prev.dtype not in FLOAT_DTYPES:
            raise MergeError(
                f"{short(name)}{where}: dtype {prev.dtype} in PREV but {cur.dtype} in CUR; both must be floating"
            )
        return (cur.dtype if dtype == "keep" else _DTYPE_NAMES[dtype]), prev is not None
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


def _spec_bytes(spec: tuple) -> int:
    """Output bytes of a planned tensor (name, out dtype, shape, ...)."""
    return math.prod(spec[2]) * ITEMSIZE[spec[1]]


def _shard_names(n: int) -> list[str]:
    return [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def make_plan(
    prev: Checkpoint,
    cur: Checkpoint,
    alpha: float,
    *,
    dtype: OutDtype = "keep",
    max_shard_size: int | str | None = None,
    on_missing: OnMissing = "error",
    metadata: dict[str, str] | None = None,
) -> MergePlan:
    """Match tensors by name across PREV and CUR and lay out the output files."""
    if dtype not in ("keep", *_DTYPE_NAMES):
        raise usage_error(f"--dtype {dtype!r} is not one of keep, bf16, fp16, fp32")
    if on_missing not in ("error", "copy"):
        raise usage_error(f"--on-missing {on_missing!r} is not one of error, copy")
    if not cur.tensors:
        raise MergeError(f"CUR {cur.label}: holds no tensors; give a checkpoint with weights")
    cur_only = [n for n in cur.tensors if n not in prev.tensors]
    prev_only = [n for n in prev.tensors if n not in cur.tensors]
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
        f"{short(n)} {list(prev.tensors[n][1].shape)} vs {list(info.shape)}"
        for n, (_, info) in cur.tensors.items()
        if n in prev.tensors and prev.tensors[n][1].shape != info.shape
    ]
    if mismatched:
        raise MergeError(
            f"shape mismatch between PREV ({prev.label}) and CUR ({cur.label}): {_listed(mismatched, str)}; "
            "both must be checkpoints of the same architecture"
        )

    # (name, out dtype, shape, cur source, prev source or None, convert), in CUR's layout order.
    specs: list[tuple[str, str, tuple[int, ...], tuple[FileHeader, TensorInfo], tuple | None, bool]] = []
    for name, (header, info) in cur.tensors.items():
        p = prev.tensors.get(name)
        where = f" (PREV {p[0].path}, CUR {header.path})" if p else f" (CUR {header.path})"  # which input, which file
        out_dtype, extrapolated = _out_dtype(name, info, p[1] if p else None, dtype, where)
        convert = not extrapolated and out_dtype != info.dtype  # CUR-only float tensor under --dtype
        source = p if extrapolated else (header, info) if convert else None
        specs.append((name, out_dtype, info.shape, (header, info), source, convert))

    groups: list[list] = []
    if max_shard_size is None:
        by_file: dict[str, list] = {}
        for spec in specs:
            by_file.setdefault(spec[3][0].path.name, []).append(spec)
        groups = list(by_file.values())
        names = list(by_file) if cur.index_name else [cur.files[0].path.name]
        for fname in names:  # kept names must not collide with the card, the index or side files
            if not fname.endswith(".safetensors") or fname == INDEX_NAME:
                raise MergeError(
                    f"{cur.root / (cur.index_name or fname)}: names shard {_show(fname)}, which the output cannot "
                    "keep (a weight file must end in .safetensors; README.md would be replaced by the model card); "
                    "rename the shard in the index, or re-shard with --max-shard-size"
                )
    else:
        limit = parse_size(max_shard_size)
        filled = 0  # bytes in the last group, kept as it grows: planning stays linear in the tensor count
        for spec in specs:
            size = _spec_bytes(spec)
            if not groups or (groups[-1] and filled + size > limit):
                groups.append([])
                filled = 0
            groups[-1].append(spec)
            filled += size
        groups = groups or [[]]
        names = _shard_names(len(groups))

    meta = {"format": "pt", **(metadata or {})}
    files: list[OutFile] = []
    for fname, group in zip(names, groups):
        entries, begin = [], 0
        for name, out_dtype, shape, c, p, convert in group:
            piece = Piece(name, out_dtype, shape, 0, c, p, convert)
            entries.append((piece, begin))
            begin += piece.nbytes
        header = _header_bytes(entries, meta)
        pieces = [Piece(pc.name, pc.dtype, pc.shape, len(header) + b, pc.cur, pc.prev, pc.convert) for pc, b in entries]
        files.append(OutFile(fname, header, pieces))

    index = None
    if len(files) > 1 or (max_shard_size is None and cur.index_name):
        index = {
            "metadata": {"total_size": sum(p.nbytes for f in files for p in f.pieces)},
            "weight_map": dict(sorted((p.name, f.name) for f in files for p in f.pieces)),
        }
    return MergePlan(
        prev,
        cur,
        alpha,
        files,
        index,
        copied_cur_only=cur_only if on_missing == "copy" else [],
        ignored_prev_only=prev_only if on_missing == "copy" else [],
    )
