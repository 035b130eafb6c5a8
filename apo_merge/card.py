"""The model card (README.md) that records how an output was made, and reading it back."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from apo_merge._version import __version__
from apo_merge.io.checkpoint import INDEX_NAME
from apo_merge.io.hashing import OUTPUT_HASHES, InputDigest, hash_file
from apo_merge.io.output import CARD_MARK

HASH_DEFINITION = (
    "An input's content sha256 is the SHA-256 of its `sha256sum` listing: the lines `<sha256 of file>  <file name>` "
    "(two spaces, each ending in a newline) for each of its weight files, sorted by file name in byte order. Weight "
    "files are the .safetensors files and model.safetensors.index.json when present (for a PEFT adapter: "
    "adapter_model.safetensors and adapter_config.json). In the input folder, "
    "`sha256sum $(LC_ALL=C ls <weight files>) | sha256sum` prints it. Per-file hashes cover every byte of the "
    "file, so they match `sha256sum` and the SHA256 the Hub shows for LFS files."
)
UNKNOWN = "unknown"
SIDE_HEADING = "Other files, copied from the input"
UNKNOWN_NOTE = (
    "Input files marked unknown were not read through SHA-256 (it costs a pass over every input byte); the "
    "SHA-256 of a Hub input's LFS files is the Hub's own, as the Hub cache names them. To record every content "
    "hash, merge with `--hash-inputs`, or run the command above in the input folder."
)


def escape_name(name: str) -> str:
    r"""A file name as the card's tables write it inside a code span: ``\\`` and ``\|`` for backslash and bar
    (GFM reads ``\|`` as a bar even in a code span), ``\xNN`` for a backtick, a control character or a byte
    that is not UTF-8 (Python's surrogate escape, as ``os.listdir`` gives it), ``\uNNNN`` for any other lone
    surrogate; every other character as it is. :func:`unescape_name` is its inverse."""
    out = []
    for ch in name:
        o = ord(ch)
        if ch in "\\|":
            out.append("\\" + ch)
        elif ch == "`" or o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02x}")
        elif 0xDC80 <= o <= 0xDCFF:
            out.append(f"\\x{o - 0xDC00:02x}")
        elif 0xD800 <= o <= 0xDFFF:
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


_ESCAPE = r"\\(?:[\\|]|x[0-9a-f]{2}|u[0-9a-f]{4})"


def unescape_name(text: str) -> str:
    """The file name :func:`escape_name` wrote as ``text``."""

    def one(m: re.Match) -> str:
        e = m.group(0)[1:]
        if e[0] == "x":
            o = int(e[1:], 16)
            return chr(o) if o < 0x80 else chr(0xDC00 + o)
        return chr(int(e[1:], 16)) if e[0] == "u" else e

    return re.sub(_ESCAPE, one, text)


@dataclass
class CardInfo:
    alpha: float
    prev: str  # how the input is named (Hub inputs with their commit)
    cur: str
    dtype: str
    files: dict[str, tuple[int, str]]  # name -> (bytes, hex digest by output_hash)
    base_models: list[str]  # Hub ids of the inputs
    input_hashes: dict[str, InputDigest] | None = None  # "prev" / "cur" -> content hashes, when known
    library_name: str = "transformers"
    tags: list[str] = field(default_factory=list)  # beyond apo, merge, extrapolation
    rows: list[tuple[str, str]] = field(default_factory=list)  # extra (what, value) rows of the summary table
    side_files: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (bytes, digest): config, ...
    output_hash: str = OUTPUT_HASHES[0]  # the hash of ``files`` and ``side_files``
    notes: str = ""  # markdown after the summary table (e.g. --quantize's error per tensor)
    summary: str = (
        "This checkpoint is an APO (Accelerated Preference Optimization, arXiv 2410.06293) "
        "extrapolation step,\n`theta = cur + alpha * (cur - prev)`"
    )


def render(info: CardInfo, title: str) -> str:
    front = ["---"]
    base_models = list(dict.fromkeys(info.base_models))
    if base_models:
        front.append("base_model:")
        front += [f"- {m}" for m in base_models]
    front += ["base_model_relation: merge", "tags:"]
    front += [f"- {t}" for t in dict.fromkeys(["apo", "merge", "extrapolation", *info.tags])]
    front += [f"library_name: {info.library_name}", "---"]
    hashes = info.input_hashes or {}
    known = {role: d.sha256 for role, d in hashes.items() if d.sha256 is not None}
    summary = [("alpha", repr(info.alpha)), ("prev", f"`{info.prev}`")]
    if "prev" in known:
        summary.append(("prev content sha256", f"`{known['prev']}`"))
    summary.append(("cur", f"`{info.cur}`"))
    if "cur" in known:
        summary.append(("cur content sha256", f"`{known['cur']}`"))
    summary += [(f"{role} content sha256", f"`{sha}`") for role, sha in known.items() if role not in ("prev", "cur")]
    summary += [
        ("output dtype", info.dtype),
        *info.rows,
        ("arithmetic", "fp32 (fp64 for fp64 inputs), one round-to-nearest-even per element"),
        ("tool", f"apo-merge {__version__}"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in summary)
    rows = [_file_row(name, size, sha) for name, (size, sha) in sorted(info.files.items())]
    inputs = ""
    if hashes:
        lines = [
            f"| {role} | `{escape_name(f.name)}` | {f.size} | {UNKNOWN if f.sha256 is None else f'`{f.sha256}`'} |"
            for role, d in hashes.items()
            for f in d.files
        ]
        note = f"\n\n{UNKNOWN_NOTE}" if len(known) < len(hashes) else ""
        inputs = (
            "\nInput files:\n\n| input | file | bytes | sha256 |\n| --- | --- | --- | --- |\n"
            + "\n".join(lines)
            + f"\n\n{HASH_DEFINITION}{note}\n"
        )
    notes = f"\n{info.notes}" if info.notes else ""
    side = ""
    if info.side_files:
        side = (
            f"\n{SIDE_HEADING} (`apo-merge verify` checks them too):\n\n"
            f"| file | bytes | {info.output_hash} |\n| --- | --- | --- |\n"
            + "\n".join(_file_row(name, size, sha) for name, (size, sha) in sorted(info.side_files.items()))
            + "\n"
        )
    return (
        "\n".join(front)
        + f"""
{CARD_MARK}
# {title}

{info.summary}, made by apo-merge {__version__}.

| | |
| --- | --- |
{table}
{notes}{inputs}
Weight files (check with `apo-merge verify <folder>`{_CHECK_TOOL.get(info.output_hash, "")}):

| file | bytes | {info.output_hash} |
| --- | --- | --- |
{chr(10).join(rows)}
{side}"""
    )


def side_files(folder: Path, recorded: Iterable[str], output_hash: str) -> dict[str, tuple[int, str]]:
    """(bytes, digest by ``output_hash``) of each file an output holds besides the ``recorded`` weight files, its
    card, its index and hidden files: the files copied from the input (config.json, generation_config.json, the
    tokenizer's files, a chat template, ...), which decide how the weights load and run."""
    skip = {*recorded, "README.md", INDEX_NAME}
    out = {}
    for path in sorted(folder.iterdir()):
        name = path.name
        if name in skip or name.startswith(".") or name.endswith(".safetensors") or path.is_symlink():
            continue
        if path.is_file():
            out[name] = hash_file(path, name=output_hash)
    return out


def _file_row(name: str, size: int, sha: str) -> str:
    return f"| `{escape_name(name)}` | {size} | `{sha}` |"


_ROW = re.compile(rf"^\| `((?:[^`\\]|{_ESCAPE})+)` \| (\d+) \| `([0-9a-f]{{64}})` \|$", re.MULTILINE)


_CHECK_TOOL = {"blake3": " or `b3sum`"}  # SHA-256 cards read as they did before the choice
_HASH_COLUMN = re.compile(rf"^\| file \| bytes \| ({'|'.join(OUTPUT_HASHES)}) \|$", re.MULTILINE)


def recorded_hash(card_text: str) -> str:
    """The hash the card's weight files table records (cards written before the choice existed: sha256)."""
    m = _HASH_COLUMN.search(card_text.replace("\r\n", "\n"))
    return m.group(1) if m else "sha256"


def recorded_files(card_text: str) -> dict[str, tuple[int, str]]:
    """The (bytes, digest) per weight file that ``render`` recorded. CRLF line ends (git autocrlf, an editor) read
    as LF."""
    return _rows(card_text.replace("\r\n", "\n").partition(f"\n{SIDE_HEADING}")[0])


def recorded_side_files(card_text: str) -> dict[str, tuple[int, str]]:
    """The (bytes, digest) per other file (config, tokenizer, ...: the side files) that ``render`` recorded; empty
    for cards written before side files were recorded."""
    return _rows(card_text.replace("\r\n", "\n").partition(f"\n{SIDE_HEADING}")[2])


def _rows(text: str) -> dict[str, tuple[int, str]]:
    return {unescape_name(m.group(1)): (int(m.group(2)), m.group(3)) for m in _ROW.finditer(text)}


# Summary rows the weight files' metadata also records: card row -> metadata key.
SUMMARY_METADATA = {"alpha": "apo_alpha", "prev": "apo_prev", "cur": "apo_cur", "merged into": "apo_merge_into"}
_SUMMARY_ROW = re.compile(r"^\| (alpha|prev|cur|merged into) \| (.*) \|$", re.MULTILINE)


def recorded_summary(card_text: str) -> dict[str, str]:
    """The card's alpha, prev, cur (and merged-into) values, as ``render`` wrote them (code quotes removed)."""
    out: dict[str, str] = {}
    for m in _SUMMARY_ROW.finditer(card_text.replace("\r\n", "\n")):
        value = m.group(2)
        if m.group(1) != "alpha" and len(value) >= 2 and value[0] == value[-1] == "`":
            value = value[1:-1]
        out.setdefault(m.group(1), value)
    return out
