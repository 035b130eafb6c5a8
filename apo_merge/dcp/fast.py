"""The same-layout DCP merge without torch: each chunk's raw bytes read with pread, computed by apo_kernels'
compiled pass (else its numpy twin) and written inside CUR's own ``torch.save`` framing (apo_merge.dcp.blob).

It applies when PREV is a DCP folder with CUR's chunk plan, the output keeps CUR's dtypes, CUR holds model tensors
only (so the output's chunks sit at CUR's byte offsets and CUR's ``.metadata`` describes the output as it is) and
every chunk is a plain ``torch.save`` of one contiguous tensor; ``plan`` returns None otherwise and the torch path
(apo_merge.dcp.torchpath) writes the same bytes. Stages run on threads (read -> compute -> write -> hash: SHA-256 of
each output file from the buffers just written), over pieces of a chunk: memory is a few pieces (4 x 2 input and 4
x alphas output buffers of 2M elements), whatever the chunk sizes.
"""

from __future__ import annotations

import json
import os
import queue
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from apo_kernels import cpass
from apo_kernels.dtypes import BY_NAME, DTYPES
from apo_merge.dcp.blob import Blob, NotCanonical  # noqa: F401 - merge catches fast.NotCanonical
from apo_merge.dcp.reader import Chunk, DcpCheckpoint, _numel
from apo_merge.engine.runner import StageRunner, Stopped
from apo_merge.io.hashing import new_hasher
from apo_merge.io.prefetch import Prefetcher
from apo_merge.io.writer import SafetensorsWriter, advise, pread_exact

PIECE_ELEMS = 1 << 21  # elements per piece (8 MiB of fp32): large enough for the pass, small in memory
SLOTS = 4  # pieces in flight: input and output buffers each
KERNEL = {d.torch: d.name for d in DTYPES if d.kernel}  # "bfloat16" -> "BF16"
PART = ".apo-part-"


@dataclass
class Item:
    """One CUR chunk and where its PREV values are (None: copied unchanged). The blobs' framings are read by the
    read stage, in file order (read up front, on a cold disk, they cost a seek each, behind the prefetch)."""

    fqn: str
    chunk: Chunk
    dtype: str  # kernel name of CUR (and the output)
    prev: tuple[str, Chunk, str] | None  # PREV's key, chunk and kernel dtype name
    blob: Blob | None = None
    prev_blob: Blob | None = None
    crcs: list[int] = field(default_factory=list)


def plan(cur: DcpCheckpoint, prev, kinds: dict, options) -> dict[str, list[Item]] | None:
    """Per CUR storage file, its chunks in file order; None where the torch path must write the output (from the
    metadata alone: ``FastMerge.run`` raises NotCanonical for a chunk that only ``torch.load`` reads)."""
    from apo_kernels.dtypes import torch_name
    from apo_merge.dcp.sources import DcpPrev

    if not isinstance(prev, DcpPrev) or cur.left_out:
        return None
    want = None if options.dtype == "keep" else torch_name(options.dtype)
    files: dict[str, list[Item]] = {}
    for fqn, e in cur.entries.items():
        floating = kinds[fqn] is not None
        if floating and (e.dtype not in KERNEL or want not in (None, e.dtype)):
            return None
        p = prev.by_name[cur.hf_name(fqn)]
        by_box = {(c.offsets, c.sizes): c for c in p.chunks}
        for c in e.chunks:
            pair = None
            if floating:
                pc = by_box.get((c.offsets, c.sizes))
                if pc is None or p.dtype not in KERNEL:
                    return None
                pair = (p.fqn, pc, KERNEL[p.dtype])
            files.setdefault(c.file, []).append(Item(fqn, c, KERNEL.get(e.dtype, ""), pair))
    for name, items in files.items():  # the model's chunks fill each file, in order: offsets stay CUR's
        items.sort(key=lambda it: it.chunk.offset)
        at = 0
        for it in items:
            if it.chunk.offset != at:
                return None
            at += it.chunk.length
        if at != cur.file_sizes[name]:
            return None
    return files


def put(runner: StageRunner, q: queue.Queue, item) -> None:
    """``q.put(item)`` into a bounded queue that gives up (raises ``Stopped``) once another stage has failed: the
    stage that would take it may be gone."""
    while True:
        try:
            return q.put(item, timeout=0.1)
        except queue.Full:
            if runner.stop.is_set():
                raise Stopped() from None


