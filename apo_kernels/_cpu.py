"""CPU twin of the Triton kernel: same formula, same operation order, same single rounding, bit for bit.

Speed matters here (the merge engine runs it on a 2-core machine): fresh full-size fp32 temporaries cost more in
page faults than the arithmetic, so tensors are processed in cache-sized chunks through two reused per-thread
scratch buffers, with in-place ops only. torch's elementwise CPU ops round every result in the tensor's dtype
and do not fuse the subtract, multiply and add into one fma, exactly like the kernel launched without fp fusion.
"""

from __future__ import annotations

import threading

import torch

from apo_kernels._numerics import BITS_DTYPE, CANONICAL_NAN, compute_dtype, round_alpha

_CHUNK = 1 << 18  # elements: two fp32 scratch chunks (2 MiB) stay in this machine kind's L2 + L3
_scratch = threading.local()


def _buffers(wide: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    key = (wide, device)
    if key not in bufs or bufs[key][0].numel() < _CHUNK:
        bufs[key] = (torch.empty(_CHUNK, dtype=wide, device=device), torch.empty(_CHUNK, dtype=wide, device=device))
    return bufs[key]


def extrapolate_(out: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor, alpha: float) -> torch.Tensor:
    """``out = cur + alpha * (cur - prev)`` with torch ops (CPU; any device works); arguments already validated."""
    wide = compute_dtype(prev.dtype, cur.dtype, out.dtype)
    a = round_alpha(alpha, wide)
    if a == 0.0 and out.dtype == cur.dtype:
        return out.copy_(cur)
    n = out.numel()
    if n == 0:
        return out
    p = prev.contiguous().view(-1)
    c = cur.contiguous().view(-1)
    o = out.view(-1) if out.is_contiguous() else torch.empty(n, dtype=out.dtype, device=out.device)
    c_buf, d_buf = _buffers(wide, out.device)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        _chunk(o[s:e], p[s:e], c[s:e], a, c_buf[: e - s], d_buf[: e - s])
    if not out.is_contiguous():
        out.copy_(o.view(out.shape))
    return out


def _chunk(o: torch.Tensor, p: torch.Tensor, c: torch.Tensor, a: float, c_buf: torch.Tensor,
           d_buf: torch.Tensor) -> None:
    # o may be the very memory of p or c: both are read (into scratch or by the op) before o is written.
    wide = d_buf.dtype
    if a == 0.0:
        r = d_buf.copy_(c)
    else:
        cw = c if c.dtype == wide else c_buf.copy_(c)  # upcasts are exact
        torch.sub(cw, p, out=d_buf)  # d = cur - prev; a narrower p is upcast (exactly) on the fly
        d_buf.mul_(a)  # t = alpha * d
        r = torch.add(cw, d_buf, out=o) if o.dtype == wide else d_buf.add_(cw)  # r = cur + t
    if r is not o:
        if wide == torch.float64 and o.element_size() == 2:
            o.copy_(_round_to_odd_fp32(r))
        else:
            o.copy_(r)  # torch rounds to nearest even (subnormals included); NaN bits fixed below
    if torch.isnan(r.amax()):  # amax propagates NaN: one cheap pass, the mask only when NaN is present
        o.view(BITS_DTYPE[o.dtype]).masked_fill_(torch.isnan(r), CANONICAL_NAN[o.dtype])


def _round_to_odd_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp64 -> fp32 rounding to odd; a following round-to-nearest-even into 16 bits is then one correct rounding.

    torch's own fp64 -> fp16/bf16 casts go through fp32 with nearest-even twice (double rounding). The kernel
    does the same steps.
    """
    f = x.to(torch.float32)
    back = f.to(torch.float64)
    inexact = back != x
    bits = f.view(torch.int32)
    bits.sub_((inexact & (back.abs() > x.abs())).to(torch.int32))  # step the magnitude down to truncation
    bits.bitwise_or_(inexact.to(torch.int32))
    return f
