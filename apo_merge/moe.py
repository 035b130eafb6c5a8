"""MoE experts under two names: per expert (Mixtral ``block_sparse_moe.experts.N.w1/w2/w3``, Qwen-MoE
``mlp.experts.N.gate_proj/up_proj/down_proj``, as the releases store them) or packed (transformers 5's
``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I]).

transformers 5 loads either and saves the layout it loaded (``save_pretrained`` reverses its conversion), but a
trainer that saves ``model.state_dict()`` itself (accelerate's ``save_model``, a raw ``save_file``) writes the packed
names beside a per-expert base, and one built ``from_config`` writes per-expert names beside a packed one. ``align``
reads PREV under CUR's names, exactly as transformers' conversion lays the tensors out: ``gate_up_proj[e]`` is
``cat([gate_e, up_e], dim=0)`` (``MergeModulelist(dim=0)`` then ``Concatenate(dim=1)``), ``down_proj[e]`` is
``down_e``, no transpose: so a packed tensor's bytes are its per-expert tensors' bytes in the order e0.gate, e0.up,
e1.gate, ... (a per-expert tensor is a byte range of the packed one); Mixtral's ``.block_sparse_moe.`` is ``.mlp.``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from apo_kernels.dtypes import ITEMSIZE
from apo_merge.errors import MergeError, shown
from apo_merge.io.header import FileHeader, TensorInfo
from apo_merge.quant.layout import QuantInfo

Source = tuple[FileHeader, TensorInfo]
_LEGACY = re.compile(r"^(.*)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_ROLE = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1, "w2": 2, "down_proj": 2}  # gate, up, down


@dataclass(frozen=True)
class Parts(TensorInfo):
    """A tensor read as its ``parts`` one after the other (same dtype): a packed tensor from per-expert ones."""

    parts: tuple[Source, ...] = ()


def _short(name: str) -> str:
    return shown(name, 80, quote=False)


def _groups(tensors: dict[str, Source]) -> dict[str, list[tuple[tuple[int, int], str]]]:
    """Packed name -> its per-expert tensors' ((expert, half), name), in transformers' order."""
    out: dict[str, list] = {}
    for name in tensors:
        m = _LEGACY.match(name)
        if m:
            role = _ROLE[m[4]]
            packed = f"{m[1]}.mlp.experts.{'down_proj' if role == 2 else 'gate_up_proj'}"
            out.setdefault(packed, []).append(((int(m[3]), role % 2), name))
    return {k: sorted(v) for k, v in out.items()}


def _check(where: str, packed: Source, parts: list[tuple[tuple[int, int], str]], tensors: dict[str, Source], read):
    """Whether ``parts`` tile ``packed`` exactly: every expert's halves, of the packed tensor's expert shape; the
    side read through the mapping (PREV) holds one kind of parts (plain, or FP8 read as fp32) if ``read``, and a
    plain packed tensor otherwise."""
    info = packed[1]
    halves = 2 if info.name.endswith("gate_up_proj") else 1
    experts = info.shape[0] if len(info.shape) == 3 else -1
    want = [(e, h) for e in range(experts) for h in range(halves)]
    shape = (info.shape[1] // halves, *info.shape[2:]) if experts > 0 else None
    srcs = [tensors[n] for _, n in parts]
    if (
        [k for k, _ in parts] != want
        or any(s[1].shape != shape or s[1].dtype != srcs[0][1].dtype for s in srcs)
        or (read and any(type(s[1]) is not type(srcs[0][1]) or getattr(s[1], "kind", "fp8") != "fp8" for s in srcs))
        or (not read and type(info) is not TensorInfo)
    ):
        raise MergeError(
            f"{where}: {_short(info.name)} {list(info.shape)} cannot be read from the {len(parts)} per-expert "
            f"tensors {_short(parts[0][1])}, ... (experts, shapes, dtypes or quantization differ); give both "
            "checkpoints with the same expert layout (save both with save_pretrained)"
        )
    return srcs


def align(prev_t: dict[str, Source], cur_t: dict[str, Source], where: str) -> tuple[dict[str, Source], str]:
    """PREV's tensors under CUR's MoE names where the two layouts differ, and the card's note ("" if none)."""
    out = dict(prev_t)
    done = []
    for packed, parts in _groups(prev_t).items():  # CUR packed, PREV per expert: read in sequence
        if packed in cur_t and packed not in prev_t:
            srcs = _check(where, cur_t[packed], parts, prev_t, True)
            c, size = cur_t[packed][1], sum(s[1].nbytes for s in srcs)
            out[packed] = (srcs[0][0], Parts(packed, srcs[0][1].dtype, c.shape, 0, size, parts=tuple(srcs)))
            for _, n in parts:
                del out[n]
            done.append(f"{packed} from {len(parts)} per-expert tensors")
    for packed, parts in _groups(cur_t).items():  # CUR per expert, PREV packed: byte ranges of it
        if packed in prev_t and packed not in cur_t:
            header, info = prev_t[packed]
            _check(where, prev_t[packed], parts, cur_t, False)
            step = (info.end - info.begin) // len(parts)
            for k, (_, n) in enumerate(parts):
                c = cur_t[n][1]
                out[n] = (
                    header,
                    TensorInfo(n, info.dtype, c.shape, info.begin + k * step, info.begin + (k + 1) * step),
                )
            del out[packed]
            done.append(f"{len(parts)} per-expert tensors from {packed}")
    if not done:
        return prev_t, ""
    for name in cur_t:  # Mixtral's router and any other .block_sparse_moe. tensor
        alt = name.replace(".block_sparse_moe.", ".mlp.") if ".block_sparse_moe." in name else None
        alt = alt or (name.replace(".mlp.", ".block_sparse_moe.", 1) if ".mlp." in name else None)
        if name not in out and alt in out and alt not in cur_t:
            out[name] = out.pop(alt)
    note = (
        f"PREV's MoE experts read under CUR's names as transformers 5's conversion lays them out "
        f"(gate_up_proj[e] = cat(gate_e, up_e), down_proj[e] = down_e, no transpose): {'; '.join(done[:2])}"
        + (f"; and {len(done) - 2} more" if len(done) > 2 else "")
    )
    return out, note


def read_parts(readers: tuple, info: Parts, view: memoryview, task, side: str) -> tuple:
    """Fill ``view`` with the task's elements of ``info`` from the parts they lie in; quantized parts leave their
    raw bytes where their fp32 values go, and come back as the compute stage's dequantization entries."""
    pread, dequant = readers
    begin, count = task.begin, task.count
    size, start, quant = ITEMSIZE[info.dtype], 0, ()
    for header, part in info.parts:
        lo, hi = max(begin, start), min(begin + count, start + part.numel)
        if lo < hi:
            at = view[(lo - begin) * size : (hi - begin) * size]
            if isinstance(part, QuantInfo):
                scale = dequant.read(header, part, at, lo - start, hi - lo)
                quant += ((side, part, scale, (lo - begin, lo - start, hi - lo)),)
            else:
                pread(header, at, part.begin + (lo - start) * size)
        start += part.numel
    return quant
