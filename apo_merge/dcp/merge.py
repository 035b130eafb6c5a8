"""APO extrapolation of torch DCP checkpoints, storage file by storage file, with no gather.

The output has CUR's layout: for each of CUR's storage files, a file of the same name holding each model chunk
``cur + alpha (cur - prev)``, and a ``.metadata``, so the next round ``dcp.load``s it straight into FSDP at any
world size. Same layouts without entries left out take apo_merge.dcp.fast (no torch, pieces of a chunk in memory,
CUR's ``.metadata`` as it is); otherwise apo_merge.dcp.torchpath (one chunk in memory at a time, a new
``.metadata``): PREV may have another layout (a world-size change between rounds) or be a Hugging Face folder, and
each CUR chunk reads PREV's values over the same box. The arithmetic is apo_kernels' (fp32 math, one rounding),
elementwise, so the bytes equal a merge of the consolidated weights; both paths write the same bytes.

Under ``torchrun`` each rank writes a share of the files into one staging folder beside OUT (rank 0 creates it
and sends its name); after a barrier rank 0 writes ``.metadata`` and the model card and renames the folder into
place; a second barrier tells the others it is done. No tensor crosses between ranks. A rank that dies leaves
nothing in place (rank 0 removes the staging folder, or the next run does when rank 0 itself was killed).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from apo_merge import card
from apo_merge.dcp import fast
from apo_merge.dcp.reader import METADATA, DcpCheckpoint, open_dcp
from apo_merge.dcp.sources import open_prev
from apo_merge.errors import MergeError, shown, usage_error
from apo_merge.io.hashing import new_hasher
from apo_merge.io.output import StagedFolder
from apo_merge.options import MergeOptions

PART = fast.PART  # a rank's record of one file it wrote, read and removed by rank 0
FLOATING = ("float16", "bfloat16", "float32", "float64")  # torch's names


def _some(names: list[str]) -> str:
    return ", ".join(shown(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def pair(prev, cur: DcpCheckpoint) -> dict[str, str | None]:
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
            raise MergeError(
                f"{shown(name)}: dtype torch.{p_dtype} in PREV, torch.{c.dtype} in CUR; both must be floating or not"
            )
        kinds[fqn] = c.dtype if c_float else None
    return kinds


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
    prefetcher=None,
) -> list:
    """Write ``cur + alpha (cur - prev)`` for each alpha of ``options`` into ``outputs`` (DCP folders); reports.
    ``prefetcher``: an ``apo_merge.io.prefetch.Prefetcher`` already reading the inputs (the CLI starts one)."""
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
    plan = fast.plan(cur_ck, prev_src, kinds, options)  # None: the torch path writes the output
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
        nonfinite = _write_files(mine, (cur_ck, prev_src, kinds, plan), outs, options, (progress, prefetcher))
        nonfinite = nonfinite if options.strict else 0  # as the safetensors merge: counted under --strict
        if world > 1:
            dist.barrier(group=group)  # every file is written and fsynced
        reports = []
        for (tmp, alpha), out in zip(outs, outputs):
            how = (alpha, src_prev, src_cur, out, plan is not None)  # with CUR's dtypes and entries
            files = _finish(tmp, cur_ck, kinds, options, how) if rank == 0 else {}
            reports.append(
                MergeReport(
                    output=out,
                    device="cpu",
                    n_tensors=len(kinds),
                    n_extrapolated=sum(k is not None for k in kinds.values()),
                    bytes_written=sum(size for size, _ in files.values())
                    or sum(os.path.getsize(tmp / n) for n in mine),
                    seconds=0.0,
                    digests={n: sha for n, (_, sha) in files.items()},
                    output_hash=options.output_hash,
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


def _write_files(mine: list[str], inputs: tuple, outs: list, options: MergeOptions, hooks: tuple) -> int:
    """This rank's storage files, torch-free where ``plan`` allows (else, or for a chunk only torch.load reads,
    through torch); the count of new non-finite values."""
    cur, prev, kinds, plan = inputs
    progress, prefetcher = hooks
    if plan is not None:
        try:
            return fast.FastMerge(cur, prev.ckpt, plan, outs, options.output_hash).run(mine, progress, prefetcher)
        except fast.NotCanonical:  # start these files again through torch, which reads (or names) that chunk
            for tmp, _ in outs:
                for name in mine:
                    (tmp / name).unlink(missing_ok=True)
                    (tmp / f"{PART}{name}.json").unlink(missing_ok=True)
    from apo_merge.dcp import torchpath

    return sum(torchpath.write_file(n, cur, prev, kinds, outs, (options, progress)) for n in mine)


def _kind(cur: DcpCheckpoint, rank: int, world: int) -> str:
    text = "torch DCP checkpoint" + (f", rank {rank} of {world}" if world > 1 else "")
    if cur.left_out:
        text += "; left out (not model weights): " + ", ".join(f"{k} ({n} entries)" for k, n in cur.left_out.items())
    return text


def _where_cur_has_them(cur: DcpCheckpoint, parts: dict[str, dict]) -> bool:
    """Every chunk the ranks wrote sits at CUR's file, offset and length (whichever path each rank took)."""
    where = {(fqn, tuple(off)): (p["file"], at, n) for p in parts.values() for fqn, off, at, n in p["chunks"]}
    want = {(f, c.offsets): (c.file, c.offset, c.length) for f, e in cur.entries.items() for c in e.chunks}
    return where == want


def _finish(tmp: Path, cur: DcpCheckpoint, kinds: dict, options: MergeOptions, how: tuple) -> dict:
    """Rank 0: gather the parts, write ``.metadata`` and the model card; the files' (bytes, digest)."""
    alpha, src_prev, src_cur, out, same_entries = how
    parts = {}
    for name in cur.files():
        part = tmp / f"{PART}{name}.json"
        if not part.is_file():
            raise MergeError(f"{tmp}: the rank that writes {name} did not finish; rerun the merge")
        parts[name] = json.loads(part.read_text())
        part.unlink()
    if same_entries and _where_cur_has_them(cur, parts):  # CUR's metadata describes the output as it is
        raw = (cur.root / METADATA).read_bytes()
    else:
        from apo_merge.dcp.torchpath import build_metadata

        raw = build_metadata(cur, kinds, options, parts)
    (tmp / METADATA).write_bytes(raw)
    files = {p["file"]: (p["size"], p["digest"]) for p in parts.values()}
    metadata_hash = new_hasher(options.output_hash)
    metadata_hash.update(raw)
    files[METADATA] = (len(raw), metadata_hash.hexdigest())
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
        output_hash=options.output_hash,
    )
    (tmp / "README.md").write_text(card.render(info, out.name), encoding="utf-8")
    return files
