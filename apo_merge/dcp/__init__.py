"""torch.distributed.checkpoint (DCP) folders in apo-merge: merge two rounds' sharded checkpoints file by file
(``merge_dcp``), and export one to a Hugging Face safetensors folder (``export_hf``).

``is_dcp`` only looks at the folder (no torch), so the CLI can sniff its inputs before torch loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from apo_kernels.lazy import lazy_exports

if TYPE_CHECKING:
    from apo_merge.dcp.export import export_hf
    from apo_merge.dcp.merge import merge_dcp
    from apo_merge.dcp.reader import open_dcp
    from apo_merge.dcp.verify import verify_dcp

__all__ = ["is_dcp", "run_merges", "merge_dcp", "export_hf", "open_dcp", "verify_dcp"]


def is_dcp(path: str | os.PathLike) -> bool:
    """A local folder holding DCP's ``.metadata`` (or accelerate's ``pytorch_model_fsdp_0/.metadata``)."""
    try:
        p = Path(path).expanduser()
        return (p / ".metadata").is_file() or (p / "pytorch_model_fsdp_0" / ".metadata").is_file()
    except (OSError, TypeError, ValueError):
        return False


def run_merges(prev, cur, options, output=None, *, progress=None, prefetcher=None) -> list:
    """``apo_merge.api.run_merges`` for DCP inputs: PREV a DCP or Hugging Face folder, CUR a DCP folder."""
    from apo_merge import api, sources
    from apo_merge.dcp.merge import merge_dcp
    from apo_merge.errors import MergeError
    from apo_merge.finish import check_output

    if not is_dcp(cur):
        raise MergeError(
            f"{cur}: CUR is not a DCP folder but PREV {prev} is; export PREV to safetensors first "
            f"(apo-merge export {prev} OUT --config-from CUR) and merge the two safetensors folders"
        )
    src_prev, src_cur = (sources.Source(Path(p), str(p), Path(p)) for p in (prev, cur))
    outs = api.output_paths(src_cur, options.alphas, output)
    for out in outs:
        check_output(out, [src_prev, src_cur], options.overwrite)
    return merge_dcp(prev, cur, options, outs, progress=progress, prefetcher=prefetcher)


__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "merge_dcp": "apo_merge.dcp.merge",
        "export_hf": "apo_merge.dcp.export",
        "open_dcp": "apo_merge.dcp.reader",
        "verify_dcp": "apo_merge.dcp.verify",
    },
)
