"""What flows between the stages: a chunk of work (``Task``), the ring of reusable host buffers it travels in, and
the queues (``Lanes``) that join the stages."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from apo_kernels.dtypes import ITEMSIZE, torch_dtype
from apo_merge.engine.runner import StageRunner
from apo_merge.plan import MergePlan, Piece
from apo_merge.quant.quantize import chunk_elems as quant_elems

if TYPE_CHECKING:
    import torch


@dataclass
class Task:
    seq: int
    out_index: int
    piece: Piece
    begin: int  # element (or byte, for copies) offset within the tensor
    count: int
    index: int = 0  # the piece's position in its file (the same in every plan)
    slot: Slot | None = None
    ready: Any = None  # a CUDA event the writer waits for before writing the slot's outputs
    holds: int = 0  # hash stages still to read the slot's outputs before it is free again
    quant: tuple = ()  # (slot side, QuantInfo, scales): raw fp8 bytes the compute stage dequantizes in place first
    qout: list = field(default_factory=list)  # a quantized output's (scale rows, TensorError) per output buffer

    @property
    def copy(self) -> bool:
        return self.piece.prev is None

    @property
    def shared(self) -> bool:
        """Whether every output holds the same bytes for this chunk (a copy, or CUR converted with alpha 0)."""
        return self.copy or self.piece.convert

    def nbytes(self) -> tuple[int, int, int]:
        """Bytes of the chunk's (out, prev, cur)."""
        piece = self.piece
        return tuple(self.count * ITEMSIZE[d] for d in (piece.compute_dtype, piece.prev[1].dtype, piece.cur[1].dtype))

    def operands(self, out: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor) -> list[torch.Tensor]:
        """The chunk's (out, prev, cur) in their dtypes, viewed over byte buffers that hold it from offset 0."""
        piece = self.piece
        dtypes = (piece.compute_dtype, piece.prev[1].dtype, piece.cur[1].dtype)
        return [buf[:n].view(torch_dtype(d)) for buf, n, d in zip((out, prev, cur), self.nbytes(), dtypes)]


def tasks(plan: MergePlan, chunk_elems: int, copy_chunk_bytes: int) -> Iterator[Task]:
    """The plan's work in write order: computed tensors in chunks of elements (whole block rows when quantized
    afterwards), copied ones in chunks of bytes, a quantized weight's scales in one task after it."""
    seq = 0
    for i, f in enumerate(plan.files):
        for j, piece in enumerate(f.pieces):
            total, step = (piece.nbytes, copy_chunk_bytes) if piece.prev is None else (piece.numel, chunk_elems)
            if piece.block:
                step = quant_elems(piece, chunk_elems)
            elif piece.scales_of:
                step = max(total, 1)
            for begin in range(0, max(total, 1), step):
                yield Task(seq, i, piece, begin, min(step, total - begin), j)
                seq += 1


def slot_elems(plan: MergePlan, chunk_elems: int) -> int:
    """Elements a slot must hold: a chunk, or the widest task of whole block rows of a quantized output."""
    return max([chunk_elems] + [quant_elems(p, chunk_elems) for f in plan.files for p in f.pieces if p.block])


def widest(plan: MergePlan) -> int:
    """The largest item size the plan reads or writes (or computes, before quantizing)."""
    return max(
        [ITEMSIZE[p.compute_dtype] for f in plan.files for p in f.pieces]
        + [ITEMSIZE[s[1].dtype] for f in plan.files for p in f.pieces for s in (p.cur, p.prev) if s]
        + [1]
    )


class Slot:
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


class Ring:
    """The slots a merge cycles through: the reader takes a free one per chunk; it is free again once every hash
    stage has read the outputs written from it. Allocate inside ``device.on(device)`` when pinned."""

    def __init__(self, count: int, nbytes: int, pinned: bool, n_out: int) -> None:
        self.slot_bytes = nbytes
        self._free: queue.Queue[Slot] = queue.Queue()
        self._lock = threading.Lock()
        for _ in range(count):
            self._free.put(Slot(nbytes, pinned, n_out))

    def take(self, runner: StageRunner) -> Slot:
        return runner.get(self._free)

    def release(self, task: Task) -> None:
        """One hash stage is done with ``task``'s slot; the last one frees it."""
        with self._lock:
            task.holds -= 1
            last = task.holds == 0
        if last:
            self._free.put(task.slot)


@dataclass
class Lanes:
    """The queues between the stages (``None`` ends a producer's stream) and the ring their tasks travel in."""

    ring: Ring
    workers: int  # compute threads: the reader ends each, the writer waits for each to end
    n_out: int
    compute: queue.Queue[Task | None] = field(default_factory=queue.Queue)  # reader -> compute
    write: queue.Queue[Task | None] = field(default_factory=queue.Queue)  # compute -> writer
    # Per output, writer -> hash stage: (file name, bytes to hash or None at the end of the file, task to release)
    hash: list[queue.Queue[tuple[str, memoryview | None, Task | None] | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hash = [queue.Queue() for _ in range(self.n_out)]
