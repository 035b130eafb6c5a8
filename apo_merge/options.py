"""MergeOptions: every setting of one merge, with its help text and choices, validated once.

Every field is one flag of ``apo-merge`` (``apo_merge.cliopts`` builds the CLI from them: flag, help, default and
choices come from here) and the pipeline takes the object whole::

    options = MergeOptions(0.3, dtype="bf16", max_shard_size="5GB")
    run_merge("runs/round-1", "runs/round-2", options, "runs/round-2-apo")

Several alphas (``MergeOptions((0.1, 0.3, 0.5))``) make one output each from one read of the inputs; see
``apo_merge.api.run_merges``.

Invalid values raise MergeError (exit code 2) from the constructor, before any input is opened.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from apo_kernels.dtypes import CLI_NAMES
from apo_merge.cliopts import setting
from apo_merge.errors import shown, usage_error
from apo_merge.hub import PushOptions
from apo_merge.io.hashing import OUTPUT_HASHES, check_available

_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, 1000 -> 1000 (the units huggingface_hub accepts)."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
        if not m:
            raise usage_error(f"--max-shard-size {shown(text)} is not a size; write e.g. 5GB, 500MB or 2GiB")
        number = float(m.group(1))
        if not math.isfinite(number) or number > 2**63:
            raise usage_error(f"--max-shard-size {shown(text)} is too large; write e.g. 5GB")
        size = int(number * _SIZE_UNITS[(m.group(2) or "B").upper()])
    if size <= 0:
        raise usage_error(f"--max-shard-size {shown(text)} must be positive")
    return size


@dataclass(frozen=True)
class MergeOptions:
    """How to merge (what to merge, PREV, CUR and OUT, are arguments of ``run_merge``). See each field's help."""

    alpha: float | tuple[float, ...] = setting(
        help="Extrapolation weight; 0 copies CUR, negative moves toward PREV. Several (--alpha 0.1,0.3,0.5 or the "
        "option repeated) write one output each from one read of the inputs.",
        type=list[str],
        parse=lambda values: parse_alphas(values),
    )
    device: str = setting("auto", "Where to compute; auto uses CUDA when present.", choices=("auto", "cpu", "cuda"))
    dtype: str = setting(
        "keep", "Output dtype of floating tensors; keep = CUR's.", choices=("keep", *sorted(CLI_NAMES))
    )
    max_shard_size: int | None = setting(None, "Re-shard in HF naming, e.g. 5GB [default: keep CUR's files].")
    on_missing: str = setting(
        "error", "Tensors in only one input: error, or copy CUR's unchanged.", choices=("error", "copy")
    )
    overwrite: bool = setting(False, "Replace an existing OUT (an earlier apo-merge output) atomically.")
    strict: bool = setting(False, "Fail if finite inputs give inf/NaN outputs.")
    merge_into: str | os.PathLike | None = setting(
        None,
        "LoRA adapters only: write BASE + the extrapolated delta as full weights instead of an adapter.",
        metavar="BASE",
    )
    token: str | bool | None = setting(
        None,
        "Hugging Face token [default: HF_TOKEN or the saved login]; never printed or stored.",
        repr=False,
        show_default=False,
    )
    # A repo id, or an apo_merge.hub.PushOptions; on the command line --push-to-hub REPO_ID and the Hub flags.
    push_to_hub: str | PushOptions | None = setting(
        None,
        "Upload OUT to this Hub model repo once it is complete.",
        metavar="REPO_ID",
        group=PushOptions,
        key="repo_id",
        applies_to="the upload",
    )
    hash_inputs: bool = setting(
        False,
        "Record each input's content SHA-256 in the model card (reads every input byte through SHA-256, about "
        "1 GB/s per core) [default: names, sizes, and the Hub's SHA-256 of files from the Hub cache].",
    )
    output_hash: str = setting(
        "blake3",
        "The hash of each output file the card records and verify checks: blake3 (as `b3sum` prints it; about "
        "7 GB/s per core) or sha256 (as `sha256sum`, the Hub's LFS id; about 2 GB/s).",
        choices=OUTPUT_HASHES,
    )
    card_paths: str = setting(
        "relative",
        "How the card and file metadata name local inputs: relative (a relative path as given, else the folder "
        "name) or absolute. Hub inputs are always repo@commit.",
        choices=("relative", "absolute"),
    )

    quantize: str = setting(
        "none",
        "fp8-block: write the weights that are FP8 block-scaled in the inputs (CUR's, else PREV's) back in that "
        "layout: e4m3 with a scale_inv = amax/448 per block, the error per tensor in the card; none: CUR's dtype.",
        choices=("none", "fp8-block"),
    )

    def __post_init__(self) -> None:
        alpha = self.alpha
        if isinstance(alpha, (list, tuple)):
            if not alpha:
                raise usage_error("--alpha needs at least one value; use e.g. --alpha 0.3")
            values = tuple(_alpha(a) for a in alpha)
            twice = [a for i, a in enumerate(values) if a in values[:i]]
            if twice:
                raise usage_error(f"--alpha {twice[0]!r} is given twice; give each alpha once")
            object.__setattr__(self, "alpha", values[0] if len(values) == 1 else values)
        else:
            object.__setattr__(self, "alpha", _alpha(alpha))
        device = self.device
        if not isinstance(device, str) or (device not in choices("device") and not re.fullmatch(r"cuda:\d+", device)):
            raise usage_error(f"--device {shown(device)} is not one of {', '.join(choices('device'))}")
        for name in ("dtype", "quantize", "on_missing", "output_hash", "card_paths"):
            value = getattr(self, name)
            if value not in choices(name):
                flag = "--" + name.replace("_", "-")
                raise usage_error(f"{flag} {shown(value)} is not one of {', '.join(choices(name))}")
        if self.max_shard_size is not None:
            object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size))
        check_available(self.output_hash)

    @property
    def alphas(self) -> tuple[float, ...]:
        """Every alpha to make an output for (one, unless several were given)."""
        return self.alpha if isinstance(self.alpha, tuple) else (self.alpha,)

    def replace(self, **changes: Any) -> MergeOptions:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def parse_alphas(values: list[str]) -> list[float]:
    """``--alpha 0.1,0.3 --alpha 0.5`` -> [0.1, 0.3, 0.5] (finiteness and repeats are MergeOptions' to check)."""
    out = []
    for value in values:
        for part in value.split(","):
            try:
                number = float(part)
            except ValueError:
                raise usage_error(
                    f"{shown(value)} is not a number or a comma-separated list of numbers, e.g. 0.3 or 0.1,0.3,0.5"
                ) from None
            if number == 0 and re.search(r"[1-9]", part.lower().split("e")[0]):  # 1e-400: below every double
                raise _too_small(shown(part.strip(), quote=False))
            out.append(number)
    return out


