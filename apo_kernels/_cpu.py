"""CPU twin of the Triton kernel: same formula, same operation order, same single rounding, bit for bit.

Speed matters here (the merge engine runs it on a 2-core machine). Fresh full-size fp32 temporaries cost more in
page faults than the arithmetic, so a tensor is processed in chunks through two reused per-thread scratch
buffers, with in-place ops only. With several torch threads a chunk is kept at torch's intra-op grain size, so
that each op runs inline on the calling thread: one OpenMP parallel region per op (six per chunk) stalls for
milliseconds whenever another thread or process holds one of the cores (measured: 10x slower on a busy 2-core
machine). Large inputs are split instead into contiguous ranges, one per torch thread, run by a small thread pool
(torch ops release the GIL). With one torch thread nothing runs in parallel and larger chunks cost less per byte.

torch's elementwise CPU ops round every result to the tensor's dtype and do not fuse the subtract, multiply and
add into an fma, exactly like the kernel launched without fp fusion.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from apo_kernels.dtypes import DTYPES

_CHUNK = 1 << 15  # elements per op: torch's intra-op grain size (32768), so ops run inline; 2 x 128 KiB scratch
_CHUNK_ONE_THREAD = 1 << 18  # with torch.set_num_threads(1): ~1.8x less CPU per byte than 2**15 (2 x 1 MiB)
_SPLIT_MIN = 1 << 18  # elements per range below which splitting across threads does not pay
# Per output dtype (apo_kernels.dtypes): the same-width integer view of its bits and its canonical NaN.
_NAN = {d.torch_dtype(): (getattr(torch, f"int{8 * d.itemsize}"), d.nan) for d in DTYPES if d.kernel}
_scratch = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _buffers(wide: torch.dtype, device: torch.device, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    key = (wide, device)
    if key not in bufs or bufs[key][0].numel() < size:
        bufs[key] = (torch.empty(size, dtype=wide, device=device), torch.empty(size, dtype=wide, device=device))
    return bufs[key]


def _workers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:  # threads start on demand, up to one per core
            _pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="apo_kernels")
        return _pool


def _forget_pool() -> None:
    global _pool
    _pool = None  # a forked child (e.g. a DataLoader worker) has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def extrapolate_(prev: torch.Tensor, cur: torch.Tensor, out: torch.Tensor, a: float, wide: torch.dtype) -> None:
    """``out = cur + a * (cur - prev)`` with torch ops (CPU; any device works) in the compute dtype ``wide``.

    ``apo_kernels.ops`` has validated the tensors, rounded ``a`` to ``wide`` and handled the alpha == 0 copy.
    """
    n = out.numel()
    if n == 0:
        return
    # Detached: worker threads do not inherit no_grad, and parameters (requires_grad) are updated in place.
    p = prev.detach().contiguous().view(-1)
    c = cur.detach().contiguous().view(-1)
    o = out.detach().view(-1) if out.is_contiguous() else torch.empty(n, dtype=out.dtype, device=out.device)
    threads = torch.get_num_threads() if o.device.type == "cpu" else 1
    chunk = _CHUNK if threads > 1 else _CHUNK_ONE_THREAD
    parts = min(threads, n // _SPLIT_MIN)
    if parts > 1:
        step = -(-n // parts // chunk) * chunk
        jobs = [_workers().submit(_range, p, c, o, a, wide, s, min(n, s + step), chunk) for s in range(step, n, step)]
        _range(p, c, o, a, wide, 0, step, chunk)
        for job in jobs:
            job.result()
    else:
        _range(p, c, o, a, wide, 0, n, chunk)
    if not out.is_contiguous():
        out.copy_(o.view(out.shape))


def _range(
    p: torch.Tensor, c: torch.Tensor, o: torch.Tensor, a: float, wide: torch.dtype, start: int, stop: int, chunk: int
) -> None:
    c_buf, d_buf = _buffers(wide, o.device, chunk)
    pieces = (t[start:stop].split(chunk) for t in (p, c, o))  # one call per range, not three per chunk
    for pc, cc, oc in zip(*pieces, strict=True):
        m = oc.numel()
        if m == c_buf.numel():
            _chunk(pc, cc, oc, a, c_buf, d_buf)
        else:
            _chunk(pc, cc, oc, a, c_buf[:m], d_buf[:m])


def _chunk(
    p: torch.Tensor, c: torch.Tensor, o: torch.Tensor, a: float, c_buf: torch.Tensor, d_buf: torch.Tensor
) -> None:
    # o may be the very memory of p or c: both are read (into scratch or by the op) before o is written.
    wide = d_buf.dtype
    if a == 0.0:
        r = d_buf.copy_(c)
    else:
        cw = c if c.dtype == wide else c_buf.copy_(c)  # upcasts are exact
        torch.sub(cw, p if p.dtype == wide else d_buf.copy_(p), out=d_buf)  # d = cur - prev
        d_buf.mul_(a)  # t = alpha * d
        r = torch.add(cw, d_buf, out=o) if o.dtype == wide else d_buf.add_(cw)  # r = cur + t
    if r is not o:
        if wide == torch.float64 and o.element_size() == 2:
            o.copy_(_round_to_odd_fp32(r))
        else:
            o.copy_(r)  # torch rounds to nearest even (subnormals included); NaN bits fixed below
    if not math.isfinite(r.sum().item()):  # NaN anywhere makes the sum NaN: one cheap pass, the mask only then
        bits, nan = _NAN[o.dtype]
        o.view(bits).masked_fill_(torch.isnan(r), nan)


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
