"""`apo-merge verify OUT` for a DCP output: the metadata against the files, and each file against the card."""

from __future__ import annotations

from pathlib import Path

from apo_merge.card import recorded_hash
from apo_merge.dcp.reader import open_dcp
from apo_merge.errors import MergeError, shown
from apo_merge.verify import VerifyReport, _recorded, check_file


def verify_dcp(folder: str | Path) -> VerifyReport:
    """Every chunk of ``.metadata`` lies inside its file, and the folder's files are exactly the card's, each of the
    recorded size and hash."""
    root = Path(folder)
    ckpt = open_dcp(root, str(folder))
    recorded, text = _recorded(root)
    algo = recorded_hash(text)
    present = {p.name for p in root.iterdir() if p.name != "README.md"}
    if present != set(recorded):
        extra, missing = sorted(present - set(recorded)), sorted(set(recorded) - present)
        what = f"not in the card: {shown(extra)}" if extra else f"missing: {shown(missing)}"
        raise MergeError(f"{root}: the files differ from those the model card records ({what}); re-run the merge")
    for name in sorted(recorded):
        check_file(root / name, recorded[name], algo)
    return VerifyReport(root, recorded, len(ckpt.entries), algo)
