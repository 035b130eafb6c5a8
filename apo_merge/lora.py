"""PEFT LoRA adapters: the APO step written exactly, as one LoRA adapter or merged into the base weights.

A LoRA module adds ``s * B @ A`` to its base weight (``s = lora_alpha / r``, ``lora_alpha / sqrt(r)`` with
rsLoRA). Extrapolating A and B separately does not extrapolate that delta (the product is not linear in the
factors). The exact step ``(1+a) s_c B_c A_c - a s_p B_p A_p`` is one LoRA of rank ``r_c + r_p``:
``B = [(1+a) s_c B_c, -a s_p B_p]`` and ``A = [A_c; A_p]``, scalings folded into B so that the new adapter has
scaling 1 (``lora_alpha = r``, per module through rank_pattern / alpha_pattern where module ranks differ).
Tensors an adapter stores whole (modules_to_save, trained biases, trainable-token deltas, saved embedding layers)
are extrapolated as usual: ``cur + a * (cur - prev)``, which is exact because they enter the model linearly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from apo_kernels import extrapolate
from apo_merge.errors import MergeError, shown
from apo_merge.io.checkpoint import Checkpoint, is_inside
from apo_merge.io.dtypes import torch_dtype
from apo_merge.io.hashing import InputDigest, StreamHasher, digest, hash_file, listing
from apo_merge.io.header import read_regular_file
from apo_merge.io.writer import SafetensorsWriter, pread_exact
from apo_merge.options import MergeOptions
from apo_merge.plan import Layout, OutFile, Piece, lay_out, output_dtype, short
from apo_merge.sources import ADAPTER_CONFIG, Source

ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 24  # an adapter_config.json is a few KB
_PREFIX = "base_model.model."
# saved key suffix -> (factor, layer kind)
_FACTORS = {
    ".lora_A.weight": ("A", "linear"),
    ".lora_B.weight": ("B", "linear"),
    ".lora_B.bias": ("bias", "linear"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
}
# Config fields two adapters must share for their deltas to live in the same model.
_SAME = (
    "base_model_name_or_path",
    "revision",
    "target_modules",
    "exclude_modules",
    "fan_in_fan_out",
    "bias",
    "lora_bias",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "trainable_token_indices",
    "layer_replication",
    "alora_invocation_tokens",
    "task_type",
)
_UNORDERED = ("target_modules", "modules_to_save", "exclude_modules")
# LoRA variants whose update is not s * B @ A (or not in these tensors): no exact rank-concatenation.
_VARIANTS = (
    "use_qalora",
    "use_bdlora",
    "target_parameters",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "velora_config",
)


@dataclass
class Adapter:
    """A PEFT LoRA adapter folder, validated and loaded (adapters are small)."""

    label: str
    root: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    digest: InputDigest  # content hashes of adapter_model.safetensors and adapter_config.json


@dataclass
class _Module:
    """One LoRA layer: ``delta = s * B @ A`` (transposed for embeddings and fan_in_fan_out layers)."""

    kind: str
    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None
    scaling: float


def open_adapter(src: Source) -> Adapter:
    """Read and check the LoRA adapter at ``src`` (refusing DoRA and other variants with no exact form)."""
    root, label = src.path, src.label
    weights, config_path = root / ADAPTER_WEIGHTS, root / ADAPTER_CONFIG
    if not weights.is_file():
        pickled = (root / "adapter_model.bin").exists()
        raise MergeError(
            f"{label}: holds {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}"
            + (
                "; only adapter_model.bin (pickle), which apo-merge never loads; re-save it with "
                "save_pretrained(..., safe_serialization=True)"
                if pickled
                else "; save the adapter with save_pretrained"
            )
        )
    for path in (weights, config_path):
        if not is_inside(path, src.trusted_root):
            raise MergeError(
                f"{path}: is a symlink leading outside the adapter folder (refused); copy the real file into the folder"
            )
    try:
        raw_config = read_regular_file(config_path, MAX_CONFIG_BYTES)
        raw = read_regular_file(weights)
    except OSError as e:
        raise MergeError(f"{label}: cannot read the adapter ({e.strerror or e}); check the files") from None
    try:
        config = json.loads(raw_config)
    except RecursionError:
        raise MergeError(f"{config_path}: not valid JSON (nested too deeply); re-save the adapter") from None
    except ValueError as e:
        raise MergeError(f"{config_path}: not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise MergeError(
            f"{label}: is a PEFT {kind or 'unknown'} adapter; apo-merge extrapolates LoRA adapters "
            "only (merge it into its base first)"
        )
    if config.get("use_dora"):
        raise MergeError(
            f"{label}: is a DoRA adapter, whose weight-normalised update cannot be written exactly "
            "as one adapter; merge both into the base (merge_and_unload) and extrapolate those"
        )
    for key in _VARIANTS:
        if config.get(key):
            raise MergeError(
                f"{label}: uses the LoRA variant {key}, which apo-merge cannot extrapolate exactly; "
                "merge both adapters into the base (merge_and_unload) and extrapolate those"
            )
    _check_config(label, config_path, config)
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(raw)
    except SafetensorError as e:
        raise MergeError(f"{weights}: not a valid safetensors file ({e}); re-save the adapter") from None
    files = {
        ADAPTER_WEIGHTS: (len(raw), hashlib.sha256(raw).hexdigest()),
        ADAPTER_CONFIG: (len(raw_config), hashlib.sha256(raw_config).hexdigest()),
    }
    return Adapter(label, root, config, tensors, digest(files))


_FP32_MAX = 3.4028234663852886e38  # the step's scalings meet fp32 tensors: a larger lora_alpha becomes inf there


def _check_numbers(path: Path, config: dict) -> None:
    """No inf or NaN anywhere (the output config is strict JSON), and the alphas the step multiplies by are numbers
    that fp32 can hold."""
    stack: list[tuple[str, object]] = [(k, v) for k, v in config.items()]
    while stack:  # not recursive: a config nested as deeply as json.loads allows is still one line
        key, value = stack.pop()
        if isinstance(value, dict):
            stack += [(f"{key}[{shown(k)}]", v) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, float) and not math.isfinite(value):
            raise MergeError(f"{path}: {shown(key, quote=False)} is {value!r}, not a finite number; fix the config")
    patterns = config.get("alpha_pattern")
    alphas = [("lora_alpha", config.get("lora_alpha"))]
    alphas += [(f"alpha_pattern[{shown(k)}]", v) for k, v in patterns.items()] if isinstance(patterns, dict) else []
    for key, value in alphas:
        if value is None and key == "lora_alpha":
            continue  # reported per layer, with its rank
        if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > _FP32_MAX:
            raise MergeError(
                f"{path}: {shown(key, quote=False)} must be a number fp32 can hold (at most 3.4e38 in size), "
                f"not {shown(value)}; fix the config"
            )


def _check_config(label: str, path: Path, config: dict) -> None:
    """The fields apo-merge computes with must have PEFT's types: a hand-edited config gets one line, not a crash."""
    _check_numbers(path, config)
    for key in _UNORDERED:
        value = config.get(key)
        if value is not None and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            raise MergeError(f"{path}: {key} must be a string or a list of strings, not {shown(value)}; fix the config")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise MergeError(f"{path}: {key} must be an object, not {shown(patterns)}; fix the config")
        for pattern in patterns:
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except (re.error, RecursionError, OverflowError):
                raise MergeError(
                    f"{path}: {key} key {shown(pattern)} is not a valid regular expression; fix the config"
                ) from None


