"""The judge is user code: whatever it does wrong ends the run with one line, and the rerun resumes at the judge."""

from __future__ import annotations

import json

import pytest
import yaml

from apo_trainer.cli import main
from apo_trainer.oracle import RewardModelOracle, load_oracle
from apo_trainer.store import RunStore
from tests.trainer.conftest import tiny_config
from tests.trainer.tiny import word_sum

_behaviour = {"mode": "ok"}


def flaky(prompts, responses):
    """A judge whose failure mode the test chooses: a down server, strings instead of floats, or working."""
    mode = _behaviour["mode"]
    if mode == "down":
        raise ConnectionError("judge server at localhost:8000 refused the connection\n(errno 111)")
    if mode == "strings":
        return ["good"] * len(prompts)
    return word_sum(prompts, responses)


def _run(cfg_path, capsys, monkeypatch, debug=False):
    if debug:
        monkeypatch.setenv("APO_DEBUG", "1")
    else:
        monkeypatch.delenv("APO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["run", str(cfg_path), "--quiet"])
    return e.value.code, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,needle",
    [
        ("down", "(ConnectionError: judge server at localhost:8000 refused the connection (errno 111))"),
        ("strings", "(ValueError: could not convert string to float: 'good')"),
    ],
)
def test_a_failing_judge_is_one_line_and_the_rerun_resumes_at_the_judge(
    tiny, tmp_path, capsys, monkeypatch, mode, needle
):
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    config = tiny_config(tiny, out, rounds=1, oracle=f"callable:{__name__}:flaky")
    cfg.write_text(yaml.safe_dump(config.to_dict()))
    monkeypatch.setitem(_behaviour, "mode", mode)

    code, err = _run(cfg, capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"apo-train: error: round 0, judge phase: the oracle callable:{__name__}:flaky failed ")
    assert needle in lines[0] and "rerun the same command to resume at the judge phase" in lines[0]
    store = RunStore(out)
    assert store.done(0, "sample") is not None and store.done(0, "judge") is None
    samples = store.samples(0).read_bytes()

    code, err = _run(cfg, capsys, monkeypatch, debug=True)  # the user's traceback on request, the same line last
    assert code == 1 and "Traceback (most recent call last)" in err and "def flaky" not in err
    assert err.strip().splitlines()[-1] == lines[0]

    monkeypatch.setitem(_behaviour, "mode", "ok")
    code, err = _run(cfg, capsys, monkeypatch)
    assert code == 0, err
    assert store.samples(0).read_bytes() == samples  # resumed at the judge: the samples were not drawn again
    assert json.loads(store.scores(0).read_text())["scores"]


def _custom_code_model(folder):
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "apo-custom-rm",
                "auto_map": {
                    "AutoConfig": "configuration_rm.RMConfig",
                    "AutoModelForSequenceClassification": "modeling_rm.RM",
                },
                "num_labels": 1,
            }
        )
    )
    (folder / "configuration_rm.py").write_text(
        "from transformers import PretrainedConfig\n\nclass RMConfig(PretrainedConfig):\n    model_type = 'apo-custom-rm'\n"
    )


def test_a_reward_model_with_its_own_code_is_refused_naming_trust_remote_code(tmp_path, monkeypatch):
    _custom_code_model(tmp_path / "rm")
    monkeypatch.setattr("sys.stdin", None)  # transformers would ask on stdin if the choice were left open
    with pytest.raises(Exception) as e:
        load_oracle(f"reward-model:{tmp_path / 'rm'}")
    assert type(e.value).__name__ == "ConfigError" and e.value.exit_code == 1
    assert "set trust_remote_code: true in the config" in e.value.message


def test_trust_remote_code_reaches_transformers(tmp_path, monkeypatch):
    seen = []

    def fake(path, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise RuntimeError("stop here")

    monkeypatch.setattr("transformers.AutoModelForSequenceClassification.from_pretrained", fake)
    for trust in (False, True):
        with pytest.raises(RuntimeError, match="stop here"):
            RewardModelOracle(str(tmp_path), trust_remote_code=trust)
    assert seen == [False, True]