_FP32_MAX = float.fromhex("0x1.fffffep127")


def _too_small(value: str) -> Exception:
    return usage_error(
        f"{value} is too small to represent (it would be 0); give 0 to copy CUR, or an alpha of at least "
        "1e-45 in magnitude"
    )


def _alpha(value: object) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise usage_error(f"--alpha {shown(value)} is not a finite number; use e.g. --alpha 0.3")
    from apo_kernels.numpy_twin import np, round_alpha  # the kernels' own rounding, imported only when used

    # fp32 is the merge's arithmetic (fp64 only for fp64 inputs): alpha must survive its one rounding into it
    rounded = round_alpha(float(value), np.float32)
    if math.isinf(rounded):
        raise usage_error(
            f"--alpha {value!r} overflows float32, the merge's arithmetic; give an alpha of at most "
            f"{_FP32_MAX:.7g} in magnitude"
        )
    if rounded == 0 and value != 0:
        raise _too_small(f"--alpha {value!r}")
    return float(value)


def _field(name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(MergeOptions)}[name]


def choices(name: str) -> tuple[str, ...]:
    """The allowed values of a MergeOptions field (``device``, ``dtype``, ``quantize``, ``on_missing``,
    ``card_paths``)."""
    return _field(name).metadata["choices"]


def help_text(name: str) -> str:
    return _field(name).metadata["help"]
