"""The Python API: ``extrapolate_checkpoints(prev=, cur=, alpha=, output=)`` -> the output folder, ``run_merge``
-> a report, and ``run_merges`` -> one report per alpha (several alphas from one read). The CLI calls the same
code."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apo_merge import card, sources
from apo_merge._version import __version__
from apo_merge.errors import MergeError, usage_error
from apo_merge.hub import PushOptions
from apo_merge.io import hashing
from apo_merge.io.checkpoint import WEIGHT_SUFFIXES, Checkpoint, is_inside, open_checkpoint
from apo_merge.io.files import remove
from apo_merge.io.output import StagedFolder, check_replaceable
from apo_merge.options import MergeOptions
from apo_merge.plan import Layout, make_plan

if TYPE_CHECKING:
    from apo_merge.engine import Kernel
    from apo_merge.io.prefetch import Prefetcher


@dataclass
class MergeReport:
    """What a merge did (the CLI prints it as the summary line)."""

    output: Path
    device: str
    n_tensors: int
    n_extrapolated: int
    bytes_written: int
    seconds: float
    sha256: dict[str, str]
    new_nonfinite: int = 0
    copied_cur_only: list[str] = field(default_factory=list)
    ignored_prev_only: list[str] = field(default_factory=list)
    copied_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    input_hashes: dict[str, hashing.InputDigest] = field(default_factory=dict)  # "prev" / "cur" (/ "base")
    kind: str = "checkpoint"  # or "lora adapter", "merged lora" (--merge-into)
    pushed: str | None = None  # the Hub commit or pull request URL after --push-to-hub

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def default_output(cur: sources.Source, alpha: float) -> Path:
    """``<CUR name>-apo<alpha>`` beside CUR (in the working folder when CUR came from the Hub)."""
    name = f"{(cur.hub_id or cur.path.resolve().name).split('/')[-1]}-apo{alpha:g}"
    return Path(name) if cur.hub_id else cur.path.resolve().parent / name


PUSH_ONE = "--push-to-hub uploads one output; give one --alpha, or push each output with apo-merge push"


def output_paths(cur: sources.Source, alphas: tuple[float, ...], output: str | os.PathLike | None) -> list[Path]:
    """One output folder per alpha: ``default_output``, or ``output`` with ``{alpha}`` replaced by each alpha."""
    if output is None:
        outs = [default_output(cur, a) for a in alphas]
    elif "{alpha}" in os.fspath(output):
        outs = [Path(os.fspath(output).replace("{alpha}", f"{a:g}")).expanduser() for a in alphas]
    elif len(alphas) > 1:
        raise usage_error(
            f"-o {output} names one folder for {len(alphas)} alphas; put {{alpha}} in it (e.g. -o {output}{{alpha}}) "
            "or leave -o out"
        )
    else:
        outs = [Path(output).expanduser()]
    for i, out in enumerate(outs):
        if out in outs[:i]:
            raise usage_error(
                f"alphas {alphas[outs.index(out)]!r} and {alphas[i]!r} both give output {out}; "
                "give alphas that differ in the first 6 digits"
            )
    return outs


def _check_output(out: Path, inputs: list[sources.Source], overwrite: bool) -> None:
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


def _copy_side_files(root: Path, weights: set[str], trusted_root: Path, dest: Path) -> tuple[list[str], list[str]]:
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


@dataclass(frozen=True)
class _Hooks:
    """What a run is given besides its options: callbacks and the resources it may share with its caller."""

    progress: Callable[[int], None] | None = None  # called with each count of bytes written
    on_plan: Callable[[Layout], None] | None = None  # called once the output is laid out (a MergePlan for a merge)
    kernel: Kernel | None = None  # a torch kernel for the engine (default: numpy twin on CPU, extrapolate_ on GPU)
    prefetcher: Prefetcher | None = None  # the CLI's, started before torch loads


def run_merge(
    prev: str | os.PathLike,
    cur: str | os.PathLike,
    options: MergeOptions,
    output: str | os.PathLike | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[Layout], None] | None = None,
    kernel: Kernel | None = None,
    prefetcher: Prefetcher | None = None,
) -> MergeReport:
    """Merge (and push, if ``options.push_to_hub``) and return a report; see ``extrapolate_checkpoints``."""
    if isinstance(options, MergeOptions) and len(options.alphas) > 1:
        raise usage_error(f"run_merge makes one output but {len(options.alphas)} alphas were given; use run_merges")
    reports = run_merges(
        prev, cur, options, output, progress=progress, on_plan=on_plan, kernel=kernel, prefetcher=prefetcher
    )
    return reports[0]


def run_merges(
    prev: str | os.PathLike,
    cur: str | os.PathLike,
    options: MergeOptions,
    output: str | os.PathLike | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[Layout], None] | None = None,
    kernel: Kernel | None = None,
    prefetcher: Prefetcher | None = None,
) -> list[MergeReport]:
    """One output per alpha of ``options.alphas``, all from one read of PREV and CUR; a report for each.

    ``output`` may contain ``{alpha}`` (replaced by each alpha as ``f"{alpha:g}"``); without it, several alphas
    need ``output=None`` (each goes to ``<CUR>-apo<alpha>`` beside CUR). Each output is complete, atomic and
    carded as if made alone, and holds the same bytes as a run with that alpha alone. The outputs are put in
    place only once all are written and fsynced: any failure before that leaves none of them; if putting one in
    place fails (something appeared at its OUT meanwhile), those this call already put in place are removed
    again, except ones that replaced an earlier output under ``overwrite`` (that earlier output is gone).
    ``on_plan`` is called once per output. Several alphas apply to full checkpoints only, without
    ``push_to_hub``.
    """
    if not isinstance(options, MergeOptions):
        raise TypeError(f"run_merge takes a MergeOptions (e.g. MergeOptions(alpha=0.3)), not {type(options).__name__}")
    t0 = time.perf_counter()
    hooks = _Hooks(progress, on_plan, kernel, prefetcher)
    several = len(options.alphas) > 1
    if several and options.push_to_hub is not None:
        raise usage_error(PUSH_ONE)
    src_prev, src_cur = sources.resolve(prev, token=options.token), sources.resolve(cur, token=options.token)
    outs = output_paths(src_cur, options.alphas, output)
    for out in outs:
        _check_output(out, [src_prev, src_cur], options.overwrite)
    if src_prev.is_adapter or src_cur.is_adapter:
        if several:
            raise usage_error("several alphas apply to full checkpoints; for LoRA adapters run one --alpha at a time")
        reports = [_merge_adapters(src_prev, src_cur, outs[0], options, hooks)]
    elif options.merge_into is not None:
        raise MergeError("--merge-into applies to LoRA adapters, but PREV and CUR are full checkpoints; drop it")
    else:
        reports = _merge_checkpoints(src_prev, src_cur, outs, options, hooks)
    for report in reports:
        report.seconds = time.perf_counter() - t0
    if options.push_to_hub is not None:
        from apo_merge import hub

        push = options.push_to_hub
        reports[0].pushed = hub.push(outs[0], PushOptions(push) if isinstance(push, str) else push, token=options.token)
    return reports


def _metadata(alpha: float, prev: str, cur: str) -> dict[str, str]:
    """What every weight file records (and the card repeats; ``verify`` compares the two)."""
    return {"apo_merge_version": __version__, "apo_alpha": repr(alpha), "apo_prev": prev, "apo_cur": cur}


def _merge_checkpoints(
    src_prev: sources.Source, src_cur: sources.Source, outs: list[Path], options: MergeOptions, hooks: _Hooks
) -> list[MergeReport]:
    from apo_merge.engine import execute_many, resolve_device

    options = options.replace(device=resolve_device(options.device))
    ckpt_prev = open_checkpoint(src_prev.path, src_prev.label, src_prev.trusted_root)
    ckpt_cur = open_checkpoint(src_cur.path, src_cur.label, src_cur.trusted_root)
    prev_name, cur_name = src_prev.card_name(options.card_paths), src_cur.card_name(options.card_paths)
    each = [options.replace(alpha=a) for a in options.alphas]
    plans = [make_plan(ckpt_prev, ckpt_cur, o, metadata=_metadata(o.alpha, prev_name, cur_name)) for o in each]
    if hooks.on_plan:
        for plan in plans:
            hooks.on_plan(plan)

    hash_inputs = options.hash_inputs
    staged = [StagedFolder(out, options.overwrite) for out in outs]
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(s) for s in staged]
        hasher = stack.enter_context(hashing.StreamHasher(*((ckpt_prev.files, ckpt_cur.files) if hash_inputs else ())))
        stats = execute_many(
            plans,
            tmps,
            options,
            kernel=hooks.kernel,
            prefetcher=hooks.prefetcher,
            progress=hooks.progress,
            on_read=hasher.update if hash_inputs else None,
        )
        for o, st in zip(each, stats):
            if options.strict and st.new_nonfinite:
                raise MergeError(
                    f"{st.new_nonfinite} output values are inf or NaN although both inputs were "
                    f"finite (--strict{f', alpha {o.alpha!r}' if len(each) > 1 else ''}); lower --alpha or use "
                    "--dtype fp32"
                )
        if hash_inputs:
            hashes = hasher.finish()
            input_hashes = {"prev": _checkpoint_digest(ckpt_prev, hashes), "cur": _checkpoint_digest(ckpt_cur, hashes)}
        else:
            input_hashes = {
                "prev": _checkpoint_listing(ckpt_prev, src_prev),
                "cur": _checkpoint_listing(ckpt_cur, src_cur),
            }
        reports = []
        for o, plan, st, tmp, out in zip(each, plans, stats, tmps, outs):
            copied, skipped = _copy_side_files(ckpt_cur.root, ckpt_cur.weight_file_names, src_cur.trusted_root, tmp)
            info = card.CardInfo(
                alpha=o.alpha,
                prev=prev_name,
                cur=cur_name,
                dtype=options.dtype,
                files={f.name: (f.size, st.sha256[f.name]) for f in plan.files},
                base_models=[s.hub_id for s in (src_prev, src_cur) if s.hub_id],
                input_hashes=input_hashes,
            )
            _write_card(tmp, out, plan.index, info)
            reports.append(
                MergeReport(
                    output=out,
                    device=options.device,
                    n_tensors=plan.n_tensors,
                    n_extrapolated=plan.n_extrapolated,
                    bytes_written=st.bytes_written,
                    seconds=0.0,
                    sha256=st.sha256,
                    new_nonfinite=st.new_nonfinite,
                    copied_cur_only=plan.copied_cur_only,
                    ignored_prev_only=plan.ignored_prev_only,
                    copied_files=copied,
                    skipped_files=skipped,
                    input_hashes=input_hashes,
                )
            )
        _commit_all(staged)
    return reports


def _commit_all(staged: list[StagedFolder]) -> None:
    """Put every output in place; if one fails, take back those put in place before it that were new."""
    done: list[StagedFolder] = []
    try:
        for s in staged:
            s.commit()
            done.append(s)
    except BaseException:
        for s in done:
            if not s.replaced:
                remove(s.out)
        raise


def _write_card(folder: Path, out: Path, index: dict | None, info: card.CardInfo) -> None:
    """Write the index (when sharded) and the model card of output ``out`` into ``folder``."""
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    info.side_files = card.side_files(folder, info.files)  # the copied config, tokenizer, ...: verify checks them
    (folder / "README.md").write_text(card.render(info, out.name), encoding="utf-8")


def _finish(staged: StagedFolder, index: dict | None, info: card.CardInfo) -> None:
    """Write the index (when sharded) and the model card into the staged folder, then put it in place."""
    _write_card(staged.tmp, staged.out, index, info)
    staged.commit()


def _checkpoint_digest(ckpt: Checkpoint, hashes: dict[Path, tuple[int, str]]) -> hashing.InputDigest:
    files = {f.path.name: hashes[f.path] for f in ckpt.files}
    if ckpt.index_name:
        files[ckpt.index_name] = hashing.hash_file(ckpt.root / ckpt.index_name)
    return hashing.digest(files)


def _checkpoint_listing(ckpt: Checkpoint, src: sources.Source) -> hashing.InputDigest:
    """The input's files without reading its weights (see ``hashing.listing``)."""
    index = [ckpt.root / ckpt.index_name] if ckpt.index_name else []
    return hashing.listing([f.path for f in ckpt.files], index, hub=src.hub_id is not None)


