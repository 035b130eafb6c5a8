"""Compute stages: each takes filled slots from the reader, writes every alpha's output bytes into the slot and
hands it to the writer, counting the outputs that became inf or NaN from finite inputs (``found``, per output).

- ``NumpyCompute``: on the byte buffers, apo_kernels' compiled pass (``apo_kernels.cpass``, one fused pass per
  chunk, GIL released, FP8 sides dequantized inside it) where the install built it, else the numpy twin; same
  bytes, torch not even imported.
- ``TorchCompute``: a kernel on torch tensors over the same buffers (a kernel passed in, or fp16 without the
  compiled pass).
- ``CudaCompute``: pinned slots, two CUDA streams with their own device buffers, an event per chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from apo_kernels import cpass
from apo_merge.engine.chunks import Lanes, Task
from apo_merge.engine.device import on
from apo_merge.engine.runner import StageRunner
from apo_merge.quant.dequant import dequantize, fp8_side, split_whole
from apo_merge.quant.quantize import quantize_task

if TYPE_CHECKING:
    import torch

# kernel(out, prev, cur, alpha): writes cur + alpha * (cur - prev) into out (apo_kernels.extrapolate_'s contract)
Kernel = Callable[[Any, Any, Any, float], Any]


class Compute:
    """The loop every compute stage shares; ``chunk`` computes one task's outputs and returns its counts."""

    def __init__(self, runner: StageRunner, lanes: Lanes, alphas: Sequence[float]) -> None:
        self.runner, self.lanes, self.alphas = runner, lanes, list(alphas)
        self.found = [0] * len(self.alphas)

    def run(self) -> None:
        try:
            while (task := self.runner.get(self.lanes.compute)) is not None:
                if not task.copy:
                    self.dequantize(task)  # quantized inputs: raw bytes -> fp32, here to spread it over the workers
                    alphas = [0.0] if task.piece.convert else self.alphas  # alpha 0: CUR, rounded once
                    counts = self.chunk(task, alphas)  # empty where the device counts
                    for k in range(len(self.alphas) if counts else 0):  # a converted chunk is every output's
                        self.found[k] += counts[0 if task.piece.convert else k]
                    if task.piece.block:  # --quantize: the fp32 rows to e4m3 and block scales, in place
                        quantize_task(task, len(self.alphas))
                    if task.ready is None:  # computed here, not queued on a device: the inputs are free now
                        self.lanes.ring.free_inputs(task)
                self.lanes.write.put(task)
        finally:
            self.lanes.write.put(None)

    def chunk(self, task: Task, alphas: list[float]) -> Sequence[int]:
        raise NotImplementedError

    def dequantize(self, task: Task) -> None:
        dequantize(task)


class NumpyCompute(Compute):
    fuse_fp8 = True  # False: every FP8 side dequantized in its slot first (the bytes are the same; tests compare)

    def __init__(self, runner: StageRunner, lanes: Lanes, alphas: Sequence[float]) -> None:
        super().__init__(runner, lanes, alphas)
        self.into = cpass.best()  # the compiled pass if built, else the numpy twin: the same bytes and counts

    def dequantize(self, task: Task) -> None:
        """With the compiled pass, FP8 sides that fill the whole chunk stay fp8 bytes in the slot, dequantized
        tile by tile inside the pass: the slot (larger than L2) is not expanded to fp32 and read back, 8 bytes an
        element of memory traffic saved. The rest (parts of packed tensors, MXFP4) in place first, as before;
        ``task.quant`` keeps the sides left raw."""
        if not (self.fuse_fp8 and self.into is cpass.extrapolate_into):
            dequantize(task)
            task.quant = ()
            return
        fused, rest = split_whole(task, ("fp8",))
        dequantize(task, rest)
        task.quant = tuple(fused)

    def chunk(self, task: Task, alphas: list[float]) -> Sequence[int]:
        slot, piece = task.slot, task.piece
        ob, pb, cb = task.nbytes()
        outs = [o[:ob] for o in task.out.arrays[: len(alphas)]]
        raw = {f"{side}_fp8": fp8_side(info, scale, begin) for side, info, scale, (_, begin, _) in task.quant}
        prev = slot.prev[: task.count if "prev_fp8" in raw else pb]  # an FP8 side: one byte an element
        cur = slot.cur[: task.count if "cur_fp8" in raw else cb]
        return self.into(outs, piece.compute_dtype, prev, piece.prev[1].dtype, cur, piece.cur[1].dtype, alphas, **raw)


class TorchCompute(Compute):
    """On the CPU: run with one torch thread per worker (OpenMP threads spinning next to the I/O threads cost
    more than they give); the caller sets that."""

    def __init__(self, runner: StageRunner, lanes: Lanes, alphas: Sequence[float], kernel: Kernel) -> None:
        super().__init__(runner, lanes, alphas)
        self.kernel = kernel

    def chunk(self, task: Task, alphas: list[float]) -> Sequence[int]:
        import torch

        (cur_t, prev_t), outs_t = task.slot.tensors(), task.out.tensors()
        counts = []
        for k, alpha in enumerate(alphas):
            out, prev, cur = task.operands(outs_t[k], prev_t, cur_t)
            self.kernel(out, prev, cur, alpha)
            counts.append(new_nonfinite(torch, out, prev, cur))
        return counts


