"""Stream a MergePlan's bytes through the kernel: read -> compute -> write -> hash, overlapped on threads.

- read: pread into a small ring of reusable buffers (pinned when the GPU computes): anonymous memory does not
  grow with checkpoint size and no input page is mapped. A ``Prefetcher`` (apo_merge.io.prefetch) streams the
  inputs into the page cache ahead of these reads.
- compute: on the CPU, worker threads running apo_kernels' numpy twin on the byte buffers (torch is not even
  imported: its start-up alone would cost a third of a 1 GB merge on two cores), or torch's twin when fp16 is
  involved (numpy has no fast fp16 conversion); on a GPU, pinned slots, two CUDA streams with their own device
  buffers (copies of one chunk overlap the kernel of the other) and an event per chunk that the writer waits
  on, so the compute thread never synchronises. A kernel on torch
  tensors can be passed instead (default on a GPU: apo_kernels' ``extrapolate_``); on the CPU it runs with one
  torch thread per worker (OpenMP threads spinning next to the I/O threads cost more than they give).
- write: chunks in order (workers may finish out of order) through apo_merge.io.writer's SafetensorsWriter,
  which keeps writeback moving behind the writes.
- hash: SHA-256 of each output file (for the model card), in order, beside the writes, straight from the buffers
  just written (no copy, no read back).

Several plans over the same inputs (one per alpha) run in one pass: each chunk is read once, computed once per
alpha into its own output buffer, and written to each output; copied and converted tensors are computed once.

torch loads only for a GPU or a torch kernel, and then after the CLI's prefetch has started.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apo_kernels._numpy import extrapolate_into
from apo_merge.errors import MergeError
from apo_merge.io.dtypes import ITEMSIZE, torch_dtype
from apo_merge.io.header import FileHeader
from apo_merge.io.prefetch import Prefetcher
from apo_merge.io.writer import SafetensorsWriter, advise, pread_exact
from apo_merge.options import MergeOptions
from apo_merge.plan import MergePlan, Piece

if TYPE_CHECKING:
    import torch

CHUNK_ELEMS = 1 << 20  # elements per task on the CPU (the twin works through it in cache-sized pieces)
GPU_CHUNK_ELEMS = 1 << 22  # per task on a GPU: fewer, larger copies and launches
COPY_CHUNK_BYTES = 1 << 22  # per task of a tensor copied unchanged
MAX_CPU_WORKERS = 4
GPU_SLOTS = 5

OnRead = Callable[[Path, int, memoryview], None]
# kernel(out, prev, cur, alpha): writes cur + alpha * (cur - prev) into out (apo_kernels.extrapolate_'s contract)
Kernel = Callable[[Any, Any, Any, float], Any]


class _Stopped(Exception):
    """Raised inside a stage when another stage failed."""


@dataclass
class EngineStats:
    seconds: float
    bytes_written: int
    sha256: dict[str, str] = field(default_factory=dict)
    new_nonfinite: int = 0  # non-finite outputs whose inputs were both finite


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is available, else ``cpu``; a CUDA request without one is refused."""
    if device == "cpu" or (device == "auto" and not _may_have_gpu()):
        return "cpu"
    from apo_merge.shell import import_torch

    torch = import_torch()  # Ctrl-C held while torch starts (see hold_signals)

    if not torch.cuda.is_available():
        if device == "auto":
            return "cpu"
        raise MergeError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return "cuda" if device == "auto" else device


def _may_have_gpu() -> bool:
    """False only where no CUDA or ROCm device can be, told without importing torch (3 s of start-up)."""
    if "torch" in sys.modules or not sys.platform.startswith("linux"):
        return sys.platform != "darwin"  # torch is loaded, so asking it is free; macOS has no CUDA
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    for path in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd"):  # drivers: NVIDIA, WSL, ROCm
        if os.path.exists(path):
            return True
    try:  # an NVIDIA or AMD display/3D controller whose driver is not loaded yet
        devices = [d.path for d in os.scandir("/sys/bus/pci/devices")]
    except OSError:
        return True  # cannot tell: ask torch
    for dev in devices:
        with contextlib.suppress(OSError), open(f"{dev}/vendor") as v, open(f"{dev}/class") as c:
            if v.read().strip() in ("0x10de", "0x1002") and c.read().startswith("0x03"):
                return True
    return False


