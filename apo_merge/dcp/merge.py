"""APO extrapolation of torch DCP checkpoints, storage file by storage file, with no gather.

The output has CUR's layout: for each of CUR's storage files, a file of the same name holding each model chunk
``cur + alpha (cur - prev)`` (one chunk in memory at a time), and a new ``.metadata``, so the next round
``dcp.load``s it straight into FSDP at any world size. PREV may have another layout (a world-size change between
rounds) or be a Hugging Face folder: each CUR chunk reads PREV's values over the same box. The arithmetic is
``apo_kernels.extrapolate_`` (fp32 math, one rounding), elementwise, so the bytes equal a merge of the
consolidated weights.

Under ``torchrun`` each rank writes a share of the files into one staging folder beside OUT (rank 0 creates it
and sends its name); after a barrier rank 0 writes ``.metadata`` and the model card and renames the folder into
place; a second barrier tells the others it is done. No tensor crosses between ranks. A rank that dies leaves
nothing in place (rank 0 removes the staging folder, or the next run does when rank 0 itself was killed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint.filesystem import _StorageInfo

from apo_kernels import extrapolate_
from apo_kernels.dtypes import torch_dtype
from apo_merge import card
from apo_merge.dcp.reader import METADATA, DcpCheckpoint, open_dcp
from apo_merge.dcp.sources import open_prev
from apo_merge.errors import MergeError, shown, usage_error
from apo_merge.io.output import StagedFolder
from apo_merge.io.writer import SFR_WAIT_AFTER, SFR_WAIT_BEFORE, SFR_WRITE, SYNC_FILE_RANGE, WRITEBACK_BYTES, advise
from apo_merge.options import MergeOptions

PART = ".apo-part-"  # a rank's record of one file it wrote, read and removed by rank 0
SFR_WAIT_ALL = SFR_WAIT_BEFORE | SFR_WRITE | SFR_WAIT_AFTER
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _some(names: list[str]) -> str:
    return ", ".join(shown(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def pair(prev, cur: DcpCheckpoint) -> dict[str, torch.dtype | None]:
    """Check PREV and CUR are two states of one model; each CUR key -> its output compute dtype (None: copied)."""
    names = {cur.hf_name(f): f for f in cur.entries}
    only_cur = sorted(n for n in names if prev.info(n) is None)
    known = prev.by_name if hasattr(prev, "by_name") else prev.ckpt.tensors
    only_prev = sorted(n for n in known if n not in names)
    if only_cur or only_prev:
        sides = [f"only in {s}: {_some(x)}" for s, x in (("PREV", only_prev), ("CUR", only_cur)) if x]
        raise MergeError(
            f"PREV and CUR hold different tensors ({'; '.join(sides)}); give two checkpoints of the same model"
        )
    kinds = {}
    for name, fqn in names.items():
        p_shape, p_dtype = prev.info(name)
        c = cur.entries[fqn]
        if tuple(p_shape) != c.size:
            raise MergeError(
                f"{shown(name)}: shape {tuple(p_shape)} in PREV, {c.size} in CUR; give two checkpoints of the same "
                "model"
            )
        p_float, c_float = p_dtype in FLOATING, c.dtype in FLOATING
        if p_float != c_float:
            raise MergeError(f"{shown(name)}: dtype {p_dtype} in PREV, {c.dtype} in CUR; both must be floating or not")
        kinds[fqn] = c.dtype if c_float else None
    return kinds


def _out_dtype(options: MergeOptions, cur_dtype: torch.dtype, floating: bool) -> torch.dtype:
    if not floating or options.dtype == "keep":
        return cur_dtype
    return torch_dtype(options.dtype)


class _Sink:
    """What torch.save writes, straight to an output file (no copy in between), hashed on the way."""

    def __init__(self, fd: int) -> None:
        self.fd, self.pos, self.sha = fd, 0, hashlib.sha256()
        self.started = self.dropped = 0  # as SafetensorsWriter: writeback kept moving, written pages dropped

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        self.sha.update(view)
        while view:
            view = view[os.write(self.fd, view) :]
        self.pos += n
        if SYNC_FILE_RANGE is not None and self.pos - self.started >= WRITEBACK_BYTES:
            SYNC_FILE_RANGE(self.fd, self.started, self.pos - self.started, SFR_WRITE)
            if self.started > self.dropped:
                SYNC_FILE_RANGE(self.fd, self.dropped, self.started - self.dropped, SFR_WAIT_ALL)
                advise(self.fd, self.dropped, self.started - self.dropped, "DONTNEED")
                self.dropped = self.started
            self.started = self.pos
        return n

    def flush(self) -> None:
        pass


def _save(t: torch.Tensor, sink: _Sink) -> int:
    """Append ``torch.save(t)`` (the bytes are the same for equal tensors: a rerun writes the same files)."""
    start = sink.pos
    torch.save(t, sink)
    return sink.pos - start


def _write_file(name: str, cur: DcpCheckpoint, prev, kinds: dict, outs: list[tuple[Path, float]], opts) -> int:
    """Write CUR's storage file ``name`` into each staging folder (one per alpha), and a record of its chunks."""
    options, progress = opts
    items = sorted(((c.offset, f, c) for f, e in cur.entries.items() for c in e.chunks if c.file == name))
    files = [os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644) for tmp, _ in outs]
    sinks = [_Sink(fd) for fd in files]
    records: list[list] = [[] for _ in outs]
    nonfinite = 0
    try:
        for _, fqn, chunk in items:
            c = cur.read_chunk(fqn, chunk)
            floating = kinds[fqn] is not None
            p = prev.region(cur.hf_name(fqn), chunk.offsets, chunk.sizes) if floating else None
            for k, (_, alpha) in enumerate(outs):
                if floating:
                    out = extrapolate_(torch.empty(c.shape, dtype=_out_dtype(options, c.dtype, True)), p, c, alpha)
                    if options.strict:
                        nonfinite += int((~out.isfinite() & p.isfinite() & c.isfinite()).sum())
                else:
                    out = c
                start = sinks[k].pos
                n = _save(out, sinks[k])
                records[k].append([fqn, list(chunk.offsets), start, n])
                if progress:
                    progress(n)
        for k, (tmp, _) in enumerate(outs):
            os.fsync(files[k])
            part = {"file": name, "size": sinks[k].pos, "sha256": sinks[k].sha.hexdigest(), "chunks": records[k]}
            (tmp / f"{PART}{name}.json").write_text(json.dumps(part))
    finally:
        for fd in files:
            os.close(fd)
    return nonfinite


