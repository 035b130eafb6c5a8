"""``execute``: a MergePlan's bytes through read -> compute -> write -> hash, each stage on its own threads."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from apo_kernels import cpass
from apo_merge.engine.chunks import Lanes, Ring, slot_elems, tasks, widest
from apo_merge.engine.compute import Compute, CudaCompute, Kernel, NumpyCompute, TorchCompute
from apo_merge.engine.device import is_gpu, on
from apo_merge.engine.read import OnRead, Reader
from apo_merge.engine.runner import StageRunner
from apo_merge.engine.tuning import Tuning, current_tuning
from apo_merge.engine.write import Hasher, Writer
from apo_merge.io.hashing import OUTPUT_HASHES
from apo_merge.io.prefetch import Prefetcher
from apo_merge.plan import MergePlan


@dataclass
class EngineStats:
    seconds: float
    bytes_written: int
    digests: dict[str, str] = field(default_factory=dict)  # output file -> its Hooks.output_hash
    new_nonfinite: int = 0  # non-finite outputs whose inputs were both finite
    quant_errors: dict = field(default_factory=dict)  # --quantize: weight name -> quantize.TensorError


@dataclass(frozen=True)
class Hooks:
    """What a run is given besides its plans, device and tuning; every field is optional."""

    kernel: Kernel | None = None  # computes each chunk (default: the compiled pass or numpy twin on the CPU)
    prefetcher: Prefetcher | None = None  # the one the caller may have started already (the CLI does, first thing)
    progress: Callable[[int], None] | None = None  # called with each count of bytes written
    on_read: OnRead | None = None  # called on the reader thread after each read of an input file
    output_hash: str = OUTPUT_HASHES[0]  # what EngineStats.digests holds


def execute(
    plan: MergePlan, out_dir: Path, device: str, hooks: Hooks | None = None, tuning: Tuning | None = None
) -> EngineStats:
    """Write every file of ``plan`` into ``out_dir`` (which must exist and be empty of those names).

    ``device`` is where to compute, as ``resolve_device`` returned it. ``hooks.kernel`` computes each chunk
    (default on the CPU: apo_kernels' compiled pass, else its numpy twin, or its ``extrapolate_`` when fp16 is
    involved and the pass is not built; on a GPU its ``extrapolate_``);
    ``hooks.on_read(path, offset, data)`` is called on the reader thread after each read of an input file:
    ``data`` holds the bytes at absolute ``offset`` and is valid only during the call (e.g. to hash the inputs).
    ``tuning`` sets the engine's sizes (default: the enclosing ``use_tuning`` block's, else ``Tuning()``); the
    bytes written never depend on it. OSError propagates: io.output.StagedFolder, which knows the user's OUT,
    turns it into a MergeError.
    """
    return execute_many([plan], [out_dir], device, hooks, tuning)[0]


def execute_many(
    plans: Sequence[MergePlan],
    out_dirs: Sequence[Path],
    device: str,
    hooks: Hooks | None = None,
    tuning: Tuning | None = None,
) -> list[EngineStats]:
    """``execute`` for several plans of the same PREV and CUR that differ only in alpha and header metadata (one
    per alpha, made by ``make_plan`` with the same options otherwise): the inputs are read once and plan k is
    written into ``out_dirs[k]``, byte for byte as ``execute`` alone would write it."""
    plans, out_dirs, hooks = list(plans), [Path(d) for d in out_dirs], hooks or Hooks()
    if device == "auto":
        raise ValueError("execute_many: resolve the device first (resolve_device)")
    first = plans[0]
    for plan in plans[1:]:
        same = len(plan.files) == len(first.files) and all(
            [(p.name, p.dtype, p.cur, p.prev, p.convert) for p in a.pieces]
            == [(p.name, p.dtype, p.cur, p.prev, p.convert) for p in b.pieces]
            for a, b in zip(plan.files, first.files)
        )
        if not same:
            raise ValueError("execute_many: the plans must read the same tensors in the same order")
    hooks = replace(hooks, prefetcher=hooks.prefetcher or Prefetcher())
    hooks.prefetcher.prefetch([h.path for h in first.prev.files], [h.path for h in first.cur.files])
    tuning = tuning or current_tuning()
    if device == "cpu" and hooks.kernel is None and (cpass.available() or not _has_fp16(first)):  # no torch
        return _Merge(plans, out_dirs, device, tuning).run(hooks)
    from apo_merge.shell import import_torch

    torch = import_torch()  # Ctrl-C held while torch starts (see hold_signals)
    if hooks.kernel is None:
        from apo_kernels import extrapolate_

        hooks = replace(hooks, kernel=extrapolate_)
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # one per worker thread, for the merge only (the setting is process-wide)
    try:
        return _Merge(plans, out_dirs, device, tuning).run(hooks)
    finally:
        torch.set_num_threads(threads)


class _Merge:
    """One run: the ring, the lanes and the stages, assembled for the device and started on a StageRunner."""

    def __init__(self, plans: list[MergePlan], out_dirs: list[Path], device: str, tuning: Tuning) -> None:
        self.plans, self.out_dirs, self.device, self.tuning = plans, out_dirs, device, tuning
        gpu = is_gpu(device)
        self.chunk_elems = tuning.gpu_chunk_elems if gpu else tuning.chunk_elems
        slot_bytes = max(slot_elems(plans[0], self.chunk_elems) * widest(plans[0]), tuning.copy_chunk_bytes)
        with on(device):  # pinned for this device's context
            ring = Ring(
                tuning.slots(gpu),
                tuning.outputs(gpu, slot_bytes, len(plans)),
                slot_bytes,
                pinned=gpu,
                n_out=len(plans),
            )
        self.lanes = Lanes(ring, tuning.workers(gpu), len(plans))

    def _computes(self, runner: StageRunner, kernel: Kernel | None) -> list[Compute]:
        alphas = [p.alpha for p in self.plans]
        if is_gpu(self.device):
            return [CudaCompute(runner, self.lanes, alphas, kernel, self.device)]
        if kernel is None:
            return [NumpyCompute(runner, self.lanes, alphas) for _ in range(self.lanes.workers)]
        return [TorchCompute(runner, self.lanes, alphas, kernel) for _ in range(self.lanes.workers)]

    def run(self, hooks: Hooks) -> list[EngineStats]:
        t0 = time.perf_counter()
        runner, lanes, n = StageRunner(), self.lanes, len(self.plans)
        reader = Reader(runner, lanes, hooks.prefetcher, hooks.on_read)
        writer = Writer(runner, lanes, self.plans, self.out_dirs, hooks.progress)
        hashers = [Hasher(runner, lanes, k, hooks.output_hash) for k in range(n)]
        computes = self._computes(runner, hooks.kernel)
        work = tasks(self.plans[0], self.chunk_elems, self.tuning.copy_chunk_bytes)
        runner.add("apo-read", lambda: reader.run(work))
        runner.add("apo-write", writer.run)
        for k, hasher in enumerate(hashers):
            runner.add(f"apo-hash-{k}", hasher.run)
        for i, compute in enumerate(computes):
            runner.add(f"apo-compute-{i}", compute.run)
        try:
            runner.run()
        finally:
            reader.close()
        seconds = time.perf_counter() - t0
        return [
            EngineStats(
                seconds,
                writer.bytes_written[k],
                hashers[k].digests,
                sum(c.found[k] for c in computes),
                writer.scales.errors[k],
            )
            for k in range(n)
        ]


def _has_fp16(plan: MergePlan) -> bool:
    """Whether any computed tensor reads or writes fp16: without the compiled pass, numpy converts fp16 an element
    at a time, 8x slower than torch's twin (measured 7.9 against 1.0 ns per element for fp16 -> fp16), which
    outweighs torch's start-up. The compiled pass converts fp16 as fast as torch (docs/performance.md)."""
    return any(
        "F16" in (p.compute_dtype, p.prev[1].dtype, p.cur[1].dtype) for f in plan.files for p in f.pieces if p.prev
    )
