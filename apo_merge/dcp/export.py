"""A DCP folder -> a Hugging Face safetensors folder, tensor by tensor.

Chunks split along the first dimension only (FSDP2's ``Shard(0)``) are copied straight to their place in the
file: their raw bytes read from the ``torch.save`` blob (apo_merge.dcp.blob, no torch), a piece at a time, the
output hashed as it is written. Other layouts (and blobs only ``torch.load`` reads) assemble one tensor at a time
through torch. The tensors equal what
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` gives (names without the ``model.`` of a
``{"model": state_dict}`` save); config, tokenizer and other side files come from a named Hugging Face folder.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
from pathlib import Path

from apo_kernels.dtypes import ITEMSIZE
from apo_merge import card
from apo_merge.dcp.blob import NotCanonical
from apo_merge.dcp.fast import put
from apo_merge.dcp.reader import DcpCheckpoint, Entry, open_dcp
from apo_merge.engine.runner import StageRunner
from apo_merge.errors import MergeError
from apo_merge.io.checkpoint import INDEX_NAME, WEIGHT_SUFFIXES
from apo_merge.io.hashing import hash_file, new_hasher
from apo_merge.io.output import MAX_CARD_BYTES, StagedFolder, check_replaceable
from apo_merge.io.prefetch import Prefetcher
from apo_merge.io.writer import SafetensorsWriter, advise, pread_exact

ST_NAMES = {  # torch's dtype name -> safetensors'
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "int8": "I8",
    "uint8": "U8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "bool": "BOOL",
}
DEFAULT_SHARD = 5 * 10**9
COPY_BYTES = 16 << 20  # bytes per read of a chunk's data
SLOTS = 4  # read buffers in flight


def _layout(ckpt: DcpCheckpoint, max_shard_size: int) -> list[list[tuple[str, Entry]]]:
    groups: list[list[tuple[str, Entry]]] = [[]]
    size = 0
    for fqn, e in ckpt.entries.items():
        if e.dtype not in ST_NAMES:
            raise MergeError(f"{ckpt.label}: {fqn} has dtype torch.{e.dtype}, which safetensors does not store here")
        nbytes = _nbytes(e)
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append((ckpt.hf_name(fqn), e))
        size += nbytes
    return groups


def _nbytes(e: Entry) -> int:
    n = ITEMSIZE[ST_NAMES[e.dtype]]
    for s in e.size:
        n *= s
    return n


def _header(group: list[tuple[str, Entry]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    body: dict[str, object] = {"__metadata__": metadata}
    begins, at = [], 0
    for name, e in group:
        body[name] = {"dtype": ST_NAMES[e.dtype], "shape": list(e.size), "data_offsets": [at, at + _nbytes(e)]}
        begins.append(at)
        at += _nbytes(e)
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, begins


def _in_order(e: Entry) -> list:
    """A row-split tensor's chunks in the order of their rows: the order the export reads and writes them."""
    return sorted(e.chunks, key=lambda c: c.offsets[:1])


def _rows_only(e: Entry) -> bool:
    """Every chunk is whole rows (split along dim 0 only), or one chunk is the whole tensor (a 0-d one too): each
    chunk's bytes are one run of the tensor's."""
    if len(e.chunks) == 1 and e.chunks[0].sizes == e.size:
        return True
    return all(all(o == 0 for o in c.offsets[1:]) and c.sizes[1:] == e.size[1:] for c in e.chunks) and bool(e.size)