# -- the pipeline ---------------------------------------------------------------------------------------------
@dataclass
class _Task:
    seq: int
    out_index: int
    piece: Piece
    begin: int  # element (or byte, for copies) offset within the tensor
    count: int
    index: int = 0  # the piece's position in its file (the same in every plan)
    slot: _Slot | None = None
    ready: Any = None  # a CUDA event the writer waits for before writing the slot's outputs
    holds: int = 0  # hash stages still to read the slot's outputs before it is free again

    @property
    def copy(self) -> bool:
        return self.piece.prev is None


class _Slot:
    """Reusable host buffers for one chunk: CUR's, PREV's and each output's bytes (numpy uint8 arrays)."""

    def __init__(self, nbytes: int, pinned: bool, n_out: int) -> None:
        self._tensors: list[torch.Tensor] | None = None
        if pinned:  # for a GPU: torch's pinned memory, seen through numpy
            import torch

            self._tensors = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2 + n_out)]
            arrays = [t.numpy() for t in self._tensors]
        else:
            arrays = [np.empty(nbytes, np.uint8) for _ in range(2 + n_out)]
        self.cur, self.prev, *self.outs = arrays
        self.views = {"cur": memoryview(self.cur), "prev": memoryview(self.prev)}
        self.out_views = [memoryview(o) for o in self.outs]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(cur, prev, outs) as torch tensors over the same memory."""
        if self._tensors is None:
            import torch

            self._tensors = [torch.from_numpy(a) for a in (self.cur, self.prev, *self.outs)]
        cur, prev, *outs = self._tensors
        return cur, prev, outs


def _tasks(plan: MergePlan, chunk_elems: int) -> Iterator[_Task]:
    seq = 0
    for i, f in enumerate(plan.files):
        for j, piece in enumerate(f.pieces):
            total, step = (piece.nbytes, COPY_CHUNK_BYTES) if piece.prev is None else (piece.numel, chunk_elems)
            for begin in range(0, max(total, 1), step):
                yield _Task(seq, i, piece, begin, min(step, total - begin), j)
                seq += 1


def _on(device: str) -> contextlib.AbstractContextManager:
    if not device.startswith("cuda"):
        return contextlib.nullcontext()
    import torch

    return torch.cuda.device(torch.device(device))


def _nbytes(task: _Task) -> tuple[int, int, int]:
    """Bytes of the chunk's (out, prev, cur)."""
    piece = task.piece
    return tuple(task.count * ITEMSIZE[d] for d in (piece.dtype, piece.prev[1].dtype, piece.cur[1].dtype))


def _operands(task: _Task, out: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor) -> list[torch.Tensor]:
    """The chunk's (out, prev, cur) in their dtypes, viewed over byte buffers that hold it from offset 0."""
    piece = task.piece
    dtypes = (piece.dtype, piece.prev[1].dtype, piece.cur[1].dtype)
    return [buf[:n].view(torch_dtype(d)) for buf, n, d in zip((out, prev, cur), _nbytes(task), dtypes)]


def _shared(task: _Task) -> bool:
    """Whether every output holds the same bytes for this chunk (a copy, or CUR converted with alpha 0)."""
    return task.copy or task.piece.convert


