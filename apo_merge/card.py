"""The model card (README.md) that records how an output was made, and reading it back."""

from __future__ import annotations

import re
from dataclasses import dataclass

from apo_merge import __version__
from apo_merge.output import CARD_MARK


@dataclass
class CardInfo:
    alpha: float
    prev: str
    cur: str
    dtype: str
    files: dict[str, tuple[int, str]]  # name -> (bytes, sha256)
    base_models: list[str]
    input_hashes: dict[str, str] | None = None  # label -> content hash, when known


def render(info: CardInfo, title: str) -> str:
    front = ["---"]
    if info.base_models:
        front.append("base_model:")
        front += [f"- {m}" for m in info.base_models]
    front += ["base_model_relation: merge", "tags:", "- apo", "- merge", "- extrapolation",
              "library_name: transformers", "---"]
    rows = [f"| `{name}` | {size} | `{sha}` |" for name, (size, sha) in sorted(info.files.items())]
    inputs = ""
    if info.input_hashes:
        inputs = "\n".join(f"| {label} | `{h}` |" for label, h in info.input_hashes.items())
        inputs = f"\nInput content hashes:\n\n| input | sha256 |\n| --- | --- |\n{inputs}\n"
    return "\n".join(front) + f"""
{CARD_MARK}
# {title}

This checkpoint is an APO (Accelerated Preference Optimization, arXiv 2410.06293) extrapolation step,
`theta = cur + alpha * (cur - prev)`, made by apo-merge {__version__}.

| | |
| --- | --- |
| alpha | {info.alpha!r} |
| prev | `{info.prev}` |
| cur | `{info.cur}` |
| output dtype | {info.dtype} |
| arithmetic | fp32 (fp64 for fp64 inputs), one round-to-nearest-even per element |
| tool | apo-merge {__version__} |
{inputs}
Weight files (check with `apo-merge verify <folder>`):

| file | bytes | sha256 |
| --- | --- | --- |
{chr(10).join(rows)}
"""


_ROW = re.compile(r"^\| `([^`]+)` \| (\d+) \| `([0-9a-f]{64})` \|$", re.MULTILINE)


def recorded_files(card_text: str) -> dict[str, tuple[int, str]]:
    """The (bytes, sha256) per weight file that ``render`` recorded."""
    return {m.group(1): (int(m.group(2)), m.group(3)) for m in _ROW.finditer(card_text)}
