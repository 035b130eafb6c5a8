"""End-to-end rounds on a tiny model: the extrapolation is exact, alpha = 0 is plain iterative DPO, resume works."""

from __future__ import annotations

import math

import pytest
import torch

from apo_merge import extrapolate_state_dict
from apo_trainer import store
from apo_trainer import train as train_module
from apo_trainer.errors import ConfigError, TrainError
from apo_trainer.loop import run
from apo_trainer.store import PHASES, RunStore
from tests.trainer.conftest import tiny_config
from tests.trainer.helpers import artifacts, weights


def test_records_cover_rounds_0_to_T(reference_run):
    out, records = reference_run
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records:
        for key in (
            "mean_score",
            "std_score",
            "mean_length",
            "kl_to_init",
            "time_sample",
            "time_judge",
            "time_reference",
        ):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
        assert r["prompts"] == 6 and r["samples"] == 24
    assert records[0]["kl_to_init"] == 0.0
    for r in records[:2]:
        assert r["pairs"] + r["tied_prompts"] == 6 and r["steps"] >= 1
        assert all(f"time_{p}" in r for p in PHASES)
    assert "train_loss" not in records[2]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_checkpoints_satisfy_the_apo_step_bit_for_bit(tiny, reference_run):
    out, _ = reference_run
    raw = [weights(tiny / "policy"), weights(out / "round-0" / "trained"), weights(out / "round-1" / "trained")]
    for t in range(2):
        theta = weights(out / f"round-{t}" / "policy")
        want = extrapolate_state_dict(prev=raw[t], cur=raw[t + 1], alpha=0.3)
        assert theta.keys() == want.keys()
        for name in theta:
            assert theta[name].dtype == want[name].dtype
            assert torch.equal(theta[name], want[name]), name
    # The step is against the raw theta_hat_1, not the extrapolated theta_1 (which differs from it).
    theta_1 = weights(out / "round-0" / "policy")
    assert any(not torch.equal(theta_1[n], raw[1][n]) for n in theta_1)
    wrong = extrapolate_state_dict(prev=theta_1, cur=raw[2], alpha=0.3)
    theta_2 = weights(out / "round-1" / "policy")
    assert any(not torch.equal(theta_2[n], wrong[n]) for n in theta_2)


