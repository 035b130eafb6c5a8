"""APOCallback inside TRL's DPOTrainer rounds, as users run it: the reference is theta_t in every round (first-step
DPO loss ln 2), the APO step extrapolates between raw outputs bit for bit, and resumed rounds never take a
checkpoint as the round's start.

Needs trl (in the dev extra); skipped without it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("trl")
pytestmark = pytest.mark.slow  # ~1 s per DPOTrainer round on a quiet CPU

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOTrainer  # noqa: E402

from apo_merge import APOCallback, extrapolate_state_dict  # noqa: E402
from tests.merge.trl_tiny import dpo_args, make_policy, pairs, raw_weights  # noqa: E402

ALPHA = 0.3
LN2 = math.log(2)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Trainer leaves accelerate's process-wide state (device, mixed precision) behind; later tests build their own."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def theta0(tmp_path_factory):
    return make_policy(tmp_path_factory.mktemp("trl") / "theta0")


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def _trainer(model, tok, apo, args, seed: int, ref="copy") -> DPOTrainer:
    ref_model = copy.deepcopy(model) if ref == "copy" else ref
    callbacks = [apo] if apo is not None else []
    return DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=pairs(seed),
        processing_class=tok,
        callbacks=callbacks,
    )


def _first_loss(trainer: DPOTrainer) -> float:
    return next(e["loss"] for e in trainer.state.log_history if "loss" in e)


def _assert_bitwise(model, want: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    for name, t in want.items():
        assert torch.equal(state[name].cpu().view(torch.int32), t.view(torch.int32)), name


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def test_three_rounds_train_against_theta_t_and_step_between_raw_outputs(theta0, tmp_path):
    model, tok = _load(theta0)
    apo = APOCallback(ALPHA, save_raw=tmp_path / "raw")
    prev = raw_weights(theta0)  # theta_hat_0 = theta_0
    losses = []
    for t in (1, 2, 3):
        out = tmp_path / f"round-{t}"
        trainer = _trainer(model, tok, apo, dpo_args(out, save_strategy="steps", save_steps=100), seed=t)
        trainer.train()
        losses.append(_first_loss(trainer))
        raw = raw_weights(tmp_path / "raw")
        assert not torch.equal(raw["model.norm.weight"], prev["model.norm.weight"])  # the round trained
        _assert_bitwise(model, extrapolate_state_dict(prev=prev, cur=raw, alpha=ALPHA))
        # The round's last checkpoint holds the raw weights; save_model() after train() the extrapolated ones.
        _assert_bitwise(AutoModelForCausalLM.from_pretrained(out / "checkpoint-2"), raw)
        trainer.save_model(tmp_path / f"apo-{t}")
        _assert_bitwise(model, raw_weights(tmp_path / f"apo-{t}"))
        prev = raw
    assert losses == pytest.approx([LN2] * 3, abs=1e-6)  # policy == reference at the first step of every round
    assert apo.rounds == 3


def test_ref_model_none_reloads_theta_0_and_is_refused(theta0, tmp_path):
    """TRL builds ref_model=None from model.config._name_or_path: theta_0 in every round, not theta_t."""
    model, tok = _load(theta0)
    apo = APOCallback(ALPHA)
    first = _trainer(model, tok, apo, dpo_args(tmp_path / "round-1"), seed=1, ref=None)
    first.train()
    assert _first_loss(first) == pytest.approx(LN2, abs=1e-6)  # round 1: theta_0 is theta_t
    theta1 = _snapshot(model)
    with pytest.raises(ValueError, match=r"reference model is not the policy this round starts from .*theta0'\)"):
        _trainer(model, tok, apo, dpo_args(tmp_path / "round-2"), seed=2, ref=None).train()
    _assert_bitwise(model, theta1)  # refused before any step
    assert apo.rounds == 1

    apo.check_reference = False  # what the documented loop used to do: the reference is theta_0
    second = _trainer(model, tok, apo, dpo_args(tmp_path / "round-2b"), seed=2, ref=None)
    second.train()
    assert abs(_first_loss(second) - LN2) > 1e-3


def test_precomputed_reference_log_probs_come_from_theta_t(theta0, tmp_path):
    model, tok = _load(theta0)
    apo = APOCallback(ALPHA)
    losses = []
    for t in (1, 2, 3):
        trainer = _trainer(model, tok, apo, dpo_args(tmp_path / f"round-{t}", precompute_ref_log_probs=True), t, None)
        trainer.train()
        losses.append(_first_loss(trainer))
    # TRL's precompute pass and its training forward differ by ~1e-5 in the loss after the first round (the same
    # weights: a wrong reference is off by more than 1e-3 here).
    assert losses == pytest.approx([LN2] * 3, abs=2e-4)

    # A trainer built before the previous round's APO step holds log-probs of the old policy.
    early = _trainer(model, tok, apo, dpo_args(tmp_path / "early", precompute_ref_log_probs=True), 5, None)
    _trainer(model, tok, apo, dpo_args(tmp_path / "round-4"), seed=4).train()
    with pytest.raises(ValueError, match="precomputed its reference log-probs before the previous round's APO"):
        early.train()


def test_resuming_mid_round_needs_prev(theta0, tmp_path):
    out = tmp_path / "round-1"
    args = dpo_args(out, max_steps=3, save_strategy="steps", save_steps=1)
    model, tok = _load(theta0)
    _trainer(model, tok, None, args, seed=1).train()  # the run that "crashed" after checkpoint-2

    model, tok = _load(theta0)  # a new process: a fresh callback knows nothing of the round's start
    with pytest.raises(ValueError, match=r"resumed at step 2 of 3 and the callback has no prev"):
        _trainer(model, tok, APOCallback(ALPHA), args, seed=1).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    _assert_bitwise(model, raw_weights(out / "checkpoint-2"))  # loaded, not extrapolated

    model, tok = _load(theta0)
    apo = APOCallback(ALPHA, prev=theta0)
    _trainer(model, tok, apo, args, seed=1).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    raw = raw_weights(out / "checkpoint-3")  # rewritten by the resumed run: its raw output
    _assert_bitwise(model, extrapolate_state_dict(prev=raw_weights(theta0), cur=raw, alpha=ALPHA))


def test_resuming_a_finished_round(theta0, tmp_path):
    shared = tmp_path / "run"  # one output_dir for every round: the mistake the docs warn about
    model, tok = _load(theta0)
    apo = APOCallback(ALPHA, save_raw=tmp_path / "raw")
    trainer = _trainer(model, tok, apo, dpo_args(shared, save_strategy="steps", save_steps=100), seed=1)
    trainer.train()
    trainer.save_model(tmp_path / "apo-1")
    raw1 = raw_weights(tmp_path / "raw")

    # Round 2 crashed; a new process resumes it with resume_from_checkpoint=True, which finds round 1's checkpoint.
    model, tok = _load(tmp_path / "apo-1")
    apo = APOCallback(ALPHA, prev=tmp_path / "raw")
    trainer = _trainer(model, tok, apo, dpo_args(shared, save_strategy="steps", save_steps=100), seed=2)
    with pytest.raises(ValueError, match=r"finished checkpoint \(step 2 of 2\) that equals prev"):
        trainer.train(resume_from_checkpoint=True)
    _assert_bitwise(model, raw1)  # not set to raw_1 + 0.3 * 0 silently: no APO step was taken
    assert apo.rounds == 0

    # Round 1 died between its last checkpoint and the APO step: resuming trains 0 steps, says so, and steps.
    model, tok = _load(theta0)
    apo = APOCallback(ALPHA, prev=theta0)
    trainer = _trainer(model, tok, apo, dpo_args(shared, save_strategy="steps", save_steps=100), seed=1)
    with pytest.warns(UserWarning, match=r"finished checkpoint \(step 2 of 2\): this round trains 0 steps"):
        trainer.train(resume_from_checkpoint=str(shared / "checkpoint-2"))
    _assert_bitwise(model, raw_weights(tmp_path / "apo-1"))
