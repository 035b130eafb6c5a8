"""One adapter job: two LoRA adapters (PREV, CUR), or a full checkpoint as PREV and an adapter over it as CUR,
written as one adapter or, with ``--merge-into BASE``, as full weights. The checkpoint path's skeleton: every check
before any work, the output written into a staged folder, side files and card, put in place, one report."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from apo_merge import card, sources
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
from apo_merge.io.checkpoint import Checkpoint, open_checkpoint
from apo_merge.io.output import StagedFolder
from apo_merge.options import MergeOptions

if TYPE_CHECKING:
    from apo_merge.lora.read import Adapter
    from apo_merge.lora.write import Output, Written
    from apo_merge.plan import Layout

Side = tuple[Path, set[str], Path]  # a folder whose side files the output gets: (root, its weight files, trusted root)


@dataclass
class _Inputs:
    """What the job opened and checked before writing anything."""

    cur: Adapter
    prev: Adapter | None  # None: PREV is the full checkpoint ``base``
    base: Checkpoint | None  # the full PREV, or --merge-into's BASE
    base_src: sources.Source | None
    metadata: dict[str, str]  # what every weight file records
    side: list[Side]  # BASE's side files first when merging into it, then CUR's, whose tokenizer wins
    base_models: list[str]  # Hub ids the card names as base models


@dataclass(frozen=True)
class AdapterJob:
    """PREV and CUR (at least one an adapter) and one output, as ``run_merges`` resolved them."""

    prev: sources.Source
    cur: sources.Source
    out: Path
    options: MergeOptions

    def run(
        self, progress: Callable[[int], None] | None = None, on_plan: Callable[[Layout], None] | None = None
    ) -> MergeReport:
        """Check, write and put the output in place; ``progress`` and ``on_plan`` as for ``run_merges``."""
        if len(self.options.alphas) > 1:
            raise usage_error("several alphas apply to full checkpoints; for LoRA adapters run one --alpha at a time")
        if not self.cur.is_adapter:
            raise MergeError(
                f"{self.cur.label}: is a full checkpoint but PREV {self.prev.label} is a LoRA adapter; give two "
                "adapters, or merge the adapter into its base first"
            )
        from apo_merge.shell import import_torch

        import_torch()  # before the LoRA modules import it: Ctrl-C held while torch starts
        from apo_merge.lora.write import Output

        inputs = self._open_pair() if self.prev.is_adapter else self._open_over_base()
        if self.options.merge_into is None and self.options.max_shard_size is not None:
            raise MergeError("--max-shard-size applies to full weights; an adapter is written as one file")
        staged = StagedFolder(self.out, self.options.overwrite)
        with staged as tmp:
            written = _write(inputs, Output(tmp, self.options, inputs.metadata, progress, on_plan))
            return self._finish(staged, inputs, written)

    def _start(self, cur: Adapter) -> _Inputs:
        """What every adapter output records: the weight files' metadata, CUR's side files, the Hub base models."""
        from apo_merge.lora.read import ADAPTER_WEIGHTS

        o = self.options
        metadata = file_metadata(o.alpha, self.prev.card_name(o.card_paths), self.cur.card_name(o.card_paths))
        side = [(self.cur.path, {ADAPTER_WEIGHTS, sources.ADAPTER_CONFIG}, self.cur.trusted_root)]
        base_models = [s.hub_id for s in (self.prev, self.cur) if s.hub_id]
        return _Inputs(cur, None, None, None, metadata, side, base_models)

    def _open_pair(self) -> _Inputs:
        """Two adapters; with --merge-into, BASE must be the base they record (the full-PREV rule)."""
        from apo_merge.lora.read import check_recorded_base, open_adapter

        prev = open_adapter(self.prev)
        inputs = self._start(open_adapter(self.cur))
        inputs.prev = prev
        if self.options.merge_into is not None:
            src = sources.resolve(self.options.merge_into, token=self.options.token)
            if src.is_adapter:
                raise MergeError(f"--merge-into {src.label}: is an adapter; give the base model")
            check_output(self.out, [src], self.options.overwrite)  # BASE is an input too: never written or replaced
            check_recorded_base(inputs.cur, src, "--merge-into")
            self._add_base(inputs, open_checkpoint(src.path, src.label, src.trusted_root), src)
            inputs.base_models += [src.hub_id] if src.hub_id else []
        return inputs

    def _open_over_base(self) -> _Inputs:
        """PREV a full checkpoint (theta_hat_t), CUR an adapter over it (theta_hat_{t+1} = PREV + delta): the step
        PREV + (1 + alpha) delta, as an adapter over PREV, or as full weights with --merge-into (which must be PREV)."""
        from apo_merge.lora.read import check_base, open_adapter

        inputs = self._start(open_adapter(self.cur))
        base = open_checkpoint(self.prev.path, self.prev.label, self.prev.trusted_root)
        check_base(self.prev, base, inputs.cur)
        inputs.base, inputs.base_src = base, self.prev
        if self.options.merge_into is not None:
            src = sources.resolve(self.options.merge_into, token=self.options.token)
            if os.path.realpath(src.path) != os.path.realpath(self.prev.path):
                raise MergeError(
                    f"--merge-into {src.label}: with a full checkpoint as PREV the step is PREV + (1 + alpha) delta; "
                    f"give PREV ({self.prev.label}) as --merge-into"
                )
            self._add_base(inputs, base, self.prev)
        return inputs

    def _add_base(self, inputs: _Inputs, base: Checkpoint, src: sources.Source) -> None:
        """The output is BASE + the step as full weights: BASE's layout, and its side files under CUR's."""
        inputs.base, inputs.base_src = base, src
        inputs.metadata["apo_merge_into"] = src.card_name(self.options.card_paths)
        inputs.side.insert(0, (base.root, base.weight_file_names, src.trusted_root))

    def _base_digest(self, inputs: _Inputs, written: Written) -> hashing.InputDigest:
        """BASE (or the full PREV) as any full-checkpoint input: content hashes with --hash-inputs (read on the way
        when the output streamed it), else names and sizes, with the Hub's SHA-256s where the cache has them."""
        base = inputs.base
        if not self.options.hash_inputs:
            return checkpoint_listing(base, inputs.base_src)
        hashes = written.base_hashes or {f.path: hashing.hash_file(f.path) for f in base.files}
        return checkpoint_digest(base, hashes)

    def _finish(self, staged: StagedFolder, inputs: _Inputs, written: Written) -> MergeReport:
        """Copy the side files, write the card, put OUT in place, and report."""
        o = self.options
        prev_digest = inputs.prev.digest if inputs.prev is not None else self._base_digest(inputs, written)
        hashes = {"prev": prev_digest, "cur": inputs.cur.digest}
        if inputs.prev is not None and inputs.base is not None:
            hashes["base"] = self._base_digest(inputs, written)
        copied, skipped = set(), set()
        for root, weights, trusted in inputs.side:
            c, s = copy_side_files(root, weights, trusted, staged.tmp)
            copied, skipped = copied | set(c), skipped | set(s)
        info = card.CardInfo(
            alpha=o.alpha,
            prev=self.prev.card_name(o.card_paths),
            cur=self.cur.card_name(o.card_paths),
            dtype=o.dtype,
            files=written.files,
            base_models=inputs.base_models,
            input_hashes=hashes,
            output_hash=o.output_hash,
            **written.card,
        )
        write_card(staged.tmp, staged.out, written.index, info)
        staged.commit()
        return MergeReport(
            output=self.out,
            device="cpu",
            n_tensors=written.n_tensors,
            n_extrapolated=written.n_changed,
            bytes_written=written.bytes_written,
            seconds=0.0,
            digests={name: sha for name, (_, sha) in written.files.items()},
            output_hash=o.output_hash,
            copied_files=sorted(copied),
            skipped_files=sorted(skipped),
            input_hashes=hashes,
            kind="lora adapter" if o.merge_into is None else "merged lora",
        )


def _write(inputs: _Inputs, out: Output) -> Written:
    """The step written as full weights over BASE (--merge-into), as an adapter over BASE, or as one adapter."""
    from apo_merge.lora import step, write

    if out.options.merge_into is not None:
        prev = inputs.prev if inputs.prev is not None else step.base_as_adapter(inputs.base, inputs.cur)
        return write.write_merged(prev, inputs.cur, inputs.base, out)
    if inputs.prev is None:
        return write.write_base_step_adapter(inputs.base, inputs.cur, out)
    return write.write_adapter(inputs.prev, inputs.cur, out)
