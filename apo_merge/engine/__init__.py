"""Stream a MergePlan's bytes through the kernel: read -> compute -> write -> hash, overlapped on threads.

- read (``read.Reader``): pread into a small ring of reusable buffers (``chunks.Ring``, pinned when the GPU
  computes): input slots free again once a chunk is computed, output buffers once written and hashed (so the
  reader goes on while the writer or a hash lags); anonymous memory does not grow with checkpoint size and no
  input page is mapped. A ``Prefetcher``
  (apo_merge.io.prefetch) streams the inputs into the page cache ahead of these reads.
- compute (``compute``): on the CPU, worker threads running apo_kernels' compiled pass (else its numpy twin) on
  the byte buffers (torch is not even imported: its start-up alone would cost a third of a 1 GB merge on two
  cores); without the compiled pass, torch's twin when fp16 is involved (numpy has no fast fp16 conversion); on a GPU, pinned slots, two CUDA streams with their
  own device buffers (copies of one chunk overlap the kernel of the other) and an event per chunk that the
  writer waits on, so the compute thread never synchronises. A kernel on torch tensors can be passed instead
  (default on a GPU: apo_kernels' ``extrapolate_``); on the CPU it runs with one torch thread per worker
  (OpenMP threads spinning next to the I/O threads cost more than they give).
- write (``write.Writer``): chunks in order (workers may finish out of order) through apo_merge.io.writer's
  SafetensorsWriter, which keeps writeback moving behind the writes.
- hash (``write.Hasher``): SHA-256 of each output file (for the model card), in order, beside the writes,
  straight from the buffers just written (no copy, no read back).

Each stage runs on its own thread(s) under a ``runner.StageRunner`` (first error wins, the caller only waits).
Sizes (chunks, workers, slots) come from a frozen ``Tuning``; the device is resolved once, by the caller, with
``resolve_device``.

Several plans over the same inputs (one per alpha) run in one pass: each chunk is read once, computed once per
alpha into its own output buffer, and written to each output; copied and converted tensors are computed once.

torch loads only for a GPU or a torch kernel, and then after the CLI's prefetch has started.
"""

from apo_merge.engine.compute import Kernel
from apo_merge.engine.device import resolve_device
from apo_merge.engine.pipeline import EngineStats, Hooks, execute, execute_many
from apo_merge.engine.read import OnRead
from apo_merge.engine.tuning import Tuning, current_tuning, use_tuning

__all__ = [
    "EngineStats",
    "Hooks",
    "Kernel",
    "OnRead",
    "Tuning",
    "current_tuning",
    "execute",
    "execute_many",
    "resolve_device",
    "use_tuning",
]