def _merge_adapters(
    src_prev: sources.Source, src_cur: sources.Source, out: Path, options: MergeOptions, hooks: _Hooks
) -> MergeReport:
    if not src_cur.is_adapter:
        raise MergeError(
            f"{src_cur.label}: is a full checkpoint but PREV {src_prev.label} is a LoRA adapter; give two "
            "adapters, or merge the adapter into its base first"
        )
    from apo_merge.shell import import_torch

    import_torch()  # before lora imports it: Ctrl-C held while torch starts
    from apo_merge import lora

    if not src_prev.is_adapter:
        return _merge_base_and_adapter(src_prev, src_cur, out, options, hooks)

    prev_a, cur_a = lora.open_adapter(src_prev), lora.open_adapter(src_cur)
    meta = _metadata(options.alpha, src_prev.card_name(options.card_paths), src_cur.card_name(options.card_paths))
    base_models = [s.hub_id for s in (src_prev, src_cur) if s.hub_id]
    # Side files: BASE's (config, tokenizer) first when merging into it, then CUR's, whose tokenizer wins.
    side = [(src_cur.path, {lora.ADAPTER_WEIGHTS, sources.ADAPTER_CONFIG}, src_cur.trusted_root)]
    base = None
    if options.merge_into is not None:
        src_base = sources.resolve(options.merge_into, token=options.token)
        if src_base.is_adapter:
            raise MergeError(f"--merge-into {src_base.label}: is an adapter; give the base model")
        _check_output(out, [src_base], options.overwrite)  # BASE is an input too: never written into or replaced
        base = open_checkpoint(src_base.path, src_base.label, src_base.trusted_root)
        base_from_hub = src_base.hub_id is not None
        meta["apo_merge_into"] = src_base.card_name(options.card_paths)
        base_models += [src_base.hub_id] if src_base.hub_id else []
        side.insert(0, (base.root, base.weight_file_names, src_base.trusted_root))
    elif options.max_shard_size is not None:
        raise MergeError("--max-shard-size applies to full weights; an adapter is written as one file")

    staged = StagedFolder(out, options.overwrite)
    with staged as tmp:
        if base is None:
            res = lora.write_adapter(prev_a, cur_a, tmp, options, metadata=meta)
        else:
            res = lora.write_merged(
                prev_a,
                cur_a,
                base,
                tmp,
                options,
                metadata=meta,
                progress=hooks.progress,
                on_plan=hooks.on_plan,
                hub=base_from_hub,
            )
        hashes = {"prev": prev_a.digest, "cur": cur_a.digest}
        if res.base_digest is not None:
            hashes["base"] = res.base_digest
        kind = "lora adapter" if base is None else "merged lora"
        return _finish_adapter(staged, tmp, out, side, res, hashes, (src_prev, src_cur), base_models, options, kind)


