"""Where PREV and CUR come from: a local folder (Hub repo ids plug in here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    path: Path  # local folder
    label: str  # as the user gave it
    trusted_root: Path  # symlinks may resolve anywhere below this
    hub_id: str | None = None  # "org/name" (with "@revision" stripped) when it came from the Hub


def resolve(spec: str | Path) -> Source:
    """A local checkpoint folder as a Source."""
    path = Path(spec).expanduser()
    return Source(path=path, label=str(spec), trusted_root=path)
