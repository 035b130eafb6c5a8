"""apo-merge: exact, streaming APO extrapolation ``cur + alpha * (cur - prev)`` of Hugging Face checkpoints.

Heavy modules (torch) load lazily so that the CLI starts reading while they import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from apo_kernels.lazy import lazy_exports
from apo_merge._version import __version__

__all__ = [
    "APOCallback",
    "extrapolate_checkpoints",
    "extrapolate",
    "extrapolate_state_dict",
    "extrapolate_state_dict_",
    "extrapolate_tensors_",
    "MergeError",
    "MergeOptions",
    "__version__",
]

_LAZY = {
    "APOCallback": "apo_merge.callback",
    "extrapolate_checkpoints": "apo_merge.api",
    "extrapolate": "apo_merge.api",  # the former name of extrapolate_checkpoints, keyword arguments only
    "MergeOptions": "apo_merge.options",
    "MergeError": "apo_merge.errors",
    "extrapolate_state_dict": "apo_merge.state",
    "extrapolate_state_dict_": "apo_merge.state",
    "extrapolate_tensors_": "apo_merge.state",
}

if TYPE_CHECKING:
    from apo_merge.api import extrapolate, extrapolate_checkpoints
    from apo_merge.callback import APOCallback
    from apo_merge.errors import MergeError
    from apo_merge.options import MergeOptions
    from apo_merge.state import extrapolate_state_dict, extrapolate_state_dict_, extrapolate_tensors_


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
