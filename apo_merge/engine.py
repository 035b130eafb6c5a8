"""Stream a MergePlan's bytes through the kernel: read -> compute -> write -> hash, overlapped on threads.

- prefetch: a daemon thread asks the kernel to read the inputs ahead (POSIX_FADV_WILLNEED, PREV and CUR side by
  side, in read order), starting before torch is imported, so the disk streams while the process starts. It
  stays at most half the available memory ahead of the reader; the pages are reclaimable page cache.
- read: pread into a small ring of reusable buffers (pinned when the GPU computes): anonymous memory does not
  grow with checkpoint size and no input page is mapped.
- compute: on the CPU, worker threads with one torch thread each (OpenMP threads spinning next to the I/O
  threads cost more than they give on small machines); on a GPU, pinned slots, two CUDA streams with their
  own device buffers (copies of one chunk overlap the kernel of the other) and an event per chunk that the
  writer waits on, so the compute thread never synchronises.
- write: chunks in order (workers may finish out of order) with pwrite, and writeback started every
  WRITEBACK_BYTES with sync_file_range, the pages behind it dropped once on disk: the final fsync has little
  left to do and the page cache does not fill with dirty output.
- hash: SHA-256 of each output file (for the model card), in order, beside the writes.

torch loads lazily, so that ``prefetch_checkpoints`` can start before it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apo_merge.errors import MergeError
from apo_merge.header import ITEMSIZE, FileHeader
from apo_merge.plan import MergePlan, OutFile, Piece

if TYPE_CHECKING:
    import torch

CHUNK_ELEMS = 1 << 20  # elements per task on the CPU (the twin works through it in cache-sized pieces)
GPU_CHUNK_ELEMS = 1 << 22  # per task on a GPU: fewer, larger copies and launches
COPY_CHUNK_BYTES = 1 << 22  # per task of a tensor copied unchanged
WRITEBACK_BYTES = 1 << 26  # start writeback of the output every this many bytes
PREFETCH_STEP = 4 << 20  # one WILLNEED reads at most the device's readahead size (often 4-8 MiB)
# Pieces in flight at once: enough for the disk's bandwidth, few enough that the reads on the critical path
# (headers, file-system metadata for the output, torch's own files) do not queue behind gigabytes of readahead.
PREFETCH_DEPTH = 16
MAX_CPU_WORKERS = 4
GPU_SLOTS = 5

# The kernel, imported with torch when the first merge starts (tests may swap it).
extrapolate_: Callable[..., Any] | None = None

OnRead = Callable[[Path, int, memoryview], None]

_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4
_TORCH_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def __getattr__(name: str) -> Any:
    if name == "TORCH_DTYPES":  # {safetensors dtype: torch dtype}, built on use: this module loads before torch
        import torch

        return {k: getattr(torch, v) for k, v in _TORCH_DTYPE_NAMES.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Stopped(Exception):
    """Raised inside a stage when another stage failed."""


@dataclass
class EngineStats:
    seconds: float
    bytes_written: int
    sha256: dict[str, str] = field(default_factory=dict)
    new_nonfinite: int = 0  # non-finite outputs whose inputs were both finite


# -- prefetch -------------------------------------------------------------------------------------------------
_read_bytes = 0  # input bytes the engine's readers have consumed (the prefetch window slides with it)
_prefetched: dict[str, float] = {}  # real path -> when its prefetch started
_prefetch_lock = threading.Lock()
_PREFETCH_PATIENCE_S = 60.0  # a prefetcher whose readers stopped reading gives up after this long
_PREFETCH_FRESH_S = 60.0  # a file prefetched this recently is not prefetched again


def _advise(fd: int, offset: int, length: int, advice: str) -> None:
    """posix_fadvise where the platform has it: a hint, the merge is correct without it."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, getattr(os, f"POSIX_FADV_{advice}"))


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 30


