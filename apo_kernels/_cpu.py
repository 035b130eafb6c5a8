"""CPU twin of the Triton kernel: same formula, same operation order, same single rounding."""

from __future__ import annotations

import torch


def extrapolate_(out: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 0.0:
        return out.copy_(cur)
    wide = torch.float64 if torch.float64 in (prev.dtype, cur.dtype, out.dtype) else torch.float32
    c = cur.to(wide)
    d = c - prev.to(wide)
    d.mul_(torch.tensor(alpha, dtype=wide))
    d.add_(c)
    return out.copy_(d)
