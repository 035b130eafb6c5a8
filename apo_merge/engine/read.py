"""The read stage: each chunk's input bytes, with pread, into free ring buffers (no input page is mapped, and
anonymous memory does not grow with the checkpoint)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from apo_kernels.dtypes import ITEMSIZE
from apo_merge.engine.chunks import Lanes, Task
from apo_merge.engine.runner import StageRunner
from apo_merge.io.header import FileHeader
from apo_merge.io.prefetch import Prefetcher
from apo_merge.io.writer import advise, pread_exact
from apo_merge.moe import Parts, read_parts
from apo_merge.quant.dequant import Dequantizer
from apo_merge.quant.layout import QuantInfo

OnRead = Callable[[Path, int, memoryview], None]


class Reader:
    """Fills each task's buffers in plan order and hands it to the compute stages; ``close`` closes the inputs."""

    def __init__(self, runner: StageRunner, lanes: Lanes, prefetcher: Prefetcher, on_read: OnRead | None) -> None:
        self.runner, self.lanes, self.prefetcher, self.on_read = runner, lanes, prefetcher, on_read
        self._fds: dict[Path, int] = {}
        self._dequant = Dequantizer(self._pread)  # reads quantized inputs' raw bytes and scales

    def run(self, tasks: Iterable[Task]) -> None:
        try:
            for task in tasks:
                self.lanes.ring.take(self.runner, task)
                slot, piece = task.slot, task.piece
                if piece.scales_of:  # computed with its weight: the writer holds them
                    pass
                elif task.copy:
                    header, info = piece.cur
                    self._pread(header, task.out.views[0][: task.count], info.begin + task.begin)
                else:
                    for (h, i), name in ((piece.cur, "cur"), (piece.prev, "prev")):
                        if isinstance(i, QuantInfo):  # raw bytes now, dequantized by the compute stage
                            scale = self._dequant.read(h, i, slot.views[name], task.begin, task.count)
                            task.quant += ((name, i, scale, (0, task.begin, task.count)),)
                            continue
                        if isinstance(i, Parts):  # packed MoE experts from per-expert tensors (maybe quantized)
                            task.quant += read_parts((self._pread, self._dequant), i, slot.views[name], task, name)
                            continue
                        size = ITEMSIZE[i.dtype]
                        self._pread(h, slot.views[name][: task.count * size], i.begin + task.begin * size)
                self.lanes.compute.put(task)
        finally:
            for _ in range(self.lanes.workers):
                self.lanes.compute.put(None)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            fd = os.open(path, os.O_RDONLY)
            advise(fd, 0, 0, "SEQUENTIAL")
            self._fds[path] = fd
        return self._fds[path]

    def _pread(self, header: FileHeader, view: memoryview, data_offset: int) -> None:
        offset = header.data_start + data_offset
        pread_exact(self._fd(header.path), view, offset, header.path)
        self.prefetcher.consumed(len(view))
        if self.on_read is not None:
            self.on_read(header.path, offset, view)