def check_compatible(prev: Adapter, cur: Adapter) -> None:
    """Both adapters must be LoRAs of the same base over the same modules."""
    for key in _SAME:
        p, c = prev.config.get(key), cur.config.get(key)
        if key in _UNORDERED and isinstance(p, list) and isinstance(c, list):
            p, c = sorted(p), sorted(c)
        if p != c:
            if key == "base_model_name_or_path":
                raise MergeError(
                    f"PREV and CUR are adapters of different base models ({shown(p)} vs {shown(c)}); "
                    "extrapolate adapters trained from one base (or fix base_model_name_or_path in "
                    f"{ADAPTER_CONFIG} if it is the same model)"
                )
            what = "target modules" if key == "target_modules" else key
            raise MergeError(
                f"PREV and CUR adapters differ in {what} ({shown(p)} vs {shown(c)}); "
                "both rounds must train the same LoRA layout"
            )


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _modules(adapter: Adapter) -> tuple[dict[str, _Module], dict[str, torch.Tensor]]:
    """LoRA layers by module name (as in the base model), and the tensors the adapter stores whole."""
    parts: dict[str, dict[str, object]] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, t in adapter.tensors.items():
        for suffix, (factor, kind) in _FACTORS.items():
            if key.endswith(suffix):
                name = key[: -len(suffix)].removeprefix(_PREFIX)
                parts.setdefault(name, {"kind": kind})[factor] = t
                break
        else:
            if any(part.startswith("lora_") for part in key.split(".")):
                raise MergeError(
                    f"{adapter.label}: tensor {short(key)!r} belongs to a LoRA variant apo-merge cannot "
                    "extrapolate exactly; merge the adapters into the base and extrapolate those"
                )
            whole[key] = t
    cfg = adapter.config
    modules = {}
    for name, p in parts.items():
        if "A" not in p or "B" not in p:
            raise MergeError(f"{adapter.label}: LoRA layer {short(name)} lacks its lora_A or lora_B tensor; re-save it")
        A, B = p["A"], p["B"]
        rank = A.shape[0] if A.dim() else 0
        if rank == 0:
            raise MergeError(
                f"{adapter.label}: LoRA layer {short(name)} has rank 0 (an adapter that changes nothing); "
                "give adapters of rank 1 or more"
            )
        if B.dim() < 2 or B.shape[1] != rank:
            raise MergeError(
                f"{adapter.label}: LoRA layer {short(name)}: lora_A has rank {rank} but lora_B has shape "
                f"{list(B.shape)}; re-save the adapter"
            )
        r = _pattern_value(cfg.get("rank_pattern") or {}, name, cfg.get("r"))
        lora_alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha"))
        if r != rank or not isinstance(lora_alpha, (int, float)):
            raise MergeError(
                f"{adapter.label}: {ADAPTER_CONFIG} gives layer {short(name)} r={r!r}, "
                f"lora_alpha={lora_alpha!r}, but its tensors have rank {rank}; fix the config"
            )
        scaling = lora_alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
        if p.get("bias") is not None and cfg.get("lora_bias") is not True:
            raise MergeError(
                f"{adapter.label}: LoRA layer {short(name)} holds a lora_B.bias but {ADAPTER_CONFIG}'s lora_bias is not "
                "true, so PEFT would ignore it; fix lora_bias in the config or remove the tensor"
            )
        modules[name] = _Module(p["kind"], A, B, p.get("bias"), scaling)
    return modules, whole


