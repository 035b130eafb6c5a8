"""Writing the step: an adapter (adapter_model.safetensors + adapter_config.json), or BASE's weights plus the step
as full weights (``--merge-into``), streamed one tensor at a time in BASE's layout."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from apo_merge.errors import MergeError
from apo_merge.io.checkpoint import Checkpoint
from apo_merge.io.hashing import StreamHasher, hash_file, new_hasher
from apo_merge.io.writer import SafetensorsWriter, pread_exact
from apo_merge.lora.read import ADAPTER_WEIGHTS, Adapter
from apo_merge.lora.step import Merger, base_step_adapter, extrapolate_adapters
from apo_merge.options import MergeOptions
from apo_merge.plan import Layout, OutFile, Piece, lay_out, output_dtype, short
from apo_merge.sources import ADAPTER_CONFIG


@dataclass(frozen=True)
class Output:
    """Where a writer writes and what it is given: the staged folder, the options, what every weight file records,
    and the caller's callbacks (each count of bytes written; the layout, once known)."""

    dest: Path
    options: MergeOptions
    metadata: dict[str, str]
    progress: Callable[[int], None] | None = None
    on_plan: Callable[[Layout], None] | None = None


@dataclass
class Written:
    """What a writer put into the output folder, and how the model card describes it."""

    files: dict[str, tuple[int, str]]  # weight file -> (bytes, digest by options.output_hash)
    n_tensors: int
    n_changed: int
    bytes_written: int
    index: dict | None = None  # model.safetensors.index.json content, when sharded
    base_hashes: dict[Path, tuple[int, str]] | None = None  # BASE's weight files, hashed as read (--hash-inputs)
    card: dict = field(default_factory=dict)  # CardInfo fields: library_name, tags, rows, summary


def write_adapter(prev: Adapter, cur: Adapter, out: Output) -> Written:
    """Write the exact extrapolated adapter (adapter_model.safetensors + adapter_config.json) into ``out.dest``."""
    tensors, config = extrapolate_adapters(prev, cur, out.options.alpha, out.options.dtype)
    ranks = "/".join(map(str, sorted({config["r"], *config["rank_pattern"].values()})))
    method = (
        "exact: one LoRA of rank r_cur + r_prev, B = [(1+alpha) s_cur B_cur, -alpha s_prev "
        f"B_prev], A = [A_cur; A_prev], scaling 1 (rank {ranks})"
    )
    summary = (
        "This adapter is an APO (Accelerated Preference Optimization, arXiv 2410.06293) extrapolation "
        "step of two LoRA adapters,\n`delta = (1 + alpha) delta_cur - alpha delta_prev`, written exactly "
        "as one LoRA"
    )
    return _save_adapter(tensors, config, out, cur, (method, summary))


