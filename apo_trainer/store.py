"""The run folder on disk: where each phase's result lives, atomic writes, phase-done markers, the run lock.

Layout of OUTPUT (``config.output_dir``)::

    config.yaml                 the config the run started with (a resume with other values is refused)
    metrics.jsonl               one record per round (rewritten after each round)
    round-<t>/samples.jsonl     sample:      K responses per prompt from theta_t (token ids and text)
    round-<t>/scores.json       judge:       K x K preference matrix, win rates p and (scalar oracle) scores
    round-<t>/logprobs.safetensors reference: log pi_theta_t and log pi_theta_0 of every response
    round-<t>/pairs.jsonl       data:        (chosen, rejected) per kept prompt, with win-rates p
    round-<t>/trained/          train:       theta_hat_{t+1} (HF layout, safetensors), train_log.jsonl beside it
    round-<t>/adapter/          train:       the round's LoRA adapter (peft config only), merged into trained/
    round-<t>/policy/           extrapolate: theta_{t+1} = theta_hat_{t+1} + alpha (theta_hat_{t+1} - theta_hat_t)
    round-<t>/done/<phase>.json marker written last, holding the phase's summary and seconds
    eval/                       apo-train eval: the same layout for the held-out evaluation (evaluation.py)

A result is written under a temporary name and put in place in one step (``replace_atomically``: a crash leaves
the old or the new result, never neither); the marker follows. A phase whose marker is
missing is redone from scratch on the next run, so a crash (even SIGKILL) loses at most the phase in flight.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from apo_merge.io.files import replace_atomically
from apo_trainer.errors import TrainError

PHASES = ("sample", "judge", "reference", "data", "train", "extrapolate")
_TMP_PREFIX = ".tmp-"

# Test seam: when set, called as ``fault_hook(round_index, phase, where)`` at each fault point, so that tests can
# fail there on purpose. ``where`` is "mid" (just before a phase result is put in place; temporary files exist)
# or "end" (after the result is in place, before the done marker).
fault_hook: Callable[[int, str, str], None] | None = None


def _fault_point(round_index: int, phase: str, where: str) -> None:
    if fault_hook is not None:
        fault_hook(round_index, phase, where)


class RunStore:
    """Paths and atomic commits for one run folder. Only the main process writes."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ---------------------------------------------------------------- paths
    def round_dir(self, t: int) -> Path:
        return self.root / f"round-{t}"

    def samples(self, t: int) -> Path:
        return self.round_dir(t) / "samples.jsonl"

    def scores(self, t: int) -> Path:
        return self.round_dir(t) / "scores.json"

    def logprobs(self, t: int) -> Path:
        return self.round_dir(t) / "logprobs.safetensors"

    def pairs(self, t: int) -> Path:
        return self.round_dir(t) / "pairs.jsonl"

    def trained(self, t: int) -> Path:
        """theta_hat_{t+1}: the raw output of round t's training."""
        return self.round_dir(t) / "trained"

    def adapter(self, t: int) -> Path:
        """The LoRA adapter of round t's training (LoRA rounds only); theta_hat_{t+1} is theta_t merged with it."""
        return self.round_dir(t) / "adapter"

    def policy(self, t: int) -> Path:
        """theta_{t+1}: the extrapolated policy that samples round t+1."""
        return self.round_dir(t) / "policy"

    def marker(self, t: int, phase: str) -> Path:
        return self.round_dir(t) / "done" / f"{phase}.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    # ---------------------------------------------------------------- markers
    def done(self, t: int, phase: str) -> dict[str, Any] | None:
        """The phase's recorded summary if it finished, else None."""
        m = self.marker(t, phase)
        if not m.is_file():
            return None
        return json.loads(m.read_text(encoding="utf-8"))

    def mark_done(self, t: int, phase: str, summary: dict[str, Any]) -> None:
        _fault_point(t, phase, "end")
        self.write_text(self.marker(t, phase), dumps(summary, self.marker(t, phase), sort_keys=True) + "\n")

    def clear_markers(self, t: int, phases: tuple[str, ...]) -> None:
        """Forget that these phases of round ``t`` finished, so the next run redoes them (results are replaced)."""
        for phase in phases:
            self.marker(t, phase).unlink(missing_ok=True)

    # ---------------------------------------------------------------- atomic writes
    def tmp_path(self, final: Path) -> Path:
        return final.with_name(f"{_TMP_PREFIX}{final.name}-{os.getpid()}")

    def commit(self, tmp: Path, final: Path, *, round_index: int | None = None, phase: str | None = None) -> None:
        """Put a finished temporary file or folder in place in one step (fsynced first), replacing a stale result."""
        if round_index is not None and phase is not None:
            _fault_point(round_index, phase, "mid")
        replace_atomically(tmp, final)

    def write_text(self, final: Path, text: str, *, round_index: int | None = None, phase: str | None = None) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_path(final)
        tmp.write_text(text, encoding="utf-8")
        self.commit(tmp, final, round_index=round_index, phase=phase)

    def write_jsonl(self, final: Path, rows: list[dict[str, Any]], **kw: Any) -> None:
        self.write_text(final, "".join(dumps(r, final) + "\n" for r in rows), **kw)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete temporary files and folders left by crashed runs (names starting with ``.tmp-``)."""
        removed = []
        for p in [
            *self.root.glob(f"{_TMP_PREFIX}*"),
            *self.root.glob(f"round-*/{_TMP_PREFIX}*"),
            *self.root.glob(f"round-*/done/{_TMP_PREFIX}*"),
        ]:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        return removed

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the run folder so two runs never write it at once."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TrainError(
                    f"another apo-train run is using {self.root}; wait for it or pick another output_dir"
                ) from None
            yield


def dumps(value: Any, path: Path, **kw: Any) -> str:
    """``value`` as strict JSON for ``path``: NaN and inf have no JSON spelling (Python's ``NaN`` is not JSON that
    other readers accept), so a non-finite number is refused here rather than written."""
    try:
        return json.dumps(value, allow_nan=False, **kw)
    except ValueError:
        raise TrainError(
            f"{path}: refusing to write a non-finite number (NaN or inf) into a JSON file; the values that led to "
            "it are wrong (a judge or a setting), fix them and rerun the same command"
        ) from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file written by the store."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
