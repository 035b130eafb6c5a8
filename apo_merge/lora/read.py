"""Reading PEFT LoRA adapters: the folder's two files opened and checked, the config's fields validated, the layers
parsed into their factors and scalings, and the checks that two adapters (or an adapter and a base) belong together."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from apo_kernels.dtypes import torch_dtype
from apo_merge.errors import MergeError, shown
from apo_merge.io.checkpoint import Checkpoint, is_inside
from apo_merge.io.hashing import InputDigest, digest
from apo_merge.io.header import read_regular_file
from apo_merge.io.writer import pread_exact
from apo_merge.plan import short
from apo_merge.sources import ADAPTER_CONFIG, Source

ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 24  # an adapter_config.json is a few KB
PREFIX = "base_model.model."
# saved key suffix -> (factor, layer kind)
FACTORS = {
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
class Module:
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


def layers_of(adapter: Adapter) -> tuple[dict[str, Module], dict[str, torch.Tensor]]:
    """LoRA layers by module name (as in the base model), and the tensors the adapter stores whole."""
    parts: dict[str, dict[str, object]] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, t in adapter.tensors.items():
        for suffix, (factor, kind) in FACTORS.items():
            if key.endswith(suffix):
                name = key[: -len(suffix)].removeprefix(PREFIX)
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
        modules[name] = Module(p["kind"], A, B, p.get("bias"), scaling)
    return modules, whole


def base_name(key: str) -> str:
    """The base model's tensor an adapter key stands for (a saved whole tensor, e.g. modules_to_save)."""
    return key.removeprefix(PREFIX).replace(".base_layer.", ".")


def read_base(base: Checkpoint, name: str) -> torch.Tensor:
    """One tensor of a full checkpoint, read into memory (the few whole tensors an adapter replaces)."""
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


def _target_shape(m: Module, fan_in_fan_out: bool) -> tuple[int, ...] | None:
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
    modules, whole = layers_of(cur)
    fan = bool(cur.config.get("fan_in_fan_out"))
    wants = {f"{name}.weight": (_target_shape(m, fan), m.B.shape[0]) for name, m in modules.items()}
    wants.update({base_name(k): (tuple(t.shape), None) for k, t in whole.items()})
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
