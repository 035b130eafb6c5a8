"""`apo-train demo` end to end at tiny sizes: runs, report files, the true reward recomputed from the samples."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from apo_trainer.demo.report import Run, summarise, verdict
from apo_trainer.demo.task import reward

TINY = [
    *("--rounds", "1", "--seeds", "1", "--prompts-per-round", "16", "--samples", "4", "--warmup-steps", "20"),
    *("--eval-prompts", "8"),
]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from apo_trainer.cli import app

    out = tmp_path_factory.mktemp("demo") / "out"
    result = CliRunner().invoke(app, ["demo", *TINY, "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_report_files_are_written(demo_dir):
    png = (demo_dir / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    text = (demo_dir / "report.md").read_text()
    for method in ("iterative DPO", "APO-DPO (alpha 0.3)"):
        for t in (0, 1):
            assert f"| {method} | {t} |" in text
    assert "![reward, length, KL and win rates per round](report.png)" in text
    assert "apo-train demo --rounds 1 --seeds 1 --alphas 0,0.3 --loss dpo" in text
    assert "win rate vs theta_0 (mean ± sd)" in text and "LC win rate vs theta_0 (mean ± sd)" in text
    assert "| iterative DPO | 0 | " in text and " | 0.500 | 0.500 |" in text  # round 0 against itself


@pytest.mark.slow
def test_true_reward_matches_the_samples(demo_dir):
    means = {}
    for name in ("dpo-alpha0-seed1", "dpo-alpha0.3-seed1"):
        run = demo_dir / "runs" / name
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [0, 1]
        for rec in records:
            rows = [json.loads(line) for line in (run / f"round-{rec['round']}" / "samples.jsonl").open()]
            scores = [reward(row["prompt"], resp, 12) for row in rows for resp in row["responses"]]
            assert len(scores) == (16 if rec["round"] == 0 else 8) * 4  # the final round is on held-out prompts
            assert rec["mean_score"] == pytest.approx(sum(scores) / len(scores), abs=1e-12)
            assert rec["mean_length"] == 12
        means[name] = [r["mean_score"] for r in records]
    # same start and seed: round 0 is the same policy's samples; round 1 differs by the extrapolation only
    assert means["dpo-alpha0-seed1"][0] == means["dpo-alpha0.3-seed1"][0]


@pytest.mark.slow
def test_rerun_resumes_and_changed_settings_are_refused(demo_dir):
    from apo_trainer.cli import app

    before = (demo_dir / "runs" / "dpo-alpha0.3-seed1" / "metrics.jsonl").read_text()
    again = CliRunner().invoke(app, ["demo", *TINY, "--jobs", "1", "--output", str(demo_dir)])
    assert again.exit_code == 0, again.output
    assert (demo_dir / "runs" / "dpo-alpha0.3-seed1" / "metrics.jsonl").read_text() == before
    changed = CliRunner().invoke(app, ["demo", *TINY[:-1], "21", "--output", str(demo_dir)])
    assert changed.exit_code == 1  # the output folder's state, not a wrong command line
    assert "other settings" in changed.output


def test_bad_alphas_are_a_usage_error(tmp_path):
    from apo_trainer.cli import app

    result = CliRunner().invoke(app, ["demo", "--alphas", "0,x", "--output", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert not (tmp_path / "o").exists()


def _run(alpha: float, seed: int, scores: list[float]) -> Run:
    return Run(
        "dpo",
        alpha,
        seed,
        [
            {"round": t, "mean_score": s, "mean_length": 12.0, "kl_to_init": t * (1 + alpha)}
            for t, s in enumerate(scores)
        ],
    )


def test_summary_and_verdict_follow_the_numbers():
    runs = [
        _run(0.0, 1, [0.2, 0.3, 0.4]),
        _run(0.0, 2, [0.2, 0.32, 0.42]),
        _run(0.3, 1, [0.2, 0.35, 0.5]),
        _run(0.3, 2, [0.2, 0.36, 0.41]),
    ]
    cells = summarise(runs, "mean_score")[("dpo", 0.3)]
    assert cells[2].mean == pytest.approx(0.455) and cells[2].values == (0.5, 0.41)
    assert cells[2].sd == pytest.approx(0.0636396, abs=1e-6)
    text = " ".join(verdict(runs))
    assert "shows no clear difference" in text and "ahead in 1 of 2 seeds" in text
    runs[3] = _run(0.3, 2, [0.2, 0.36, 0.45])
    text = " ".join(verdict(runs))
    assert "wins against iterative DPO" in text and "round 1" not in text
    runs[2], runs[3] = _run(0.3, 1, [0.2, 0.25, 0.3]), _run(0.3, 2, [0.2, 0.25, 0.3])
    assert "loses against iterative DPO" in " ".join(verdict(runs))


def test_missing_matplotlib_is_named_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    from apo_trainer.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    result = CliRunner().invoke(app, ["demo", "--output", str(tmp_path / "o")])
    assert result.exit_code == 1  # a missing package: the state of the machine
    assert "apo-merge[demo]" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_peft_demo_runs_lora_rounds(tmp_path):
    pytest.importorskip("peft")
    from apo_trainer.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["demo", *TINY, "--alphas", "0.3", "--peft", "--output", str(out)])
    assert result.exit_code == 0, result.output
    run = out / "runs" / "dpo-lora-alpha0.3-seed1"
    assert (run / "round-0" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "round-0" / "adapter" / "adapter_config.json").read_text())["r"] == 8
    text = (out / "report.md").read_text()
    assert "LoRA rounds (r 8" in text and "--peft" in text
