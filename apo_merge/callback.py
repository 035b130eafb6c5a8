"""APOCallback: the APO extrapolation step inside Hugging Face Trainer (and TRL trainer) runs.

A round is one ``Trainer.train()`` call. When a round ends (``on_train_end``) the callback copies the model's raw
weights theta_hat_{t+1}, sets the model in memory to ``theta_hat_{t+1} + alpha * (theta_hat_{t+1} - theta_hat_t)``
(fp32 math, one rounding, the same kernel as the apo-merge CLI) and keeps the raw copy as theta_hat_t of the next
round. Before the first round theta_hat_0 is the model the round starts from, unless ``prev`` names it.

Use one callback object for all rounds (pass it to each round's trainer), or ``save_raw`` / ``prev`` to carry
the raw weights between processes. Needs each process to hold the full weights (one device or DDP); with FSDP or
DeepSpeed ZeRO-3 save checkpoints and run ``apo-merge`` between rounds instead. LoRA (PEFT) models are refused:
extrapolating their factors in place is not the APO step; save the adapters and run ``apo-merge PREV CUR``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback

from apo_merge.state import StateMismatchError, extrapolate_state_dict_, matching_tensors, tensors_once


class APOCallback(TrainerCallback):
    """Apply the APO step ``raw + alpha * (raw - prev_raw)`` to the model at the end of every ``train()`` call.

    ``prev``: the previous round's raw weights (a checkpoint folder or a state dict); default: the weights the
    first round starts from. ``save_raw``: a folder where each round's raw weights are written (replaced every
    round, by the main process) so that the next run can pass it as ``prev``.

    >>> apo = APOCallback(0.3)
    >>> for data in rounds:  # doctest: +SKIP
    ...     DPOTrainer(model=model, train_dataset=data, callbacks=[apo], ...).train()
    """

    def __init__(
        self,
        alpha: float,
        *,
        prev: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
        save_raw: str | os.PathLike | None = None,
    ) -> None:
        self.alpha = float(alpha)
        self.save_raw = Path(save_raw) if save_raw is not None else None
        self.rounds = 0  # finished rounds
        self._prev: dict[str, torch.Tensor] | None = None
        if isinstance(prev, Mapping):
            self._prev = {n: t.detach().to("cpu", copy=True) for n, t in prev.items()}
        elif prev is not None:
            self._prev = _load_folder(Path(prev))

    @property
    def prev_raw(self) -> dict[str, torch.Tensor] | None:
        """theta_hat_t: the raw weights the next extrapolation starts from (CPU copies)."""
        return self._prev

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        live = _state(model)
        with _mismatch_as_callback_error():
            if self._prev is None:
                self._prev = _raw_copy(live)
            matching_tensors(prev=self._prev, cur=live)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        live = _state(model)
        with _mismatch_as_callback_error():
            raw = _raw_copy(live)
            if self.save_raw is not None and getattr(state, "is_world_process_zero", True):
                _save(model, raw, self.save_raw)
            extrapolate_state_dict_(prev=self._prev, cur=live, alpha=self.alpha)
        self._prev = raw
        self.rounds += 1


def _state(model: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """The model's state dict, tensors detached (in-place updates reach the model); refuses LoRA and sharded models."""
    if model is None:
        raise ValueError("APOCallback: the trainer passed no model")
    if hasattr(model, "peft_config"):
        raise ValueError(
            "APOCallback: extrapolating a LoRA model's factors in place is not the APO step; save "
            "each round's adapter and run `apo-merge PREV CUR` (writes the exact adapter)"
        )
    state = model.state_dict(keep_vars=True)
    for t in state.values():
        if type(t).__name__ == "DTensor" or hasattr(t, "ds_id") or getattr(t, "_is_flat_param", False):
            raise ValueError(
                "APOCallback: the model is sharded (FSDP / ZeRO-3); save checkpoints and run "
                "apo-merge between rounds instead"
            )
    return {n: t.detach() for n, t in state.items()}


def _raw_copy(live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of the floating tensors, each memory once (a tied weight under its first name)."""
    names, _ = tensors_once(live)
    return {n: live[n].to("cpu", copy=True) for n in names}


@contextmanager
def _mismatch_as_callback_error():
    try:
        yield
    except StateMismatchError as e:
        if e.kind == "names":
            raise ValueError(
                f"APOCallback: the previous raw weights and the model differ in tensor names "
                f"({', '.join(e.names[:5])}); pass the checkpoint of the same model as prev"
            ) from None
        raise ValueError(f"APOCallback: {e}") from None


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from apo_merge.io.checkpoint import open_checkpoint

    ckpt = open_checkpoint(folder)
    out: dict[str, torch.Tensor] = {}
    for f in ckpt.files:
        out.update(load_file(f.path))
    return out


def _save(model: torch.nn.Module, raw: dict[str, torch.Tensor], folder: Path) -> None:
    """Write the raw weights as a checkpoint folder, replacing ``folder`` only once complete."""
    from safetensors.torch import save_file

    from apo_merge.io.files import replace_atomically

    tmp = folder.parent / f".{folder.name}.apo-raw-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(tmp, state_dict=dict(raw))  # it edits the dict it is given
    else:
        save_file(raw, tmp / "model.safetensors", metadata={"format": "pt"})
    replace_atomically(tmp, folder)  # a crash leaves the old raw weights or the new, never neither
