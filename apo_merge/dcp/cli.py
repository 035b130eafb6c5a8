"""`apo-merge export DCP OUT --config-from HF`: the command line of ``apo_merge.dcp.export_hf``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from apo_merge.shell import completed, say


def register(tools: typer.Typer) -> None:
    """Add the ``export`` command to apo-merge's maintenance commands."""
    tools.command(
        "export",
        no_args_is_help=True,
        help="Export a torch DCP checkpoint (e.g. an apo-merge DCP output) to a Hugging Face safetensors folder, "
        "tensor by tensor.\n\nExample:\n\n    apo-merge export runs/apo-2 runs/apo-2-hf --config-from runs/round-0",
    )(export)


def export(
    folder: Annotated[Path, typer.Argument(metavar="DCP", help="The DCP folder (.metadata + __R_N.distcp files).")],
    output: Annotated[Path, typer.Argument(metavar="OUT", help="The safetensors folder to write.")],
    config_from: Annotated[
        Path | None,
        typer.Option(metavar="HF", help="Hugging Face folder whose config.json, tokenizer and other files to copy."),
    ] = None,
    max_shard_size: Annotated[
        str | None, typer.Option(help="Largest safetensors file, e.g. 5GB [default: 5GB].")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing OUT (an apo-merge output).")
    ] = False,
) -> None:
    from apo_merge.dcp.export import export_hf
    from apo_merge.options import parse_size

    size = parse_size(max_shard_size) if max_shard_size is not None else None
    out = export_hf(folder, output, config_from=config_from, max_shard_size=size, overwrite=overwrite)
    completed(f"{out} is complete")
    say(f"apo-merge: exported {folder} -> {out}")
