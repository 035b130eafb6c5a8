"""In-memory APO extrapolation ``cur + alpha * (cur - prev)`` of state dicts and tensor lists.

The one implementation behind ``apo_merge.extrapolate_state_dict`` / ``extrapolate_state_dict_`` /
``extrapolate_tensors_``, ``APOCallback`` and apo-train's extrapolate phase. ``prev`` and ``cur`` are keyword-only
in every function here: swapped, they would silently compute another model.

Tensors stay where they are: each of cur's floating tensors is computed on its own device (CUDA: the Triton
kernel; CPU: its twin; fp32 math, one rounding), and prev's tensors are moved to that device in groups of about
256 MiB, so a GPU model needs only one group of prev on the GPU at a time. Tensors that are the same memory (tied
embeddings) are computed once; tensors that overlap in any other way are refused. Non-floating tensors (integer
buffers) are not extrapolated. Every check runs before anything is written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from apo_kernels import extrapolate_many_, supported_dtypes

GROUP_BYTES = 1 << 28  # bytes of cur (and so of prev on cur's device) per kernel call


class StateMismatchError(ValueError):
    """``prev`` and ``cur`` are not two states of one model.

    ``kind``: "names", "shape", "dtype" or "overlap"; ``names``: the tensors at fault (for "names": those in only
    one of the two, sorted); ``shapes``: ``(prev's, cur's)`` for "shape".
    """

    def __init__(
        self, message: str, kind: str, names: list[str], shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    ) -> None:
        super().__init__(message)
        self.kind, self.names, self.shapes = kind, names, shapes


def tensors_once(cur: Mapping[str, torch.Tensor]) -> tuple[list[str], dict[str, str]]:
    """cur's floating tensors, each memory once: ``(names, aliases)``, ``aliases[name]`` the earlier name whose tensor
    is the same memory (same start, dtype, shape and strides: tied weights). Other overlaps are refused: updating
    both in place would apply the step twice to the shared elements."""
    names: list[str] = []
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    extents: dict[tuple, list[tuple[int, int, str]]] = {}
    for name, t in cur.items():
        if not t.is_floating_point():
            continue
        if t.numel() == 0:
            names.append(name)
            continue
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key in first:
            aliases[name] = first[key]
            continue
        first[key] = name
        names.append(name)
        span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True)) + 1
        extents.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(
            (t.data_ptr(), t.data_ptr() + span * t.element_size(), name)
        )
    for spans in extents.values():
        if len(spans) > 1:
            spans.sort()
            end, owner = spans[0][1], spans[0][2]
            for start, stop, name in spans[1:]:
                if start < end:
                    raise StateMismatchError(
                        f"{owner} and {name} share part of their memory without being the same tensor; "
                        "extrapolate a state dict whose tensors are disjoint or tied",
                        "overlap",
                        [owner, name],
                    )
                if stop > end:
                    end, owner = stop, name
    return names, aliases


def matching_tensors(
    *, prev: Mapping[str, torch.Tensor], cur: Mapping[str, torch.Tensor]
) -> tuple[list[str], dict[str, str]]:
    """Check that ``prev`` and ``cur`` are two states of one model; return ``tensors_once(cur)``.

    Every name of ``prev`` is in ``cur``; every floating tensor of ``cur`` is in ``prev`` (a tied alias may be
    missing there, as in checkpoints written by ``save_pretrained``); names in both have one shape, and are both
    floating (in a supported dtype) or both not.
    """
    names, aliases = tensors_once(cur)
    only_prev = sorted(set(prev) - set(cur))
    only_cur = sorted(n for n in names if n not in prev)
    if only_prev or only_cur:
        sides = [f"only in {side}: {_some(found)}" for side, found in (("prev", only_prev), ("cur", only_cur)) if found]
        raise StateMismatchError(
            f"names in only one state dict ({'; '.join(sides)}); prev and cur must be states of the same model",
            "names",
            sorted(only_prev + only_cur),
        )
    floating = set(supported_dtypes())
    for name, c in cur.items():
        if name not in prev:
            continue
        p = prev[name]
        if p.shape != c.shape:
            shapes = (tuple(p.shape), tuple(c.shape))
            raise StateMismatchError(f"{name}: shape {shapes[0]} in prev, {shapes[1]} in cur", "shape", [name], shapes)
        if name in aliases:
            continue
        if p.is_floating_point() != c.is_floating_point() or (
            c.is_floating_point() and not {p.dtype, c.dtype} <= floating
        ):
            raise StateMismatchError(
                f"{name}: dtype {p.dtype} in prev, {c.dtype} in cur; both must be one of "
                f"{', '.join(str(d).removeprefix('torch.') for d in supported_dtypes())}, or both not floating",
                "dtype",
                [name],
            )
    return names, aliases


def extrapolate_state_dict(
    *,
    prev: Mapping[str, torch.Tensor],
    cur: Mapping[str, torch.Tensor],
    alpha: float,
    out_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Return a new state dict ``cur + alpha * (cur - prev)``, name by name, on cur's devices.

    Floating tensors are extrapolated (fp32 math, one rounding into ``out_dtype`` or each ``cur`` tensor's dtype);
    other tensors are copied from ``cur``; a tied alias in ``cur`` is the same tensor in the result.

    >>> sd = extrapolate_state_dict(prev={"w": torch.zeros(2)}, cur={"w": torch.ones(2)}, alpha=0.3)
    """
    names, aliases = matching_tensors(prev=prev, cur=cur)
    made = {n: torch.empty(cur[n].shape, dtype=out_dtype or cur[n].dtype, device=cur[n].device) for n in names}
    _apply(prev, cur, made, names, alpha)
    out: dict[str, torch.Tensor] = {}
    for name, c in cur.items():
        out[name] = made[aliases.get(name, name)] if c.is_floating_point() else c.clone()
    return out