class CudaCompute(TorchCompute):
    """Chunks alternate between two streams, each with its own device buffers: chunk k+1 is copied in while chunk
    k computes and copies out, and chunk k+2 reuses chunk k's buffers in stream order. The writer waits on each
    chunk's event, so this thread never synchronises; the counts stay on the device until the end."""

    def __init__(self, runner: StageRunner, lanes: Lanes, alphas: Sequence[float], kernel: Kernel, device: str):
        super().__init__(runner, lanes, alphas, kernel)
        self.device = device
        self._k = 0  # chunks computed: chunk k runs on stream k % 2

    def run(self) -> None:
        import torch

        self.streams = [torch.cuda.Stream(self.device) for _ in range(2)]
        n, nbytes = len(self.alphas), self.lanes.ring.slot_bytes
        self.dev = [
            [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(2 + n)] for _ in self.streams
        ]
        self.dev_found = [[torch.zeros((), dtype=torch.int64, device=self.device) for _ in range(n)] for _ in range(2)]
        self._raw = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in self.streams]  # fp8 bytes
        self._uploads = {}  # id(host array) -> (it, its device copy): scales, value tables, MXFP4 experts
        for s in self.streams:
            s.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with on(self.device):
                super().run()
        finally:
            for s in self.streams:
                s.synchronize()
            self.found = [sum(int(f[j]) for f in self.dev_found) for j in range(n)]

    def dequantize(self, task: Task) -> None:
        """Quantized sides that fill the whole chunk are dequantized on the device by apo_kernels' Triton kernels
        (the same products as the CPU paths): FP8 crosses as its raw bytes (a quarter of fp32's); MXFP4 as the
        blocks and scales of the experts the chunk reads (a chunk of the swapped tensor reads across every row of
        an expert), each uploaded once for all of its chunks (about an eighth of fp32's). Parts of packed experts
        stay on the host, as on the CPU."""
        whole, rest = split_whole(task, ("fp8", "mxfp4"))
        dequantize(task, rest)
        task.quant = tuple(whole)

    def _device_dequant(self, task: Task, side: str, host, dev) -> None:
        import torch

        from apo_kernels import _triton
        from apo_merge.quant import mxfp4
        from apo_merge.quant.dequant import fp8_values

        (_, info, scale, (_, begin, count)) = next(q for q in task.quant if q[0] == side)
        out = dev[: count * 4].view(torch.float32)
        if info.kind == "mxfp4":  # ``scale``: the experts' blocks and scales, as the host path gets them
            tables = self._upload(mxfp4.FP4, mxfp4.POW2)
            for blk, scales, lo, hi, pos in mxfp4.spans(scale, begin, count, info):
                d_blk, d_scales = self._upload(blk, scales)
                _triton.dequant_mxfp4_(d_blk, d_scales, tables, out[pos : pos + hi - lo], (lo, scales.shape[0]))
            return
        table, d_scale = self._upload(fp8_values(info.raw_dtype), scale)
        raw = self._raw[self._k % 2][:count]
        raw.copy_(host[:count], non_blocking=True)
        _triton.dequant_fp8_(raw, table, d_scale, out, (begin, info.shape[1], *info.block))

    def _upload(self, *arrays) -> list:
        """Host arrays (scales, tables, MXFP4 experts) on the device, each copied once while it is in use: held
        here, so that its id stays its own while cached; the least recently used goes past 12 (a chunk's own
        arrays are the most recent, and one dropped early costs only another upload)."""
        import torch

        stream = torch.cuda.current_stream(self.device)
        got = []
        for a in arrays:
            entry = self._uploads.pop(id(a), None)
            if entry is None:
                if len(self._uploads) >= 12:
                    del self._uploads[next(iter(self._uploads))]
                entry = (a, torch.from_numpy(a).to(self.device))
            self._uploads[id(a)] = entry  # now the most recent
            t = entry[1]
            t.record_stream(stream)  # used on both streams: not reused by the allocator before this one is done
            got.append(t)
        return got

    def chunk(self, task: Task, alphas: list[float]) -> Sequence[int]:
        import torch

        (h_cur, h_prev), h_outs = task.slot.tensors(), task.out.tensors()
        (d_prev, d_cur, *d_outs), i = self.dev[self._k % 2], self._k % 2
        ob, pb, cb = task.nbytes()
        on_device = {q[0] for q in task.quant}
        with torch.cuda.stream(self.streams[i]):
            for side, host, dev, nbytes in (("cur", h_cur, d_cur, cb), ("prev", h_prev, d_prev, pb)):
                if side in on_device:
                    self._device_dequant(task, side, host, dev)
                else:
                    dev[:nbytes].copy_(host[:nbytes], non_blocking=True)
            self._k += 1
            for j, alpha in enumerate(alphas):
                out, prev, cur = task.operands(d_outs[j], d_prev, d_cur)
                self.kernel(out, prev, cur, alpha)
                bad = (torch.isfinite(out).logical_not_() & torch.isfinite(prev) & torch.isfinite(cur)).sum()
                for k in range(len(self.alphas)) if task.piece.convert else (j,):  # converted: every output's
                    self.dev_found[i][k] += bad
                h_outs[j][:ob].copy_(d_outs[j][:ob], non_blocking=True)
            task.ready = torch.cuda.Event()
            task.ready.record(self.streams[i])
        return ()  # counted on the device


def new_nonfinite(torch, out: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor) -> int:
    """Outputs that are inf or NaN where both inputs are finite."""
    # A sum is finite only if every term is: one cheap pass; count exactly only when it is not (finite sums of
    # huge values can overflow, which only costs the exact count).
    if math.isfinite(out.sum(dtype=torch.float32).item()):
        return 0
    return int((torch.isfinite(out).logical_not_() & torch.isfinite(prev) & torch.isfinite(cur)).sum())
