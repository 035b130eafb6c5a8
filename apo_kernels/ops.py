"""Public entry points; they pick the backend from the tensors' device.

``backend="auto"``: CUDA tensors -> the compiled Triton kernel, CPU tensors -> the CPU twin.
``backend="triton"``: the kernel; on CPU tensors it runs under Triton's interpreter (slow: tests only).
``backend="torch"``: the twin (plain torch ops, any device).
``backend="numpy"``: the numpy twin (``apo_kernels.numpy_twin``) the merge engine runs on the CPU (CPU tensors only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from apo_kernels import _cpu, numpy_twin
from apo_kernels.dtypes import DTYPES, of_torch

Backend = Literal["auto", "torch", "triton", "numpy"]
_BACKENDS = ("auto", "torch", "triton", "numpy")


def supported_dtypes() -> tuple[torch.dtype, ...]:
    """Floating dtypes the kernels read and write."""
    return tuple(d.torch_dtype() for d in DTYPES if d.kernel)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any of the given dtypes is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def round_alpha(alpha: float, wide: torch.dtype) -> float:
    """``alpha`` rounded to nearest-even in ``wide`` (overflowing to inf), returned as an exact Python float."""
    return numpy_twin.round_alpha(alpha, np.float64 if wide == torch.float64 else np.float32)


def _decide(out: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor, alpha: float) -> tuple[torch.dtype, float]:
    """The values every backend takes as given: the compute dtype and alpha rounded once into it."""
    wide = compute_dtype(prev.dtype, cur.dtype, out.dtype)
    return wide, round_alpha(alpha, wide)


def _copies_cur(out: torch.Tensor, cur: torch.Tensor, a: float) -> bool:
    # alpha == 0 into cur's own dtype: cur's bytes (NaN payloads included), even where prev is inf or NaN.
    return a == 0.0 and out.dtype == cur.dtype


def _extent(t: torch.Tensor) -> tuple[int, int]:
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _check_alias(out: torch.Tensor, name: str, t: torch.Tensor) -> None:
    """``out`` may be exactly ``t`` (same elements at the same places) or disjoint from it, nothing in between."""
    if out.device != t.device or out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
        return
    (a0, a1), (b0, b1) = _extent(out), _extent(t)
    if a1 <= b0 or b1 <= a0:
        return
    if out.data_ptr() == t.data_ptr() and out.stride() == t.stride() and out.element_size() == t.element_size():
        return
    raise ValueError(f"out partly overlaps {name}; pass {name} itself as out (in place) or a separate tensor")


def _check(out: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor, backend: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(_BACKENDS)}")
    if prev.shape != cur.shape or out.shape != cur.shape:
        raise ValueError(f"shape mismatch: prev {tuple(prev.shape)}, cur {tuple(cur.shape)}, out {tuple(out.shape)}")
    for name, t in (("prev", prev), ("cur", cur), ("out", out)):
        if of_torch(t.dtype) is None:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, supported_dtypes()))}")
    if not (prev.device == cur.device == out.device):
        raise ValueError(
            f"tensors on different devices: prev {prev.device}, cur {cur.device}, out {out.device}; "
            "move them to one device first"
        )
    _check_alias(out, "prev", prev)
    _check_alias(out, "cur", cur)
    if backend == "numpy" and cur.device.type != "cpu":
        raise ValueError(f"backend='numpy' takes CPU tensors, not {cur.device}; use backend='auto'")


def _use_triton(device: torch.device, backend: Backend) -> bool:
    if backend == "auto":
        return device.type == "cuda"
    return backend == "triton"


@torch.no_grad()
def extrapolate_(
    out: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor, alpha: float, *, backend: Backend = "auto"
) -> torch.Tensor:
    """Write ``cur + alpha * (cur - prev)`` into ``out`` (which may alias ``cur`` or ``prev``) and return it.

    Math in fp32 (fp64 if any tensor is fp64), one rounding into ``out.dtype``; bit-identical on every backend.

    >>> w = torch.ones(3, dtype=torch.bfloat16)
    >>> extrapolate_(w, torch.zeros(3), w, 0.5)  # in place; prev may have another dtype
    tensor([1.5000, 1.5000, 1.5000], dtype=torch.bfloat16)
    """
    _check(out, prev, cur, backend)
    wide, a = _decide(out, prev, cur, alpha)
    if _copies_cur(out, cur, a):
        return out.copy_(cur)
    if backend == "numpy":
        _numpy_twin(out, prev, cur, a)
    elif _use_triton(cur.device, backend):
        from apo_kernels import _triton

        _triton.extrapolate_(prev, cur, out, a, wide)
    else:
        _cpu.extrapolate_(prev, cur, out, a, wide)
    return out


def _numpy_twin(out: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor, a: float) -> None:
    def raw(t: torch.Tensor):
        return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()

    def name(t: torch.Tensor) -> str:
        return of_torch(t.dtype).name  # the twin names dtypes as safetensors does

    result = torch.empty(out.shape, dtype=out.dtype)  # the twin's output may not alias its inputs
    numpy_twin.extrapolate_into([raw(result)], name(out), raw(prev), name(prev), raw(cur), name(cur), [a])
    out.copy_(result)


def extrapolate(
    prev: torch.Tensor,
    cur: torch.Tensor,
    alpha: float,
    *,
    out_dtype: torch.dtype | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Return ``cur + alpha * (cur - prev)`` as a new tensor of ``out_dtype`` (default: ``cur.dtype``).

    >>> extrapolate(torch.zeros(2), torch.ones(2), 0.5)
    tensor([1.5000, 1.5000])
    """
    out = torch.empty(cur.shape, dtype=out_dtype or cur.dtype, device=cur.device)
    return extrapolate_(out, prev, cur, alpha, backend=backend)


@torch.no_grad()
def extrapolate_many_(
    outs: Sequence[torch.Tensor],
    prevs: Sequence[torch.Tensor],
    curs: Sequence[torch.Tensor],
    alpha: float,
    *,
    backend: Backend = "auto",
) -> None:
    """``extrapolate_`` over matching lists (e.g. a model's parameters); groups small tensors per launch on GPU.

    Every triple is validated before anything is written. On the Triton backend, small contiguous tensors that
    share a device and dtype triple go through one launch (a table of addresses); large ones get their own.
    """
    outs, prevs, curs = list(outs), list(prevs), list(curs)
    if not (len(outs) == len(prevs) == len(curs)):
        raise ValueError(f"list lengths differ: {len(outs)} outs, {len(prevs)} prevs, {len(curs)} curs")
    for o, p, c in zip(outs, prevs, curs, strict=True):
        _check(o, p, c, backend)
    kernel, twin = [], []
    for o, p, c in zip(outs, prevs, curs, strict=True):
        wide, a = _decide(o, p, c, alpha)
        if _copies_cur(o, c, a):
            o.copy_(c)
        elif backend == "numpy":
            _numpy_twin(o, p, c, a)
        else:
            (kernel if _use_triton(c.device, backend) else twin).append((p, c, o, a, wide))  # the backends' order
    if kernel:
        from apo_kernels import _triton

        _triton.extrapolate_many_(kernel)
    for job in twin:
        _cpu.extrapolate_(*job)
