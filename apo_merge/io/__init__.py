"""Everything apo-merge reads from and writes to disk, in one layer that the merge, LoRA, verify, the callback
and apo-train's run store share:

- ``header`` / ``checkpoint``: the hardened safetensors header reader and checkpoint folder reader.
- ``hashing``: whole-file SHA-256 and the stream hasher fed by the merge's reads.
- ``files``: fsync helpers and ``replace_atomically`` (one step, never a moment with neither old nor new).
- ``output``: the staged output folder that appears complete or not at all.
- ``writer``: the safetensors file writer with writeback windows, and exact preads.
- ``prefetch``: a ``Prefetcher`` that streams inputs into the page cache ahead of the reads.

No module here imports torch at import time (the CLI starts reading before torch loads).
"""
