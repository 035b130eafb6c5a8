"""A checkpoint folder -> its validated safetensors headers and a name -> (file, tensor) map.

Nothing here reads tensor data. Everything a folder can get wrong is found here, before any output exists.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from apo_merge.errors import MergeError
from apo_merge.io.header import MAX_HEADER_BYTES, FileHeader, TensorInfo, read_header, read_regular_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights whose loading can run code
# Every weight-file suffix apo-merge knows: never copied as a side file, never fetched from the Hub but safetensors.
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES, ".gguf", ".h5", ".msgpack", ".onnx", ".npz", ".ot")
MAX_INDEX_BYTES = MAX_HEADER_BYTES  # an index names every tensor, as a header does


@dataclass
class Checkpoint:
    """A validated checkpoint: its files in layout order and where each tensor lives."""

    root: Path
    label: str  # how the user named it (path or hub id), for messages and the model card
    files: list[FileHeader]
    tensors: dict[str, tuple[FileHeader, TensorInfo]] = field(repr=False)
    index_name: str | None = None

    @property
    def weight_file_names(self) -> set[str]:
        names = {f.path.name for f in self.files}
        if self.index_name:
            names.add(self.index_name)
        return names

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for _, info in self.tensors.values())


def is_inside(path: Path, root: Path) -> bool:
    """True when ``path`` (symlinks resolved) is ``root`` or lies below it."""
    p, r = os.path.realpath(path), os.path.realpath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def _plain_name(name: object) -> bool:
    if not isinstance(name, str) or not name or "\0" in name:
        return False
    try:
        os.fsencode(name)  # lone surrogates from JSON escapes name no file
    except UnicodeEncodeError:
        return False
    return not (os.path.isabs(name) or "\\" in name or any(part in ("", ".", "..") for part in name.split("/")))


def _safe_member(root: Path, name: object, trusted_root: Path, what: str) -> Path:
    if not _plain_name(name):
        raise MergeError(
            f"{root / INDEX_NAME}: {what} {name!r} is not a plain file name inside the checkpoint "
            "(path traversal refused); fix the index"
        )
    path = root / name
    if not is_inside(path, trusted_root):
        raise MergeError(
            f"{path}: is a symlink leading outside the checkpoint folder (refused); copy the real file into the folder"
        )
    return path


def open_checkpoint(
    folder: str | os.PathLike, label: str | None = None, trusted_root: str | os.PathLike | None = None
) -> Checkpoint:
    """Validate ``folder`` as a safetensors checkpoint (one file, or shards with an index).

    Files may be symlinks only when they resolve inside ``trusted_root`` (default: the folder itself; a Hub cache
    passes its repository folder, whose snapshots link into blobs/).
    """
    root = Path(folder)
    label = label or str(folder)
    trusted = Path(trusted_root) if trusted_root is not None else root
    if not root.exists():
        raise MergeError(f"{label}: no such folder; give a local checkpoint folder (or a Hub repo id)")
    if not root.is_dir():
        raise MergeError(f"{label}: is not a folder; give the checkpoint folder that holds the .safetensors files")

    index_path = root / INDEX_NAME
    if index_path.exists():
        return _open_sharded(root, label, trusted)

    candidates = [root / SINGLE_NAME] if (root / SINGLE_NAME).exists() else sorted(root.glob("*.safetensors"))
    if len(candidates) == 1:
        path = _safe_member(root, candidates[0].name, trusted, "weight file")
        header = read_header(path)
        return Checkpoint(root, label, [header], {n: (header, t) for n, t in header.tensors.items()})
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates[:5])
        raise MergeError(
            f"{label}: several .safetensors files ({names}) but no {INDEX_NAME}; "
            "add the index that save_pretrained writes"
        )
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise MergeError(
            f"{label}: holds only pickle weights ({pickles[0]}), which apo-merge never loads "
            "(unpickling can run code); convert it with model.save_pretrained(..., "
            "safe_serialization=True)"
        )
    raise MergeError(f"{label}: holds no {SINGLE_NAME} or {INDEX_NAME}; give a Hugging Face checkpoint folder")


def _open_sharded(root: Path, label: str, trusted: Path) -> Checkpoint:
    index_path = _safe_member(root, INDEX_NAME, trusted, "index")
    try:
        index = json.loads(read_regular_file(index_path, MAX_INDEX_BYTES).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise MergeError(f"{index_path}: not a readable JSON index ({why}); re-save the checkpoint") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise MergeError(f"{index_path}: has no weight_map object; re-save the checkpoint")

    shard_names: list[str] = []
    for shard in weight_map.values():
        _safe_member(root, shard, trusted, "shard")
        if shard not in shard_names:
            shard_names.append(shard)
    headers: dict[str, FileHeader] = {}
    for shard in sorted(shard_names):
        path = root / shard
        if not path.is_file():
            raise MergeError(f"{index_path}: names shard {shard!r}, which is missing; re-download the checkpoint")
        headers[shard] = read_header(path)

    tensors: dict[str, tuple[FileHeader, TensorInfo]] = {}
    for name, shard in weight_map.items():
        header = headers[shard]
        if name not in header.tensors:
            raise MergeError(f"{index_path}: maps {name!r} to {shard}, which has no such tensor; fix the index")
        tensors[name] = (header, header.tensors[name])
    for shard, header in headers.items():
        for name in header.tensors:
            if weight_map.get(name) != shard:
                raise MergeError(
                    f"{root / shard}: holds tensor {name!r} that the index does not map to it; fix the index"
                )
    # Layout order: shards by name, tensors by byte offset within each shard.
    ordered = {n: tensors[n] for h in headers.values() for n in h.tensors}
    return Checkpoint(root, label, list(headers.values()), ordered, INDEX_NAME)
