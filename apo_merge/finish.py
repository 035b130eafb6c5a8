"""What every output shares, on the checkpoint path and the adapter path: OUT checked before any work, the input's
side files copied, the weight files' metadata, the index and model card written, and the report."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from apo_merge import card, sources
from apo_merge._version import __version__
from apo_merge.errors import MergeError, usage_error
from apo_merge.io import hashing
from apo_merge.io.checkpoint import WEIGHT_SUFFIXES, Checkpoint, is_inside
from apo_merge.io.output import check_replaceable


@dataclass
class MergeReport:
    """What a merge did (the CLI prints it as the summary line)."""

    output: Path
    device: str
    n_tensors: int
    n_extrapolated: int
    bytes_written: int
    seconds: float
    digests: dict[str, str]  # weight file -> its output_hash
    new_nonfinite: int = 0
    copied_cur_only: list[str] = field(default_factory=list)
    ignored_prev_only: list[str] = field(default_factory=list)
    copied_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    input_hashes: dict[str, hashing.InputDigest] = field(default_factory=dict)  # "prev" / "cur" (/ "base")
    kind: str = "checkpoint"  # or "lora adapter", "merged lora" (--merge-into)
    pushed: str | None = None  # the Hub commit or pull request URL after --push-to-hub
    output_hash: str = hashing.OUTPUT_HASHES[0]  # the hash in ``digests`` and the card (MergeOptions.output_hash)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def check_output(out: Path, inputs: list[sources.Source], overwrite: bool) -> None:
    """Before any work: OUT is neither inside an input nor around one, and may be created (or replaced)."""
    for src in inputs:
        if is_inside(out, src.path):
            raise usage_error(f"output {out} is inside input {src.label}; choose an -o outside both inputs")
        if is_inside(src.path, out):
            raise usage_error(f"input {src.label} is inside output {out}; choose another -o")
    if sources.lexists(out, "output", usage=True):
        if not overwrite:
            raise MergeError(f"{out}: already exists; pass --overwrite to replace it or choose another -o")
        check_replaceable(out)
    if not sources.lexists(out.parent, "output folder", usage=True) or not out.parent.is_dir():
        raise MergeError(f"{out.parent}: no such folder for the output; create it or choose another -o")


def copy_side_files(root: Path, weights: set[str], trusted_root: Path, dest: Path) -> tuple[list[str], list[str]]:
    """Copy a folder's top-level non-weight files (config, tokenizer, chat template, ...) into ``dest``."""
    copied, skipped = [], []
    for entry in sorted(root.iterdir()):
        name = entry.name
        if name.startswith(".") or name == "README.md":
            continue
        if name in weights:
            continue
        if name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json") or not entry.is_file():
            skipped.append(name + ("/" if entry.is_dir() else ""))
            continue
        if not is_inside(entry, trusted_root):
            raise MergeError(
                f"{entry}: is a symlink leading outside the checkpoint folder (refused); "
                "copy the real file into the folder"
            )
        shutil.copyfile(entry, dest / name)
        copied.append(name)
    return copied, skipped


def file_metadata(alpha: float, prev: str, cur: str) -> dict[str, str]:
    """What every weight file records (and the card repeats; ``verify`` compares the two)."""
    return {"apo_merge_version": __version__, "apo_alpha": repr(alpha), "apo_prev": prev, "apo_cur": cur}


def write_card(folder: Path, out: Path, index: dict | None, info: card.CardInfo) -> None:
    """Write the index (when sharded) and the model card of output ``out`` into ``folder``."""
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    # the copied config, tokenizer, ...: verify checks them
    info.side_files = card.side_files(folder, info.files, info.output_hash)
    (folder / "README.md").write_text(card.render(info, out.name), encoding="utf-8")


def checkpoint_digest(ckpt: Checkpoint, hashes: dict[Path, tuple[int, str]]) -> hashing.InputDigest:
    """The input's content hashes: its weight files' (read on the way) and its index's."""
    files = {f.path.name: hashes[f.path] for f in ckpt.files}
    if ckpt.index_name:
        files[ckpt.index_name] = hashing.hash_file(ckpt.root / ckpt.index_name)
    return hashing.digest(files)


def checkpoint_listing(ckpt: Checkpoint, src: sources.Source) -> hashing.InputDigest:
    """The input's files without reading its weights (see ``hashing.listing``)."""
    index = [ckpt.root / ckpt.index_name] if ckpt.index_name else []
    return hashing.listing([f.path for f in ckpt.files], index, hub=src.hub_id is not None)