class _Pipeline:
    def __init__(
        self,
        plans: list[MergePlan],
        out_dirs: list[Path],
        device: str,
        kernel: Kernel | None,
        prefetcher: Prefetcher,
        progress: Callable[[int], None] | None,
        on_read: OnRead | None,
    ) -> None:
        plan = plans[0]
        self.plans, self.out_dirs, self.device, self.progress = plans, out_dirs, device, progress
        self.plan, self.alphas, self.n_out = plan, [p.alpha for p in plans], len(plans)
        self.kernel, self.prefetcher, self.on_read = kernel, prefetcher, on_read
        self.gpu = device.startswith("cuda")
        self.chunk_elems = GPU_CHUNK_ELEMS if self.gpu else CHUNK_ELEMS
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.workers = 1 if self.gpu else max(1, min(MAX_CPU_WORKERS, cpus))
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.free: queue.Queue[_Slot] = queue.Queue()
        self.to_compute: queue.Queue[_Task | None] = queue.Queue()
        self.to_write: queue.Queue[_Task | None] = queue.Queue()
        # Per output: (file name, bytes to hash or None at the end of the file, task whose slot to release)
        self.to_hash: list[queue.Queue[tuple[str, memoryview | None, _Task | None] | None]] = [
            queue.Queue() for _ in plans
        ]
        self.fds: dict[Path, int] = {}
        self.stats = [EngineStats(0.0, 0) for _ in plans]
        widest = max(
            [ITEMSIZE[p.dtype] for f in plan.files for p in f.pieces]
            + [ITEMSIZE[s[1].dtype] for f in plan.files for p in f.pieces for s in (p.cur, p.prev) if s]
            + [1]
        )
        self.slot_bytes = max(self.chunk_elems * widest, COPY_CHUNK_BYTES)
        # Enough slots for every stage to hold one while the reader fills the next.
        with _on(device):  # pinned for this device's context
            for _ in range(GPU_SLOTS if self.gpu else self.workers + 4):
                self.free.put(_Slot(self.slot_bytes, pinned=self.gpu, n_out=self.n_out))

    # -- stages -------------------------------------------------------------------------------------------
    def _fd(self, path: Path) -> int:
        if path not in self.fds:
            fd = os.open(path, os.O_RDONLY)
            advise(fd, 0, 0, "SEQUENTIAL")
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
        self.prefetcher.consumed(len(view))
        if self.on_read is not None:
            self.on_read(header.path, offset, view)

    def _read(self) -> None:
        try:
            for task in _tasks(self.plan, self.chunk_elems):
                slot = task.slot = self._get(self.free)
                piece = task.piece
                if task.copy:
                    header, info = piece.cur
                    self._pread(header, slot.out_views[0][: task.count], info.begin + task.begin)
                else:
                    for (h, i), name in ((piece.cur, "cur"), (piece.prev, "prev")):
                        size = ITEMSIZE[i.dtype]
                        self._pread(h, slot.views[name][: task.count * size], i.begin + task.begin * size)
                self.to_compute.put(task)
        finally:
            for _ in range(self.workers):
                self.to_compute.put(None)

    def _compute_cpu(self) -> None:
        found = [0] * self.n_out
        try:
            while (task := self._get(self.to_compute)) is not None:
                if not task.copy:
                    slot, piece = task.slot, task.piece
                    alphas = [0.0] if piece.convert else self.alphas  # alpha 0: CUR, rounded once
                    if self.kernel is None:
                        ob, pb, cb = _nbytes(task)
                        outs = [o[:ob] for o in slot.outs[: len(alphas)]]
                        counts = extrapolate_into(
                            outs,
                            piece.dtype,
                            slot.prev[:pb],
                            piece.prev[1].dtype,
                            slot.cur[:cb],
                            piece.cur[1].dtype,
                            alphas,
                        )
                    else:
                        counts = self._torch_kernel(task, alphas)
                    for k in range(self.n_out):  # a converted chunk is every output's: count it in each
                        found[k] += counts[0 if piece.convert else k]
                self.to_write.put(task)
        finally:
            with self.lock:
                for stats, n in zip(self.stats, found):
                    stats.new_nonfinite += n
            self.to_write.put(None)

    def _torch_kernel(self, task: _Task, alphas: list[float]) -> list[int]:
        import torch

        cur_t, prev_t, outs_t = task.slot.tensors()
        counts = []
        for k, alpha in enumerate(alphas):
            out, prev, cur = _operands(task, outs_t[k], prev_t, cur_t)
            self.kernel(out, prev, cur, alpha)
            counts.append(_new_nonfinite(torch, out, prev, cur))
        return counts

    def _compute_cuda(self) -> None:
        import torch

        # Chunks alternate between two streams, each with its own device buffers: chunk k+1 is copied in while
        # chunk k computes and copies out, and chunk k+2 reuses chunk k's buffers in stream order. The writer
        # waits on each chunk's event, so this thread never synchronises.
        streams = [torch.cuda.Stream(self.device) for _ in range(2)]
        n = self.n_out
        dev = [
            [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(2 + n)] for _ in streams
        ]
        found = [[torch.zeros((), dtype=torch.int64, device=self.device) for _ in range(n)] for _ in streams]
        for s in streams:
            s.wait_stream(torch.cuda.current_stream(self.device))
        k = 0
        try:
            with _on(self.device):
                while (task := self._get(self.to_compute)) is not None:
                    if not task.copy:
                        (h_cur, h_prev, h_outs), (d_prev, d_cur, *d_outs), i = task.slot.tensors(), dev[k % 2], k % 2
                        k += 1
                        ob, pb, cb = _nbytes(task)
                        with torch.cuda.stream(streams[i]):
                            d_cur[:cb].copy_(h_cur[:cb], non_blocking=True)
                            d_prev[:pb].copy_(h_prev[:pb], non_blocking=True)
                            for j, alpha in enumerate(self.alphas[:1] if task.piece.convert else self.alphas):
                                out, prev, cur = _operands(task, d_outs[j], d_prev, d_cur)
                                self.kernel(out, prev, cur, 0.0 if task.piece.convert else alpha)
                                bad = (
                                    torch.isfinite(out).logical_not_() & torch.isfinite(prev) & torch.isfinite(cur)
                                ).sum()
                                for jj in range(n) if task.piece.convert else (j,):  # converted: every output's
                                    found[i][jj] += bad
                                h_outs[j][:ob].copy_(d_outs[j][:ob], non_blocking=True)
                            task.ready = torch.cuda.Event()
                            task.ready.record(streams[i])
                    self.to_write.put(task)
        finally:
            for s in streams:
                s.synchronize()
            for j, stats in enumerate(self.stats):
                stats.new_nonfinite += sum(int(f[j]) for f in found)
            self.to_write.put(None)

    def _write(self) -> None:
        pending: dict[int, _Task] = {}
        next_seq, done, index = 0, 0, -1
        current: list[SafetensorsWriter] = []
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
                        self._finish(current, index)
                        index = task.out_index
                        current = self._open(index)
                    if task.ready is not None:
                        task.ready.synchronize()
                    size = 1 if task.copy else ITEMSIZE[task.piece.dtype]
                    task.holds = self.n_out
                    for k, (plan, writer) in enumerate(zip(self.plans, current)):
                        f = plan.files[index]
                        data = task.slot.out_views[0 if _shared(task) else k][: task.count * size]
                        writer.write(data, f.pieces[task.index].offset + task.begin * size)
                        self.to_hash[k].put((f.name, data, task))
                        self._advance(k, len(data))
            self._finish(current, index)
            current = []
        finally:
            for writer in current:
                writer.close()
            for q in self.to_hash:
                q.put(None)

    def _open(self, index: int) -> list[SafetensorsWriter]:
        """Open file ``index`` of every output (closing those already opened if one fails)."""
        writers: list[SafetensorsWriter] = []
        try:
            for k, (plan, out_dir) in enumerate(zip(self.plans, self.out_dirs)):
                f = plan.files[index]
                writers.append(SafetensorsWriter(out_dir / f.name, f.header, f.size))
                self.to_hash[k].put((f.name, memoryview(f.header), None))
                self._advance(k, len(f.header))
        except BaseException:
            for writer in writers:
                writer.close()
            raise
        return writers

    def _hash(self, k: int) -> None:
        # Its own stage: SHA-256 runs at about the disk's write speed, so in the writer's thread it would halve it.
        name, hasher, stats = None, None, self.stats[k]
        while (item := self._get(self.to_hash[k])) is not None:
            file_name, data, task = item
            if file_name != name:
                name, hasher = file_name, hashlib.sha256()
            if data is None:
                stats.sha256[name] = hasher.hexdigest()
            else:
                hasher.update(data)
            if task is not None:
                with self.lock:
                    task.holds -= 1
                    last = task.holds == 0
                if last:
                    self.free.put(task.slot)

    def _advance(self, k: int, n: int) -> None:
        self.stats[k].bytes_written += n
        if self.progress:
            self.progress(n)

    def _finish(self, writers: list[SafetensorsWriter], index: int) -> None:
        for k, writer in enumerate(writers):
            writer.finish()
            self.to_hash[k].put((self.plans[k].files[index].name, None, None))

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

    def run(self) -> list[EngineStats]:
        t0 = time.perf_counter()
        compute = self._compute_cuda if self.gpu else self._compute_cpu
        threads = [
            threading.Thread(target=self._guard(self._read), name="apo-read", daemon=True),
            threading.Thread(target=self._guard(self._write), name="apo-write", daemon=True),
        ]
        threads += [
            threading.Thread(target=self._guard(lambda k=k: self._hash(k)), name=f"apo-hash-{k}", daemon=True)
            for k in range(self.n_out)
        ]
        # Every stage runs in a worker thread; the main thread, where Ctrl-C and SIGTERM land, only waits. A
        # signal raised inside a stage's queue call could strike between acquiring the queue's lock and the
        # block that releases it, leaving the lock held and the other stages blocked forever (a hang seen once
        # in 50 interrupted merges under load, when the main thread ran a compute worker).
        threads += [
            threading.Thread(target=self._guard(compute), name=f"apo-compute-{i}", daemon=True)
            for i in range(self.workers)
        ]
        try:
            for t in threads:  # inside the try: a signal landing between two starts must stop the started ones
                t.start()
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
        for stats in self.stats:
            stats.seconds = time.perf_counter() - t0
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


