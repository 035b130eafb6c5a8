"""The DCP merge's torch path: each chunk through ``torch.load`` and ``torch.save``, and a new ``.metadata``.

It writes what apo_merge.dcp.fast cannot: PREV of another layout or a Hugging Face folder, a dtype change, CUR with
entries left out (optimizer state: the output's byte ranges and metadata differ from CUR's), chunks that are not a
plain ``torch.save`` of one contiguous tensor. Both paths write the same bytes where both apply.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint.filesystem import _StorageInfo

from apo_kernels import extrapolate_
from apo_kernels.dtypes import torch_dtype
from apo_merge.dcp.reader import DcpCheckpoint
from apo_merge.io.hashing import new_hasher
from apo_merge.io.writer import SFR_WAIT_AFTER, SFR_WAIT_BEFORE, SFR_WRITE, SYNC_FILE_RANGE, WRITEBACK_BYTES, advise
from apo_merge.options import MergeOptions

PART = ".apo-part-"  # a rank's record of one file it wrote, read and removed by rank 0
SFR_WAIT_ALL = SFR_WAIT_BEFORE | SFR_WRITE | SFR_WAIT_AFTER


def _out_dtype(options: MergeOptions, cur_dtype: str, floating: bool) -> torch.dtype:
    if not floating or options.dtype == "keep":
        return getattr(torch, cur_dtype)
    return torch_dtype(options.dtype)


class _Sink:
    """What torch.save writes, straight to an output file (no copy in between), hashed on the way."""

    def __init__(self, fd: int, algo: str) -> None:
        self.fd, self.pos, self.sha = fd, 0, new_hasher(algo)
        self.started = self.dropped = 0  # as SafetensorsWriter: writeback kept moving, written pages dropped

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        self.sha.update(view)
        while view:
            view = view[os.write(self.fd, view) :]
        self.pos += n
        if SYNC_FILE_RANGE is not None and self.pos - self.started >= WRITEBACK_BYTES:
            SYNC_FILE_RANGE(self.fd, self.started, self.pos - self.started, SFR_WRITE)
            if self.started > self.dropped:
                SYNC_FILE_RANGE(self.fd, self.dropped, self.started - self.dropped, SFR_WAIT_ALL)
                advise(self.fd, self.dropped, self.started - self.dropped, "DONTNEED")
                self.dropped = self.started
            self.started = self.pos
        return n

    def flush(self) -> None:
        pass


def _save(t: torch.Tensor, sink: _Sink) -> int:
    """Append ``torch.save(t)`` (the bytes are the same for equal tensors: a rerun writes the same files)."""
    start = sink.pos
    torch.save(t, sink)
    return sink.pos - start


def write_file(name: str, cur: DcpCheckpoint, prev, kinds: dict, outs: list[tuple[Path, float]], opts) -> int:
    """Write CUR's storage file ``name`` into each staging folder (one per alpha), and a record of its chunks."""
    options, progress = opts
    items = sorted(((c.offset, f, c) for f, e in cur.entries.items() for c in e.chunks if c.file == name))
    files = [os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644) for tmp, _ in outs]
    sinks = [_Sink(fd, options.output_hash) for fd in files]
    records: list[list] = [[] for _ in outs]
    nonfinite = 0
    try:
        for _, fqn, chunk in items:
            c = cur.read_chunk(fqn, chunk)
            floating = kinds[fqn] is not None
            p = prev.region(cur.hf_name(fqn), chunk.offsets, chunk.sizes) if floating else None
            for k, (_, alpha) in enumerate(outs):
                if floating:
                    out = extrapolate_(torch.empty(c.shape, dtype=_out_dtype(options, kinds[fqn], True)), p, c, alpha)
                    if options.strict:
                        nonfinite += int((~out.isfinite() & p.isfinite() & c.isfinite()).sum())
                else:
                    out = c
                start = sinks[k].pos
                n = _save(out, sinks[k])
                records[k].append([fqn, list(chunk.offsets), start, n])
                if progress:
                    progress(n)
        for k, (tmp, _) in enumerate(outs):
            os.fsync(files[k])
            part = {"file": name, "size": sinks[k].pos, "digest": sinks[k].sha.hexdigest(), "chunks": records[k]}
            (tmp / f"{PART}{name}.json").write_text(json.dumps(part))
    finally:
        for fd in files:
            os.close(fd)
    return nonfinite


def build_metadata(cur: DcpCheckpoint, kinds: dict, options: MergeOptions, parts: dict[str, dict]) -> bytes:
    """The new ``.metadata``: CUR's model entries (dtype as written), the new byte ranges, no save ids."""
    where = {(fqn, tuple(off)): (p["file"], at, n) for p in parts.values() for fqn, off, at, n in p["chunks"]}
    sd_md, storage = {}, {}
    for fqn, e in cur.entries.items():
        dtype = _out_dtype(options, e.dtype, kinds[fqn] is not None)
        chunks = [dcp_md.ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in e.chunks]
        sd_md[fqn] = dcp_md.TensorStorageMetadata(dcp_md.TensorProperties(dtype=dtype), torch.Size(e.size), chunks)
        for i, c in enumerate(e.chunks):
            file, at, n = where[(fqn, c.offsets)]
            storage[dcp_md.MetadataIndex(fqn, c.offsets, i)] = _StorageInfo(file, at, n)
    planner = cur.meta.planner_data
    planner = {f: planner[f] for f in cur.entries if f in planner} if isinstance(planner, dict) else planner
    meta = dcp_md.Metadata(sd_md, planner, storage, dcp_md.StorageMeta(), cur.meta.version)
    return pickle.dumps(meta)