def _merge_base_and_adapter(
    src_prev: sources.Source, src_cur: sources.Source, out: Path, options: MergeOptions, hooks: _Hooks
) -> MergeReport:
    """PREV a full checkpoint (theta_hat_t), CUR an adapter over it (theta_hat_{t+1} = PREV + delta): write
    PREV + (1 + alpha) delta as an adapter over PREV, or as full weights with ``merge_into`` (which must be PREV)."""
    from apo_merge import lora

    cur_a = lora.open_adapter(src_cur)
    base = open_checkpoint(src_prev.path, src_prev.label, src_prev.trusted_root)
    lora.check_base(src_prev, base, cur_a)
    meta = _metadata(options.alpha, src_prev.card_name(options.card_paths), src_cur.card_name(options.card_paths))
    base_models = [s.hub_id for s in (src_prev, src_cur) if s.hub_id]
    side = [(src_cur.path, {lora.ADAPTER_WEIGHTS, sources.ADAPTER_CONFIG}, src_cur.trusted_root)]
    merged = options.merge_into is not None
    if merged:
        src_base = sources.resolve(options.merge_into, token=options.token)
        if os.path.realpath(src_base.path) != os.path.realpath(src_prev.path):
            raise MergeError(
                f"--merge-into {src_base.label}: with a full checkpoint as PREV the step is PREV + (1 + alpha) delta; "
                f"give PREV ({src_prev.label}) as --merge-into"
            )
        meta["apo_merge_into"] = src_prev.card_name(options.card_paths)
        side.insert(0, (base.root, base.weight_file_names, src_prev.trusted_root))
    elif options.max_shard_size is not None:
        raise MergeError("--max-shard-size applies to full weights; an adapter is written as one file")

    staged = StagedFolder(out, options.overwrite)
    with staged as tmp:
        if merged:
            res = lora.write_merged(
                lora.base_as_adapter(base, cur_a),
                cur_a,
                base,
                tmp,
                options,
                metadata=meta,
                progress=hooks.progress,
                on_plan=hooks.on_plan,
            )
            prev_digest = res.base_digest
        else:
            res = lora.write_base_step_adapter(base, cur_a, tmp, options, metadata=meta)
            if options.hash_inputs:
                prev_digest = _checkpoint_digest(base, {f.path: hashing.hash_file(f.path) for f in base.files})
            else:  # as for any full-checkpoint input: names and sizes, the Hub's SHA-256s where the cache has them
                prev_digest = _checkpoint_listing(base, src_prev)
        hashes = {"prev": prev_digest, "cur": cur_a.digest}
        kind = "merged lora" if merged else "lora adapter"
        return _finish_adapter(staged, tmp, out, side, res, hashes, (src_prev, src_cur), base_models, options, kind)