def extrapolate_state_dict_(*, prev: Mapping[str, torch.Tensor], cur: Mapping[str, torch.Tensor], alpha: float) -> int:
    """In place on cur's floating tensors (e.g. ``model.state_dict()``): ``cur <- cur + alpha * (cur - prev)``.

    Tied tensors are updated once. Returns the number of tensors computed.
    """
    names, _ = matching_tensors(prev=prev, cur=cur)
    _apply(prev, cur, cur, names, alpha)
    return len(names)


def extrapolate_tensors_(*, prev: Sequence[torch.Tensor], cur: Sequence[torch.Tensor], alpha: float) -> None:
    """In place: ``cur[i] <- cur[i] + alpha * (cur[i] - prev[i])`` (e.g. over ``list(model.parameters())``).

    ``prev[i]`` may live on another device than ``cur[i]`` (moved there in groups); a tensor listed twice in
    ``cur`` is updated once.
    """
    cur, prev = list(cur), list(prev)
    if len(cur) != len(prev):
        raise ValueError(f"{len(cur)} cur tensors but {len(prev)} prev tensors; pass matching lists")
    extrapolate_state_dict_(
        prev={f"tensor {i}": t for i, t in enumerate(prev)},
        cur={f"tensor {i}": t for i, t in enumerate(cur)},
        alpha=alpha,
    )


@torch.no_grad()
def _apply(
    prev: Mapping[str, torch.Tensor],
    cur: Mapping[str, torch.Tensor],
    out: Mapping[str, torch.Tensor],
    names: list[str],
    alpha: float,
) -> None:
    group: list[str] = []
    size = 0
    for i, name in enumerate(names):
        group.append(name)
        size += cur[name].numel() * cur[name].element_size()
        if size >= GROUP_BYTES or i == len(names) - 1:
            extrapolate_many_(
                [out[n] for n in group], [_to(prev[n], cur[n].device) for n in group], [cur[n] for n in group], alpha
            )
            group, size = [], 0


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Non-blocking only towards a GPU: the kernel then runs after the copy on the same stream. Towards the CPU it
    # would return before the data is there.
    return t.to(device, non_blocking=device.type == "cuda")


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
