"""The APO step on LoRA adapters, written exactly.

A LoRA module adds ``s * B @ A`` to its base weight (``s = lora_alpha / r``, ``lora_alpha / sqrt(r)`` with
rsLoRA). Extrapolating A and B separately does not extrapolate that delta (the product is not linear in the
factors). The exact step ``(1+a) s_c B_c A_c - a s_p B_p A_p`` is one LoRA of rank ``r_c + r_p``:
``B = [(1+a) s_c B_c, -a s_p B_p]`` and ``A = [A_c; A_p]``, scalings folded into B so that the new adapter has
scaling 1 (``lora_alpha = r``, per module through rank_pattern / alpha_pattern where module ranks differ).
Tensors an adapter stores whole (modules_to_save, trained biases, trainable-token deltas, saved embedding layers)
are extrapolated as usual: ``cur + a * (cur - prev)``, which is exact because they enter the model linearly.
``Merger`` gives the same step added to a base's weights (``--merge-into``), one tensor at a time; a full
checkpoint as PREV enters as an adapter whose B factors are zero (``base_as_adapter``) or, written as an adapter,
as ``(1 + alpha)`` folded into lora_alpha (``base_step_adapter``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import torch

from apo_kernels import extrapolate
from apo_kernels.dtypes import torch_dtype
from apo_merge.errors import MergeError
from apo_merge.io.checkpoint import Checkpoint
from apo_merge.lora.read import FACTORS, PREFIX, Adapter, Module, base_name, check_compatible, layers_of, read_base
from apo_merge.plan import short


def matched_layers(prev: Adapter, cur: Adapter):
    """PREV's and CUR's LoRA layers and whole tensors (mp, mc, wp, wc), checked to pair one to one."""
    check_compatible(prev, cur)
    mp, wp = layers_of(prev)
    mc, wc = layers_of(cur)
    for what, p, c in (("LoRA layers", mp, mc), ("whole tensors", wp, wc)):
        if set(p) != set(c):
            only = sorted(set(p) ^ set(c))
            raise MergeError(
                f"PREV and CUR adapters hold different {what} ({', '.join(map(short, only[:5]))}); both rounds "
                "must train the same LoRA layout"
            )
    for name, c in mc.items():  # a lora_B.bias in one round only: the other's is PEFT's zero init (lora_bias true)
        p = mp[name]
        if (c.bias is None) != (p.bias is None):
            if c.bias is None:
                c.bias = torch.zeros_like(p.bias)
            else:
                p.bias = torch.zeros_like(c.bias)
        if c.bias is not None and c.bias.shape != p.bias.shape:
            raise MergeError(
                f"LoRA layer {short(name)}: lora_B.bias has shape {list(p.bias.shape)} in PREV but "
                f"{list(c.bias.shape)} in CUR; both rounds must train the same LoRA layout"
            )
    for key, c in wc.items():
        if wp[key].shape != c.shape:
            raise MergeError(
                f"{short(key)}: shape {list(wp[key].shape)} in PREV, {list(c.shape)} in CUR; "
                "both rounds must train the same LoRA layout"
            )
    return mp, mc, wp, wc


def check_factors(name: str, p: Module, c: Module) -> None:
    """PREV's and CUR's factors must stack: same input and output sizes (ranks may differ)."""
    if (
        c.A.dim() != p.A.dim()
        or c.B.dim() != p.B.dim()
        or c.A.shape[1:] != p.A.shape[1:]
        or c.B.shape[0] != p.B.shape[0]
        or c.B.shape[2:] != p.B.shape[2:]
    ):
        raise MergeError(
            f"LoRA layer {short(name)}: factor shapes differ between PREV and CUR "
            f"({list(p.B.shape)} x {list(p.A.shape)} vs {list(c.B.shape)} x {list(c.A.shape)}); "
            "both rounds must train the same LoRA layout"
        )


def _whole(p: torch.Tensor, c: torch.Tensor, alpha: float, dtype: torch.dtype | None) -> torch.Tensor:
    """A tensor stored whole: ``c + alpha (c - p)`` by the kernel (fp32 math, one rounding); integer ones as CUR's."""
    if c.is_floating_point() and p.is_floating_point():
        return extrapolate(p, c, alpha, out_dtype=dtype or c.dtype)
    return c.clone()


