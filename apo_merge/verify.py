"""`apo-merge verify OUT`: re-check a finished output against what the merge recorded in its model card.

Every header goes through the hardened parser, the index must map every tensor to the file that holds it (and
nothing else), the weight files must be exactly those the card lists, and each file's size and hash (the card's
BLAKE3 or SHA-256) must equal the recorded ones: the weight files', then those of the side files (config,
tokenizer, ...) the card records; an output holding FP8 weights (``--quantize fp8-block``) must also pair each with
its block scales as config.json says. The first mismatch is a MergeError naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from apo_merge.card import SUMMARY_METADATA, recorded_files, recorded_hash, recorded_side_files, recorded_summary
from apo_merge.errors import MergeError, first_line, shown
from apo_merge.io.checkpoint import INDEX_NAME, MAX_INDEX_BYTES, open_checkpoint
from apo_merge.io.hashing import hash_file
from apo_merge.io.header import read_regular_file
from apo_merge.io.output import CARD_MARK, MAX_CARD_BYTES
from apo_merge.quant.layout import fold

CARD_NAME = "README.md"


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify_output`` checked: every weight file (name -> bytes, digest), tensors and total bytes."""

    folder: Path
    files: dict[str, tuple[int, str]]
    n_tensors: int
    output_hash: str  # the card's hash of ``files``

    @property
    def total_bytes(self) -> int:
        return sum(size for size, _ in self.files.values())


def _recorded(root: Path) -> tuple[dict[str, tuple[int, str]], str]:
    card = root / CARD_NAME
    try:
        text = read_regular_file(card, MAX_CARD_BYTES).decode("utf-8", errors="replace")
    except OSError as e:
        raise MergeError(
            f"{card}: cannot read the model card ({e.strerror or e}), so there are no recorded hashes "
            "to check against; re-run the merge"
        ) from None
    if CARD_MARK not in text:
        raise MergeError(
            f"{card}: is not an apo-merge model card, so there are no recorded hashes to check "
            "against; re-run the merge"
        )
    recorded = recorded_files(text)
    if not recorded:
        raise MergeError(f"{card}: records no weight files; re-run the merge")
    return recorded, text


def _check_summary(card: Path, text: str, files) -> None:
    """The card's alpha and inputs must be what every weight file's metadata records (both are written together)."""
    summary = recorded_summary(text)
    for f in files:
        for row, key in SUMMARY_METADATA.items():
            have, want = f.metadata.get(key), summary.get(row)
            if have != want:
                raise MergeError(
                    f"{f.path}: metadata {key} is {shown(have)} but the model card records {row} {shown(want)} "
                    f"({card}); the card or the file changed after the merge, re-run it"
                )


def verify_output(folder: str | Path) -> VerifyReport:
    """Check an apo-merge output folder; return what was checked or raise MergeError at the first mismatch."""
    root = Path(folder)
    if not root.is_dir():
        raise MergeError(f"{root}: no such folder; give the output folder of an apo-merge run")
    recorded, card_text = _recorded(root)
    ckpt = open_checkpoint(root)  # every header and the index, through the hardened reader

    for name in sorted(recorded):
        path = root / name
        if "/" in name or name.startswith(".") or not path.is_file() or path.is_symlink():
            raise MergeError(f"{path}: recorded in the model card but missing; re-run the merge")
    weights = {n for n in recorded if n.endswith(".safetensors")}  # (an adapter's card also lists its config)
    extra = sorted({p.name for p in root.glob("*.safetensors")} - weights)
    if extra:
        raise MergeError(
            f"{root / extra[0]}: a weight file the model card does not record; remove it or re-run the merge"
        )
    unindexed = sorted(weights - {f.path.name for f in ckpt.files})
    if unindexed:
        raise MergeError(
            f"{root / INDEX_NAME}: does not name {unindexed[0]}, which the model card records; re-run the merge"
        )
    unrecorded = sorted({f.path.name for f in ckpt.files} - weights)
    if unrecorded:
        raise MergeError(
            f"{root / unrecorded[0]}: named by {INDEX_NAME} but a file the model card does not record; "
            "remove it from the index or re-run the merge"
        )
    if ckpt.index_name:
        _check_total_size(root / INDEX_NAME, ckpt.total_bytes)
    _check_summary(root / CARD_NAME, card_text, ckpt.files)

    algo = recorded_hash(card_text)
    side = recorded_side_files(card_text)  # config.json, tokenizer files, ...: checked as the weight files are
    for name in sorted(side):
        path = root / name
        if "/" in name or name.startswith(".") or not path.is_file() or path.is_symlink():
            raise MergeError(f"{path}: recorded in the model card but missing; re-run the merge")
    for name in [*sorted(recorded), *sorted(side)]:
        check_file(root / name, recorded.get(name) or side[name], algo)
    _check_fp8(root, ckpt)
    return VerifyReport(root, {n: recorded[n] for n in sorted(recorded)}, len(ckpt.tensors), algo)


def check_file(path: Path, recorded: tuple[int, str], algo: str) -> None:
    """``path`` has the (bytes, digest by ``algo``) the model card records, else a MergeError naming it."""
    size, digest = recorded
    actual_size = path.stat().st_size
    if actual_size != size:
        raise MergeError(
            f"{path}: {actual_size} bytes but the model card records {size}; the file changed after the merge, re-run it"
        )
    _, actual = hash_file(path, name=algo)
    if actual != digest:
        raise MergeError(
            f"{path}: {algo} {actual[:16]}... differs from the {digest[:16]}... recorded in the model "
            "card; the file changed after the merge, re-run it"
        )


def _check_fp8(root: Path, ckpt) -> None:
    """An output written with --quantize fp8-block: every F8 weight has its scales, of the shape config.json's
    weight_block_size gives, and no scale lacks its weight (what a loader relies on; the hashes say the bytes
    are those written, not that they were written consistently)."""
    if not any(info.dtype.startswith("F8") for _, info in ckpt.tensors.values()):
        return
    try:
        fold(ckpt, "OUT")
    except MergeError as e:
        raise MergeError(
            f"{root}: its FP8 weights do not agree with their scales or config.json ({first_line(e)}); re-run the merge"
        ) from None


def _check_total_size(index_path: Path, total: int) -> None:
    metadata = json.loads(read_regular_file(index_path, MAX_INDEX_BYTES).decode("utf-8")).get("metadata")
    recorded = metadata.get("total_size") if isinstance(metadata, dict) else None
    if recorded is not None and recorded != total:
        raise MergeError(
            f"{index_path}: metadata.total_size is {recorded!r} but the tensors hold {total} bytes; re-run the merge"
        )