def share(cur: DcpCheckpoint, rank: int, world: int) -> list[str]:
    """This rank's storage files: the largest first, each to the least loaded rank (the same split everywhere)."""
    load = [0] * world
    mine = []
    for name in sorted(cur.files(), key=lambda n: (-cur.file_sizes[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += cur.file_sizes[name]
        if r == rank:
            mine.append(name)
    return sorted(mine)


def build_metadata(cur: DcpCheckpoint, kinds: dict, options: MergeOptions, parts: dict[str, dict]) -> bytes:
    """The new ``.metadata``: CUR's model entries (dtype as written), the new byte ranges, no save ids."""
    where = {(fqn, tuple(off)): (p["file"], at, n) for p in parts.values() for fqn, off, at, n in p["chunks"]}
    sd_md, storage = {}, {}
    for fqn, e in cur.entries.items():
        dtype = _out_dtype(options, e.dtype, kinds[fqn] is not None)
        chunks = [dcp_md.ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in e.chunks]
        sd_md[fqn] = dcp_md.TensorStorageMetadata(dcp_md.TensorProperties(dtype=dtype), torch.Size(e.size), chunks)
        for i, c in enumerate(e.chunks):
            file, at, n = where[(fqn, c.offsets)]
            storage[dcp_md.MetadataIndex(fqn, c.offsets, i)] = _StorageInfo(file, at, n)
    planner = cur.meta.planner_data
    planner = {f: planner[f] for f in cur.entries if f in planner} if isinstance(planner, dict) else planner
    meta = dcp_md.Metadata(sd_md, planner, storage, dcp_md.StorageMeta(), cur.meta.version)
    return pickle.dumps(meta)


def _group():
    """(rank, world, gloo group or None): a process group when launched by torchrun with several ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
        group = None
    else:
        group = dist.new_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size(), group


def merge_dcp(
    prev: str | os.PathLike,
    cur: str | os.PathLike,
    options: MergeOptions,
    outputs: list[Path],
    *,
    progress: Callable[[int], None] | None = None,
) -> list:
    """Write ``cur + alpha (cur - prev)`` for each alpha of ``options`` into ``outputs`` (DCP folders); reports."""
    from apo_merge.api import MergeReport
    from apo_merge.sources import Source

    for flag, on in (
        ("--max-shard-size", options.max_shard_size is not None),  # the output keeps CUR's storage files
        ("--merge-into", options.merge_into is not None),
        ("--hash-inputs", options.hash_inputs),
        ("--on-missing copy", options.on_missing == "copy"),
        (f"--device {options.device}", options.device.startswith("cuda")),  # I/O-bound: computed on the CPU
    ):
        if on:
            raise usage_error(f"{flag} does not apply to torch DCP checkpoints; drop it")
    if options.push_to_hub is not None:
        raise usage_error("--push-to-hub uploads safetensors; export the DCP output first (apo-merge export)")
    t0 = time.perf_counter()
    src_prev, src_cur = (Source(Path(p), str(p), Path(p)) for p in (prev, cur))
    cur_ck = open_dcp(cur, str(cur))
    prev_src = open_prev(Path(prev), str(prev))
    kinds = pair(prev_src, cur_ck)
    rank, world, group = _group()
    staged = [StagedFolder(out, options.overwrite) for out in outputs]
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(s) for s in staged] if rank == 0 else [None] * len(staged)
        if world > 1:
            import torch.distributed as dist

            names = [[str(t) for t in tmps] if rank == 0 else None]
            dist.broadcast_object_list(names, src=0, group=group)
            tmps = [Path(t) for t in names[0]]
            if not all(t.is_dir() for t in tmps):
                raise MergeError(
                    f"{tmps[0].parent}: rank {rank} does not see the staging folder rank 0 made there; put OUT on a "
                    "file system every node shares"
                )
        outs = list(zip(tmps, options.alphas))
        mine = share(cur_ck, rank, world)
        nonfinite = sum(_write_file(n, cur_ck, prev_src, kinds, outs, (options, progress)) for n in mine)
        if world > 1:
            dist.barrier(group=group)  # every file is written and fsynced
        reports = []
        for (tmp, alpha), out in zip(outs, outputs):
            files = _finish(tmp, cur_ck, kinds, options, (alpha, src_prev, src_cur, out)) if rank == 0 else {}
            reports.append(
                MergeReport(
                    output=out,
                    device="cpu",
                    n_tensors=len(kinds),
                    n_extrapolated=sum(k is not None for k in kinds.values()),
                    bytes_written=sum(size for size, _ in files.values())
                    or sum(os.path.getsize(tmp / n) for n in mine),
                    seconds=0.0,
                    sha256={n: sha for n, (_, sha) in files.items()},
                    new_nonfinite=nonfinite,
                    kind=_kind(cur_ck, rank, world),
                )
            )
        if options.strict and nonfinite:
            raise MergeError(
                f"{nonfinite} output values are inf or NaN although both inputs were finite (--strict); lower "
                "--alpha or use --dtype fp32"
            )
        if rank == 0:
            for s in staged:
                s.commit()
    if world > 1:
        dist.barrier(group=group)  # rank 0 has put the outputs in place
    for r in reports:
        r.seconds = time.perf_counter() - t0
    return reports


def _kind(cur: DcpCheckpoint, rank: int, world: int) -> str:
    text = "torch DCP checkpoint" + (f", rank {rank} of {world}" if world > 1 else "")
    if cur.left_out:
        text += "; left out (not model weights): " + ", ".join(f"{k} ({n} entries)" for k, n in cur.left_out.items())
    return text


def _finish(tmp: Path, cur: DcpCheckpoint, kinds: dict, options: MergeOptions, how: tuple) -> dict:
    """Rank 0: gather the parts, write ``.metadata`` and the model card; the files' (bytes, sha256)."""
    alpha, src_prev, src_cur, out = how
    parts = {}
    for name in cur.files():
        part = tmp / f"{PART}{name}.json"
        if not part.is_file():
            raise MergeError(f"{tmp}: the rank that writes {name} did not finish; rerun the merge")
        parts[name] = json.loads(part.read_text())
        part.unlink()
    raw = build_metadata(cur, kinds, options, parts)
    (tmp / METADATA).write_bytes(raw)
    files = {p["file"]: (p["size"], p["sha256"]) for p in parts.values()}
    files[METADATA] = (len(raw), hashlib.sha256(raw).hexdigest())
    info = card.CardInfo(
        alpha=alpha,
        prev=src_prev.card_name(options.card_paths),
        cur=src_cur.card_name(options.card_paths),
        dtype=options.dtype,
        files=files,
        base_models=[],
        library_name="pytorch",
        tags=["dcp"],
        rows=[("format", "torch.distributed.checkpoint (dcp.load it; apo-merge export makes safetensors)")],
    )
    (tmp / "README.md").write_text(card.render(info, out.name), encoding="utf-8")
    return files