def _matched(prev: Adapter, cur: Adapter):
    check_compatible(prev, cur)
    mp, wp = _modules(prev)
    mc, wc = _modules(cur)
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


def _check_factors(name: str, p: _Module, c: _Module) -> None:
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
    if c.is_floating_point() and p.is_floating_point():
        return extrapolate(p, c, alpha, out_dtype=dtype or c.dtype)
    return c.clone()


def extrapolate_adapters(
    prev: Adapter, cur: Adapter, alpha: float, dtype: str = "keep"
) -> tuple[dict[str, torch.Tensor], dict]:
    """The exact extrapolated adapter: (tensors as PEFT saves them, adapter_config.json content)."""
    mp, mc, wp, wc = _matched(prev, cur)
    out_dtype = torch_dtype(dtype)  # None for keep
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, c in mc.items():
        p = mp[name]
        _check_factors(name, p, c)
        dt = out_dtype or torch.promote_types(c.A.dtype, p.A.dtype)
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B") if c.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        )
        # fp64 products, one rounding each; A is copied exactly (only widened).
        tensors[f"{_PREFIX}{name}.{a_key}"] = torch.cat([c.A.to(dt), p.A.to(dt)], 0)
        tensors[f"{_PREFIX}{name}.{b_key}"] = torch.cat(
            [(c.B.double() * ((1 + alpha) * c.scaling)).to(dt), (p.B.double() * (-alpha * p.scaling)).to(dt)], 1
        )
        if c.bias is not None:
            tensors[f"{_PREFIX}{name}.lora_B.bias"] = (
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


def _delta(c: _Module, p: _Module, alpha: float, fan_in_fan_out: bool, dtype: torch.dtype) -> torch.Tensor:
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


def _base_name(key: str) -> str:
    return key.removeprefix(_PREFIX).replace(".base_layer.", ".")


@dataclass
class _Change:
    """How one base tensor changes: replaced by an extrapolated whole tensor, plus a LoRA delta or bias delta."""

    whole: str | None = None  # adapter key of the whole tensor
    lora: str | None = None  # LoRA module whose weight delta is added
    bias: str | None = None  # LoRA module whose lora_B bias delta is added


class _Merger:
    def __init__(self, prev: Adapter, cur: Adapter, alpha: float) -> None:
        self.mp, self.mc, self.wp, self.wc = _matched(prev, cur)
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
            self.changes.setdefault(_base_name(key), _Change()).whole = key

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
            _check_factors(change.lora, p, c)
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


@dataclass
class Written:
    """What a writer put into the output folder, and how the model card describes it."""

    files: dict[str, tuple[int, str]]  # weight file -> (bytes, sha256)
    n_tensors: int
    n_changed: int
    bytes_written: int
    index: dict | None = None  # model.safetensors.index.json content, when sharded
    base_digest: InputDigest | None = None
    card: dict = field(default_factory=dict)  # CardInfo fields: library_name, tags, rows, summary


def write_adapter(
    prev: Adapter, cur: Adapter, dest: Path, options: MergeOptions, *, metadata: dict[str, str]
) -> Written:
    """Write the exact extrapolated adapter (adapter_model.safetensors + adapter_config.json) into ``dest``."""
    tensors, config = extrapolate_adapters(prev, cur, options.alpha, options.dtype)
    ranks = "/".join(map(str, sorted({config["r"], *config["rank_pattern"].values()})))
    method = (
        "exact: one LoRA of rank r_cur + r_prev, B = [(1+alpha) s_cur B_cur, -alpha s_prev "
        f"B_prev], A = [A_cur; A_prev], scaling 1 (rank {ranks})"
    )
    summary = (
        "This adapter is an APO (Accelerated Preference Optimization, arXiv 2410.06293) extrapolation "
        "step of two LoRA adapters,\n`delta = (1 + alpha) delta_cur - alpha delta_prev`, written exactly "
        "as one LoRA"
    )
    return _save_adapter(tensors, config, dest, options, metadata, cur, method, summary)


def _save_adapter(
    tensors: dict[str, torch.Tensor],
    config: dict,
    dest: Path,
    options: MergeOptions,
    metadata: dict[str, str],
    cur: Adapter,
    method: str,
    summary: str,
) -> Written:
    """Write an adapter's two files into ``dest`` (refusing inf/NaN under --strict) with its card rows."""
    from safetensors.torch import save_file

    bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors.values() if t.is_floating_point())
    if options.strict and bad:
        raise MergeError(f"{bad} adapter values are inf or NaN (--strict); lower --alpha")
    save_file(tensors, dest / ADAPTER_WEIGHTS, metadata={"format": "pt", **metadata})
    (dest / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n")
    size, sha = hash_file(dest / ADAPTER_WEIGHTS)
    card = dict(
        library_name="peft",
        tags=["lora", "peft"],
        rows=[("base model", f"`{cur.config.get('base_model_name_or_path')}`"), ("method", method)],
        summary=summary,
    )
    files = {ADAPTER_WEIGHTS: (size, sha), ADAPTER_CONFIG: hash_file(dest / ADAPTER_CONFIG)}  # verify checks both
    return Written(files, len(tensors), len(tensors), size, card=card)


def write_merged(
    prev: Adapter,
    cur: Adapter,
    base: Checkpoint,
    dest: Path,
    options: MergeOptions,
    *,
    metadata: dict[str, str],
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[Layout], None] | None = None,
    hub: bool = False,
) -> Written:
    """Write BASE + the extrapolated adapter delta as full weights into ``dest`` (BASE's tensors and layout).

    ``hub``: BASE came from the Hub cache (its LFS files' SHA-256s are known without reading them).

    One tensor in memory at a time; BASE is read once, in file order, and hashed on the way with --hash-inputs.
    """
    merger = _Merger(prev, cur, options.alpha)
    missing = sorted(n for n in merger.changes if n not in base.tensors)
    if missing:
        raise MergeError(
            f"--merge-into {base.label}: the base has no tensor {', '.join(map(short, missing[:5]))} that the "
            "adapters change; give the base model the adapters were trained on"
        )
    for name in sorted(merger.changes):  # before any output exists, and before any addition could broadcast
        want, have = merger.shape(name), base.tensors[name][1].shape
        if want != have:
            raise MergeError(
                f"--merge-into {base.label}: {short(name)} has shape {list(have)} in the base but the adapters change "
                f"it with shape {list(want)}; give the base model the adapters were trained on"
            )
    layout = _base_layout(base, options, metadata)
    if on_plan:
        on_plan(layout)
    sha: dict[str, str] = {}
    written = 0
    fds: dict[Path, int] = {}
    try:
        with StreamHasher(base.files if options.hash_inputs else ()) as hasher:
            for f in layout.files:
                sha[f.name], n = _write_file(f, dest, merger, hasher, fds, progress)
                written += n
            hashes = hasher.finish()
    finally:
        for fd in fds.values():
            os.close(fd)
    index = [base.root / base.index_name] if base.index_name else []
    if options.hash_inputs:
        base_digest = digest({h.path.name: hashes[h.path] for h in base.files} | {p.name: hash_file(p) for p in index})
    else:
        base_digest = listing([h.path for h in base.files], index, hub=hub)
    card = dict(
        rows=[("merged into", f"`{metadata.get('apo_merge_into', base.label)}`")],
        summary="This checkpoint is a base model plus an APO (Accelerated Preference Optimization, "
        "arXiv 2410.06293) extrapolation step of two LoRA adapters,\n"
        "`W = W_base + (1 + alpha) delta_cur - alpha delta_prev`",
    )
    return Written(
        {f.name: (f.size, sha[f.name]) for f in layout.files},
        layout.n_tensors,
        len(merger.changes),
        written,
        layout.index,
        base_digest,
        card,
    )