def extrapolate_adapters(
    prev: Adapter, cur: Adapter, alpha: float, dtype: str = "keep"
) -> tuple[dict[str, torch.Tensor], dict]:
    """The exact extrapolated adapter: (tensors as PEFT saves them, adapter_config.json content)."""
    mp, mc, wp, wc = matched_layers(prev, cur)
    out_dtype = torch_dtype(dtype)  # None for keep
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, c in mc.items():
        p = mp[name]
        check_factors(name, p, c)
        dt = out_dtype or torch.promote_types(c.A.dtype, p.A.dtype)
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B") if c.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        )
        # fp64 products, one rounding each; A is copied exactly (only widened).
        tensors[f"{PREFIX}{name}.{a_key}"] = torch.cat([c.A.to(dt), p.A.to(dt)], 0)
        tensors[f"{PREFIX}{name}.{b_key}"] = torch.cat(
            [(c.B.double() * ((1 + alpha) * c.scaling)).to(dt), (p.B.double() * (-alpha * p.scaling)).to(dt)], 1
        )
        if c.bias is not None:
            tensors[f"{PREFIX}{name}.lora_B.bias"] = (
                c.bias.double() * ((1 + alpha) * c.scaling) - p.bias.double() * (alpha * p.scaling)
            ).to(dt)
        ranks[name] = c.A.shape[0] + p.A.shape[0]
    for key, c in wc.items():
        tensors[key] = _whole(wp[key], c, alpha, out_dtype)
    return tensors, _config(cur.config, ranks)


def _config(base: dict, ranks: dict[str, int]) -> dict:
    """CUR's config with scaling 1 everywhere: lora_alpha = r, per module where ranks differ."""
    config = dict(base)
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else base.get("r", 8)
    odd = {re.escape(name): r for name, r in sorted(ranks.items()) if r != common}
    config.update(r=common, lora_alpha=common, use_rslora=False, rank_pattern=odd, alpha_pattern=dict(odd))
    return config


def _delta(c: Module, p: Module, alpha: float, fan_in_fan_out: bool, dtype: torch.dtype) -> torch.Tensor:
    """``(1+a) s_c B_c A_c - a s_p B_p A_p`` in ``dtype``, laid out like the base weight."""
    if c.A.dim() != 2:
        raise MergeError(
            "--merge-into supports LoRA on Linear and Embedding layers only (this adapter has "
            "convolution layers); write the extrapolated adapter instead"
        )
    B = torch.cat([c.B.to(dtype) * ((1 + alpha) * c.scaling), p.B.to(dtype) * (-alpha * p.scaling)], 1)
    A = torch.cat([c.A.to(dtype), p.A.to(dtype)], 0)
    d = B @ A
    return d.T if c.kind == "embedding" or fan_in_fan_out else d


@dataclass
class _Change:
    """How one base tensor changes: replaced by an extrapolated whole tensor, plus a LoRA delta or bias delta."""

    whole: str | None = None  # adapter key of the whole tensor
    lora: str | None = None  # LoRA module whose weight delta is added
    bias: str | None = None  # LoRA module whose lora_B bias delta is added