def _has_fp16(plan: MergePlan) -> bool:
    """Whether any computed tensor reads or writes fp16: numpy converts fp16 an element at a time, 8x slower than
    torch's twin (measured 7.9 against 1.0 ns per element for fp16 -> fp16), which outweighs torch's start-up."""
    return any("F16" in (p.dtype, p.prev[1].dtype, p.cur[1].dtype) for f in plan.files for p in f.pieces if p.prev)


def execute(
    plan: MergePlan,
    out_dir: Path,
    options: MergeOptions,
    *,
    kernel: Kernel | None = None,
    prefetcher: Prefetcher | None = None,
    progress: Callable[[int], None] | None = None,
    on_read: OnRead | None = None,
) -> EngineStats:
    """Write every file of ``plan`` into ``out_dir`` (which must exist and be empty of those names).

    ``options.device`` is where to compute (``auto`` is resolved here); ``kernel`` computes each chunk (default:
    apo_kernels' numpy twin on the CPU, its ``extrapolate_`` on a GPU or when fp16 is involved); ``prefetcher``
    is the one the caller may have started already (the CLI does, first thing). ``on_read(path, offset, data)``
    is called on the reader thread after each read of an input file: ``data`` holds the bytes at absolute
    ``offset`` and is valid only during the call (e.g. to hash the inputs). OSError propagates: io.output.StagedFolder, which knows the user's OUT, turns it into
    a MergeError.
    """
    return execute_many(
        [plan], [out_dir], options, kernel=kernel, prefetcher=prefetcher, progress=progress, on_read=on_read
    )[0]


