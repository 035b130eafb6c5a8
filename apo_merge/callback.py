"""APOCallback: the APO extrapolation step inside Hugging Face Trainer (and TRL trainer) runs.

A round is one ``Trainer.train()`` call. When a round ends (``on_train_end``) the callback copies the model's raw
weights theta_hat_{t+1}, sets the model in memory to ``theta_hat_{t+1} + alpha * (theta_hat_{t+1} - theta_hat_t)``
(fp32 math, one rounding, the same kernel as the apo-merge CLI) and keeps the raw copy as theta_hat_t of the next
round. Before the first round theta_hat_0 is the model the round starts from, unless ``prev`` names it.

Use one callback object for all rounds (pass it to each round's trainer), or ``save_raw`` / ``prev`` to carry
the raw weights between processes. APO's DPO reference in round t is theta_t, the policy the round starts from: at
the start of a round the callback compares the trainer's ``ref_model`` (TRL) with the policy and refuses a
reference that is not theta_t (TRL's ``ref_model=None`` loads ``model.config._name_or_path``: theta_0 in every
round); pass ``ref_model=copy.deepcopy(model)`` or ``precompute_ref_log_probs=True``. A ``train()`` resumed from a
checkpoint needs ``prev`` (the checkpoint is not the round's start), and one that resumes a finished round is
refused or reported.

Under FSDP2 (``fully_shard``: DTensor parameters) each rank extrapolates its own shards in place and keeps its
previous raw shards on the CPU (1/world of the model), with no gather; ``save_raw`` then writes a DCP folder (every
rank its shards) and ``prev`` may be one, saved at any world size. One process and DDP: whole tensors, as before.
FSDP1 and DeepSpeed ZeRO-3 are refused (use FSDP2, or save checkpoints and run ``apo-merge``). LoRA (PEFT) models
are refused: extrapolating their factors in place is not the APO step; save the adapters and run
``apo-merge PREV CUR``.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
import weakref
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from apo_merge import shards
from apo_merge.errors import shown
from apo_merge.state import StateMismatchError, extrapolate_state_dict_, matching_tensors, tensors_once


class APOCallback(TrainerCallback):
    """Apply the APO step ``raw + alpha * (raw - prev_raw)`` to the model at the end of every ``train()`` call.

    ``prev``: the previous round's raw weights (a checkpoint folder or a state dict); default: the weights the
    first round starts from. ``save_raw``: a folder where each round's raw weights are written (replaced every
    round, by the main process) so that the next run can pass it as ``prev``. ``check_reference=False`` lets a
    round train against a reference that is not the policy it starts from (not APO's rule).

    >>> apo = APOCallback(0.3)
    >>> for t, data in enumerate(rounds, 1):  # doctest: +SKIP
    ...     args = DPOConfig(output_dir=f"runs/round-{t}")  # one output_dir per round
    ...     DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
    ...                processing_class=tokenizer, callbacks=[apo]).train()
    """

    def __init__(
        self,
        alpha: float,
        *,
        prev: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
        save_raw: str | os.PathLike | None = None,
        check_reference: bool = True,
    ) -> None:
        self.alpha = float(alpha)
        self.save_raw = Path(save_raw) if save_raw is not None else None
        self.check_reference = check_reference
        self.rounds = 0  # finished rounds
        self._prev: dict[str, torch.Tensor] | None = None
        self._prev_source: str | os.PathLike | None = None  # a DCP folder, read at the first train() (collective)
        self._layout: dict[str, tuple] | None = None  # how the model was cut when prev was taken
        self._built_at: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # trainer -> self.rounds when built
        if isinstance(prev, Mapping):
            self._prev = {n: t.detach().to("cpu", copy=True) for n, t in prev.items()}
        elif prev is not None:
            from apo_merge.dcp import is_dcp

            if is_dcp(prev):
                self._prev_source = prev
            else:
                self._prev = _load_folder(Path(prev))

    @property
    def prev_raw(self) -> dict[str, torch.Tensor] | None:
        """theta_hat_t: the raw weights the next extrapolation starts from (CPU copies)."""
        return self._prev

    def on_init_end(self, args, state, control, **kwargs):
        trainer = _trainer_running(self)
        if trainer is not None:  # TRL precomputes reference log-probs from the policy as it is now
            self._built_at[trainer] = self.rounds

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        full = _state(model)
        live = shards.local_state(full)
        step, steps = getattr(state, "global_step", 0), getattr(state, "max_steps", 0)
        self._take_prev(full)
        if step > 0 and self._prev is None:
            # Trainer loads the checkpoint before this event: the weights are not the ones the round started from.
            raise ValueError(
                f"APOCallback: train() resumed at step {step} of {steps} and the callback has no prev, so the "
                f"round's start is unknown; pass APOCallback(prev=...) the previous round's raw weights (its "
                f"save_raw folder or last checkpoint; for round 1 the initial model)"
            )
        with _mismatch_as_callback_error():
            if self._prev is None:
                self._prev, self._layout = _raw_copy(live), shards.layout(full)
            matching_tensors(prev=self._prev, cur=live)
        if step > 0 and step >= steps:
            if _equal(self._prev, live):
                raise ValueError(
                    f"APOCallback: train() resumed from a finished checkpoint (step {step} of {steps}) that equals "
                    f"prev: this round would train nothing and take no APO step (one output_dir for every round?); "
                    f"give each round its own output_dir and resume from that round's checkpoint"
                )
            warnings.warn(
                f"APOCallback: train() resumed from a finished checkpoint (step {step} of {steps}): this round trains "
                f"0 steps and the APO step takes that checkpoint as its raw output",
                stacklevel=2,
            )
        elif step == 0 and self.check_reference:
            trainer = _trainer_running(self)
            stale = trainer is not None and self._built_at.get(trainer, self.rounds) != self.rounds
            _check_reference(trainer, live, stale)

    def _take_prev(self, full: dict[str, torch.Tensor]) -> None:
        """Put prev in the model's layout: read a DCP folder into this rank's shards, slice full tensors."""
        if self._prev_source is not None:
            self._prev = shards.load_local(self._prev_source, full)
            self._prev_source = None
        elif self._prev is not None and self._layout is None and shards.is_sharded(full):
            self._prev = shards.load_local(self._prev, full)  # full tensors given as prev: keep this rank's part
        if self._prev is not None and self._layout is None:
            self._layout = shards.layout(full)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        full = _state(model)
        live = shards.local_state(full)
        changed = shards.layout_change(self._layout or {}, shards.layout(full))
        if changed is not None:
            raise ValueError(
                f"APOCallback: the model's shards changed layout since the previous raw weights were taken "
                f"({changed}); keep one layout for the callback's rounds, or save_raw and pass that folder as prev "
                f"to a new callback"
            )
        with _mismatch_as_callback_error():
            names, _ = matching_tensors(prev=self._prev, cur=live)  # every check before anything is written
            if self.save_raw is not None and shards.is_sharded(full):
                shards.save_dcp(full, self.save_raw)  # the raw weights, every rank its shards (a collective)
            elif self.save_raw is not None and getattr(state, "is_world_process_zero", True):
                _save(model, _raw_copy(live), self.save_raw)
            prev, raw = self._prev, {}
            for n in names:  # tensor by tensor: a tensor's old prev is freed as its new raw copy is made
                raw[n] = live[n].to("cpu", copy=True)
                extrapolate_state_dict_(prev={n: prev.pop(n)}, cur={n: live[n]}, alpha=self.alpha)
        self._prev = raw
        self.rounds += 1


def _state(model: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """The model's state dict, tensors detached (in-place updates reach the model; FSDP2: DTensors); refuses LoRA,
    FSDP1 and ZeRO-3 models."""
    if model is None:
        raise ValueError("APOCallback: the trainer passed no model")
    if hasattr(model, "peft_config"):
        raise ValueError(
            "APOCallback: extrapolating a LoRA model's factors in place is not the APO step; save "
            "each round's adapter and run `apo-merge PREV CUR` (writes the exact adapter)"
        )
    state = model.state_dict(keep_vars=True)
    for t in state.values():
        if hasattr(t, "ds_id") or getattr(t, "_is_flat_param", False):
            raise ValueError(
                "APOCallback: the model is sharded by DeepSpeed ZeRO-3 or FSDP1, whose fp32 masters live apart from "
                "the parameters; use FSDP2 (fully_shard, fsdp_version: 2), or save checkpoints and run apo-merge"
            )
    return {n: t.detach() for n, t in state.items()}


def _check_reference(trainer: Trainer | None, live: dict[str, torch.Tensor], stale: bool) -> None:
    """Refuse a round whose DPO reference is not the policy it starts from (APO's reference is theta_t); ``stale``:
    the trainer was built before the previous round's APO step."""
    ref = getattr(trainer, "ref_model", None)
    fix = "pass ref_model=copy.deepcopy(model) or DPOConfig(precompute_ref_log_probs=True)"
    if ref is not None:
        ref = trainer.accelerator.unwrap_model(ref)  # a DeepSpeed engine or a wrapper: the module inside
        name = _first_difference(shards.local_state(ref.state_dict()), live)
        if name is not None:
            path = getattr(getattr(ref, "config", None), "_name_or_path", "")
            source = f"; ref_model=None makes TRL load it from {shown(path)}" if path else ""
            raise ValueError(
                f"APOCallback: the trainer's reference model is not the policy this round starts from "
                f"({name} differs{source}); APO's reference is theta_t: {fix}"
            )
    elif getattr(trainer, "precompute_ref_logps", False) and stale:
        raise ValueError(
            "APOCallback: the trainer precomputed its reference log-probs before the previous round's APO step; "
            "build each round's trainer after the previous train() returns"
        )


def _trainer_running(callback: APOCallback) -> Trainer | None:
    """The Trainer whose event is being dispatched, or None: events are not passed the trainer, so it is taken from
    the calling frames (the Trainer method that calls ``callback_handler.on_*``)."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        handler = getattr(obj, "callback_handler", None) if isinstance(obj, Trainer) else None
        if handler is not None and any(c is callback for c in handler.callbacks):
            return obj
        frame = frame.f_back
    return None


def _first_difference(ref: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor]) -> str | None:
    """The first of ``live``'s tensors that ``ref`` lacks or holds with other values (in ref's dtype), else None."""
    for name, t in live.items():
        r = ref.get(name)
        if r is None or r.shape != t.shape or not torch.equal(r, t.to(device=r.device, dtype=r.dtype)):
            return name
    return None


def _equal(prev: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor]) -> bool:
    return all(torch.equal(t, live[n].to("cpu")) for n, t in prev.items())


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
