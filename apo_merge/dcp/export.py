"""A DCP folder -> a Hugging Face safetensors folder, tensor by tensor.

Chunks split along the first dimension only (FSDP2's ``Shard(0)``) are written straight to their place in the
file, one chunk in memory at a time; other layouts assemble one tensor at a time. The tensors equal what
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` gives (names without the ``model.`` of a
``{"model": state_dict}`` save); config, tokenizer and other side files come from a named Hugging Face folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from apo_merge import card
from apo_merge.dcp.reader import DcpCheckpoint, Entry, open_dcp
from apo_merge.errors import MergeError
from apo_merge.io.checkpoint import INDEX_NAME, WEIGHT_SUFFIXES
from apo_merge.io.hashing import hash_file
from apo_merge.io.output import MAX_CARD_BYTES, StagedFolder, check_replaceable
from apo_merge.io.writer import SafetensorsWriter

ST_NAMES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}
DEFAULT_SHARD = 5 * 10**9


def _layout(ckpt: DcpCheckpoint, max_shard_size: int) -> list[list[tuple[str, Entry]]]:
    groups: list[list[tuple[str, Entry]]] = [[]]
    size = 0
    for fqn, e in ckpt.entries.items():
        if e.dtype not in ST_NAMES:
            raise MergeError(f"{ckpt.label}: {fqn} has dtype {e.dtype}, which safetensors does not store here")
        nbytes = _nbytes(e)
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append((ckpt.hf_name(fqn), e))
        size += nbytes
    return groups


def _nbytes(e: Entry) -> int:
    n = torch.empty((), dtype=e.dtype).element_size()
    for s in e.size:
        n *= s
    return n


def _header(group: list[tuple[str, Entry]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    body: dict[str, object] = {"__metadata__": metadata}
    begins, at = [], 0
    for name, e in group:
        body[name] = {"dtype": ST_NAMES[e.dtype], "shape": list(e.size), "data_offsets": [at, at + _nbytes(e)]}
        begins.append(at)
        at += _nbytes(e)
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, begins


def _rows_only(e: Entry) -> bool:
    """Every chunk is whole rows (split along dim 0 only): its bytes are one run of the tensor's."""
    return all(all(o == 0 for o in c.offsets[1:]) and c.sizes[1:] == e.size[1:] for c in e.chunks) and bool(e.size)


def _write_tensor(ckpt: DcpCheckpoint, e: Entry, writer: SafetensorsWriter, at: int) -> None:
    if _rows_only(e):
        row = _nbytes(e) // e.size[0] if e.size[0] else 0
        for c in e.chunks:
            t = ckpt.read_chunk(e.fqn, c).contiguous()
            writer.write(t.reshape(-1).view(torch.uint8).numpy().data, at + c.offsets[0] * row)
        return
    full = torch.empty(e.size, dtype=e.dtype)
    for c in e.chunks:
        full[tuple(slice(o, o + n) for o, n in zip(c.offsets, c.sizes))] = ckpt.read_chunk(e.fqn, c)
    writer.write(full.reshape(-1).view(torch.uint8).numpy().data, at)


def _copy_side_files(src: Path, dest: Path) -> list[str]:
    copied = []
    for entry in sorted(src.iterdir()):
        name = entry.name
        if name.startswith(".") or name == "README.md" or name == INDEX_NAME or name.endswith(WEIGHT_SUFFIXES):
            continue
        if entry.is_symlink() or not entry.is_file():
            continue
        shutil.copyfile(entry, dest / name)
        copied.append(name)
    return copied


def export_hf(
    dcp_dir: str | os.PathLike,
    hf_dir: str | os.PathLike,
    *,
    config_from: str | os.PathLike | None = None,
    max_shard_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the model tensors of ``dcp_dir`` as a safetensors folder ``hf_dir`` (atomic), side files from
    ``config_from`` (config.json, tokenizer, ...); return ``hf_dir``."""
    ckpt = open_dcp(dcp_dir, str(dcp_dir))
    out = Path(hf_dir).expanduser()
    if config_from is not None and not (Path(config_from) / "config.json").is_file():
        raise MergeError(f"--config-from {config_from}: has no config.json; give the Hugging Face folder of the model")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise MergeError(f"{out}: already exists; pass --overwrite to replace it or choose another output")
        check_replaceable(out)
    groups = _layout(ckpt, max_shard_size or DEFAULT_SHARD)
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    summary = _source_summary(ckpt.root)
    metadata = {"format": "pt", **{k: v for k, v in summary.items() if k.startswith("apo_")}}
    staged = StagedFolder(out, overwrite)
    with staged as tmp:
        files = {}
        for fname, group in zip(names, groups):
            header, begins = _header(group, metadata)
            size = len(header) + sum(_nbytes(e) for _, e in group)
            writer = SafetensorsWriter(tmp / fname, header, size)
            try:
                for (_, e), begin in zip(group, begins):
                    _write_tensor(ckpt, e, writer, len(header) + begin)
                writer.finish()
            finally:
                writer.close()
            files[fname] = hash_file(tmp / fname)
        if n > 1:
            index = {
                "metadata": {"total_size": sum(_nbytes(e) for g in groups for _, e in g)},
                "weight_map": dict(sorted((name, f) for f, g in zip(names, groups) for name, _ in g)),
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if config_from is not None:
            _copy_side_files(Path(config_from), tmp)
        if "apo_alpha" in metadata:  # an apo-merge output: the card carries over, and verify checks the export
            info = card.CardInfo(
                alpha=float(metadata["apo_alpha"]),
                prev=metadata.get("apo_prev", ""),
                cur=metadata.get("apo_cur", ""),
                dtype="keep",
                files=files,
                base_models=[],
                rows=[("exported from", "torch DCP (apo-merge export)")],
            )
            (tmp / "README.md").write_text(card.render(info, out.name), encoding="utf-8")
        staged.commit()
    return out


def _source_summary(root: Path) -> dict[str, str]:
    """An apo-merge DCP output's alpha, prev and cur, as its card recorded them (metadata names)."""
    try:
        with open(root / "README.md", "rb") as f:
            text = f.read(MAX_CARD_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return {}
    if card.CARD_MARK not in text:
        return {}
    found = card.recorded_summary(text)
    return {card.SUMMARY_METADATA[k]: v for k, v in found.items() if k in card.SUMMARY_METADATA}
