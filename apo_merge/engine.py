"""Stream a MergePlan's bytes through the kernel: read -> compute -> write, overlapped on three threads.

Inputs are read with pread into a small ring of reusable buffers (pinned when the GPU computes), so memory does
not grow with checkpoint size and no input page is mapped. Output files are written in order, each tensor in
chunks, and hashed (SHA-256) as they are written.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from apo_kernels import extrapolate_
from apo_merge.errors import MergeError
from apo_merge.header import ITEMSIZE, FileHeader
from apo_merge.plan import MergePlan, OutFile, Piece

CHUNK_ELEMS = 1 << 21  # per chunk of an extrapolated tensor
COPY_CHUNK_BYTES = 1 << 23  # per chunk of a copied tensor
N_SLOTS = 4

OnRead = Callable[[Path, int, memoryview], None]

TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class _Stopped(Exception):
    """Raised inside a stage when another stage failed."""


@dataclass
class EngineStats:
    seconds: float
    bytes_written: int
    sha256: dict[str, str] = field(default_factory=dict)
    new_nonfinite: int = 0  # non-finite outputs whose inputs were both finite


@dataclass
class _Task:
    out_index: int
    piece: Piece
    begin: int  # element (or byte, for copies) offset within the tensor
    count: int
    slot: _Slot | None = None

    @property
    def copy(self) -> bool:
        return self.piece.prev is None


class _Slot:
    def __init__(self, nbytes: int, pinned: bool) -> None:
        def buf() -> torch.Tensor:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)

        self.cur, self.prev, self.out = buf(), buf(), buf()


def _tasks(plan: MergePlan) -> Iterator[_Task]:
    for i, f in enumerate(plan.files):
        for piece in f.pieces:
            total, step = (piece.nbytes, COPY_CHUNK_BYTES) if piece.prev is None else (piece.numel, CHUNK_ELEMS)
            for begin in range(0, max(total, 1), step):
                yield _Task(i, piece, begin, min(step, total - begin))


def _pread_into(fd: int, buf: torch.Tensor, nbytes: int, offset: int, path: Path) -> None:
    view = memoryview(buf.numpy())[:nbytes]
    got = 0
    while got < nbytes:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise MergeError(f"{path}: file ended early at byte {offset + got} (changed or truncated while "
                             "merging); check the input and rerun")
        got += n


class _Pipeline:
    def __init__(self, plan: MergePlan, out_dir: Path, device: torch.device,
                 progress: Callable[[int], None] | None, on_read: OnRead | None = None) -> None:
        self.plan, self.out_dir, self.device, self.progress = plan, out_dir, device, progress
        self.on_read = on_read
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.free: queue.Queue[_Slot] = queue.Queue()
        self.to_compute: queue.Queue[_Task | None] = queue.Queue()
        self.to_write: queue.Queue[_Task | None] = queue.Queue()
        self.fds: dict[Path, int] = {}
        self.stats = EngineStats(0.0, 0)
        widest = max([ITEMSIZE[p.dtype] for f in plan.files for p in f.pieces]
                     + [ITEMSIZE[src[1].dtype] for f in plan.files for p in f.pieces for src in (p.cur, p.prev) if src]
                     + [1])
        slot_bytes = max(CHUNK_ELEMS * widest, COPY_CHUNK_BYTES)
        gpu = device.type == "cuda"
        for _ in range(N_SLOTS):
            self.free.put(_Slot(slot_bytes, pinned=gpu))
        if gpu:
            self.stream = torch.cuda.Stream(device)
            self.dev = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(3)]

    # -- stages -------------------------------------------------------------------------------------------
    def _fd(self, path: Path) -> int:
        if path not in self.fds:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self.fds[path] = fd
        return self.fds[path]

    def _pread(self, header: FileHeader, buf: torch.Tensor, nbytes: int, data_offset: int) -> None:
        offset = header.data_start + data_offset
        _pread_into(self._fd(header.path), buf, nbytes, offset, header.path)
        if self.on_read is not None:
            self.on_read(header.path, offset, memoryview(buf.numpy())[:nbytes])

    def _get(self, q: queue.Queue):
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if self.stop.is_set():
                    raise _Stopped() from None

    def _read(self) -> None:
        for task in _tasks(self.plan):
            slot = self._get(self.free)
            task.slot = slot
            piece = task.piece
            header, info = piece.cur
            if task.copy:
                self._pread(header, slot.out, task.count, info.begin + task.begin)
            else:
                for (h, i), buf in ((piece.cur, slot.cur), (piece.prev, slot.prev)):
                    size = ITEMSIZE[i.dtype]
                    self._pread(h, buf, task.count * size, i.begin + task.begin * size)
            self.to_compute.put(task)
        self.to_compute.put(None)

    def _compute(self) -> None:
        alpha = self.plan.alpha
        while (task := self._get(self.to_compute)) is not None:
            if not task.copy:
                piece, slot, n = task.piece, task.slot, task.count
                cd, pd, od = (TORCH_DTYPES[piece.cur[1].dtype], TORCH_DTYPES[piece.prev[1].dtype],
                              TORCH_DTYPES[piece.dtype])
                cb, pb, ob = n * ITEMSIZE[piece.cur[1].dtype], n * ITEMSIZE[piece.prev[1].dtype], n * ITEMSIZE[piece.dtype]
                if self.device.type == "cuda":
                    with torch.cuda.stream(self.stream):
                        c = self.dev[0][:cb].copy_(slot.cur[:cb], non_blocking=True).view(cd)
                        p = self.dev[1][:pb].copy_(slot.prev[:pb], non_blocking=True).view(pd)
                        o = self.dev[2][:ob].view(od)
                        extrapolate_(o, p, c, alpha)
                        self.stats.new_nonfinite += _new_nonfinite(o, p, c)
                        slot.out[:ob].copy_(self.dev[2][:ob], non_blocking=True)
                    self.stream.synchronize()
                else:
                    c, p, o = slot.cur[:cb].view(cd), slot.prev[:pb].view(pd), slot.out[:ob].view(od)
                    extrapolate_(o, p, c, alpha)
                    self.stats.new_nonfinite += _new_nonfinite(o, p, c)
            self.to_write.put(task)
        self.to_write.put(None)

    def _write(self) -> None:
        fd, current, hasher = -1, -1, None
        try:
            while (task := self._get(self.to_write)) is not None:
                if task.out_index != current:
                    if fd >= 0:
                        self._finish_file(fd, current, hasher)
                        fd = -1  # closed: the finally below must not close this number again
                    current = task.out_index
                    fd, hasher = self._start_file(self.plan.files[current])
                piece, slot = task.piece, task.slot
                size = 1 if task.copy else ITEMSIZE[piece.dtype]
                data = memoryview(slot.out.numpy())[:task.count * size]
                offset = piece.offset + task.begin * size
                written = 0
                while written < len(data):
                    written += os.pwrite(fd, data[written:], offset + written)
                hasher.update(data)
                self.free.put(slot)
                self.stats.bytes_written += len(data)
                if self.progress:
                    self.progress(len(data))
            if fd >= 0:
                self._finish_file(fd, current, hasher)
                fd = -1
        finally:
            if fd >= 0:
                os.close(fd)

    def _start_file(self, f: OutFile):
        fd = os.open(self.out_dir / f.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:  # reserve the space now: a full disk fails here, before hours of work
            os.posix_fallocate(fd, 0, f.size)
        except OSError as e:
            if e.errno not in (95, 22):  # EOPNOTSUPP / EINVAL: the filesystem cannot preallocate
                os.close(fd)
                raise
        os.pwrite(fd, f.header, 0)
        hasher = hashlib.sha256(f.header)
        self.stats.bytes_written += len(f.header)
        if self.progress:
            self.progress(len(f.header))
        return fd, hasher

    def _finish_file(self, fd: int, index: int, hasher) -> None:
        os.fsync(fd)
        os.close(fd)
        self.stats.sha256[self.plan.files[index].name] = hasher.hexdigest()

    # -- driver -------------------------------------------------------------------------------------------
    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except _Stopped:
                pass
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                if self.error is None:
                    self.error = e
                self.stop.set()

        return run

    def run(self) -> EngineStats:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=self._guard(self._read), name="apo-read", daemon=True),
                   threading.Thread(target=self._guard(self._write), name="apo-write", daemon=True)]
        try:
            for t in threads:  # inside the try: a signal landing between the two starts must stop the first
                t.start()
            self._guard(self._compute)()
            _join(threads)
        except BaseException:  # Ctrl-C while joining: stop the other stages before the caller cleans up
            self.stop.set()
            _join(threads)
            raise
        finally:
            for fd in self.fds.values():
                os.close(fd)
        if self.error is not None:
            raise self.error
        self.stats.seconds = time.perf_counter() - t0
        return self.stats


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        while t.is_alive():  # short joins keep Ctrl-C responsive
            t.join(timeout=0.1)


def _new_nonfinite(out: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor) -> int:
    bad = ~torch.isfinite(out)
    if not bool(bad.any()):
        return 0
    return int((bad & torch.isfinite(prev) & torch.isfinite(cur)).sum())


def execute(plan: MergePlan, out_dir: Path, *, device: torch.device | str = "cpu",
            progress: Callable[[int], None] | None = None, on_read: OnRead | None = None) -> EngineStats:
    """Write every file of ``plan`` into ``out_dir`` (which must exist and be empty of those names).

    ``on_read(path, offset, data)`` is called on the reader thread after each read of an input file: ``data``
    holds the bytes at absolute ``offset`` and is valid only during the call (e.g. to hash the inputs).
    OSError propagates: output.StagedFolder, which knows the user's OUT, turns it into a MergeError.
    """
    return _Pipeline(plan, Path(out_dir), torch.device(device), progress, on_read).run()
