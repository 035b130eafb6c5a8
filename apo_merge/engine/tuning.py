"""How the engine cuts the work and how many buffers it keeps: speed and memory only, never the bytes written."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Tuning:
    """The engine's sizes. Any values write the same bytes; tests pass small ones to cut tensors into many chunks."""

    chunk_elems: int = 1 << 20  # elements per task on the CPU (the twin works through it in cache-sized pieces)
    gpu_chunk_elems: int = 1 << 22  # per task on a GPU: fewer, larger copies and launches
    copy_chunk_bytes: int = 1 << 22  # per task of a tensor copied unchanged
    max_cpu_workers: int = 4  # CPU compute threads: one per usable core, at most this many
    cpu_workers: int | None = None  # exactly this many CPU compute threads instead (None: as above)
    spare_slots: int = 4  # CPU ring slots beyond one per worker: each stage holds one while the reader fills the next
    gpu_slots: int = 5  # pinned ring slots when a GPU computes
    # Computed output per alpha (for up to three alphas: more share three windows) that may wait for the writer and
    # the hash stages: the writer blocks while a writeback window reaches the disk and hashing shares the cores;
    # meanwhile the reader goes on.
    output_window_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (value is None and f.name == "cpu_workers") and (type(value) is not int or value < 1):
                raise ValueError(f"Tuning.{f.name} must be a positive int, not {value!r}")

    def workers(self, gpu: bool) -> int:
        """Compute threads: one on a GPU (it queues work on two streams); on the CPU one per usable core."""
        if gpu:
            return 1
        if self.cpu_workers is not None:
            return self.cpu_workers
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(self.max_cpu_workers, cpus))

    def slots(self, gpu: bool) -> int:
        """Input slots: enough for every stage to hold one while the reader fills the next."""
        return self.gpu_slots if gpu else self.workers(gpu) + self.spare_slots

    def outputs(self, gpu: bool, nbytes: int, n_out: int = 1) -> int:
        """Output buffer sets of ``nbytes`` bytes per alpha for ``n_out`` alphas: the output window's worth, at
        least one per input slot."""
        return max(self.slots(gpu), self.output_window_bytes * min(n_out, 3) // (nbytes * n_out))


_CURRENT: ContextVar[Tuning | None] = ContextVar("apo_merge_tuning", default=None)


@contextlib.contextmanager
def use_tuning(tuning: Tuning) -> Iterator[Tuning]:
    """Merges started inside the block (through the API or the CLI, in this thread) run with ``tuning``, unless a
    Tuning is passed to ``execute`` itself."""
    token = _CURRENT.set(tuning)
    try:
        yield tuning
    finally:
        _CURRENT.reset(token)


def current_tuning() -> Tuning:
    """The enclosing ``use_tuning`` block's Tuning, else the defaults."""
    return _CURRENT.get() or Tuning()
