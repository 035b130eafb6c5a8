"""A hardened reader of safetensors headers: every way a header can lie becomes a MergeError naming the file.

Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data buffer. Tensor byte ranges
are relative to the data buffer and must tile it exactly (no holes, no overlap, no trailing bytes).
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from apo_kernels.dtypes import ITEMSIZE
from apo_merge.errors import MergeError, shown

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's cap

_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: byte range ``[begin, end)`` relative to the file's data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FileHeader:
    """A validated safetensors file: ``data_start`` is the absolute offset of the data buffer."""

    path: Path
    size: int
    data_start: int
    tensors: dict[str, TensorInfo]  # in byte order
    metadata: dict[str, str]


def read_regular_file(path: Path, limit: int | None = None) -> bytes:
    """The bytes of a regular file (of at most ``limit`` bytes); anything else (FIFO, device, folder) is refused.

    O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it before any read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MergeError(f"{path}: is not a regular file (a folder, FIFO or device); replace it with a plain file")
        if limit is not None and st.st_size > limit:
            raise MergeError(f"{path}: {st.st_size} bytes is more than the {limit} this file may hold")
        with open(fd, "rb", closefd=False) as f:  # to EOF (a file growing past the limit is still refused)
            data = f.read() if limit is None else f.read(limit + 1)
        if limit is not None and len(data) > limit:
            raise MergeError(f"{path}: more than the {limit} bytes this file may hold")
        return data
    finally:
        os.close(fd)


def read_header(path: Path) -> FileHeader:
    """Read and validate the header of the safetensors file at ``path`` (data bytes are not read)."""
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO planted in the folder must be refused, not block the open forever.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise MergeError(
                    f"{path}: is not a regular file (a folder, FIFO or device); "
                    "give a checkpoint whose weights are plain files"
                )
            size = st.st_size
            if size < 8:
                raise MergeError(
                    f"{path}: {size} bytes is too short for a safetensors file (truncated or not "
                    "safetensors); re-save or re-download it"
                )
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise MergeError(
                    f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt or not safetensors)"
                )
            if n > size - 8:
                raise MergeError(
                    f"{path}: header length {n} runs past the end of the {size}-byte file "
                    "(truncated or not safetensors); re-save or re-download it"
                )
            raw = f.read(n)
    except OSError as e:
        raise MergeError(f"{path}: cannot read ({e.strerror or e})") from None
    tensors, metadata = parse_header(raw, size - 8 - n, str(path))
    return FileHeader(path=path, size=size, data_start=8 + n, tensors=tensors, metadata=metadata)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _fits_u64(shape: list[int]) -> bool:
    """The reference reader multiplies dims left to right in u64; a shape it cannot represent is refused here too."""
    n = 1
    for d in shape:
        n *= d
        if d >= 2**64 or n >= 2**64:
            return False
    return True


def _utf8(s: str) -> bool:
    """False for strings with lone surrogates (JSON escapes like \\ud800), which no file can hold."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_header(raw: bytes, data_size: int, label: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate header bytes against a data buffer of ``data_size`` bytes; return tensors (in byte order)."""

    def bad(why: str) -> MergeError:
        return MergeError(f"{label}: invalid safetensors header: {why}; re-save or re-download the file")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("not UTF-8") from None
    if not text.lstrip().startswith("{"):
        raise bad("not a JSON object")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise bad("JSON nested too deeply") from None
    except ValueError as e:
        raise bad(f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise bad("not a JSON object")

    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    if not all(_utf8(k) and _utf8(v) for k, v in metadata.items()):
        raise bad("__metadata__ holds a string that is not valid Unicode (lone surrogate)")

    tensors: list[TensorInfo] = []
    for name, entry in obj.items():
        if not _utf8(name):
            raise bad(f"tensor name {shown(name)} is not valid Unicode (lone surrogate)")
        if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
            raise bad(f"entry {shown(name)} must have exactly the keys dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise bad(f"tensor {shown(name)} has unknown dtype {shown(dtype)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"tensor {shown(name)} has an invalid shape {shown(shape)} (want non-negative integers)")
        if not _fits_u64(shape):
            raise bad(f"tensor {shown(name)}: shape {shown(shape)} overflows 64 bits")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise bad(f"tensor {shown(name)} has invalid data_offsets {shown(offsets)}")
        info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
        if info.numel * ITEMSIZE[dtype] != info.nbytes:
            raise bad(
                f"tensor {shown(name)}: shape {shown(list(shape))} x {dtype} is "
                f"{shown(info.numel * ITEMSIZE[dtype])} bytes but its byte range holds {shown(info.nbytes)}"
            )
        tensors.append(info)

    tensors.sort(key=lambda t: (t.begin, t.end))
    pos = 0
    for t in tensors:
        if t.begin != pos:
            raise bad(
                f"tensor {shown(t.name)} starts at byte {shown(t.begin)}, expected {shown(pos)} "
                f"({'overlap' if t.begin < pos else 'hole'} in the data buffer)"
            )
        pos = t.end
    if pos != data_size:
        raise bad(
            f"tensors cover {shown(pos)} bytes but the data buffer holds {data_size} "
            f"({'truncated file' if pos > data_size else 'trailing bytes'})"
        )
    return {t.name: t for t in tensors}, metadata
