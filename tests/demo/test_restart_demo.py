"""`apo-train demo --restart score` at tiny size: the runs carry the option and their decisions follow the rewards."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from apo_trainer.restart import decide

TINY = ["--rounds", "3", "--seeds", "1", "--prompts-per-round", "16", "--samples", "4", "--warmup-steps", "20"]


@pytest.mark.slow
def test_demo_runs_with_restart(tmp_path):
    from apo_trainer.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["demo", *TINY, "--alphas", "0.5", "--restart", "score", "--output", str(out)])
    assert result.exit_code == 0, result.output
    run = out / "runs" / "dpo-alpha0.5-restart-score-seed1"
    assert yaml.safe_load((run / "config.yaml").read_text())["restart"] == "score"
    assert json.loads((out / "demo.json").read_text())["restart"] == "score"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scores = [r["mean_score"] for r in records]
    for t, rec in enumerate(records[:3]):
        assert (rec["alpha"], rec["restart"]) == tuple(decide(scores[: t + 1], 0.5, "score"))
        same = (run / f"round-{t}" / "policy" / "model.safetensors").read_bytes() == (
            run / f"round-{t}" / "trained" / "model.safetensors"
        ).read_bytes()
        assert same == rec["restart"]
    text = (out / "report.md").read_text()
    assert "--restart score" in text and "momentum restart" in text


def test_unknown_restart_is_a_usage_error(tmp_path):
    from apo_trainer.cli import app

    result = CliRunner().invoke(app, ["demo", "--restart", "loss", "--output", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert not (tmp_path / "o").exists()