def _finish_adapter(
    staged: StagedFolder,
    tmp: Path,
    out: Path,
    side: list,
    res: Any,
    hashes: dict[str, str],
    sources_: tuple[sources.Source, sources.Source],
    base_models: list[str],
    options: MergeOptions,
    kind: str,
) -> MergeReport:
    """Copy the side files into ``tmp``, write the card, put OUT in place, and report (both LoRA paths)."""
    src_prev, src_cur = sources_
    copied, skipped = [], []
    for root, weights, trusted in side:
        c, s = _copy_side_files(root, weights, trusted, tmp)
        copied, skipped = sorted({*copied, *c}), sorted({*skipped, *s})
    info = card.CardInfo(
        alpha=options.alpha,
        prev=src_prev.card_name(options.card_paths),
        cur=src_cur.card_name(options.card_paths),
        dtype=options.dtype,
        files=res.files,
        base_models=base_models,
        input_hashes=hashes,
        **res.card,
    )
    _finish(staged, res.index, info)
    return MergeReport(
        output=out,
        device="cpu",
        n_tensors=res.n_tensors,
        n_extrapolated=res.n_changed,
        bytes_written=res.bytes_written,
        seconds=0.0,
        sha256={name: sha for name, (_, sha) in res.files.items()},
        copied_files=copied,
        skipped_files=skipped,
        input_hashes=hashes,
        kind=kind,
    )


