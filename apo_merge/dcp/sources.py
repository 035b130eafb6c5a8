"""PREV's values over any box of a tensor: from a DCP checkpoint (its overlapping chunks, whatever its layout) or
from a Hugging Face safetensors folder (a slice read straight from the file)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from apo_merge.dcp.reader import DcpCheckpoint, Entry, _numel
from apo_merge.errors import MergeError, shown

if TYPE_CHECKING:
    import torch

CACHED_CHUNKS = 2  # PREV chunks kept between CUR chunks (a world-size change reads each from one or two boxes)


class DcpPrev:
    def __init__(self, ckpt: DcpCheckpoint) -> None:
        self.ckpt = ckpt
        self.by_name = {ckpt.hf_name(f): e for f, e in ckpt.entries.items()}
        self.cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def info(self, name: str) -> tuple[tuple[int, ...], str] | None:
        """(shape, torch's dtype name) of tensor ``name``; None where PREV has none."""
        e = self.by_name.get(name)
        return None if e is None else (e.size, e.dtype)

    def _load(self, e: Entry, i: int) -> torch.Tensor:
        key = (e.fqn, i)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        t = self.ckpt.read_chunk(e.fqn, e.chunks[i])
        self.cache[key] = t
        while len(self.cache) > CACHED_CHUNKS:
            self.cache.popitem(last=False)
        return t

    def region(self, name: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """PREV's values of tensor ``name`` over the box ``offsets``/``sizes`` (exact: copies, no arithmetic)."""
        import torch

        e = self.by_name[name]
        for c in e.chunks:
            if c.offsets == offsets and c.sizes == sizes:  # same layout: the chunk itself, not kept
                return self.ckpt.read_chunk(e.fqn, c)
        out = torch.empty(sizes, dtype=getattr(torch, e.dtype))
        covered = 0
        for i, c in enumerate(e.chunks):
            box = c.overlap(offsets, sizes)
            if box is None:
                continue
            src = self._load(e, i)[tuple(slice(lo - a, hi - a) for (lo, hi), a in zip(box, c.offsets))]
            out[tuple(slice(lo - b, hi - b) for (lo, hi), b in zip(box, offsets))] = src
            covered += _numel(tuple(hi - lo for lo, hi in box))
        if covered != _numel(sizes):
            raise MergeError(
                f"{self.ckpt.root}/.metadata: the chunks of {shown(e.fqn)} do not cover the box {offsets} {sizes} "
                "exactly once; save the checkpoint again (dcp.save)"
            )
        return out


class HfPrev:
    """PREV as a Hugging Face safetensors folder (e.g. round 0's model before any DCP round)."""

    def __init__(self, root: Path, label: str) -> None:
        from apo_merge.io.checkpoint import open_checkpoint

        self.ckpt = open_checkpoint(root, label)
        self.handles: dict[Path, object] = {}

    def info(self, name: str) -> tuple[tuple[int, ...], str] | None:
        from apo_kernels.dtypes import BY_NAME

        found = self.ckpt.tensors.get(name)
        if found is None:
            return None
        row = BY_NAME.get(found[1].dtype)
        return found[1].shape, row.torch if row is not None and row.torch else found[1].dtype

    def region(self, name: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        from safetensors import safe_open

        header, _ = self.ckpt.tensors[name]
        if header.path not in self.handles:
            self.handles[header.path] = safe_open(header.path, framework="pt")
        view = self.handles[header.path].get_slice(name)
        if not sizes:
            return view[...]
        return view[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]


def open_prev(path: Path, label: str) -> DcpPrev | HfPrev:
    from apo_merge.dcp.reader import dcp_root, open_dcp

    return DcpPrev(open_dcp(path, label)) if dcp_root(path) is not None else HfPrev(path, label)
