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
    slot: Slot | None = None  # the input buffers, from the read until the chunk is computed
    out: Outputs | None = None  # the output buffers, until every hash stage has read them
    ready: Any = None  # a CUDA event the writer waits for before writing the slot's outputs
    holds: int = 0  # hash stages still to read the outputs before they are free again
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


def _host_buffers(count: int, nbytes: int, pinned: bool) -> tuple[list[np.ndarray], list[torch.Tensor] | None]:
    """``count`` byte buffers as numpy arrays; for a GPU torch's pinned memory seen through numpy (and the tensors)."""
    if not pinned:
        return [np.empty(nbytes, np.uint8) for _ in range(count)], None
    import torch

    tensors = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
    return [t.numpy() for t in tensors], tensors


class Slot:
    """Reusable host buffers for one chunk's inputs: CUR's and PREV's bytes (numpy uint8 arrays)."""

    def __init__(self, nbytes: int, pinned: bool) -> None:
        (self.cur, self.prev), self._tensors = _host_buffers(2, nbytes, pinned)
        self.views = {"cur": memoryview(self.cur), "prev": memoryview(self.prev)}

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cur, prev) as torch tensors over the same memory."""
        if self._tensors is None:
            import torch

            self._tensors = [torch.from_numpy(a) for a in (self.cur, self.prev)]
        return self._tensors[0], self._tensors[1]


class Outputs:
    """Reusable host buffers for one chunk's outputs, one per alpha (a copied chunk's bytes go to the first)."""

    def __init__(self, nbytes: int, pinned: bool, n_out: int) -> None:
        self.arrays, self._tensors = _host_buffers(n_out, nbytes, pinned)
        self.views = [memoryview(a) for a in self.arrays]

    def tensors(self) -> list[torch.Tensor]:
        if self._tensors is None:
            import torch

            self._tensors = [torch.from_numpy(a) for a in self.arrays]
        return self._tensors


class Ring:
    """The buffers a merge cycles through. The reader takes, in plan order, one ``Outputs`` per chunk and one
    ``Slot`` per computed chunk (one thread taking both in order cannot deadlock). A Slot is free again once its
    chunk is computed (on a GPU, once the writer has waited for the copies out); Outputs once every hash stage has
    read them, so written output may queue behind a slow write or hash while the reader goes on. Allocate inside
    ``device.on(device)`` when pinned."""

    def __init__(self, slots: int, outputs: int, nbytes: int, pinned: bool, n_out: int) -> None:
        self.slot_bytes = nbytes
        self._slots: queue.Queue[Slot] = queue.Queue()
        self._outputs: queue.Queue[Outputs] = queue.Queue()
        self._lock = threading.Lock()
        for _ in range(slots):
            self._slots.put(Slot(nbytes, pinned))
        for _ in range(outputs):
            self._outputs.put(Outputs(nbytes, pinned, n_out))

    def take(self, runner: StageRunner, task: Task) -> None:
        """Give ``task`` its output buffers and, unless it is a copy, its input buffers (waiting for free ones)."""
        task.out = runner.get(self._outputs)
        if not task.copy:
            task.slot = runner.get(self._slots)

    def free_inputs(self, task: Task) -> None:
        """The chunk is computed: its input buffers may be refilled."""
        if task.slot is not None:
            self._slots.put(task.slot)
            task.slot = None

    def release(self, task: Task) -> None:
        """One hash stage is done with ``task``'s outputs; the last one frees them."""
        with self._lock:
            task.holds -= 1
            last = task.holds == 0
        if last:
            self._outputs.put(task.out)


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