def _base_layout(base: Checkpoint, options: MergeOptions, metadata: dict[str, str]) -> Layout:
    """The output keeps BASE's tensors, shapes and files (or re-shards them); ``--dtype`` as for a merge."""
    pieces = [
        Piece(name, output_dtype(name, info, None, options.dtype)[0], info.shape, 0, (header, info), None)
        for name, (header, info) in base.tensors.items()
    ]
    return lay_out(pieces, base, options.max_shard_size, metadata)


def _write_file(
    f: OutFile,
    dest: Path,
    merger: _Merger,
    hasher: StreamHasher,
    fds: dict[Path, int],
    progress: Callable[[int], None] | None,
) -> tuple[str, int]:
    """Write one output file tensor by tensor through the shared writer; return its sha256 and size."""
    writer = SafetensorsWriter(dest / f.name, f.header, f.size)
    h = hashlib.sha256(f.header)
    written = len(f.header)
    try:
        for piece in f.pieces:
            header, info = piece.cur
            if header.path not in fds:
                fds[header.path] = os.open(header.path, os.O_RDONLY)
            offset = header.data_start + info.begin
            raw = bytearray(info.nbytes)
            pread_exact(fds[header.path], memoryview(raw), offset, header.path)
            hasher.update(header.path, offset, memoryview(raw))
            data = merger.tensor(piece.name, raw, info.dtype, info.shape, piece.dtype)
            writer.write(data, piece.offset)
            h.update(data)
            written += len(data)
            if progress:
                progress(len(data))
        writer.finish()
    finally:
        writer.close()
    return h.hexdigest(), written


