"""PEFT LoRA adapters, extrapolated exactly: ``read`` (open and check adapters), ``step`` (the rank-concatenation step
and the base-step adapter), ``write`` (the adapter and the ``--merge-into`` writers) and ``job`` (one adapter job for
adapter+adapter, base+adapter and ``--merge-into``, as ``run_merges`` runs it). Names load lazily: torch starts only
when a module that needs it is used."""

from __future__ import annotations

from typing import TYPE_CHECKING

from apo_kernels.lazy import lazy_exports

_LAZY = {
    "AdapterJob": "apo_merge.lora.job",
    "ADAPTER_WEIGHTS": "apo_merge.lora.read",
    "Adapter": "apo_merge.lora.read",
    "open_adapter": "apo_merge.lora.read",
    "check_compatible": "apo_merge.lora.read",
    "check_recorded_base": "apo_merge.lora.read",
    "check_base": "apo_merge.lora.read",
    "extrapolate_adapters": "apo_merge.lora.step",
    "base_as_adapter": "apo_merge.lora.step",
    "base_step_adapter": "apo_merge.lora.step",
    "Output": "apo_merge.lora.write",
    "Written": "apo_merge.lora.write",
    "write_adapter": "apo_merge.lora.write",
    "write_merged": "apo_merge.lora.write",
    "write_base_step_adapter": "apo_merge.lora.write",
}
__all__ = [
    "AdapterJob",
    "ADAPTER_WEIGHTS",
    "Adapter",
    "open_adapter",
    "check_compatible",
    "check_recorded_base",
    "check_base",
    "extrapolate_adapters",
    "base_as_adapter",
    "base_step_adapter",
    "Output",
    "Written",
    "write_adapter",
    "write_merged",
    "write_base_step_adapter",
]

if TYPE_CHECKING:
    from apo_merge.lora.job import AdapterJob
    from apo_merge.lora.read import (
        ADAPTER_WEIGHTS,
        Adapter,
        check_base,
        check_compatible,
        check_recorded_base,
        open_adapter,
    )
    from apo_merge.lora.step import base_as_adapter, base_step_adapter, extrapolate_adapters
    from apo_merge.lora.write import Output, Written, write_adapter, write_base_step_adapter, write_merged

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