class _File:
    """One safetensors file written on three threads: read (raw chunk data with pread into a pool of buffers, or
    a tensor assembled through torch), write (at its offset, writeback kept moving), hash (by ``algo``, one of
    io.hashing.OUTPUT_HASHES, None: not hashed; from the buffers just written while the writes come in file order,
    else the file is hashed at the end)."""

    def __init__(self, ckpt: DcpCheckpoint, prefetcher: Prefetcher, fds: dict[str, int], algo: str | None) -> None:
        self.ckpt, self.prefetcher, self.fds, self.algo = ckpt, prefetcher, fds, algo
        self.pool: queue.Queue = queue.Queue()
        for _ in range(SLOTS):
            self.pool.put(memoryview(bytearray(COPY_BYTES)))
        self.to_write: queue.Queue = queue.Queue(SLOTS)
        self.to_hash: queue.Queue = queue.Queue()
        self.result: tuple[int, str] | None = None

    def fd(self, name: str) -> int:
        if name not in self.fds:
            self.fds[name] = os.open(self.ckpt.root / name, os.O_RDONLY)
            advise(self.fds[name], 0, 0, "SEQUENTIAL")
        return self.fds[name]

    def jobs(self, group: list, header: bytes, begins: list[int]):
        """(chunk file, byte offset, count, output offset) pieces, or (None, Entry, 0, output offset) for a tensor
        torch assembles."""
        for (_, e), begin in zip(group, begins):
            at = len(header) + begin
            pieces = []
            if _rows_only(e):
                row = _nbytes(e) // e.size[0] if e.size and e.size[0] else 0
                try:
                    for c in _in_order(e):
                        blob = self.ckpt.blob(e.fqn, c, self.fd(c.file))
                        start, n, dest = (
                            c.offset + blob.data.data,
                            blob.data.size,
                            at + (c.offsets[0] * row if c.offsets else 0),
                        )
                        pieces += [
                            (c.file, start + b, min(COPY_BYTES, n - b), dest + b) for b in range(0, n, COPY_BYTES)
                        ]
                except NotCanonical:
                    pieces = None
            else:
                pieces = None
            yield from pieces if pieces is not None else [(None, e, 0, at)]

    def write(self, path: Path, header: bytes, size: int, jobs) -> tuple[int, str] | None:
        """Write the file; its (size, digest) where ``algo`` is set (only a model card records them)."""
        runner = StageRunner()
        self.runner, self.path, self.header, self.size = runner, path, header, size
        runner.add("apo-export-read", lambda: self._read(jobs))
        runner.add("apo-export-write", self._write)
        runner.add("apo-export-hash", self._hash)
        runner.run()
        if self.algo is None:
            return None
        return self.result if self.result is not None else hash_file(path, name=self.algo)

    def _read(self, jobs) -> None:
        try:
            for name, what, n, dest in jobs:
                if name is None:
                    put(self.runner, self.to_write, (_assemble(self.ckpt, what), dest, None))
                    continue
                full = self.runner.get(self.pool)
                pread_exact(self.fd(name), full[:n], what, self.ckpt.root / name)
                self.prefetcher.consumed(n)
                put(self.runner, self.to_write, (full[:n], dest, full))
        finally:
            if not self.runner.stop.is_set():
                put(self.runner, self.to_write, None)

    def _write(self) -> None:
        writer = SafetensorsWriter(self.path, self.header, self.size)
        try:
            self.to_hash.put((self.header, 0, None))
            while (job := self.runner.get(self.to_write)) is not None:
                writer.write(job[0], job[1])
                self.to_hash.put(job)
            writer.finish()
        finally:
            writer.close()
            self.to_hash.put(None)

    def _hash(self) -> None:
        hasher, at = (new_hasher(self.algo) if self.algo else None), 0
        while (job := self.runner.get(self.to_hash)) is not None:
            data, dest, full = job
            if hasher is not None and dest == at:
                hasher.update(data)
                at += len(data)
            else:
                hasher = None
            if full is not None:
                self.pool.put(full)
        self.result = (at, hasher.hexdigest()) if hasher is not None and at == self.size else None