class Merger:
    def __init__(self, prev: Adapter, cur: Adapter, alpha: float) -> None:
        self.mp, self.mc, self.wp, self.wc = matched_layers(prev, cur)
        self.alpha, self.fan_in_fan_out = alpha, bool(cur.config.get("fan_in_fan_out"))
        self.changes: dict[str, _Change] = {}
        for name, module in self.mc.items():
            self.changes.setdefault(f"{name}.weight", _Change()).lora = name
            if module.bias is not None:
                self.changes.setdefault(f"{name}.bias", _Change()).bias = name
        for key in self.wc:
            if key.endswith("trainable_tokens_delta"):
                raise MergeError(
                    "--merge-into does not support trainable-token adapters; write the extrapolated adapter instead"
                )
            self.changes.setdefault(base_name(key), _Change()).whole = key

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape every part of the change to base tensor ``name`` has (checked before any arithmetic)."""
        change, shapes = self.changes[name], {}
        if change.whole is not None:
            shapes["the extrapolated tensor"] = tuple(self.wc[change.whole].shape)
        if change.lora is not None:
            c, p = self.mc[change.lora], self.mp[change.lora]
            if c.A.dim() != 2 or p.A.dim() != 2:
                raise MergeError(
                    "--merge-into supports LoRA on Linear and Embedding layers only (this adapter has "
                    "convolution layers); write the extrapolated adapter instead"
                )
            check_factors(change.lora, p, c)
            rows, cols = c.B.shape[0], c.A.shape[1]
            shapes["the LoRA update"] = (cols, rows) if c.kind == "embedding" or self.fan_in_fan_out else (rows, cols)
        if change.bias is not None:  # (PREV's and CUR's bias shapes were matched in _matched)
            shapes["the lora_B bias update"] = tuple(self.mc[change.bias].bias.shape)
        if len(set(shapes.values())) > 1:
            parts = ", ".join(f"{what} {list(s)}" for what, s in shapes.items())
            raise MergeError(
                f"--merge-into: the adapters' changes to {short(name)} disagree in shape ({parts}); re-save them"
            )
        return next(iter(shapes.values()))

    def tensor(self, name: str, raw: bytearray, base_dtype: str, shape: tuple[int, ...], out_dtype: str) -> bytes:
        """The output bytes of base tensor ``name``: fp32 math (fp64 for fp64 weights), one rounding."""
        change = self.changes.get(name)
        if change is None and out_dtype == base_dtype:
            return raw
        src, dst = torch_dtype(base_dtype), torch_dtype(out_dtype)
        if src is None:
            raise MergeError(
                f"--merge-into: base tensor {short(name)} has dtype {base_dtype}, which apo-merge cannot "
                "change; dequantize the base first"
            )
        compute = torch.float64 if torch.float64 in (src, dst) else torch.float32
        w = (torch.frombuffer(raw, dtype=src) if raw else torch.empty(0, dtype=src)).reshape(shape)
        w = w.to(compute)
        a = self.alpha
        if change is not None and change.whole is not None:
            w = _whole(self.wp[change.whole], self.wc[change.whole], a, compute)
        if change is not None and change.lora is not None:
            w = w + _delta(self.mc[change.lora], self.mp[change.lora], a, self.fan_in_fan_out, compute)
        if change is not None and change.bias is not None:
            c, p = self.mc[change.bias], self.mp[change.bias]
            w = w + (c.bias.to(compute) * ((1 + a) * c.scaling) - p.bias.to(compute) * (a * p.scaling))
        if tuple(w.shape) != shape:
            raise MergeError(
                f"--merge-into: {short(name)} has shape {list(shape)} in the base but the adapters give "
                f"{list(w.shape)}; give the base model the adapters were trained on"
            )
        return w.to(dst).contiguous().view(torch.uint8).numpy().tobytes()


def base_as_adapter(base: Checkpoint, cur: Adapter) -> Adapter:
    """PREV in adapter form for ``write_merged``: CUR's layers with B = 0 (no delta) and BASE's whole tensors, so
    that ``(1+a) s B A - a * 0`` and ``W_cur + a (W_cur - W_base)`` give the base+adapter step."""
    tensors = {}
    for key, t in cur.tensors.items():
        if key.endswith((".lora_B.weight", ".lora_embedding_B", ".lora_B.bias")):
            tensors[key] = torch.zeros_like(t)
        elif any(key.endswith(s) for s in FACTORS):
            tensors[key] = t
        else:
            tensors[key] = read_base(base, base_name(key))
    return Adapter(base.label, base.root, cur.config, tensors, cur.digest)


def base_step_adapter(base: Checkpoint, cur: Adapter, alpha: float) -> tuple[dict[str, torch.Tensor], dict]:
    """The step as an adapter over BASE: CUR's factors unchanged, ``(1 + alpha)`` folded into lora_alpha (and
    alpha_pattern), so the scale is exact to float64 where scaling B would round every element. Whole tensors
    (modules_to_save) become ``W_cur + alpha (W_cur - W_base)``, fp32 math, one rounding."""
    modules, whole = layers_of(cur)
    del modules  # checked: every layer's factors are well formed
    tensors = dict(cur.tensors)
    for key, t in whole.items():
        tensors[key] = _whole(read_base(base, base_name(key)), t, alpha, None)
    config = dict(cur.config)
    factor = 1.0 + alpha
    if config.get("lora_alpha") is not None:  # (read.py checked it: a number fp32 holds)
        config["lora_alpha"] = factor * config["lora_alpha"]
    if config.get("alpha_pattern"):
        config["alpha_pattern"] = {k: factor * v for k, v in config["alpha_pattern"].items()}
    for value in [config.get("lora_alpha"), *(config.get("alpha_pattern") or {}).values()]:
        if value is not None and not math.isfinite(value):
            raise MergeError(f"--alpha {alpha!r}: (1 + alpha) times lora_alpha is not a finite number; lower --alpha")
    return tensors, config
