"""Public entry points; they pick the backend from the tensors' device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from apo_kernels import _cpu

Backend = Literal["auto", "torch", "triton"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def supported_dtypes() -> tuple[torch.dtype, ...]:
    """Floating dtypes the kernels read and write."""
    return _FLOAT_DTYPES


def _check(out: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor) -> None:
    if prev.shape != cur.shape or out.shape != cur.shape:
        raise ValueError(f"shape mismatch: prev {tuple(prev.shape)}, cur {tuple(cur.shape)}, out {tuple(out.shape)}")
    for name, t in (("prev", prev), ("cur", cur), ("out", out)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, _FLOAT_DTYPES))}")
    if not (prev.device == cur.device == out.device):
        raise ValueError(f"tensors on different devices: {prev.device}, {cur.device}, {out.device}")


def _use_triton(device: torch.device, backend: Backend) -> bool:
    if backend == "auto":
        return device.type == "cuda"
    return backend == "triton"


def extrapolate_(out: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor, alpha: float,
                 *, backend: Backend = "auto") -> torch.Tensor:
    """Write ``cur + alpha * (cur - prev)`` into ``out`` (which may alias ``cur`` or ``prev``) and return it."""
    _check(out, prev, cur)
    if _use_triton(cur.device, backend):
        from apo_kernels import _triton

        return _triton.extrapolate_(out, prev, cur, float(alpha))
    return _cpu.extrapolate_(out, prev, cur, float(alpha))


def extrapolate(prev: torch.Tensor, cur: torch.Tensor, alpha: float, *, out_dtype: torch.dtype | None = None,
                backend: Backend = "auto") -> torch.Tensor:
    """Return ``cur + alpha * (cur - prev)`` as a new tensor of ``out_dtype`` (default: ``cur.dtype``).

    >>> extrapolate(torch.zeros(2), torch.ones(2), 0.5)
    tensor([1.5000, 1.5000])
    """
    out = torch.empty(cur.shape, dtype=out_dtype or cur.dtype, device=cur.device)
    return extrapolate_(out, prev, cur, alpha, backend=backend)


def extrapolate_many_(outs: Sequence[torch.Tensor], prevs: Sequence[torch.Tensor], curs: Sequence[torch.Tensor],
                      alpha: float, *, backend: Backend = "auto") -> None:
    """``extrapolate_`` over matching lists (e.g. a model's parameters); groups small tensors per launch on GPU."""
    if not (len(outs) == len(prevs) == len(curs)):
        raise ValueError(f"list lengths differ: {len(outs)} outs, {len(prevs)} prevs, {len(curs)} curs")
    for o, p, c in zip(outs, prevs, curs):
        extrapolate_(o, p, c, alpha, backend=backend)