def extrapolate_checkpoints(
    *,
    prev: str | os.PathLike,
    cur: str | os.PathLike,
    alpha: float,
    output: str | os.PathLike | None = None,
    options: MergeOptions | None = None,
    progress: Callable[[int], None] | None = None,
    **fields: Any,
) -> Path:
    """Write ``cur + alpha * (cur - prev)`` for two checkpoints and return the output folder (for several alphas
    from one read, see ``run_merges``).

    ``prev`` and ``cur`` (keyword-only: a swapped pair silently computes another model) are checkpoint folders
    (one model.safetensors, or shards with an index), Hub repo ids (``org/name`` or ``org/name@revision``; a
    local folder of that name wins), or two PEFT LoRA adapters (the output is then one exact adapter, or full
    weights with ``merge_into=BASE``). ``output`` defaults to ``<CUR>-apo<alpha>`` beside CUR. The other settings
    are the fields of ``apo_merge.options.MergeOptions``, given as keywords or as ``options`` (``alpha`` wins
    over ``options.alpha``): ``device`` ("auto" | "cpu" | "cuda"), ``dtype`` ("keep" | "bf16" | "fp16" |
    "fp32"), ``max_shard_size`` (e.g. "5GB": re-shard in HF naming; default keeps CUR's layout), ``overwrite``,
    ``on_missing`` ("error" | "copy"), ``strict`` (inf/NaN from finite inputs is an error), ``hash_inputs``
    (record the inputs' content SHA-256s in the card; they are read through SHA-256), ``merge_into``
    (LoRA only), ``token`` (Hub downloads and uploads), ``push_to_hub`` (a repo id or
    ``apo_merge.hub.PushOptions``), ``card_paths`` ("relative": the card and file metadata name a local input by
    its path as given when relative, else by its folder name; "absolute": by its absolute path; Hub inputs are
    always ``repo@commit``). ``progress`` is called with each count of bytes written.

    >>> extrapolate_checkpoints(prev="runs/round-1", cur="runs/round-2", alpha=0.3, output="runs/round-2-apo")
    ... # doctest: +SKIP
    PosixPath('runs/round-2-apo')
    """
    options = options.replace(alpha=alpha, **fields) if options is not None else MergeOptions(alpha, **fields)
    return run_merge(prev, cur, options, output, progress=progress).output


def extrapolate(
    prev: str | os.PathLike, cur: str | os.PathLike, alpha: float, output: str | os.PathLike | None = None, **fields
) -> Path:
    """Alias of ``extrapolate_checkpoints`` with positional (prev, cur, alpha, output), kept for existing code."""
    return extrapolate_checkpoints(prev=prev, cur=cur, alpha=alpha, output=output, **fields)
