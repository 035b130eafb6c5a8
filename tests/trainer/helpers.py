"""Comparing run folders and reading checkpoints in trainer tests."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def artifacts(out: Path) -> dict[str, bytes]:
    """Every result file of a run folder (relative path -> bytes), without timings and the config snapshot."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and rel.startswith("round-") and "/done/" not in rel:
            files[rel] = p.read_bytes()
    return files


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))
