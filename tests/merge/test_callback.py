"""APOCallback inside transformers.Trainer rounds reproduces the apo-merge CLI bit for bit."""

from __future__ import annotations

import copy
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments
from typer.testing import CliRunner

import apo_merge
from apo_merge import APOCallback, cli
from tests.checkpoints import make_model

ALPHA = 0.3


class _Data(torch.utils.data.Dataset):
    def __init__(self, seed: int) -> None:
        self.ids = torch.randint(0, 128, (8, 10), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train_round(model, apo, out_dir, seed: int, use_cpu: bool = True, trainer=Trainer, **extra) -> None:
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=use_cpu,
        disable_tqdm=True,
        logging_strategy="no",
        seed=seed,
    )
    trainer(model=model, args=args, train_dataset=_Data(seed), callbacks=[apo], **extra).train()


class _RefTrainer(Trainer):
    """A Trainer with a DPO-style reference model, as TRL's trainers hold one in ``ref_model``."""

    def __init__(self, ref_model, **kwargs):
        super().__init__(**kwargs)
        self.ref_model = ref_model


def _cli_merge(prev, cur, out) -> dict[str, torch.Tensor]:
    result = CliRunner().invoke(
        cli.app, [str(prev), str(cur), "--alpha", str(ALPHA), "-o", str(out), "-q", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.stderr
    return load_file(out / "model.safetensors")


def _assert_bitwise(model, merged: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    for name, t in merged.items():
        live = state[name].cpu()
        assert t.dtype == live.dtype and torch.equal(t.view(torch.int16), live.view(torch.int16)), name


@pytest.mark.slow
def test_rounds_equal_the_cli_on_the_raw_checkpoints(tmp_path):
    model = make_model(seed=0, dtype=torch.bfloat16, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "raw-0")  # theta_hat_0: the model round 1 starts from
    apo = APOCallback(ALPHA, save_raw=tmp_path / "raw")

    _train_round(model, apo, tmp_path / "trainer", seed=1)
    shutil.copytree(tmp_path / "raw", tmp_path / "raw-1")
    raw1 = load_file(tmp_path / "raw-1" / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(raw1[name], load_file(tmp_path / "raw-0" / "model.safetensors")[name])  # it trained
    _assert_bitwise(model, _cli_merge(tmp_path / "raw-0", tmp_path / "raw-1", tmp_path / "apo-1"))
    assert not torch.equal(model.state_dict()[name], raw1[name])  # the step did move the model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied

    # Round 2 starts from the extrapolated model; the step extrapolates between the two RAW outputs.
    _train_round(model, apo, tmp_path / "trainer", seed=2)
    shutil.copytree(tmp_path / "raw", tmp_path / "raw-2")
    _assert_bitwise(model, _cli_merge(tmp_path / "raw-1", tmp_path / "raw-2", tmp_path / "apo-2"))
    assert apo.rounds == 2

    # Round 3 in "another process": the callback knows theta_hat_2 only from disk.
    _train_round(
        model, APOCallback(ALPHA, prev=tmp_path / "raw-2", save_raw=tmp_path / "raw-3"), tmp_path / "trainer", seed=3
    )
    _assert_bitwise(model, _cli_merge(tmp_path / "raw-2", tmp_path / "raw-3", tmp_path / "apo-3"))


def test_refuses_peft_models():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model(seed=0), peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="apo-merge PREV CUR"):
        APOCallback(ALPHA).on_train_begin(None, None, None, model=model)


def test_refuses_prev_of_another_model_before_training(tmp_path):
    model = make_model(seed=0)
    prev = {n: t.clone() for n, t in model.state_dict().items() if n != "model.norm.weight"}
    with pytest.raises(ValueError, match=r"differ in tensor names \(model.norm.weight\); pass the checkpoint"):
        APOCallback(ALPHA, prev=prev).on_train_begin(None, None, None, model=model)
    prev["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"APOCallback: model.norm.weight: shape \(3,\) in prev"):
        APOCallback(ALPHA, prev=prev).on_train_begin(None, None, None, model=model)


def test_state_dict_prev_and_tied_weights_step_once():
    model = make_model(seed=0, tie_word_embeddings=True)
    prev = {n: t + 0.25 for n, t in model.state_dict().items() if n != "lm_head.weight" and t.is_floating_point()}
    want = apo_merge.extrapolate_state_dict(prev=prev, cur=model.state_dict(), alpha=ALPHA)
    apo = APOCallback(ALPHA, prev=prev)
    apo.on_train_begin(None, None, None, model=model)
    raw = {n: t.clone() for n, t in model.state_dict().items()}
    apo.on_train_end(None, None, None, model=model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(torch.equal(model.state_dict()[n], want[n]) for n in want)
    assert "lm_head.weight" not in apo.prev_raw and torch.equal(
        apo.prev_raw["model.norm.weight"], raw["model.norm.weight"]
    )


def test_a_reference_that_is_not_the_policy_is_refused_before_the_round(tmp_path):
    model = make_model(seed=0)
    apo = APOCallback(ALPHA)
    _train_round(model, apo, tmp_path / "r1", seed=1, trainer=_RefTrainer, ref_model=copy.deepcopy(model))
    theta1 = {n: t.clone() for n, t in model.state_dict().items()}
    stale = make_model(seed=0)  # theta_0, as TRL's ref_model=None would reload it
    with pytest.raises(ValueError, match=r"reference model is not the policy this round starts from \(model\.embed"):
        _train_round(model, apo, tmp_path / "r2", seed=2, trainer=_RefTrainer, ref_model=stale)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in theta1.items()) and apo.rounds == 1
    _train_round(model, apo, tmp_path / "r2", seed=2, trainer=_RefTrainer, ref_model=copy.deepcopy(model))
    apo.check_reference = False
    _train_round(model, apo, tmp_path / "r3", seed=3, trainer=_RefTrainer, ref_model=stale)
    assert apo.rounds == 3


def test_a_resumed_round_needs_prev_and_a_finished_one_is_reported():
    model = make_model(seed=0)
    with pytest.raises(
        ValueError, match=r"resumed at step 2 of 4 and the callback has no prev.*for round 1 the initial"
    ):
        APOCallback(ALPHA).on_train_begin(None, SimpleNamespace(global_step=2, max_steps=4), None, model=model)

    same = {n: t.clone() for n, t in model.state_dict().items()}
    finished = SimpleNamespace(global_step=4, max_steps=4)
    with pytest.raises(ValueError, match=r"finished checkpoint \(step 4 of 4\) that equals prev"):
        APOCallback(ALPHA, prev=same).on_train_begin(None, finished, None, model=model)

    prev = {n: t - 0.5 for n, t in same.items()}
    apo = APOCallback(ALPHA, prev=prev)
    with pytest.warns(UserWarning, match=r"finished checkpoint \(step 4 of 4\): this round trains 0 steps"):
        apo.on_train_begin(None, finished, None, model=model)
    apo.on_train_end(None, finished, None, model=model)
    want = apo_merge.extrapolate_state_dict(prev=prev, cur=same, alpha=ALPHA)
    assert all(torch.equal(model.state_dict()[n], want[n]) for n in want)


@pytest.mark.gpu
def test_rounds_on_a_cuda_model_equal_the_cli(tmp_path):
    """The callback on a model that lives on the GPU, trained by Trainer there: the same bits as the CLI on the
    raw checkpoints, and the model stays on the device."""
    model = make_model(seed=0, dtype=torch.bfloat16, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "raw-0")
    model = model.cuda()
    apo = APOCallback(ALPHA, save_raw=tmp_path / "raw")
    for t in (1, 2):
        _train_round(model, apo, tmp_path / "trainer", seed=t, use_cpu=False)
        shutil.copytree(tmp_path / "raw", tmp_path / f"raw-{t}")
        assert all(p.is_cuda for p in model.parameters())
        _assert_bitwise(model, _cli_merge(tmp_path / f"raw-{t - 1}", tmp_path / f"raw-{t}", tmp_path / f"apo-{t}"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert apo.rounds == 2