def test_alpha_zero_gives_theta_equal_to_theta_hat(tiny, tmp_path):
    out = tmp_path / "out"
    run(tiny_config(tiny, out, alpha=0.0, final_eval=False), quiet=True)
    for t in range(2):
        trained, policy = out / f"round-{t}" / "trained", out / f"round-{t}" / "policy"
        assert (policy / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()
    assert not (out / "round-2").exists()


def test_tied_embeddings_are_extrapolated_once_with_sppo(tmp_path):
    from tests.trainer.tiny import make_policy, make_prompts

    make_policy(tmp_path / "policy", seed=1, tie_word_embeddings=True)
    make_prompts(tmp_path / "prompts.jsonl", n=8)
    out = tmp_path / "out"
    run(tiny_config(tmp_path, out, rounds=1, final_eval=False, alpha=0.5, loss="sppo"), quiet=True)
    prev, hat = weights(tmp_path / "policy"), weights(out / "round-0" / "trained")
    theta = weights(out / "round-0" / "policy")
    assert "lm_head.weight" not in theta
    want = extrapolate_state_dict(prev=prev, cur=hat, alpha=0.5)
    assert all(torch.equal(theta[n], want[n]) for n in want)


def _fail_at(t: int, phase: str, where: str):
    def hook(round_index: int, at_phase: str, at: str) -> None:
        if (round_index, at_phase, at) == (t, phase, where):
            raise RuntimeError(f"injected fault at {t}:{phase}:{where}")

    return hook


@pytest.mark.slow
def test_resume_after_a_fault_in_every_phase_gives_the_same_bytes(tiny, tmp_path, reference_run, monkeypatch):
    ref_out, ref_records = reference_run
    out = tmp_path / "out"
    cfg = tiny_config(tiny, out, alpha=0.3)
    faults = [
        (0, "sample", "mid"),
        (0, "judge", "end"),
        (0, "reference", "mid"),
        (0, "data", "end"),
        (0, "train", "mid"),
        (0, "extrapolate", "end"),
        (1, "sample", "end"),
        (1, "judge", "mid"),
        (1, "reference", "end"),
        (1, "data", "mid"),
        (1, "train", "end"),
        (1, "extrapolate", "mid"),
        (2, "reference", "mid"),
    ]
    for t, phase, where in faults:
        monkeypatch.setattr(store, "fault_hook", _fail_at(t, phase, where))
        with pytest.raises(RuntimeError, match="injected fault"):
            run(cfg, quiet=True)
        assert RunStore(out).done(t, phase) is None
    monkeypatch.setattr(store, "fault_hook", None)
    records = run(cfg, quiet=True)
    assert artifacts(out) == artifacts(ref_out)
    assert not list(out.rglob(".tmp-*"))
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time_") and "per_second" not in k}  # noqa: E731
    assert [strip(r) for r in records] == [strip(r) for r in ref_records]


def test_raising_rounds_continues_a_finished_run(tiny, tmp_path, reference_run):
    out = tmp_path / "out"
    first = run(tiny_config(tiny, out, rounds=1), quiet=True)
    assert [r["round"] for r in first] == [0, 1]
    run(tiny_config(tiny, out, rounds=2), quiet=True)
    assert artifacts(out) == artifacts(reference_run[0])


def test_changed_config_on_resume_is_refused(tiny, reference_run):
    out, _ = reference_run
    before = artifacts(out)
    with pytest.raises(ConfigError, match=r"started with another config \(alpha: 0.3 -> 0.5\)"):
        run(tiny_config(tiny, out, alpha=0.5), quiet=True)
    assert artifacts(out) == before


def test_non_finite_loss_stops_naming_round_and_step(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = tiny_config(tiny, out, rounds=2, grad_accum=1)
    run(tiny_config(tiny, out, rounds=1, final_eval=False), quiet=True)
    round0 = artifacts(out)
    calls = []

    def poisoned(logr_w, logr_l, beta):
        calls.append(1)
        loss = train_module.__dict__["_real_dpo"](logr_w, logr_l, beta)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setitem(train_module.__dict__, "_real_dpo", train_module.dpo_loss)
    monkeypatch.setattr(train_module, "dpo_loss", poisoned)
    with pytest.raises(TrainError, match=r"non-finite loss in round 1 at optimizer step 2 \(micro-batch 2"):
        run(cfg, quiet=True, allow_changed_config=True)
    assert not (out / "round-1" / "trained").exists()
    assert {k: v for k, v in artifacts(out).items() if k.startswith("round-0/")} == round0


def test_a_second_run_on_the_same_folder_is_refused(tiny, tmp_path):
    out = tmp_path / "out"
    with RunStore(out).lock(), pytest.raises(TrainError, match="another apo-train run is using"):
        run(tiny_config(tiny, out), quiet=True)


def test_push_to_hub_uploads_each_round_policy_privately(tiny, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    class FakeApi:
        fail = False

        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, private, exist_ok, **kwargs):
            calls.append(("create", repo_id, private))
            return type("Repo", (), {"repo_id": repo_id})()

        def create_branch(self, repo_id, branch, exist_ok, **kwargs):
            calls.append(("branch", branch))

        def upload_folder(self, repo_id, folder_path, revision, **kwargs):
            calls.append(("upload", repo_id, str(folder_path), revision))
            if FakeApi.fail:
                raise OSError("connection reset")
            return type("Commit", (), {"commit_url": f"https://hf.co/{repo_id}/commit/x", "pr_url": None})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "out"
    run(tiny_config(tiny, out, rounds=2, final_eval=False, push_to_hub=True, hub_repo_id="me/apo-tiny"), quiet=True)
    uploads = [c for c in calls if c[0] == "upload"]
    assert uploads == [
        ("upload", "me/apo-tiny", str(out / f"round-{t}" / "policy"), f"round-{t + 1}") for t in range(2)
    ]
    assert ("create", "me/apo-tiny", True) in calls and ("branch", "round-2") in calls

    FakeApi.fail = True  # a failed upload warns with the retry command and training goes on
    out2 = tmp_path / "out2"
    records = run(
        tiny_config(tiny, out2, rounds=1, final_eval=False, push_to_hub=True, hub_repo_id="me/apo-tiny"), quiet=True
    )
    assert len(records) == 1 and (out2 / "round-0" / "policy").is_dir()
    printed = capsys.readouterr()
    assert "apo-merge push" in printed.out + printed.err


@pytest.mark.gpu
def test_cuda_bf16_rounds_satisfy_the_apo_step_bit_for_bit(tiny, tmp_path):
    """Two rounds on the GPU with bf16 mixed precision (fp32 master weights): each saved policy is exactly the
    APO step of the raw checkpoints, the anchor rule of the CPU test above."""
    out = tmp_path / "out"
    records = run(tiny_config(tiny, out, alpha=0.3, mixed_precision="bf16", final_eval=False), quiet=True)
    assert [r["round"] for r in records] == [0, 1] and all(r["steps"] >= 1 for r in records)
    raw = [weights(tiny / "policy"), weights(out / "round-0" / "trained"), weights(out / "round-1" / "trained")]
    assert any(not torch.equal(raw[0][n], raw[1][n]) for n in raw[0])  # it trained
    for t in range(2):
        theta = weights(out / f"round-{t}" / "policy")
        want = extrapolate_state_dict(prev=raw[t], cur=raw[t + 1], alpha=0.3)
        assert theta.keys() == want.keys()
        for name in theta:
            assert theta[name].dtype == want[name].dtype == torch.float32, name
            assert torch.equal(theta[name].view(torch.int32), want[name].view(torch.int32)), name