# ---------------------------------------------------------------- a full checkpoint as PREV, an adapter over it as CUR
# theta_hat_t = BASE (PREV), theta_hat_{t+1} = BASE + s B A (CUR): the step is BASE + (1 + alpha) s B A.


def _read_base(base: Checkpoint, name: str) -> torch.Tensor:
    header, info = base.tensors[name]
    src = torch_dtype(info.dtype)
    if src is None:
        raise MergeError(f"{base.label}: tensor {short(name)} has dtype {info.dtype}, which apo-merge cannot read")
    raw = bytearray(info.nbytes)
    fd = os.open(header.path, os.O_RDONLY)
    try:
        pread_exact(fd, memoryview(raw), header.data_start + info.begin, header.path)
    finally:
        os.close(fd)
    return (torch.frombuffer(raw, dtype=src) if raw else torch.empty(0, dtype=src)).reshape(info.shape)


def _target_shape(m: _Module, fan_in_fan_out: bool) -> tuple[int, ...] | None:
    """The base weight shape a LoRA layer's delta has (None for convolutions: only out-channels are known)."""
    if m.A.dim() != 2:
        return None
    rows, cols = m.B.shape[0], m.A.shape[1]
    return (cols, rows) if m.kind == "embedding" or fan_in_fan_out else (rows, cols)


def check_recorded_base(adapter: Adapter, base: Source, role: str) -> None:
    """Refuse unless ``base`` (given as ``role``: "PREV" or "--merge-into") is the base ``adapter`` records, when
    both name one: a Hub id against a Hub id, a local folder against a local folder."""
    recorded = adapter.config.get("base_model_name_or_path")
    if not (isinstance(recorded, str) and recorded):
        return
    if base.hub_id:
        mine = base.hub_id
        same = recorded == base.hub_id
    elif os.path.isdir(os.path.expanduser(recorded)):
        mine = base.label
        same = os.path.realpath(os.path.expanduser(recorded)) == os.path.realpath(base.path)
    else:  # a Hub name recorded, a local base: the folder does not say which model it is
        mine, same = None, True
    if not same:
        raise MergeError(
            f"{adapter.label}: is an adapter of {shown(recorded)}, but {role} is {shown(mine)}; give the "
            f"adapter's base as {role} (or fix base_model_name_or_path in {ADAPTER_CONFIG} if it is the same model)"
        )


