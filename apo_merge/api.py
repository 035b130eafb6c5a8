"""The Python API: ``extrapolate_checkpoints(prev=, cur=, alpha=, output=)`` -> the output folder, ``run_merge``
-> a report, and ``run_merges`` -> one report per alpha (several alphas from one read). The CLI calls the same
code."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apo_merge import card, dcp, lora, sources
from apo_merge.errors import MergeError, usage_error
from apo_merge.finish import (
    MergeReport,
    check_output,
    checkpoint_digest,
    checkpoint_listing,
    copy_side_files,
    file_metadata,
    write_card,
)
from apo_merge.io import hashing
from apo_merge.io.checkpoint import open_checkpoint
from apo_merge.io.files import remove
from apo_merge.io.output import StagedFolder
from apo_merge.options import MergeOptions
from apo_merge.plan import Layout, make_plan
from apo_merge.quant import layout as quant
from apo_merge.quant import quantize

if TYPE_CHECKING:
    from apo_merge.engine import Kernel
    from apo_merge.io.prefetch import Prefetcher


def default_output(cur: sources.Source, alpha: float) -> Path:
    """``<CUR name>-apo<alpha>`` beside CUR (in the working folder when CUR came from the Hub)."""
    name = f"{(cur.hub_id or cur.path.resolve().name).split('/')[-1]}-apo{alpha:g}"
    return Path(name) if cur.hub_id else cur.path.resolve().parent / name


PUSH_ONE = "--push-to-hub uploads one output; give one --alpha, or push each output with apo-merge push"


def output_paths(cur: sources.Source, alphas: tuple[float, ...], output: str | os.PathLike | None) -> list[Path]:
    """One output folder per alpha: ``default_output``, or ``output`` with ``{alpha}`` replaced by each alpha.

    Checked before any read: each name is UTF-8 (the card and the Hub name the folder), and no two alphas land in
    one folder, compared as the folders the paths resolve to ('..' and symlinked parents resolved).
    """
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
    landed: dict[str, int] = {}
    for i, out in enumerate(outs):
        _check_utf8(out)
        where = _landing(out)
        if where in landed and outs[landed[where]] == out:
            raise usage_error(
                f"alphas {alphas[landed[where]]!r} and {alphas[i]!r} both give output {out}; "
                "give alphas that differ in the first 6 digits"
            )
        if where in landed:
            raise usage_error(
                f"-o {output} gives alphas {alphas[landed[where]]!r} and {alphas[i]!r} one folder, {where} (after "
                "resolving '..' and symlinks); put {alpha} in the output folder's own name, e.g. -o runs/apo{alpha}"
            )
        landed[where] = i
    return outs


def _landing(out: Path) -> str:
    """The folder ``out`` is written as: its parent resolved ('..', symlinks), then its own name."""
    if out.name in ("", ".", ".."):
        return os.path.realpath(out)
    return os.path.join(os.path.realpath(out.parent), out.name)


def _check_utf8(out: Path) -> None:
    try:
        os.fspath(out).encode("utf-8")
    except UnicodeEncodeError:
        shown_name = os.fsencode(out).decode("utf-8", "backslashreplace")
        raise usage_error(
            f"output {shown_name}: the name holds bytes that are not UTF-8, which the model card and the Hub cannot "
            "name; choose a UTF-8 name"
        ) from None


@dataclass(frozen=True)
class Hooks:
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
    hooks: Hooks | None = None,
) -> MergeReport:
    """Merge (and push, if ``options.push_to_hub``) and return a report; see ``extrapolate_checkpoints``."""
    if isinstance(options, MergeOptions) and len(options.alphas) > 1:
        raise usage_error(f"run_merge makes one output but {len(options.alphas)} alphas were given; use run_merges")
    return run_merges(prev, cur, options, output, hooks=hooks)[0]


def run_merges(
    prev: str | os.PathLike,
    cur: str | os.PathLike,
    options: MergeOptions,
    output: str | os.PathLike | None = None,
    *,
    hooks: Hooks | None = None,
) -> list[MergeReport]:
    """One output per alpha of ``options.alphas``, all from one read of PREV and CUR; a report for each.

    ``output`` may contain ``{alpha}`` (replaced by each alpha as ``f"{alpha:g}"``); without it, several alphas
    need ``output=None`` (each goes to ``<CUR>-apo<alpha>`` beside CUR). Each output is complete, atomic and
    carded as if made alone, and holds the same bytes as a run with that alpha alone. The outputs are put in
    place only once all are written and fsynced: any failure before that leaves none of them; if putting one in
    place fails (something appeared at its OUT meanwhile), those this call already put in place are removed
    again, except ones that replaced an earlier output under ``overwrite`` (that earlier output is gone).
    ``hooks`` (``Hooks``) gives callbacks: ``progress`` with each count of bytes written, ``on_plan`` once per
    output; and resources: a torch ``kernel`` for the engine, the CLI's ``prefetcher``. Several alphas apply to full checkpoints only, without
    ``push_to_hub``.
    """
    if not isinstance(options, MergeOptions):
        raise TypeError(f"run_merge takes a MergeOptions (e.g. MergeOptions(alpha=0.3)), not {type(options).__name__}")
    if dcp.is_dcp(prev) or dcp.is_dcp(cur):  # torch DCP folders: apo_merge.dcp
        if options.quantize != "none":
            raise usage_error(f"--quantize {options.quantize} does not apply to torch DCP checkpoints; drop it")
        hooks = hooks or Hooks()
        return dcp.run_merges(prev, cur, options, output, progress=hooks.progress, prefetcher=hooks.prefetcher)
    t0 = time.perf_counter()
    hooks = hooks or Hooks()
    several = len(options.alphas) > 1
    if several and options.push_to_hub is not None:
        raise usage_error(PUSH_ONE)
    src_prev, src_cur = sources.resolve(prev, token=options.token), sources.resolve(cur, token=options.token)
    outs = output_paths(src_cur, options.alphas, output)
    for out in outs:
        check_output(out, [src_prev, src_cur], options.overwrite)
    if (src_prev.is_adapter or src_cur.is_adapter) and options.quantize != "none":
        raise MergeError(f"--quantize {options.quantize} applies to full checkpoints, not LoRA adapters; drop it")
    if src_prev.is_adapter or src_cur.is_adapter:
        reports = [lora.AdapterJob(src_prev, src_cur, outs[0], options).run(hooks.progress, hooks.on_plan)]
    elif options.merge_into is not None:
        raise MergeError("--merge-into applies to LoRA adapters, but PREV and CUR are full checkpoints; drop it")
    else:
        reports = _merge_checkpoints(src_prev, src_cur, outs, options, hooks)
    for report in reports:
        report.seconds = time.perf_counter() - t0
    if options.push_to_hub is not None:
        from apo_merge import hub

        reports[0].pushed = hub.push(outs[0], options.push_to_hub, token=options.token)
    return reports


def _quant_output(tmp: Path, plan, stats) -> tuple[list[tuple[str, str]], str]:
    """An output's config.json made to say what its weights are, and the card's rows (and notes) on what was read
    dequantized, renamed or written back in FP8."""
    rows, notes = quant.card_rows(plan.dequantized), ""
    rows += [("prev MoE names", plan.renamed)] if plan.renamed else []
    if plan.quantize is not None:  # FP8 again: the config says so (CUR's as copied, else PREV's)
        if plan.quantize.side == "PREV":
            quantize.write_config(tmp, plan.quantize.config)
        rows, notes = quantize.card_rows(rows, plan.quantize, stats.quant_errors)
    elif "CUR" in plan.dequantized:  # the output's weights are not quantized: its config must not say so
        quant.strip_config(tmp)
    return rows, notes


def _merge_checkpoints(
    src_prev: sources.Source, src_cur: sources.Source, outs: list[Path], options: MergeOptions, hooks: Hooks
) -> list[MergeReport]:
    from apo_merge.engine import Hooks, execute_many, resolve_device

    options = options.replace(device=resolve_device(options.device))
    ckpt_prev = open_checkpoint(src_prev.path, src_prev.label, src_prev.trusted_root)
    ckpt_cur = open_checkpoint(src_cur.path, src_cur.label, src_cur.trusted_root)
    prev_name, cur_name = src_prev.card_name(options.card_paths), src_cur.card_name(options.card_paths)
    each = [options.replace(alpha=a) for a in options.alphas]
    plans = [make_plan(ckpt_prev, ckpt_cur, o, metadata=file_metadata(o.alpha, prev_name, cur_name)) for o in each]
    if hooks.on_plan:
        for plan in plans:
            hooks.on_plan(plan)

    hash_inputs = options.hash_inputs
    staged = [StagedFolder(out, options.overwrite) for out in outs]
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(s) for s in staged]
        hasher = stack.enter_context(hashing.StreamHasher(*((ckpt_prev.files, ckpt_cur.files) if hash_inputs else ())))
        on_read = hasher.update if hash_inputs else None
        engine_hooks = Hooks(
            kernel=hooks.kernel,
            prefetcher=hooks.prefetcher,
            progress=hooks.progress,
            on_read=on_read,
            output_hash=options.output_hash,
        )
        stats = execute_many(plans, tmps, options.device, engine_hooks)
        for o, st in zip(each, stats):
            if options.strict and st.new_nonfinite:
                raise MergeError(
                    f"{st.new_nonfinite} output values are inf or NaN although both inputs were "
                    f"finite (--strict{f', alpha {o.alpha!r}' if len(each) > 1 else ''}); lower --alpha or use "
                    "--dtype fp32"
                )
        if hash_inputs:
            hashes = hasher.finish()
            input_hashes = {"prev": checkpoint_digest(ckpt_prev, hashes), "cur": checkpoint_digest(ckpt_cur, hashes)}
        else:
            input_hashes = {
                "prev": checkpoint_listing(ckpt_prev, src_prev),
                "cur": checkpoint_listing(ckpt_cur, src_cur),
            }
        reports = []
        for o, plan, st, tmp, out in zip(each, plans, stats, tmps, outs):
            copied, skipped = copy_side_files(ckpt_cur.root, ckpt_cur.weight_file_names, src_cur.trusted_root, tmp)
            rows, notes = _quant_output(tmp, plan, st)
            info = card.CardInfo(
                alpha=o.alpha,
                prev=prev_name,
                cur=cur_name,
                dtype=options.dtype,
                files={f.name: (f.size, st.digests[f.name]) for f in plan.files},
                output_hash=options.output_hash,
                base_models=[s.hub_id for s in (src_prev, src_cur) if s.hub_id],
                input_hashes=input_hashes,
                rows=rows,
                notes=notes,
            )
            write_card(tmp, out, plan.index, info)
            reports.append(
                MergeReport(
                    output=out,
                    device=options.device,
                    n_tensors=plan.n_tensors,
                    n_extrapolated=plan.n_extrapolated,
                    bytes_written=st.bytes_written,
                    seconds=0.0,
                    digests=st.digests,
                    output_hash=options.output_hash,
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


def extrapolate_checkpoints(
    *,
    prev: str | os.PathLike,
    cur: str | os.PathLike,
    alpha: float,
    output: str | os.PathLike | None = None,
    options: MergeOptions | None = None,
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
    always ``repo@commit``). For progress callbacks, see ``run_merge``'s ``hooks``.

    >>> extrapolate_checkpoints(prev="runs/round-1", cur="runs/round-2", alpha=0.3, output="runs/round-2-apo")
    ... # doctest: +SKIP
    PosixPath('runs/round-2-apo')
    """
    options = options.replace(alpha=alpha, **fields) if options is not None else MergeOptions(alpha, **fields)
    return run_merge(prev, cur, options, output).output


def extrapolate(*args: Any, **kwargs: Any) -> Path:
    """The former name of ``extrapolate_checkpoints``, kept for existing code: keyword arguments only."""
    if args:  # positional prev and cur are easily swapped, and a swap gives a wrong model without an error
        raise TypeError(
            "apo_merge.extrapolate takes keyword arguments only, so that prev and cur cannot be swapped: "
            "call extrapolate_checkpoints(prev=..., cur=..., alpha=..., output=...)"
        )
    return extrapolate_checkpoints(**kwargs)
