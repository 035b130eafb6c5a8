"""Reading a torch.distributed.checkpoint (DCP) folder without a process group, and without running its pickles.

A DCP folder (``dcp.save``, accelerate's SHARDED_STATE_DICT) is ``.metadata`` (a pickle of DCP's ``Metadata``: per
entry its dtype, size and chunks; per chunk its file, byte offset and length) and ``__<rank>_<n>.distcp`` files.
With the default serialization each tensor chunk is a ``torch.save`` of that chunk.

Nothing here runs code from the files: ``.metadata`` is unpickled with an allowlist of DCP's own metadata classes
into torch-free stand-ins (apo_merge.dcp.meta), chunks go through ``torch.load(weights_only=True)`` or are read raw
(apo_merge.dcp.blob), and entries that DCP stored as pickled objects (``BytesStorageMetadata``) are never read.
torch is imported only by ``read_chunk``.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from apo_kernels.dtypes import DTYPES
from apo_merge.dcp import meta as dcp_md
from apo_merge.dcp.blob import MAX_FRAMING, Blob, NotCanonical
from apo_merge.errors import MergeError, first_line, shown

if TYPE_CHECKING:
    import torch

METADATA = ".metadata"
ACCELERATE_MODEL_DIR = "pytorch_model_fsdp_0"  # accelerate's SHARDED_STATE_DICT: <checkpoint>/pytorch_model_fsdp_0
MAX_METADATA_BYTES = 1 << 30


def dcp_root(path: str | os.PathLike) -> Path | None:
    """The DCP folder at ``path`` (or accelerate's ``pytorch_model_fsdp_0`` inside it), else None."""
    p = Path(path)
    for root in (p, p / ACCELERATE_MODEL_DIR):
        if (root / METADATA).is_file():
            return root
    return None


@dataclass(frozen=True)
class Chunk:
    """One stored chunk of a tensor: where it sits in the tensor and where its bytes are."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int

    def overlap(self, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[tuple[int, ...], ...] | None:
        """The intersection with the box ``offsets``/``sizes`` as (start, stop) per dim, or None."""
        box = []
        for a, n, b, m in zip(self.offsets, self.sizes, offsets, sizes, strict=True):
            lo, hi = max(a, b), min(a + n, b + m)
            if lo >= hi:
                return None
            box.append((lo, hi))
        return tuple(box)


@dataclass
class Entry:
    """A model tensor of the checkpoint: its global size, dtype and chunks (in the metadata's order)."""

    fqn: str
    size: tuple[int, ...]
    dtype: str  # torch's attribute name: "bfloat16"
    chunks: list[Chunk]


@dataclass
class DcpCheckpoint:
    root: Path
    label: str
    meta: dcp_md.Metadata
    entries: dict[str, Entry]  # model tensors, by DCP key
    nested: bool  # saved as {"model": state_dict}: HF names are the keys without "model."
    left_out: dict[str, int] = field(default_factory=dict)  # top-level group -> entries not taken (optimizer, ...)
    file_sizes: dict[str, int] = field(default_factory=dict)

    def hf_name(self, fqn: str) -> str:
        return fqn[len("model.") :] if self.nested else fqn

    def files(self) -> list[str]:
        """The storage files that hold model tensors, sorted by name."""
        return sorted({c.file for e in self.entries.values() for c in e.chunks})

    def read_chunk(self, fqn: str, chunk: Chunk) -> torch.Tensor:
        """One chunk's tensor, through ``torch.load(weights_only=True)``; checked against the metadata."""
        import torch

        path = self.root / chunk.file
        with open(path, "rb") as f:
            f.seek(chunk.offset)
            raw = f.read(chunk.length)
        if len(raw) != chunk.length:
            raise MergeError(f"{path}: ends before the chunk of {shown(fqn)} at byte {chunk.offset}; {_REWRITE}")
        try:
            t = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - anything torch.load refuses is a bad chunk
            if _safetensors_file(path):
                raise MergeError(
                    f"{path}: is a safetensors file (FileSystemWriter(serialization_format=SAFETENSORS)), which "
                    "apo-merge does not read; save with dcp.save's default serialization"
                ) from None
            raise MergeError(
                f"{path}: the chunk of {shown(fqn)} at byte {chunk.offset} is not a tensor torch.load reads with "
                f"weights_only ({shown(first_line(e), 80, quote=False)}); {_REWRITE}"
            ) from None
        want = getattr(torch, self.entries[fqn].dtype)
        if not isinstance(t, torch.Tensor) or t.dtype != want or tuple(t.shape) != chunk.sizes:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise MergeError(
                f"{path}: the chunk of {shown(fqn)} at byte {chunk.offset} holds {got}, but .metadata says "
                f"{want} {chunk.sizes}; the metadata does not match the files, {_REWRITE}"
            )
        return t

    def blob(self, fqn: str, chunk: Chunk, fd: int) -> Blob:
        """The framing of a chunk's ``torch.save`` blob (``fd``: its storage file), checked against the metadata;
        ``blob.NotCanonical`` where only ``read_chunk`` reads it."""
        where = f"{self.root / chunk.file}: the chunk of {shown(fqn)} at byte {chunk.offset}"
        n = min(chunk.length, MAX_FRAMING)
        head = os.pread(fd, n, chunk.offset)
        tail = head if n == chunk.length else os.pread(fd, n, chunk.offset + chunk.length - n)
        if len(head) != n or len(tail) != n:
            raise MergeError(f"{where}: the file ends inside it; {_REWRITE}")
        found = Blob(head, tail, chunk.length, where)
        e = self.entries[fqn]
        if e.dtype not in ITEMSIZE:
            raise NotCanonical(f"dtype {e.dtype}")
        found.check(e.dtype, chunk.sizes, ITEMSIZE[e.dtype])
        return found


ITEMSIZE = {d.torch: d.itemsize for d in DTYPES if d.torch}


def _safetensors_file(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 30


_REWRITE = "save the checkpoint again (dcp.save) or restore the folder from a copy"


def _read_metadata(root: Path, label: str) -> dcp_md.Metadata:
    path = root / METADATA
    try:
        with open(path, "rb") as f:
            head = f.read(1)
            f.seek(0)
            if head == b"{":
                raise MergeError(
                    f"{label}: .metadata is JSON, as torch's HuggingFaceStorageWriter writes it (safetensors files); "
                    "merge its safetensors as a Hugging Face folder, or save with dcp.save's default writer"
                )
            meta = dcp_md.MetadataUnpickler(f).load()
    except MergeError:
        raise
    except OSError as e:
        raise MergeError(f"{path}: cannot be read ({e.strerror}); check the path and permissions") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign pickle
        raise MergeError(
            f"{path}: is not DCP metadata apo-merge reads ({shown(first_line(e), 80, quote=False)}); "
            "give a folder written by torch.distributed.checkpoint.save"
        ) from None
    if not isinstance(meta, dcp_md.Metadata) or not isinstance(meta.state_dict_metadata, dict):
        raise MergeError(f"{path}: is not DCP metadata; give a folder written by torch.distributed.checkpoint.save")
    if not isinstance(meta.storage_data, dict):
        raise MergeError(f"{path}: has no storage table (not written by FileSystemWriter); {_REWRITE}")
    return meta


def _top(meta: dcp_md.Metadata, fqn: str) -> tuple[str, int]:
    """The key of the dict given to dcp.save that ``fqn`` came from, and the depth of its path."""
    path = (meta.planner_data or {}).get(fqn) if isinstance(meta.planner_data, dict) else None
    if isinstance(path, (tuple, list)) and path and isinstance(path[0], str):
        return path[0], len(path)
    return fqn.split(".", 1)[0], 2


def open_dcp(path: str | os.PathLike, label: str | None = None) -> DcpCheckpoint:
    """Open and check a DCP folder: every model chunk has its bytes inside an existing storage file."""
    label = label or str(path)
    root = dcp_root(path)
    if root is None:
        raise MergeError(f"{label}: has no .metadata; give a folder written by torch.distributed.checkpoint.save")
    meta = _read_metadata(root, label)
    tops = {fqn: _top(meta, fqn) for fqn in meta.state_dict_metadata}
    nested = any(top == "model" and depth > 1 for top, depth in tops.values())
    entries: dict[str, Entry] = {}
    left: dict[str, int] = {}
    for fqn, md in meta.state_dict_metadata.items():
        top = tops[fqn][0]
        is_model = top == "model" if nested else top not in ("optimizer", "optim")
        if not is_model:
            left[top] = left.get(top, 0) + 1
            continue
        if isinstance(md, dcp_md.BytesStorageMetadata):
            raise MergeError(
                f"{root / METADATA}: model entry {shown(fqn)} is a pickled object, not a tensor; apo-merge never "
                "unpickles checkpoint entries; save the model's tensors only (e.g. {'model': model.state_dict()})"
            )
        if not isinstance(md, dcp_md.TensorStorageMetadata):
            raise MergeError(f"{root / METADATA}: entry {shown(fqn)} is of unknown kind; {_REWRITE}")
        dtype = getattr(md.properties, "dtype", None) if isinstance(md.properties, dcp_md.TensorProperties) else None
        if not isinstance(dtype, dcp_md.DType) or not isinstance(md.size, tuple):
            raise MergeError(f"{root / METADATA}: entry {shown(fqn)} has no dtype or size; {_REWRITE}")
        entries[fqn] = Entry(fqn, tuple(md.size), str(dtype), [])
    _attach_chunks(root, meta, entries)
    ckpt = DcpCheckpoint(root, label, meta, entries, nested, left)
    if not entries:
        raise MergeError(f"{label}: holds no model tensors; give the folder dcp.save wrote the model into")
    for name in ckpt.files():
        try:
            st = os.stat(root / name)
        except FileNotFoundError:
            raise MergeError(
                f"{root / name}: storage file listed in .metadata is missing; copy the whole checkpoint folder"
            ) from None
        ckpt.file_sizes[name] = st.st_size
    for e in entries.values():
        for c in e.chunks:
            if c.offset + c.length > ckpt.file_sizes[c.file]:
                raise MergeError(
                    f"{root / c.file}: .metadata places the chunk of {shown(e.fqn)} at bytes {c.offset}-"
                    f"{c.offset + c.length}, past the file's end ({ckpt.file_sizes[c.file]} bytes); the file is "
                    f"truncated or from another save, {_REWRITE}"
                )
    return ckpt


def _attach_chunks(root: Path, meta: dcp_md.Metadata, entries: dict[str, Entry]) -> None:
    storage = {
        (getattr(k, "fqn", None), tuple(getattr(k, "offset", None) or ())): v for k, v in meta.storage_data.items()
    }
    for fqn, entry in entries.items():
        md = meta.state_dict_metadata[fqn]
        total = 0
        for ch in md.chunks:
            offsets, sizes = tuple(ch.offsets), tuple(ch.sizes)
            info = storage.get((fqn, offsets))
            if (
                not isinstance(info, dcp_md.StorageInfo)
                or len(offsets) != len(entry.size)
                or len(sizes) != len(offsets)
            ):
                raise MergeError(f"{root / METADATA}: chunk {offsets} of {shown(fqn)} has no storage entry; {_REWRITE}")
            if any(o < 0 or n < 0 or o + n > s for o, n, s in zip(offsets, sizes, entry.size)):
                raise MergeError(
                    f"{root / METADATA}: chunk {offsets} {sizes} of {shown(fqn)} lies outside its size "
                    f"{entry.size}; {_REWRITE}"
                )
            name = info.relative_path
            if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
                raise MergeError(
                    f"{root / METADATA}: names storage file {shown(name)}, not a plain file name in the folder "
                    "(refused)"
                )
            if info.transform_descriptors:
                raise MergeError(
                    f"{root / METADATA}: {shown(fqn)} is stored with transforms {info.transform_descriptors} "
                    "(e.g. compression), which apo-merge does not read; save without storage extensions"
                )
            if not (isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0 <= info.length):
                raise MergeError(f"{root / METADATA}: chunk {offsets} of {shown(fqn)} has a bad byte range; {_REWRITE}")
            entry.chunks.append(Chunk(offsets, sizes, name, info.offset, info.length))
            total += _numel(sizes)
        if total != _numel(entry.size):
            raise MergeError(
                f"{root / METADATA}: the chunks of {shown(fqn)} hold {total} elements, its size {entry.size} "
                f"{_numel(entry.size)}; {_REWRITE}"
            )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
