"""The write and hash stages: chunks written in plan order into every output (workers finish out of order)
through apo_merge.io.writer's SafetensorsWriter, and the hash of each output file (for the model card) taken
beside the writes from the buffers just written (no copy, no read back)."""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from pathlib import Path

from apo_kernels.dtypes import ITEMSIZE
from apo_merge.engine.chunks import Lanes, Task
from apo_merge.engine.runner import StageRunner
from apo_merge.io.hashing import new_hasher
from apo_merge.io.writer import SafetensorsWriter
from apo_merge.plan import MergePlan
from apo_merge.quant.quantize import Gathered


class Writer:
    """Writes plan k into ``out_dirs[k]``; counts each output's bytes written (``bytes_written``)."""

    def __init__(
        self,
        runner: StageRunner,
        lanes: Lanes,
        plans: Sequence[MergePlan],
        out_dirs: Sequence[Path],
        progress: Callable[[int], None] | None,
    ) -> None:
        self.runner, self.lanes, self.plans, self.out_dirs, self.progress = runner, lanes, plans, out_dirs, progress
        self.bytes_written = [0] * len(plans)
        self.scales = Gathered(len(plans))  # --quantize: block scales and error sums, per output

    def run(self) -> None:
        pending: dict[int, Task] = {}
        next_seq, done, index = 0, 0, -1
        current: list[SafetensorsWriter] = []
        try:
            while done < self.lanes.workers:
                task = self.runner.get(self.lanes.write)
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
                    self._write(task, current)
            self._finish(current, index)
            current = []
        finally:
            for writer in current:
                writer.close()
            for q in self.lanes.hash:
                q.put(None)

    def _write(self, task: Task, writers: list[SafetensorsWriter]) -> None:
        if task.ready is not None:
            task.ready.synchronize()
            self.lanes.ring.free_inputs(task)  # the device has copied them in
        size = 1 if task.copy else ITEMSIZE[task.piece.dtype]
        task.holds = len(self.plans)
        for k, (plan, writer) in enumerate(zip(self.plans, writers)):
            f = plan.files[task.out_index]
            if task.piece.scales_of:
                data = self.scales.take(k, task.piece.scales_of)
            else:
                data = task.out.views[0 if task.shared else k][: task.count * size]
            if task.piece.block:
                self.scales.add(k, task)
            writer.write(data, f.pieces[task.index].offset + task.begin * size)
            self.lanes.hash[k].put((f.name, data, task))
            self._advance(k, len(data))

    def _open(self, index: int) -> list[SafetensorsWriter]:
        """Open file ``index`` of every output (closing those already opened if one fails)."""
        writers: list[SafetensorsWriter] = []
        try:
            for k, (plan, out_dir) in enumerate(zip(self.plans, self.out_dirs)):
                f = plan.files[index]
                writers.append(SafetensorsWriter(out_dir / f.name, f.header, f.size))
                self.lanes.hash[k].put((f.name, memoryview(f.header), None))
                self._advance(k, len(f.header))
        except BaseException:
            for writer in writers:
                writer.close()
            raise
        return writers

    def _finish(self, writers: list[SafetensorsWriter], index: int) -> None:
        for k, writer in enumerate(writers):
            writer.finish()
            self.lanes.hash[k].put((self.plans[k].files[index].name, None, None))

    def _advance(self, k: int, n: int) -> None:
        self.bytes_written[k] += n
        if self.progress:
            self.progress(n)


class Hasher:
    """The hash ``name`` (io.hashing.OUTPUT_HASHES) of each file of one output (``digests``: file name -> hex
    digest). Its own stage, so that it never holds up the writer."""

    def __init__(self, runner: StageRunner, lanes: Lanes, k: int, name: str) -> None:
        self.runner, self.lanes, self.name = runner, lanes, name
        self.inbox: queue.Queue = lanes.hash[k]
        self.digests: dict[str, str] = {}

    def run(self) -> None:
        name, hasher = None, None
        while (item := self.runner.get(self.inbox)) is not None:
            file_name, data, task = item
            if file_name != name:
                name, hasher = file_name, new_hasher(self.name)
            if data is None:
                self.digests[name] = hasher.hexdigest()
            else:
                hasher.update(data)
            if task is not None:
                self.lanes.ring.release(task)
