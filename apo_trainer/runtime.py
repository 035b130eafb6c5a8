"""What every phase needs: the config, the accelerator, the run folder, seeding, model loading, progress bars."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from apo_kernels.dtypes import torch_dtype
from apo_trainer.config import APOConfig
from apo_trainer.store import RunStore

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from apo_trainer.oracle import Oracle, PairwiseOracle


def phase_seed(seed: int, round_index: int, phase: str, rank: int = 0) -> int:
    """A 63-bit seed derived from (seed, round, phase, process rank) alone, so resumed phases replay exactly."""
    digest = hashlib.sha256(f"apo-train:{seed}:{round_index}:{phase}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_everything(value: int) -> None:
    random.seed(value)
    torch.manual_seed(value)


def free_memory() -> None:
    """Return freed accelerator memory to the device (a full gc.collect costs ~0.2 s, so only on CUDA)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


@dataclass
class RunContext:
    """Shared state of one run; phases read the config and folder from here rather than through arguments."""

    config: APOConfig
    accelerator: Accelerator
    store: RunStore
    tokenizer: PreTrainedTokenizerBase
    prompts: list[str]
    oracle: Oracle | PairwiseOracle | None = None
    eval_prompts: list[str] = field(default_factory=list)
    quiet: bool = False
    step_offset: int = 0

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.config.dtype)

    def initial_model(self) -> str:
        """theta_0 = theta_hat_0: the configured model."""
        return self.config.model

    @property
    def inference_dtype(self) -> torch.dtype:
        """Dtype of the copy that samples: the mixed-precision dtype when one is set, else the training dtype."""
        return torch_dtype(self.config.mixed_precision) or self.dtype

    def load_policy(
        self, path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> PreTrainedModel:
        """Load a causal LM checkpoint (default: configured dtype, this process's device); a DCP folder
        (``checkpoint_format: dcp``) through its Hugging Face view (``hf_view``)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(self.hf_view(path)), dtype=dtype or self.dtype)
        return model.to(self.device if device is None else device)

    def hf_view(self, path: str | Path) -> str | Path:
        """``path`` as a Hugging Face folder (what transformers and vLLM load): itself, or for a DCP folder one
        export of it in the run folder (``.policy-hf-<id>``, the id naming the DCP folder and its .metadata
        version), reused by every process and phase that loads the same DCP folder. One export per round, not one
        per process and phase: a 70B policy is 140 GB in bf16. The first process to ask exports it while holding a
        lock on the run folder; the others wait for the lock and find it made. A view is never replaced in place
        (a process may still be reading it): a new source gets a new folder, and only the newest two are kept."""
        import fcntl

        from apo_merge.dcp import is_dcp

        if not is_dcp(path):
            return path
        stamp = _dcp_stamp(Path(path))
        view = self.store.root / f"{POLICY_VIEW}-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"
        with open(self.store.root / f"{POLICY_VIEW}.lock", "a+b") as lock:
            with contextlib.suppress(OSError):  # a file system without flock: each process checks for itself
                fcntl.flock(lock, fcntl.LOCK_EX)
            if _view_stamp(view) != stamp:
                export_policy(path, view, stamp=stamp)
                _drop_old_views(self.store.root, keep=view)
        return view

    def save_checkpoint(self, model: Any, final: Path, *, round_index: int, phase: str) -> None:
        """``checkpoint_format: dcp``: write ``model`` (the accelerate-prepared model or a plain one) as a DCP folder
        with config and tokenizer beside it; every process writes its own FSDP shards, nothing is gathered."""
        from apo_merge import shards

        holder = self.accelerator.unwrap_model(model)

        def side(tmp: Path) -> None:
            holder.config.save_pretrained(tmp)
            if getattr(holder, "generation_config", None) is not None:
                holder.generation_config.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)

        shards.save_dcp(
            holder.state_dict(),
            final,
            tmp=final.with_name(f".tmp-{final.name}-dcp"),  # one name on every process; cleared on resume
            side=side,
            commit=lambda tmp, out: self.store.commit(tmp, out, round_index=round_index, phase=phase),
        )

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Any]:
        """A rich progress bar on the main process (``advance(n)``); silent elsewhere or when quiet."""
        from rich.console import Console

        console = Console(stderr=True)
        if self.quiet or not self.is_main or total <= 0 or not console.is_terminal:
            yield _NoProgress()
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task(description, total=total)
            yield _Advance(bar, task)


class _NoProgress:
    def advance(self, n: int = 1) -> None:
        pass


class _Advance:
    def __init__(self, bar: Any, task: Any) -> None:
        self.bar, self.task = bar, task

    def advance(self, n: int = 1) -> None:
        self.bar.advance(self.task, n)


POLICY_VIEW = ".policy-hf"  # in the run folder: the Hugging Face view of the DCP policy being loaded
_VIEW_STAMP = ".apo-source"  # in a view: which DCP folder (and .metadata version) it was exported from


def _dcp_stamp(dcp_dir: Path) -> str:
    """The DCP folder's identity: its resolved path and its .metadata's size and modification time (a phase that
    writes the folder again writes a new .metadata)."""
    st = (dcp_dir / ".metadata").stat()
    return f"{dcp_dir.resolve()}\n{st.st_size} {st.st_mtime_ns}\n"


def _drop_old_views(root: Path, keep: Path) -> None:
    """Remove the policy views but ``keep`` and the newest other one (the previous round's, which a slower process
    may still be loading)."""
    import shutil

    others = sorted(
        (p for p in root.glob(f"{POLICY_VIEW}-*") if p.is_dir() and p != keep),
        key=lambda p: p.stat().st_mtime_ns,
    )
    for old in others[:-1]:
        shutil.rmtree(old, ignore_errors=True)


def _view_stamp(view: Path) -> str | None:
    try:
        return (view / _VIEW_STAMP).read_text(encoding="utf-8")
    except OSError:
        return None


def export_policy(dcp_dir: str | Path, out: Path, *, stamp: str | None = None) -> Path:
    """A DCP checkpoint written by apo-train -> a Hugging Face folder ``out`` (tensors streamed, side files copied),
    put in place only once complete (replacing an older export); ``stamp`` is recorded in it (``hf_view``)."""
    import shutil

    from apo_merge.dcp import export_hf
    from apo_merge.io.files import replace_atomically

    tmp = out.with_name(f".tmp-{out.name.lstrip('.')}-export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    export_hf(dcp_dir, tmp)
    for entry in Path(dcp_dir).iterdir():
        if entry.is_file() and not entry.name.startswith(".") and not entry.name.endswith(".distcp"):
            shutil.copyfile(entry, tmp / entry.name)
    if stamp is not None:
        (tmp / _VIEW_STAMP).write_text(stamp, encoding="utf-8")
    replace_atomically(tmp, out)
    return out


def load_tokenizer(config: APOConfig) -> PreTrainedTokenizerBase:
    """The policy's tokenizer; pads with the end-of-sequence token when it has no pad token."""
    from transformers import AutoTokenizer

    from apo_trainer.errors import ConfigError

    tok = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ConfigError(
                f"config: tokenizer of {config.tokenizer or config.model} has neither a pad nor an "
                "end-of-sequence token; set one",
                exit_code=1,
            )
        tok.pad_token = tok.eos_token
    return tok
