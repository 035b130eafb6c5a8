"""Momentum restart: the decision on scripted score histories, and end to end with an oracle whose round means are
scripted (a drop at round 1): theta_2 = theta_hat_2 bit for bit, round 2 extrapolates again, resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from apo_merge import extrapolate_state_dict
from apo_trainer import store
from apo_trainer.config import APOConfig
from apo_trainer.errors import ConfigError
from apo_trainer.loop import run
from apo_trainer.restart import Decision, decide, score_history
from apo_trainer.store import RunStore
from tests.trainer.conftest import tiny_config
from tests.trainer.helpers import artifacts, weights
from tests.trainer.tiny import word_sum


@pytest.mark.parametrize(
    ("history", "alpha", "mode", "want"),
    [
        ([0.4], 0.3, "score", Decision(0.3, False)),  # first round: nothing to compare with
        ([0.4, 0.5], 0.3, "score", Decision(0.3, False)),  # progress
        ([0.4, 0.4], 0.3, "score", Decision(0.3, False)),  # a tie is no reversal
        ([0.4, 0.39], 0.3, "score", Decision(0.0, True)),  # a drop
        ([0.5, 0.4, 0.3], 0.7, "score", Decision(0.0, True)),  # consecutive drops restart each time
        ([0.5, 0.4, 0.45], 0.7, "score", Decision(0.7, False)),  # after a restart the configured alpha resumes
        ([0.5, 0.1, 0.45], 0.7, "score", Decision(0.7, False)),  # only the last two rounds count
        ([0.4, 0.39], 0.0, "score", Decision(0.0, False)),  # alpha 0 has no momentum to drop
        ([0.4, 0.39], 0.3, "none", Decision(0.3, False)),
        ([-1.0, -1.5], 0.5, "score", Decision(0.0, True)),  # any score scale
    ],
)
def test_decision_on_scripted_histories(history, alpha, mode, want):
    assert decide(history, alpha, mode) == want


def test_decision_sequence_over_a_run():
    scores = [0.30, 0.35, 0.33, 0.31, 0.31, 0.40, 0.20]
    got = [decide(scores[: t + 1], 0.5, "score") for t in range(len(scores))]
    assert [d.alpha for d in got] == [0.5, 0.5, 0.0, 0.0, 0.5, 0.5, 0.0]
    assert [d.restarted for d in got] == [False, False, True, True, False, False, True]


def test_decision_refuses_bad_input():
    with pytest.raises(ValueError, match="restart mode 'loss'"):
        decide([0.1], 0.3, "loss")
    with pytest.raises(ValueError, match="current round"):
        decide([], 0.3, "score")


class ScriptedOracle:
    """word_sum (varied scores, so pairs are not ties) plus a per-round offset far larger than its range, so that
    the round means follow ``offsets``. The round is read from the run folder (the first without a judge marker), so
    a fresh instance on resume scores exactly as the first did."""

    def __init__(self, out: Path, offsets: list[float]) -> None:
        self.store, self.offsets = RunStore(out), offsets

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        t = next(i for i in range(len(self.offsets)) if self.store.done(i, "judge") is None)
        return [s + self.offsets[t] for s in word_sum(prompts, responses)]


OFFSETS = [100.0, 0.0, 50.0]  # round 1 drops below round 0, round 2 rises again


def _config(tiny: Path, out: Path) -> APOConfig:
    return tiny_config(tiny, out, rounds=3, final_eval=False, alpha=0.3, restart="score")


@pytest.fixture(scope="module")
def restart_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("restart") / "out"
    records = run(_config(tiny, out), ScriptedOracle(out, OFFSETS), quiet=True)
    return out, records


@pytest.mark.slow
def test_a_drop_restarts_the_next_extrapolation_only(tiny, restart_run):
    out, records = restart_run
    history = score_history(RunStore(out), 2)
    assert history == [r["mean_score"] for r in records]
    assert history[1] < history[0] and history[2] > history[1] + 40
    assert [r["restart"] for r in records] == [False, True, False]
    assert [r["alpha"] for r in records] == [0.3, 0.0, 0.3]
    raw = [weights(tiny / "policy"), *(weights(out / f"round-{t}" / "trained") for t in range(3))]
    # round 1 (the drop): theta_2 = theta_hat_2, the same file bytes
    assert (out / "round-1" / "policy" / "model.safetensors").read_bytes() == (
        out / "round-1" / "trained" / "model.safetensors"
    ).read_bytes()
    for t in (0, 2):  # rounds 0 and 2 extrapolate with the configured alpha
        theta = weights(out / f"round-{t}" / "policy")
        want = extrapolate_state_dict(prev=raw[t], cur=raw[t + 1], alpha=0.3)
        assert theta.keys() == want.keys()
        assert all(torch.equal(theta[n], want[n]) for n in want)
        assert any(not torch.equal(theta[n], raw[t + 1][n]) for n in theta)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["restart"] for r in lines] == [False, True, False]


@pytest.mark.slow
def test_restart_is_logged_on_the_console(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    run(_config(tiny, out), ScriptedOracle(out, OFFSETS), quiet=False)
    text = " ".join((capsys.readouterr().out + capsys.readouterr().err).split())
    assert "round 1: mean score" in text and "fell below round 0's" in text
    assert "theta_2 = theta_hat_2 (alpha 0)" in text


def _fail_at(t: int, phase: str, where: str):
    def hook(round_index: int, at_phase: str, at: str) -> None:
        if (round_index, at_phase, at) == (t, phase, where):
            raise RuntimeError(f"injected fault at {t}:{phase}:{where}")

    return hook


@pytest.mark.slow
def test_resume_after_a_restart_gives_the_same_bytes(tiny, tmp_path, restart_run, monkeypatch):
    ref_out, ref_records = restart_run
    out = tmp_path / "out"
    for fault in [(1, "extrapolate", "mid"), (1, "extrapolate", "end"), (2, "judge", "end"), (2, "extrapolate", "mid")]:
        monkeypatch.setattr(store, "fault_hook", _fail_at(*fault))
        with pytest.raises(RuntimeError, match="injected fault"):
            run(_config(tiny, out), ScriptedOracle(out, OFFSETS), quiet=True)
    monkeypatch.setattr(store, "fault_hook", None)
    records = run(_config(tiny, out), ScriptedOracle(out, OFFSETS), quiet=True)
    assert artifacts(out) == artifacts(ref_out)
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time_") and "per_second" not in k}  # noqa: E731
    assert [strip(r) for r in records] == [strip(r) for r in ref_records]


@pytest.mark.slow
def test_restart_mode_is_validated_and_fixed_for_a_run(tiny, restart_run):
    with pytest.raises(ConfigError, match="'restart' must be one of none, score; got 'loss'"):
        APOConfig.from_dict({"restart": "loss"})
    out, _ = restart_run
    with pytest.raises(ConfigError, match=r"started with another config \(restart: 'score' -> 'none'\)"):
        run(tiny_config(tiny, out, rounds=3, final_eval=False, alpha=0.3), ScriptedOracle(out, OFFSETS), quiet=True)


def test_a_run_folder_from_before_the_key_still_resumes():
    cfg = APOConfig(model="m", alpha=0.5)
    old = {k: v for k, v in cfg.to_dict().items() if k != "restart"}
    assert cfg.changed_fields(old) == []
    cfg.restart = "score"
    assert cfg.changed_fields(old) == ["restart"]


def test_restart_on_score_is_refused_with_a_pairwise_oracle(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path / "out", restart="score", oracle="pairwise:apo_trainer.demo.task:pairwise_rewards")
    with pytest.raises(ConfigError, match="restart: score reads each round's mean oracle score"):
        cfg.validate()