def prefetch(*streams: Sequence[Path]) -> None:
    """Start reading files into the page cache in a background thread; a hint only (errors are ignored).

    Each stream is a list of files read in that order; streams advance together (PREV and CUR are read side by
    side), at most half the available memory ahead of the merge's reads. Files prefetched in the last minute
    (e.g. by the CLI, before the engine asks again) are skipped.
    """
    now = time.monotonic()
    with _prefetch_lock:
        todo = []
        for stream in streams:
            fresh = [
                Path(p) for p in stream if now - _prefetched.get(os.path.realpath(p), -math.inf) > _PREFETCH_FRESH_S
            ]
            _prefetched.update((os.path.realpath(p), now) for p in fresh)
            todo.append(fresh)
    if any(todo):
        threading.Thread(
            target=_prefetch, args=(todo, _available_memory() // 2), name="apo-prefetch", daemon=True
        ).start()


def prefetch_checkpoints(*folders: str | os.PathLike) -> None:
    """``prefetch`` the weight files of local checkpoint folders (the CLI calls it first, before torch loads)."""

    def run() -> None:
        from apo_merge.checkpoint import open_checkpoint

        streams = []
        for folder in folders:
            # Not a local checkpoint, or a broken one: the merge itself reports it.
            with contextlib.suppress(Exception):
                streams.append([h.path for h in open_checkpoint(folder).files])
        prefetch(*streams)

    threading.Thread(target=run, name="apo-prefetch-open", daemon=True).start()


def _prefetch(streams: list[list[Path]], budget: int) -> None:
    # Cut every stream into PREFETCH_STEP pieces and issue them in order of their position within their stream,
    # so that the streams advance in proportion to their sizes, as the merge reads them.
    fds: dict[Path, int] = {}
    try:
        pieces = []
        for stream in streams:
            sizes = []
            for path in stream:
                fds[path] = os.open(path, os.O_RDONLY)
                sizes.append(os.fstat(fds[path]).st_size)
            total, at = max(1, sum(sizes)), 0
            for path, size in zip(stream, sizes):
                for off in range(0, size, PREFETCH_STEP):
                    pieces.append(((at + off) / total, fds[path], off, min(PREFETCH_STEP, size - off)))
                at += size
        pieces.sort(key=lambda p: p[0])
        issued, base = 0, _read_bytes
        for i, (_, fd, off, n) in enumerate(pieces):
            last, since = _read_bytes, time.monotonic()
            while issued - (_read_bytes - base) > budget:  # far enough ahead: wait for the readers
                if _read_bytes != last:
                    last, since = _read_bytes, time.monotonic()
                elif time.monotonic() - since > _PREFETCH_PATIENCE_S:
                    return
                time.sleep(0.05)
            _advise(fd, off, n, "WILLNEED")
            issued += n
            if i >= PREFETCH_DEPTH:  # wait for an older piece to arrive: reading its last byte blocks until then
                _, old_fd, old_off, old_n = pieces[i - PREFETCH_DEPTH]
                os.pread(old_fd, 1, old_off + old_n - 1)
    except OSError:
        pass
    finally:
        for fd in fds.values():
            os.close(fd)


# -- writeback ------------------------------------------------------------------------------------------------
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _sync_file_range()


class _OutWriter:
    """One output file written front to back, with writeback kept moving behind the writes."""

    def __init__(self, path: Path, f: OutFile) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.end = self.started = self.dropped = 0  # written / handed to writeback / on disk and dropped
        try:
            try:  # reserve the space now: a full disk fails here, before hours of work
                os.posix_fallocate(self.fd, 0, f.size)
            except OSError as e:
                if e.errno not in (95, 22):  # EOPNOTSUPP / EINVAL: the filesystem cannot preallocate
                    raise
            self.write(memoryview(f.header), 0)
        except BaseException:
            self.close()
            raise

    def write(self, data: memoryview, offset: int) -> None:
        written = 0
        while written < len(data):
            written += os.pwrite(self.fd, data[written:], offset + written)
        self.end = offset + len(data)
        if _SYNC_FILE_RANGE is not None and self.end - self.started >= WRITEBACK_BYTES:
            # Start writing the new window, then wait for the previous one and drop its pages: the disk always
            # has a window in flight and at most two windows of output sit in memory.
            _SYNC_FILE_RANGE(self.fd, self.started, self.end - self.started, _SFR_WRITE)
            if self.started > self.dropped:
                _SYNC_FILE_RANGE(
                    self.fd, self.dropped, self.started - self.dropped, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER
                )
                _advise(self.fd, self.dropped, self.started - self.dropped, "DONTNEED")
                self.dropped = self.started
            self.started = self.end

    def finish(self) -> None:
        os.fsync(self.fd)
        _advise(self.fd, 0, 0, "DONTNEED")
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- the pipeline ---------------------------------------------------------------------------------------------
@dataclass
class _Task:
    seq: int
    out_index: int
    piece: Piece
    begin: int  # element (or byte, for copies) offset within the tensor
    count: int
    slot: _Slot | None = None
    ready: Any = None  # a CUDA event the writer waits for before writing slot.out

    @property
    def copy(self) -> bool:
        return self.piece.prev is None


def _memoryview(t: torch.Tensor) -> memoryview:
    return memoryview((ctypes.c_ubyte * t.numel()).from_address(t.data_ptr())).cast("B")


class _Slot:
    """Reusable host buffers for one chunk: CUR's, PREV's and the output's bytes."""

    def __init__(self, nbytes: int, pinned: bool) -> None:
        import torch

        self.cur, self.prev, self.out = (torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(3))
        self.views = {"cur": _memoryview(self.cur), "prev": _memoryview(self.prev), "out": _memoryview(self.out)}


def _tasks(plan: MergePlan, chunk_elems: int) -> Iterator[_Task]:
    seq = 0
    for i, f in enumerate(plan.files):
        for piece in f.pieces:
            total, step = (piece.nbytes, COPY_CHUNK_BYTES) if piece.prev is None else (piece.numel, chunk_elems)
            for begin in range(0, max(total, 1), step):
                yield _Task(seq, i, piece, begin, min(step, total - begin))
                seq += 1


def pread_exact(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; a file that ends early is a MergeError naming ``path``."""
    global _read_bytes
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise MergeError(
                f"{path}: file ended early at byte {offset + got} (changed or truncated while "
                "merging); check the input and rerun"
            )
        got += n
    _read_bytes += got  # a hint for the prefetcher: races between readers only blur it


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    import torch

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _nbytes(task: _Task) -> tuple[int, int, int]:
    """Bytes of the chunk's (out, prev, cur)."""
    piece = task.piece
    return tuple(task.count * ITEMSIZE[d] for d in (piece.dtype, piece.prev[1].dtype, piece.cur[1].dtype))


def _operands(task: _Task, out: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor) -> list[torch.Tensor]:
    """The chunk's (out, prev, cur) in their dtypes, viewed over byte buffers that hold it from offset 0."""
    import torch

    piece = task.piece
    dtypes = (piece.dtype, piece.prev[1].dtype, piece.cur[1].dtype)
    return [
        buf[:n].view(getattr(torch, _TORCH_DTYPE_NAMES[d]))
        for buf, n, d in zip((out, prev, cur), _nbytes(task), dtypes)
    ]


class _Pipeline:
    def __init__(
        self,
        plan: MergePlan,
        out_dir: Path,
        device: torch.device,
        progress: Callable[[int], None] | None,
        on_read: OnRead | None = None,
    ) -> None:
        self.plan, self.out_dir, self.device, self.progress = plan, out_dir, device, progress
        self.on_read = on_read
        self.gpu = device.type == "cuda"
        self.chunk_elems = GPU_CHUNK_ELEMS if self.gpu else CHUNK_ELEMS
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.workers = 1 if self.gpu else max(1, min(MAX_CPU_WORKERS, cpus))
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.free: queue.Queue[_Slot] = queue.Queue()
        self.to_compute: queue.Queue[_Task | None] = queue.Queue()
        self.to_write: queue.Queue[_Task | None] = queue.Queue()
        # (file name, bytes to hash or None at the end of the file, slot to free after hashing)
        self.to_hash: queue.Queue[tuple[str, memoryview | None, _Slot | None] | None] = queue.Queue()
        self.fds: dict[Path, int] = {}
        self.stats = EngineStats(0.0, 0)
        widest = max(
            [ITEMSIZE[p.dtype] for f in plan.files for p in f.pieces]
            + [ITEMSIZE[s[1].dtype] for f in plan.files for p in f.pieces for s in (p.cur, p.prev) if s]
            + [1]
        )
        self.slot_bytes = max(self.chunk_elems * widest, COPY_CHUNK_BYTES)
        # Enough slots for every stage to hold one while the reader fills the next.
        with _on(device):  # pinned for this device's context
            for _ in range(GPU_SLOTS if self.gpu else self.workers + 4):
                self.free.put(_Slot(self.slot_bytes, pinned=self.gpu))

    # -- stages -------------------------------------------------------------------------------------------
    def _fd(self, path: Path) -> int:
        if path not in self.fds:
            fd = os.open(path, os.O_RDONLY)
            _advise(fd, 0, 0, "SEQUENTIAL")
            self.fds[path] = fd
        return self.fds[path]

    def _get(self, q: queue.Queue):
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if self.stop.is_set():
                    raise _Stopped() from None

    def _pread(self, header: FileHeader, view: memoryview, data_offset: int) -> None:
        offset = header.data_start + data_offset
        pread_exact(self._fd(header.path), view, offset, header.path)
        if self.on_read is not None:
            self.on_read(header.path, offset, view)

    def _read(self) -> None:
        try:
            for task in _tasks(self.plan, self.chunk_elems):
                slot = task.slot = self._get(self.free)
                piece = task.piece
                if task.copy:
                    header, info = piece.cur
                    self._pread(header, slot.views["out"][: task.count], info.begin + task.begin)
                else:
                    for (h, i), name in ((piece.cur, "cur"), (piece.prev, "prev")):
                        size = ITEMSIZE[i.dtype]
                        self._pread(h, slot.views[name][: task.count * size], i.begin + task.begin * size)
                self.to_compute.put(task)
        finally:
            for _ in range(self.workers):
                self.to_compute.put(None)

    def _compute_cpu(self) -> None:
        import torch

        alpha, found = self.plan.alpha, 0
        try:
            while (task := self._get(self.to_compute)) is not None:
                if not task.copy:
                    slot = task.slot
                    out, prev, cur = _operands(task, slot.out, slot.prev, slot.cur)
                    extrapolate_(out, prev, cur, 0.0 if task.piece.convert else alpha)  # alpha 0: CUR, rounded once
                    found += _new_nonfinite(torch, out, prev, cur)
                self.to_write.put(task)
        finally:
            with self.lock:
                self.stats.new_nonfinite += found
            self.to_write.put(None)

    def _compute_cuda(self) -> None:
        import torch

        alpha = self.plan.alpha
        # Chunks alternate between two streams, each with its own device buffers: chunk k+1 is copied in while
        # chunk k computes and copies out, and chunk k+2 reuses chunk k's buffers in stream order. The writer
        # waits on each chunk's event, so this thread never synchronises.
        streams = [torch.cuda.Stream(self.device) for _ in range(2)]
        dev = [[torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(3)] for _ in streams]
        found = [torch.zeros((), dtype=torch.int64, device=self.device) for _ in streams]
        for s in streams:
            s.wait_stream(torch.cuda.current_stream(self.device))
        k = 0
        try:
            with _on(self.device):
                while (task := self._get(self.to_compute)) is not None:
                    if not task.copy:
                        slot, (d_out, d_prev, d_cur), i = task.slot, dev[k % 2], k % 2
                        k += 1
                        ob, pb, cb = _nbytes(task)
                        with torch.cuda.stream(streams[i]):
                            d_cur[:cb].copy_(slot.cur[:cb], non_blocking=True)
                            d_prev[:pb].copy_(slot.prev[:pb], non_blocking=True)
                            out, prev, cur = _operands(task, d_out, d_prev, d_cur)
                            extrapolate_(out, prev, cur, 0.0 if task.piece.convert else alpha)
                            found[i] += (
                                torch.isfinite(out).logical_not_() & torch.isfinite(prev) & torch.isfinite(cur)
                            ).sum()
                            slot.out[:ob].copy_(d_out[:ob], non_blocking=True)
                            task.ready = torch.cuda.Event()
                            task.ready.record(streams[i])
                    self.to_write.put(task)
        finally:
            for s in streams:
                s.synchronize()
            self.stats.new_nonfinite += sum(int(f) for f in found)
            self.to_write.put(None)

    def _write(self) -> None:
        pending: dict[int, _Task] = {}
        next_seq, done, current, index = 0, 0, None, -1
        try:
            while done < self.workers:
                task = self._get(self.to_write)
                if task is None:
                    done += 1
                    continue
                pending[task.seq] = task
                while next_seq in pending:  # write in order
                    task = pending.pop(next_seq)
                    next_seq += 1
                    if task.out_index != index:
                        if current is not None:
                            self._finish(current, index)
                        index = task.out_index
                        f = self.plan.files[index]
                        current = _OutWriter(self.out_dir / f.name, f)
                        self.to_hash.put((f.name, memoryview(f.header), None))
                        self._advance(len(f.header))
                    if task.ready is not None:
                        task.ready.synchronize()
                    size = 1 if task.copy else ITEMSIZE[task.piece.dtype]
                    data = task.slot.views["out"][: task.count * size]
                    current.write(data, task.piece.offset + task.begin * size)
                    self.to_hash.put((self.plan.files[index].name, data, task.slot))
                    self._advance(len(data))
            if current is not None:
                self._finish(current, index)
                current = None
        finally:
            if current is not None:
                current.close()
            self.to_hash.put(None)

    def _hash(self) -> None:
        # Its own stage: SHA-256 runs at about the disk's write speed, so in the writer's thread it would halve it.
        name, hasher = None, None
        while (item := self._get(self.to_hash)) is not None:
            file_name, data, slot = item
            if file_name != name:
                name, hasher = file_name, hashlib.sha256()
            if data is None:
                self.stats.sha256[name] = hasher.hexdigest()
            else:
                hasher.update(data)
            if slot is not None:
                self.free.put(slot)

    def _advance(self, n: int) -> None:
        self.stats.bytes_written += n
        if self.progress:
            self.progress(n)

    def _finish(self, writer: _OutWriter, index: int) -> None:
        writer.finish()
        self.to_hash.put((self.plan.files[index].name, None, None))

    # -- driver -------------------------------------------------------------------------------------------
    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except _Stopped:
                pass
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                with self.lock:
                    if self.error is None:
                        self.error = e
                self.stop.set()

        return run

    def run(self) -> EngineStats:
        t0 = time.perf_counter()
        compute = self._compute_cuda if self.gpu else self._compute_cpu
        threads = [
            threading.Thread(target=self._guard(self._read), name="apo-read", daemon=True),
            threading.Thread(target=self._guard(self._write), name="apo-write", daemon=True),
            threading.Thread(target=self._guard(self._hash), name="apo-hash", daemon=True),
        ]
        threads += [
            threading.Thread(target=self._guard(compute), name=f"apo-compute-{i}", daemon=True)
            for i in range(self.workers - 1)
        ]
        try:
            for t in threads:  # inside the try: a signal landing between two starts must stop the started ones
                t.start()
            self._guard(compute)()
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


def _new_nonfinite(torch, out: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor) -> int:
    # A sum is finite only if every term is: one cheap pass; count exactly only when it is not (finite sums of
    # huge values can overflow, which only costs the exact count).
    if math.isfinite(out.sum(dtype=torch.float32).item()):
        return 0
    return int((torch.isfinite(out).logical_not_() & torch.isfinite(prev) & torch.isfinite(cur)).sum())


def execute(
    plan: MergePlan,
    out_dir: Path,
    *,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    on_read: OnRead | None = None,
) -> EngineStats:
    """Write every file of ``plan`` into ``out_dir`` (which must exist and be empty of those names).

    ``on_read(path, offset, data)`` is called on the reader thread after each read of an input file: ``data``
    holds the bytes at absolute ``offset`` and is valid only during the call (e.g. to hash the inputs).
    OSError propagates: output.StagedFolder, which knows the user's OUT, turns it into a MergeError.
    """
    global extrapolate_
    prefetch([h.path for h in plan.prev.files], [h.path for h in plan.cur.files])
    import torch

    if extrapolate_ is None:
        from apo_kernels import extrapolate_ as kernel

        extrapolate_ = kernel
    device = torch.device(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # one per worker thread, for the merge only (the setting is process-wide)
    try:
        return _Pipeline(plan, Path(out_dir), device, progress, on_read).run()
    finally:
        torch.set_num_threads(threads)
