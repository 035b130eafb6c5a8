"""A model's local shards under FSDP2 (DTensor parameters) or whole tensors (one process, DDP), for the APO step in
place on every rank with no gather: the step is elementwise, so each rank's shard of the result is the step of its
shards, bit for bit.

``local_state`` maps names to the tensors this rank holds (``DTensor.to_local()``: views, so in-place updates reach
the parameters); ``layout`` records how they are cut, so that a change between rounds is refused rather than
computed against the wrong elements; ``load_local`` reads the previous raw weights into this rank's layout from a DCP
folder (DCP reshards on load, so any saving world size works), a Hugging Face folder (only this rank's slices are
read) or a state dict of full tensors; ``save_dcp`` writes a state dict as a DCP folder, every rank its shards, the
folder replaced by rank 0 only once complete.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist


def is_dtensor(t: object) -> bool:
    return type(t).__name__ == "DTensor"


def is_sharded(state: Mapping[str, torch.Tensor]) -> bool:
    return any(is_dtensor(t) for t in state.values())


def local_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``name -> this rank's tensor`` (a DTensor's local shard, a view of the parameter; others as they are)."""
    return {n: (t.to_local() if is_dtensor(t) else t).detach() for n, t in state.items()}


def layout(state: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    """Per tensor: global shape, placements and this rank's offset and shape (whole tensors: offset 0)."""
    out = {}
    for n, t in state.items():
        if is_dtensor(t):
            shape, offset = _local_box(t)
            out[n] = (tuple(t.shape), str(tuple(t.placements)), tuple(offset), tuple(shape))
        else:
            out[n] = (tuple(t.shape), "whole", (0,) * t.dim(), tuple(t.shape))
    return out


def layout_change(before: Mapping[str, tuple], now: Mapping[str, tuple]) -> str | None:
    """The first tensor whose layout differs (``"name: before -> now"``), else None."""
    for n, lay in now.items():
        if before.get(n) != lay:
            return f"{n}: {_describe(before.get(n))} -> {_describe(lay)}"
    return None


def _describe(lay: tuple | None) -> str:
    if lay is None:
        return "absent"
    shape, placements, offset, local = lay
    return "whole" if placements == "whole" else f"{placements} shard {list(local)} at {list(offset)} of {list(shape)}"


def _local_box(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(shape), tuple(offset)


def local_slice(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of the full tensor ``full`` that ``like`` (a DTensor, or a whole tensor) holds on this rank."""
    if not is_dtensor(like):
        return full
    shape, offset = _local_box(like)
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]


def load_local(source: str | os.PathLike | Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]):
    """The previous raw weights as CPU tensors in ``state``'s layout (this rank's shards), for ``state``'s names.

    ``source``: a DCP folder (``dcp.load`` into the same layout: every rank takes part), a Hugging Face folder (each
    rank reads only its slices) or a state dict of full tensors.
    """
    from apo_merge.dcp import is_dcp

    if isinstance(source, Mapping):
        return {n: local_slice(source[n], state[n]).to("cpu", copy=True) for n in state if n in source}
    if is_dcp(source):
        return _load_dcp(Path(source), state)
    return _load_hf(Path(source), state)


def _load_dcp(folder: Path, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    if not (folder / ".metadata").is_file() and (folder / "pytorch_model_fsdp_0" / ".metadata").is_file():
        folder = folder / "pytorch_model_fsdp_0"  # accelerate's SHARDED_STATE_DICT layout
    like = {n: torch.empty_like(t) for n, t in state.items() if t.is_floating_point()}
    with _one_process_quiet():
        dcp.load({"model": like}, checkpoint_id=str(folder), no_dist=not _distributed())
    return {n: t.to("cpu") for n, t in local_state(like).items()}  # fresh tensors: no copy needed on the CPU


def _load_hf(folder: Path, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from apo_merge.io.checkpoint import open_checkpoint

    out: dict[str, torch.Tensor] = {}
    for f in open_checkpoint(folder).files:
        with safe_open(str(f.path), framework="pt") as handle:
            for n in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if n not in state:
                    out[n] = handle.get_tensor(n)  # reported by the name check that follows
                elif is_dtensor(state[n]):
                    shape, offset = _local_box(state[n])
                    out[n] = handle.get_slice(n)[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
                else:
                    out[n] = handle.get_tensor(n)
    return out


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def _one_process_quiet():
    """Without a process group DCP warns that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def barrier() -> None:
    if _distributed():
        dist.barrier()


def save_dcp(state: Mapping[str, torch.Tensor], folder: str | os.PathLike, *, tmp=None, side=None, commit=None):
    """Write ``{"model": state}`` as a DCP folder (every rank its shards), replacing ``folder`` only once complete.

    Every rank calls it. On rank 0 ``side(tmp)`` adds side files (config, tokenizer), then ``commit(tmp, folder)``
    (default: an atomic replace) puts the folder in place; a rank that dies first leaves the old folder or none.
    """
    import torch.distributed.checkpoint as dcp

    from apo_merge.io.files import replace_atomically

    folder = Path(folder)
    tmp = Path(tmp) if tmp is not None else folder.parent / f".{folder.name}.apo-dcp-tmp"  # one name on every rank
    main = not _distributed() or dist.get_rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    with _one_process_quiet():
        dcp.save({"model": dict(state)}, checkpoint_id=str(tmp), no_dist=not _distributed())
    barrier()
    if main:
        if side is not None:
            side(tmp)
        (commit or replace_atomically)(tmp, folder)
    barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any."""
    if not _distributed():
        return flag
    t = torch.tensor([int(flag)])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return bool(t.item())