def _save_adapter(
    tensors: dict[str, torch.Tensor], config: dict, out: Output, cur: Adapter, text: tuple[str, str]
) -> Written:
    """Write an adapter's two files into ``out.dest`` (refusing inf/NaN under --strict) with its card rows;
    ``text``: the card's method row and summary."""
    method, summary = text
    dest = out.dest
    bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors.values() if t.is_floating_point())
    if out.options.strict and bad:
        raise MergeError(f"{bad} adapter values are inf or NaN (--strict); lower --alpha")
    (dest / ADAPTER_WEIGHTS).write_bytes(_safetensors_bytes(tensors, {"format": "pt", **out.metadata}))
    (dest / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n")
    algo = out.options.output_hash
    size, sha = hash_file(dest / ADAPTER_WEIGHTS, name=algo)
    card = dict(
        library_name="peft",
        tags=["lora", "peft"],
        rows=[("base model", f"`{cur.config.get('base_model_name_or_path')}`"), ("method", method)],
        summary=summary,
    )
    files = {
        ADAPTER_WEIGHTS: (size, sha),
        ADAPTER_CONFIG: hash_file(dest / ADAPTER_CONFIG, name=algo),
    }  # verify checks both
    return Written(files, len(tensors), len(tensors), size, card=card)


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors' file with its metadata in sorted order: safetensors writes it in hash-map order, which changes
    from call to call, and the same inputs must give the same bytes."""
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)  # data offsets are relative to the end of the header: its length may change
    return len(body).to_bytes(8, "little") + body + raw[8 + n :]


def write_merged(prev: Adapter, cur: Adapter, base: Checkpoint, out: Output) -> Written:
    """Write BASE + the extrapolated adapter delta as full weights into ``out.dest`` (BASE's tensors and layout).

    One tensor in memory at a time; BASE is read once, in file order, and hashed on the way with --hash-inputs.
    """
    options = out.options
    merger = Merger(prev, cur, options.alpha)
    missing = sorted(n for n in merger.changes if n not in base.tensors)
    if missing:
        raise MergeError(
            f"--merge-into {base.label}: the base has no tensor {', '.join(map(short, missing[:5]))} that the "
            "adapters change; give the base model the adapters were trained on"
        )
    for name in sorted(merger.changes):  # before any output exists, and before any addition could broadcast
        want, have = merger.shape(name), base.tensors[name][1].shape
        if want != have:
            raise MergeError(
                f"--merge-into {base.label}: {short(name)} has shape {list(have)} in the base but the adapters change "
                f"it with shape {list(want)}; give the base model the adapters were trained on"
            )
    layout = _base_layout(base, options, out.metadata)
    if out.on_plan:
        out.on_plan(layout)
    sha: dict[str, str] = {}
    written = 0
    fds: dict[Path, int] = {}
    try:
        with StreamHasher(base.files if options.hash_inputs else ()) as hasher:
            for f in layout.files:
                sha[f.name], n = _write_file(f, out, merger, hasher, fds)
                written += n
            hashes = hasher.finish()
    finally:
        for fd in fds.values():
            os.close(fd)
    card = dict(
        rows=[("merged into", f"`{out.metadata.get('apo_merge_into', base.label)}`")],
        summary="This checkpoint is a base model plus an APO (Accelerated Preference Optimization, "
        "arXiv 2410.06293) extrapolation step of two LoRA adapters,\n"
        "`W = W_base + (1 + alpha) delta_cur - alpha delta_prev`",
    )
    return Written(
        {f.name: (f.size, sha[f.name]) for f in layout.files},
        layout.n_tensors,
        len(merger.changes),
        written,
        layout.index,
        hashes if options.hash_inputs else None,
        card,
    )


def _base_layout(base: Checkpoint, options: MergeOptions, metadata: dict[str, str]) -> Layout:
    """The output keeps BASE's tensors, shapes and files (or re-shards them); ``--dtype`` as for a merge."""
    pieces = [
        Piece(name, output_dtype(name, info, None, options.dtype)[0], info.shape, 0, (header, info), None)
        for name, (header, info) in base.tensors.items()
    ]
    return lay_out(pieces, base, options.max_shard_size, metadata)


def _write_file(f: OutFile, out: Output, merger: Merger, hasher: StreamHasher, fds: dict[Path, int]) -> tuple[str, int]:
    """Write one output file tensor by tensor through the shared writer; return its digest and size (``fds``: BASE's
    files, opened once)."""
    progress = out.progress
    writer = SafetensorsWriter(out.dest / f.name, f.header, f.size)
    h = new_hasher(out.options.output_hash)
    h.update(f.header)
    written = len(f.header)
    try:
        for piece in f.pieces:
            header, info = piece.cur
            if header.path not in fds:
                fds[header.path] = os.open(header.path, os.O_RDONLY)
            offset = header.data_start + info.begin
            raw = bytearray(info.nbytes)
            pread_exact(fds[header.path], memoryview(raw), offset, header.path)
            hasher.update(header.path, offset, memoryview(raw))
            data = merger.tensor(piece.name, raw, info.dtype, info.shape, piece.dtype)
            writer.write(data, piece.offset)
            h.update(data)
            written += len(data)
            if progress:
                progress(len(data))
        writer.finish()
    finally:
        writer.close()
    return h.hexdigest(), written


def write_base_step_adapter(base: Checkpoint, cur: Adapter, out: Output) -> Written:
    """Write the base+adapter step as an adapter over PREV (adapter_model.safetensors + adapter_config.json)."""
    if out.options.dtype != "keep":
        raise MergeError(
            "--dtype applies to --merge-into for a full PREV and an adapter CUR; the adapter keeps CUR's factors"
        )
    tensors, config = base_step_adapter(base, cur, out.options.alpha)
    method = "exact: CUR's factors, lora_alpha (and alpha_pattern) times (1 + alpha)"
    summary = (
        "This adapter is an APO (Accelerated Preference Optimization, arXiv 2410.06293) extrapolation "
        "step from a base model (PREV) to base + adapter (CUR),\n`delta = (1 + alpha) delta_cur`, written exactly "
        "as one LoRA over the base"
    )
    return _save_adapter(tensors, config, out, cur, (method, summary))