def check_base(prev: Source, base: Checkpoint, cur: Adapter) -> None:
    """Refuse unless CUR is an adapter over PREV: its recorded base names PREV (when both name one) and every
    targeted weight exists in PREV with the shape the adapter's factors give."""
    check_recorded_base(cur, prev, "PREV")
    if cur.config.get("trainable_token_indices"):
        raise MergeError(
            f"{cur.label}: has trainable-token deltas, which a full PREV cannot pair with; merge it into its base first"
        )
    modules, whole = _modules(cur)
    fan = bool(cur.config.get("fan_in_fan_out"))
    wants = {f"{name}.weight": (_target_shape(m, fan), m.B.shape[0]) for name, m in modules.items()}
    wants.update({_base_name(k): (tuple(t.shape), None) for k, t in whole.items()})
    for name, (shape, rows) in sorted(wants.items()):
        if name not in base.tensors:
            raise MergeError(
                f"{cur.label}: changes {short(name)}, which PREV {base.label} does not have; give the adapter's base "
                "as PREV"
            )
        have = base.tensors[name][1].shape
        if (shape is not None and tuple(have) != shape) or (shape is None and have[0] != rows):
            raise MergeError(
                f"{cur.label}: changes {short(name)} with shape {list(shape or [rows])} but PREV {base.label} has "
                f"{list(have)}; give the adapter's base as PREV"
            )


def base_as_adapter(base: Checkpoint, cur: Adapter) -> Adapter:
    """PREV in adapter form for ``write_merged``: CUR's layers with B = 0 (no delta) and BASE's whole tensors, so
    that ``(1+a) s B A - a * 0`` and ``W_cur + a (W_cur - W_base)`` give the base+adapter step."""
    tensors = {}
    for key, t in cur.tensors.items():
        if key.endswith((".lora_B.weight", ".lora_embedding_B", ".lora_B.bias")):
            tensors[key] = torch.zeros_like(t)
        elif any(key.endswith(s) for s in _FACTORS):
            tensors[key] = t
        else:
            tensors[key] = _read_base(base, _base_name(key))
    return Adapter(base.label, base.root, cur.config, tensors, cur.digest)


def base_step_adapter(base: Checkpoint, cur: Adapter, alpha: float) -> tuple[dict[str, torch.Tensor], dict]:
    """The step as an adapter over BASE: CUR's factors unchanged, ``(1 + alpha)`` folded into lora_alpha (and
    alpha_pattern), so the scale is exact to float64 where scaling B would round every element. Whole tensors
    (modules_to_save) become ``W_cur + alpha (W_cur - W_base)``, fp32 math, one rounding."""
    modules, whole = _modules(cur)
    del modules  # checked: every layer's factors are well formed
    tensors = dict(cur.tensors)
    for key, t in whole.items():
        tensors[key] = _whole(_read_base(base, _base_name(key)), t, alpha, None)
    config = dict(cur.config)
    factor = 1.0 + alpha
    config["lora_alpha"] = factor * config["lora_alpha"]
    if config.get("alpha_pattern"):
        config["alpha_pattern"] = {k: factor * v for k, v in config["alpha_pattern"].items()}
    return tensors, config


def write_base_step_adapter(
    base: Checkpoint, cur: Adapter, dest: Path, options: MergeOptions, *, metadata: dict[str, str]
) -> Written:
    """Write the base+adapter step as an adapter over PREV (adapter_model.safetensors + adapter_config.json)."""
    if options.dtype != "keep":
        raise MergeError(
            "--dtype applies to --merge-into for a full PREV and an adapter CUR; the adapter keeps CUR's factors"
        )
    tensors, config = base_step_adapter(base, cur, options.alpha)
    method = "exact: CUR's factors, lora_alpha (and alpha_pattern) times (1 + alpha)"
    summary = (
        "This adapter is an APO (Accelerated Preference Optimization, arXiv 2410.06293) extrapolation "
        "step from a base model (PREV) to base + adapter (CUR),\n`delta = (1 + alpha) delta_cur`, written exactly "
        "as one LoRA over the base"
    )
    return _save_adapter(tensors, config, dest, options, metadata, cur, method, summary)