def _assemble(ckpt: DcpCheckpoint, e: Entry) -> memoryview:
    """A tensor of any layout (or whose chunks only torch.load reads), assembled through torch: its bytes."""
    import torch

    full = torch.empty(e.size, dtype=getattr(torch, e.dtype))
    for c in e.chunks:
        full[tuple(slice(o, o + n) for o, n in zip(c.offsets, c.sizes))] = ckpt.read_chunk(e.fqn, c)
    return memoryview(full.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _copy_side_files(src: Path, dest: Path) -> list[str]:
    copied = []
    for entry in sorted(src.iterdir()):
        name = entry.name
        if name.startswith(".") or name == "README.md" or name == INDEX_NAME or name.endswith(WEIGHT_SUFFIXES):
            continue
        if entry.is_symlink() or not entry.is_file():
            continue
        shutil.copyfile(entry, dest / name)
        copied.append(name)
    return copied


def export_hf(
    dcp_dir: str | os.PathLike,
    hf_dir: str | os.PathLike,
    *,
    config_from: str | os.PathLike | None = None,
    max_shard_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the model tensors of ``dcp_dir`` as a safetensors folder ``hf_dir`` (atomic), side files from
    ``config_from`` (config.json, tokenizer, ...); return ``hf_dir``."""
    ckpt = open_dcp(dcp_dir, str(dcp_dir))
    out = Path(hf_dir).expanduser()
    if config_from is not None and not (Path(config_from) / "config.json").is_file():
        raise MergeError(f"--config-from {config_from}: has no config.json; give the Hugging Face folder of the model")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise MergeError(f"{out}: already exists; pass --overwrite to replace it or choose another output")
        check_replaceable(out)
    groups = _layout(ckpt, max_shard_size or DEFAULT_SHARD)
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    summary, algo = _source_summary(ckpt.root)  # an apo-merge output's card carries over, by the same hash
    metadata = {"format": "pt", **{k: v for k, v in summary.items() if k.startswith("apo_")}}
    staged = StagedFolder(out, overwrite)
    prefetcher = Prefetcher()
    prefetcher.ranges(_read_order(ckpt, groups))
    fds: dict[str, int] = {}
    with staged as tmp:
        files = {}
        try:
            for fname, group in zip(names, groups):
                header, begins = _header(group, metadata)
                size = len(header) + sum(_nbytes(e) for _, e in group)
                out_file = _File(ckpt, prefetcher, fds, algo if "apo_alpha" in metadata else None)
                files[fname] = out_file.write(tmp / fname, header, size, out_file.jobs(group, header, begins))
        finally:
            for fd in fds.values():
                os.close(fd)
        if n > 1:
            index = {
                "metadata": {"total_size": sum(_nbytes(e) for g in groups for _, e in g)},
                "weight_map": dict(sorted((name, f) for f, g in zip(names, groups) for name, _ in g)),
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if config_from is not None:
            _copy_side_files(Path(config_from), tmp)
        if "apo_alpha" in metadata:  # an apo-merge output: the card carries over, and verify checks the export
            info = card.CardInfo(
                alpha=float(metadata["apo_alpha"]),
                prev=metadata.get("apo_prev", ""),
                cur=metadata.get("apo_cur", ""),
                dtype="keep",
                files=files,
                base_models=[],
                rows=[("exported from", "torch DCP (apo-merge export)")],
                output_hash=algo,
            )
            (tmp / "README.md").write_text(card.render(info, out.name), encoding="utf-8")
        staged.commit()
    return out


def _read_order(ckpt: DcpCheckpoint, groups: list) -> list[tuple[Path, int, int]]:
    """The (storage file, offset, length) ranges in the order the export reads them: each tensor's chunks in
    turn, which moves between the ranks' files."""
    return [(ckpt.root / c.file, c.offset, c.length) for group in groups for _, e in group for c in _in_order(e)]


def _source_summary(root: Path) -> tuple[dict[str, str], str | None]:
    """An apo-merge DCP output's alpha, prev and cur, as its card recorded them (metadata names), and the hash its
    card records files by; ({}, None) for other folders."""
    try:
        with open(root / "README.md", "rb") as f:
            text = f.read(MAX_CARD_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return {}, None
    if card.CARD_MARK not in text:
        return {}, None
    found = card.recorded_summary(text)
    return {card.SUMMARY_METADATA[k]: v for k, v in found.items() if k in card.SUMMARY_METADATA}, card.recorded_hash(
        text
    )
