"""Config loading, overrides and the one-line errors a bad config gives before any work starts."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from apo_trainer.cli import app
from apo_trainer.config import APOConfig
from apo_trainer.errors import ConfigError
from tests.trainer.conftest import tiny_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nalpha: 0\nrounds: 4\nloss: sppo\n")
    cfg = APOConfig.from_yaml(path, ["alpha=0.5", "final_eval=false", "log_with=tensorboard", "model=123"])
    assert (cfg.alpha, cfg.rounds, cfg.loss, cfg.final_eval) == (0.5, 4, "sppo", False)
    assert isinstance(cfg.alpha, float) and cfg.model == "123" and cfg.log_with == "tensorboard"
    assert APOConfig.from_yaml(path).alpha == 0.0


@pytest.mark.parametrize(
    "text, overrides, needle",
    [
        ("lerning_rate: 1e-6\n", [], "unknown config key 'lerning_rate' (did you mean 'learning_rate'?)"),
        ("rounds: 2.5\n", [], "'rounds' must be int, got float"),
        ("rounds: true\n", [], "'rounds' must be int, got bool"),
        ("alpha: high\n", [], "'alpha' must be float, got str"),
        ("loss: ipo\n", [], "'loss' must be one of dpo, sppo"),
        ("- a\n- b\n", [], "expected a mapping"),
        ("a: [\n", [], "not valid YAML"),
        ("", ["alpha"], "expected key=value"),
        ("", ["nope=1"], "unknown config key 'nope'"),
        ("", ["final_eval=maybe"], "'final_eval' must be bool"),
    ],
)
def test_bad_config_is_one_line_config_error(tmp_path, text, overrides, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        APOConfig.from_yaml(path, overrides)
    assert needle in e.value.message and "\n" not in e.value.message and e.value.exit_code == 2


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"prompts": "/nonexistent/prompts.jsonl"}, "prompts file /nonexistent/prompts.jsonl does not exist"),
        ({"oracle": "callable:no_such_module_xyz:f"}, "cannot import oracle module 'no_such_module_xyz'"),
        ({"oracle": "callable:tests.trainer.tiny:missing"}, "has no attribute 'missing'"),
        ({"oracle": "callable:tests.trainer.tiny:WORDS"}, "is not callable"),
        (
            {"oracle": "judge-me"},
            "must be 'reward-model:PATH', 'callable:module:function', 'pairwise:module:function', "
            "'pairrm:PATH_OR_HUB_ID' or 'llm:URL:MODEL'",
        ),
        ({"oracle": "llm:localhost:8000"}, "must be 'llm:URL:MODEL', e.g. llm:http://127.0.0.1:8000:"),
        ({"oracle": "reward-model:/nonexistent/rm"}, "neither an existing folder nor a Hub id"),
        ({"oracle": ""}, "'oracle' is required"),
        ({"model": "./missing-model"}, "neither an existing folder nor a Hub id"),
        ({"samples_per_prompt": 1}, "'samples_per_prompt' must be at least 2"),
        ({"alpha": -0.1}, "'alpha' must not be negative"),
        ({"beta": float("nan")}, "'beta' must be finite"),
        ({"min_new_tokens": 9}, "'min_new_tokens' exceeds 'max_new_tokens'"),
        ({"push_to_hub": True}, "push_to_hub needs 'hub_repo_id'"),
        pytest.param(
            {"sampler": "vllm"},
            "sampler 'vllm' needs the vllm package",
            marks=pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm installed"),
        ),
        ({"log_with": "tensorbored"}, "log_with tracker 'tensorbored' is unknown"),
    ],
)
def test_validate_refuses_before_work(tiny, tmp_path, overrides, needle):
    cfg = tiny_config(tiny, tmp_path / "out", **overrides)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert needle in e.value.message and "\n" not in e.value.message
    assert not (tmp_path / "out").exists()


def test_prompts_file_without_prompt_field_is_refused(tiny, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "w1 w2"}\n')
    with pytest.raises(ConfigError, match="no string field 'prompt'"):
        tiny_config(tiny, tmp_path / "out", prompts=str(bad)).validate()
    tiny_config(tiny, tmp_path / "out", prompts=str(bad), prompt_field="text").validate()


def test_reference_yaml_lists_every_field_and_loads_back_to_the_defaults():
    text = APOConfig.reference_yaml()
    assert yaml.safe_load(text) == APOConfig().to_dict()
    table = APOConfig.reference_markdown()
    for f in dataclasses.fields(APOConfig):
        assert f"`{f.name}`" in table and f.metadata["help"]


def test_cli_bad_config_exits_2_with_one_line_on_stderr(tiny, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny, tmp_path / "out").to_dict()))
    runner = CliRunner()
    for args, needle, code in [
        (["--set", "rounds=two"], "'rounds' must be int", 2),  # the config itself is wrong
        (["--set", "oracle=callable:nope_mod:f"], "cannot import oracle module 'nope_mod'", 1),  # what is installed
        (["--set", "prompts=/no/such.jsonl"], "does not exist", 1),  # what is on disk
    ]:
        result = runner.invoke(app, ["run", str(cfg), *args])
        assert result.exit_code == code, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("apo-train: error: ") and needle in lines[0]
    assert not (tmp_path / "out").exists()
    missing = runner.invoke(app, ["run", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 1 and "cannot read config file" in missing.stderr


def test_cli_config_command_prints_the_reference():
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 0 and "learning_rate: 5.0e-07" in result.stdout


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (Path(__file__).parents[2] / "examples").glob("*.yaml") if not p.name.startswith("accelerate")),
    ids=lambda p: p.name,
)
def test_example_configs_load(path):
    cfg = APOConfig.from_yaml(path)
    assert cfg.model and cfg.prompts and cfg.oracle


def test_the_paper_example_is_the_papers_setup():
    cfg = APOConfig.from_yaml(Path(__file__).parents[2] / "examples" / "apo_mistral7b.yaml")
    assert (cfg.rounds, cfg.alpha, cfg.samples_per_prompt, cfg.loss) == (3, 0.3, 5, "dpo")
    assert "Mistral-7B-Instruct" in cfg.model and not cfg.shuffle_prompts and cfg.prompts_per_round > 0
    assert cfg.eval_fraction == 0 and not cfg.eval_prompts  # round t samples exactly part t+1: none held out


def test_cli_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("apo-train ")
