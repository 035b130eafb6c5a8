"""In-memory extrapolation for trainers: tensors stay where they are (GPU tensors use the Triton kernel)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from apo_kernels import extrapolate, extrapolate_many_


def extrapolate_state_dict(
    prev: Mapping[str, torch.Tensor],
    cur: Mapping[str, torch.Tensor],
    alpha: float,
    *,
    out_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Return a new state dict ``cur + alpha * (cur - prev)``, name by name.

    Floating tensors are extrapolated (fp32 math, one rounding into ``out_dtype`` or each ``cur`` tensor's dtype);
    other tensors are copied from ``cur``. Both dicts must hold the same names and shapes.

    >>> sd = extrapolate_state_dict({"w": torch.zeros(2)}, {"w": torch.ones(2)}, 0.3)
    """
    missing = sorted(set(prev) ^ set(cur))
    if missing:
        raise ValueError(f"names in only one state dict: {', '.join(missing[:10])}")
    out: dict[str, torch.Tensor] = {}
    for name, c in cur.items():
        p = prev[name]
        if p.shape != c.shape:
            raise ValueError(f"{name}: shape {tuple(p.shape)} in prev, {tuple(c.shape)} in cur")
        if c.is_floating_point() and p.is_floating_point():
            out[name] = extrapolate(p.to(c.device), c, alpha, out_dtype=out_dtype)
        else:
            out[name] = c.clone()
    return out


@torch.no_grad()
def extrapolate_tensors_(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor], alpha: float) -> None:
    """In place: ``cur[i] <- cur[i] + alpha * (cur[i] - prev[i])`` (e.g. over ``model.parameters()``).

    Matching tensors must share shape and device; on CUDA small tensors are grouped into few kernel launches.
    """
    cur, prev = list(cur), list(prev)
    if len(cur) != len(prev):
        raise ValueError(f"{len(cur)} cur tensors but {len(prev)} prev tensors")
    for i, (c, p) in enumerate(zip(cur, prev)):
        if c.shape != p.shape or c.device != p.device:
            raise ValueError(f"tensor {i}: cur {tuple(c.shape)} on {c.device}, prev {tuple(p.shape)} on {p.device}")
    extrapolate_many_(cur, prev, cur, alpha)