@dataclass
class _Task:
    kind: str  # "head", "data", "tail", "raw", "end"
    item: Item | None = None
    begin: int = 0  # byte offset in the chunk's data (data) or blob (raw)
    count: int = 0  # elements (data) or bytes (raw)
    name: str = ""  # the storage file (end)
    slot: tuple | None = None


class FastMerge:
    """Write ``files`` (from ``plan``) into each staging folder of ``outs`` ((folder, alpha) pairs), each file
    hashed by ``algo`` (io.hashing.OUTPUT_HASHES)."""

    def __init__(
        self, cur: DcpCheckpoint, prev: DcpCheckpoint, files: dict[str, list[Item]], outs: list, algo: str
    ) -> None:
        self.cur, self.prev, self.files, self.outs, self.algo = cur, prev, files, outs, algo
        widest = max((BY_NAME[i.dtype].itemsize for its in files.values() for i in its if i.prev), default=1)
        widest = max(widest, *(BY_NAME[i.prev[2]].itemsize for its in files.values() for i in its if i.prev), 1)
        self.piece_bytes = PIECE_ELEMS * widest
        self.free_in: queue.Queue = queue.Queue()
        self.free_out: queue.Queue = queue.Queue()
        for _ in range(SLOTS):
            self.free_in.put((np.empty(self.piece_bytes, np.uint8), np.empty(self.piece_bytes, np.uint8)))
            self.free_out.put([np.empty(self.piece_bytes, np.uint8) for _ in outs])
        self.to_compute: queue.Queue = queue.Queue(SLOTS)
        self.to_write: queue.Queue = queue.Queue(SLOTS)
        self.to_hash: queue.Queue = queue.Queue()  # bounded by the slots its tasks hold
        self.fds: dict[Path, int] = {}
        self.nonfinite = 0
        self.kernel = cpass.best()

    def run(self, names: list[str], progress=None, prefetcher: Prefetcher | None = None) -> int:
        """Write the storage files ``names``; the count of new non-finite values (all outputs)."""
        self.progress, self.prefetcher = progress, prefetcher or Prefetcher()
        prev_files = sorted({i.prev[1].file for n in names for i in self.files[n] if i.prev})
        self.prefetcher.prefetch([self.prev.root / n for n in prev_files], [self.cur.root / n for n in names])
        runner = StageRunner()
        self.runner = runner
        runner.add("apo-dcp-read", lambda: self._read(names))
        runner.add("apo-dcp-compute", self._compute)
        runner.add("apo-dcp-write", self._write)
        runner.add("apo-dcp-hash", self._hash)
        try:
            runner.run()
        finally:
            for fd in self.fds.values():
                os.close(fd)
        return self.nonfinite

    def _tasks(self, names: list[str]):
        for name in names:
            for it in self.files[name]:
                if it.prev is None:  # copied: CUR's blob as it is
                    for b in range(0, it.chunk.length, self.piece_bytes):
                        yield _Task("raw", it, b, min(self.piece_bytes, it.chunk.length - b))
                    continue
                it.crcs = [0] * len(self.outs)
                yield _Task("head", it)
                n = _numel(it.chunk.sizes)  # the framing's check: the data record holds exactly these
                for b in range(0, n, PIECE_ELEMS):
                    yield _Task("data", it, b, min(PIECE_ELEMS, n - b))
                yield _Task("tail", it)
            yield _Task("end", name=name)

    def _fd(self, root: Path, name: str) -> int:
        path = root / name
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
            advise(self.fds[path], 0, 0, "SEQUENTIAL")
        return self.fds[path]

    def _pread(self, root: Path, name: str, view, offset: int) -> None:
        pread_exact(self._fd(root, name), view, offset, root / name)
        self.prefetcher.consumed(len(view))

    def _frame(self, it: Item) -> None:
        """Read and check the framings of ``it``'s blobs (NotCanonical: the torch path writes this merge)."""
        it.blob = self.cur.blob(it.fqn, it.chunk, self._fd(self.cur.root, it.chunk.file))
        if it.prev is not None:
            fqn, pc, _ = it.prev
            it.prev_blob = self.prev.blob(fqn, pc, self._fd(self.prev.root, pc.file))
            if it.blob.data.size and not it.blob.data.described:
                raise NotCanonical("the CRC-32 in the local header")

    def _read(self, names: list[str]) -> None:
        try:
            for task in self._tasks(names):
                it = task.item
                if task.kind == "head" or (task.kind == "raw" and task.begin == 0):
                    self._frame(it)
                if task.kind == "raw":
                    slot = task.slot = self.runner.get(self.free_in)
                    self._pread(
                        self.cur.root, it.chunk.file, memoryview(slot[1])[: task.count], it.chunk.offset + task.begin
                    )
                elif task.kind == "data":
                    slot = task.slot = self.runner.get(self.free_in)
                    _, pc, pdt = it.prev
                    cs, ps = BY_NAME[it.dtype].itemsize, BY_NAME[pdt].itemsize
                    at_p = pc.offset + it.prev_blob.data.data + task.begin * ps
                    self._pread(self.prev.root, pc.file, memoryview(slot[0])[: task.count * ps], at_p)
                    at_c = it.chunk.offset + it.blob.data.data + task.begin * cs
                    self._pread(self.cur.root, it.chunk.file, memoryview(slot[1])[: task.count * cs], at_c)
                put(self.runner, self.to_compute, task)
        finally:
            if not self.runner.stop.is_set():
                put(self.runner, self.to_compute, None)

    def _compute(self) -> None:
        alphas = [a for _, a in self.outs]
        while (task := self.runner.get(self.to_compute)) is not None:
            if task.kind == "data":
                it, (p, c) = task.item, task.slot
                cs, ps = BY_NAME[it.dtype].itemsize, BY_NAME[it.prev[2]].itemsize
                outs = self.runner.get(self.free_out)
                views = [o[: task.count * cs] for o in outs]
                found = self.kernel(
                    views, it.dtype, p[: task.count * ps], it.prev[2], c[: task.count * cs], it.dtype, alphas
                )
                self.nonfinite += sum(found)
                for k, v in enumerate(views):
                    it.crcs[k] = zlib.crc32(v, it.crcs[k])
                self.free_in.put(task.slot)
                task.slot = views
            put(self.runner, self.to_write, task)
        put(self.runner, self.to_write, None)

    def _write(self) -> None:
        """Each task's bytes at their place in every output file; then on to the hash stage."""
        writers: list[SafetensorsWriter] = []
        at = 0
        try:
            while (task := self.runner.get(self.to_write)) is not None:
                if task.kind == "end":
                    for w in writers:
                        w.finish()  # fsync before the part record says the file is done
                    writers, at = [], 0
                    self.to_hash.put((task, []))
                    continue
                it = task.item
                if not writers:
                    size = self.cur.file_sizes[it.chunk.file]
                    writers = [SafetensorsWriter(tmp / it.chunk.file, b"", size) for tmp, _ in self.outs]
                if task.kind == "raw":
                    views = [memoryview(task.slot[1])[: task.count]] * len(self.outs)
                elif task.kind == "head":
                    views = [it.blob.head] * len(self.outs)
                elif task.kind == "data":
                    views = [memoryview(v) for v in task.slot]
                else:
                    views = [it.blob.framed(crc)[1] for crc in it.crcs]
                for w, v in zip(writers, views):
                    w.write(v, at)
                at += len(views[0])
                self.to_hash.put((task, views))
                if self.progress:
                    self.progress(len(views[0]) * len(self.outs))
        finally:
            for w in writers:
                w.close()
            self.to_hash.put(None)

    def _hash(self) -> None:
        """The hash of each output file beside the writes (from the buffers just written), and its part record."""
        shas = [new_hasher(self.algo) for _ in self.outs]
        records: list[list] = [[] for _ in self.outs]
        at = 0
        while (got := self.runner.get(self.to_hash)) is not None:
            task, views = got
            if task.kind == "end":
                for k, (tmp, _) in enumerate(self.outs):
                    part = {"file": task.name, "size": at, "digest": shas[k].hexdigest(), "chunks": records[k]}
                    (tmp / f"{PART}{task.name}.json").write_text(json.dumps(part))
                shas, records, at = [new_hasher(self.algo) for _ in self.outs], [[] for _ in self.outs], 0
                continue
            it = task.item
            if task.kind in ("raw", "head") and task.begin == 0:
                for rec in records:
                    rec.append([it.fqn, list(it.chunk.offsets), it.chunk.offset, it.chunk.length])
            for sha, v in zip(shas, views):
                sha.update(v)
            at += len(views[0])
            if task.kind == "raw":
                self.free_in.put(task.slot)
            elif task.kind == "data":
                self.free_out.put([v.base for v in task.slot])