def execute_many(
    plans: Sequence[MergePlan],
    out_dirs: Sequence[Path],
    options: MergeOptions,
    *,
    kernel: Kernel | None = None,
    prefetcher: Prefetcher | None = None,
    progress: Callable[[int], None] | None = None,
    on_read: OnRead | None = None,
) -> list[EngineStats]:
    """``execute`` for several plans of the same PREV and CUR that differ only in alpha and header metadata (one
    per alpha, made by ``make_plan`` with the same options otherwise): the inputs are read once and plan k is
    written into ``out_dirs[k]``, byte for byte as ``execute`` alone would write it."""
    plans, out_dirs = list(plans), [Path(d) for d in out_dirs]
    first = plans[0]
    for plan in plans[1:]:
        same = len(plan.files) == len(first.files) and all(
            [(p.name, p.dtype, p.cur, p.prev, p.convert) for p in a.pieces]
            == [(p.name, p.dtype, p.cur, p.prev, p.convert) for p in b.pieces]
            for a, b in zip(plan.files, first.files)
        )
        if not same:
            raise ValueError("execute_many: the plans must read the same tensors in the same order")
    prefetcher = prefetcher or Prefetcher()
    prefetcher.prefetch([h.path for h in first.prev.files], [h.path for h in first.cur.files])
    device = resolve_device(options.device)
    if device == "cpu" and kernel is None and not _has_fp16(first):  # the numpy twin: no torch
        return _Pipeline(plans, out_dirs, device, None, prefetcher, progress, on_read).run()
    from apo_merge.shell import import_torch

    torch = import_torch()  # Ctrl-C held while torch starts (see hold_signals)
    if kernel is None:
        from apo_kernels import extrapolate_ as kernel
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # one per worker thread, for the merge only (the setting is process-wide)
    try:
        return _Pipeline(plans, out_dirs, device, kernel, prefetcher, progress, on_read).run()
    finally:
        torch.set_num_threads(threads)
