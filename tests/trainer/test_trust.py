"""Hostile settings and files at the trainer's edges: nothing non-finite leaves silently, failures come before any
work (and leave nothing behind), and eval measures what training does."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml

from apo_trainer import evaluation
from apo_trainer.cli import main
from apo_trainer.config import APOConfig
from apo_trainer.errors import ConfigError, TrainError
from apo_trainer.store import RunStore, read_jsonl
from tests.trainer.conftest import tiny_config
from tests.trainer.tiny import word_sum

_judge = {"mode": "ok"}


def switch(prompts, responses):
    """A scalar judge that scores as word_sum, or returns NaN / inf for every response when told to."""
    if _judge["mode"] == "ok":
        return word_sum(prompts, responses)
    return [float(_judge["mode"])] * len(prompts)


def _cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main([*args, "--quiet"])
    return e.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def held_prompts(tiny, tmp_path_factory):
    """Held-out prompts with one prompt twice (rows 1 and 3)."""
    path = tmp_path_factory.mktemp("held") / "held.jsonl"
    texts = ["w1 w2 w3", "w9 w8", "w4 w5 w6 w7", "w9 w8", "w10 w11"]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    return path


@pytest.fixture(scope="module")
def trust_run(tiny, held_prompts, tmp_path_factory):
    """One round with held-out prompts (one of them twice) and fixed-length 6-token training answers."""
    from apo_trainer.loop import run

    out = tmp_path_factory.mktemp("trust") / "out"
    cfg = tiny_config(
        tiny,
        out,
        rounds=1,
        eval_prompts=str(held_prompts),
        min_new_tokens=6,
        max_new_tokens=6,
        oracle=f"callable:{__name__}:switch",
    )
    run(cfg, quiet=True)
    return out


# ---------------------------------------------------------------- section 0: nothing non-finite leaves silently
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_eval_with_a_judge_returning_non_finite_scores_is_one_line_exit_1(trust_run, tmp_path, capsys, value):
    out = tmp_path / "run"
    shutil.copytree(trust_run, out)
    _judge["mode"] = value
    try:
        code, err = _cli(["eval", str(out)], capsys)
    finally:
        _judge["mode"] = "ok"
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert "must return finite floats" in lines[0] and "round 0" in lines[0]
    assert not (out / "eval/summary.jsonl").exists()
    assert not (out / "eval/round-0/done/judge.json").exists()


def test_the_run_store_writes_strict_json_only(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(TrainError, match="non-finite"):
        store.write_jsonl(tmp_path / "x.jsonl", [{"win_rate": math.nan}])
    with pytest.raises(TrainError, match="non-finite"):
        store.mark_done(0, "judge", {"lc_win_rate": math.inf})
    assert not (tmp_path / "x.jsonl").exists() and store.done(0, "judge") is None
    assert not list(tmp_path.rglob(".tmp-*"))


@pytest.mark.parametrize(
    "values, needle",
    [
        ({"peft": {"lora_alpha": math.nan}}, "'peft.lora_alpha' must be finite"),
        ({"peft": {"lora_alpha": math.inf}}, "'peft.lora_alpha' must be finite"),
        ({"peft": {"lora_dropout": math.nan}}, "'peft.lora_dropout' must be finite"),
        ({"eval_temperature": math.nan}, "'eval_temperature' must be finite"),
        ({"top_p": -math.inf}, "'top_p' must be finite"),
    ],
)
def test_every_float_of_the_config_nested_groups_included_must_be_finite(tiny, tmp_path, values, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        cfg = tiny_config(tiny, tmp_path / "out", **values)
        cfg.validate()
    assert e.value.exit_code == 2
    # the YAML spellings too, through the command line: before any work, nothing written
    text = {k: v for k, v in tiny_config(tiny, tmp_path / "out").to_dict().items()}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(text).replace("peft: {}", "peft: {r: 4}"))
    key, value = next(iter(values.items()))
    item = f"peft.{next(iter(value))}=.nan" if key == "peft" else f"{key}=.nan"
    with pytest.raises(SystemExit) as e:
        main(["run", str(path), "--set", item, "--quiet"])
    assert e.value.code == 2 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("alpha", [1.0e39, -1.0e39, 3.5e38, 1e-50])
def test_alpha_must_be_representable_in_fp32(tiny, tmp_path, alpha):
    with pytest.raises(ConfigError, match="fp32") as e:
        tiny_config(tiny, tmp_path / "out", alpha=alpha).validate()
    assert e.value.exit_code == 2


def test_extrapolate_refuses_a_policy_with_new_non_finite_values(tiny, tmp_path, monkeypatch):
    from apo_trainer import extrapolate
    from apo_trainer.loop import run

    real = extrapolate.extrapolate_state_

    def overflowing(*, prev, cur, alpha):
        # what a huge alpha does to a weight that training moved far: cur + alpha * (cur - prev) overflows
        n = real(prev=prev, cur=cur, alpha=alpha)
        cur["model.layers.0.mlp.up_proj.weight"].view(-1)[5] = math.inf
        return n

    monkeypatch.setattr(extrapolate, "extrapolate_state_", overflowing)
    out = tmp_path / "out"
    with pytest.raises(TrainError) as e:
        run(tiny_config(tiny, out, rounds=1, final_eval=False), quiet=True)
    message = e.value.message
    assert message.startswith("round 0, extrapolate phase:") and "\n" not in message
    assert "1 inf/NaN values in model.layers.0.mlp.up_proj.weight" in message
    store = RunStore(out)
    assert not store.policy(0).exists() and store.done(0, "extrapolate") is None
    assert store.done(0, "train") is not None


def test_extrapolate_state_counts_only_new_non_finite_values():
    from apo_trainer.extrapolate import first_new_non_finite

    prev = {"a": torch.tensor([0.0, math.inf]), "b": torch.tensor([0.0, 1.0])}
    cur = {"a": torch.tensor([1.0, math.inf]), "b": torch.tensor([1.0, 3.0e38])}
    after = {"a": torch.tensor([1.3, math.nan]), "b": torch.tensor([1.3, math.inf])}
    assert first_new_non_finite(prev, after) == ("b", 1)
    assert first_new_non_finite(prev, {"a": after["a"], "b": cur["b"]}) is None


# ---------------------------------------------------------------- section 1: fail before work
def test_an_oracle_that_cannot_be_built_fails_before_the_first_sample(tiny, tmp_path, capsys):
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text(json.dumps({"model_type": "no-such-architecture", "num_labels": 1}))
    out = tmp_path / "out"
    cfg = tiny_config(tiny, out, rounds=1, oracle=f"reward-model:{rm}")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    code, err = _cli(["run", str(path)], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert "no-such-architecture" in lines[0] and f"reward-model:{rm}" in lines[0]
    assert not out.exists()


def test_eval_builds_its_judge_before_the_first_sample(trust_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trust_run, out)
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text(json.dumps({"model_type": "no-such-architecture", "num_labels": 1}))
    values = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({**values, "oracle": f"reward-model:{rm}"}))
    code, err = _cli(["eval", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "no-such-architecture" in lines[0], err
    assert not (out / "eval").exists()


def test_an_oracle_module_whose_import_fails_names_its_own_error(tiny, tmp_path, monkeypatch):
    (tmp_path / "judge_with_bad_dep.py").write_text("import not_a_module_anywhere_xyz\n\ndef f(p, r):\n    return r\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tiny_config(tiny, tmp_path / "out", oracle="callable:judge_with_bad_dep:f")
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert "No module named 'not_a_module_anywhere_xyz'" in e.value.message
    assert "pip install" not in e.value.message


@pytest.mark.parametrize("name", ["data/prompts.jsonl", "prompts.jsonl", "data/prompts.parquet", "./x/prompts"])
def test_a_prompts_path_that_looks_like_a_file_is_not_a_hub_dataset(tiny, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tiny, tmp_path / "out", prompts=name)
    with pytest.raises(ConfigError, match=f"prompts file {name} does not exist") as e:
        cfg.validate()
    assert e.value.exit_code == 1


def test_a_run_that_fails_at_start_pins_nothing_and_the_corrected_rerun_runs(tiny, tmp_path):
    from apo_trainer.loop import run

    prompts = tmp_path / "prompts.jsonl"
    good = (tiny / "prompts.jsonl").read_text()
    prompts.write_text(good + "not json\n")  # the first record is fine: validate() passes, loading fails
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="not a JSON object"):
        run(tiny_config(tiny, out, prompts=str(prompts), rounds=1, final_eval=False), quiet=True)
    assert not out.exists()
    prompts.write_text(good)
    records = run(tiny_config(tiny, out, prompts=str(prompts), rounds=1, final_eval=False, alpha=0.5), quiet=True)
    assert [r["round"] for r in records] == [0]
    assert yaml.safe_load((out / "config.yaml").read_text())["alpha"] == 0.5


def test_a_config_written_by_a_run_that_finished_no_phase_is_not_pinned(tiny, tmp_path):
    from apo_trainer.loop import _check_config

    store = RunStore(tmp_path / "out")
    store.root.mkdir()
    _check_config(store, tiny_config(tiny, store.root, alpha=0.1), allow_changed=False)
    _check_config(store, tiny_config(tiny, store.root, alpha=0.2), allow_changed=False)  # no phase ran yet
    assert yaml.safe_load(store.config.read_text())["alpha"] == 0.2
    store.mark_done(0, "sample", {})
    with pytest.raises(ConfigError, match="was started with another config"):
        _check_config(store, tiny_config(tiny, store.root, alpha=0.3), allow_changed=False)


def test_a_non_utf8_eval_reference_is_named(trust_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trust_run, out)
    ref = tmp_path / "ref.jsonl"
    ref.write_bytes(b'{"instruction": "w1 w2 w3", "output": "caf\xe9"}\n')
    code, err = _cli(["eval", str(out), "--set", f"eval_reference={ref}"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert str(ref) in lines[0] and "UTF-8" in lines[0] and "oracle" not in lines[0]
    assert not (out / "eval/round-0/samples.jsonl").exists()  # refused before sampling


def test_eval_on_a_run_started_with_the_defaults_has_held_out_prompts(tiny, tmp_path):
    from apo_trainer.loop import run
    from apo_trainer.prompts import split_prompts

    cfg = APOConfig.from_dict({"prompts": str(tiny / "prompts.jsonl")})
    train, held = split_prompts(cfg)
    assert len(held) >= 1 and len(train) + len(held) == 16 and not set(train) & set(held)
    out = tmp_path / "out"
    values = tiny_config(tiny, out, rounds=1, final_eval=False).to_dict()
    values.pop("eval_fraction")
    run(APOConfig.from_dict(values), quiet=True)
    records = evaluation.evaluate_run(out, quiet=True)
    assert [r["round"] for r in records] == [0, 1] and records[0]["win_rate"] == 0.5


# ---------------------------------------------------------------- section 2: eval measures what training does
def test_eval_samples_with_the_training_keys_unless_an_eval_key_overrides_them(tiny):
    cfg = tiny_config(tiny, "out", min_new_tokens=5, max_new_tokens=9, top_k=7, eval_top_k=3)
    s = evaluation.eval_sampling(cfg)
    assert (s.min_new_tokens, s.max_new_tokens, s.top_k, s.samples_per_prompt) == (5, 9, 3, 1)
    assert s.temperature == cfg.eval_temperature and s.top_p == cfg.eval_top_p
    short = evaluation.eval_sampling(tiny_config(tiny, "out", min_new_tokens=5, eval_max_new_tokens=3))
    assert (short.min_new_tokens, short.max_new_tokens) == (3, 3)


def test_eval_pairs_references_by_row_and_answers_have_the_training_length(trust_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trust_run, out)
    records = evaluation.evaluate_run(out, quiet=True)
    assert records[0]["win_rate"] == 0.5 and records[0]["prompts"] == 5  # theta_0 against itself, row by row
    for t in (0, 1):
        rows = read_jsonl(out / f"eval/round-{t}/samples.jsonl")
        assert [len(r["response_ids"][0]) for r in rows] == [6] * 5


def test_an_eval_folder_sampled_without_the_training_minimum_is_not_resumed(trust_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trust_run, out)
    evaluation.evaluate_run(out, quiet=True)
    settings = out / "eval/settings.json"
    assert json.loads(settings.read_text())["min_new_tokens"] == 6
    old = {k: v for k, v in json.loads(settings.read_text()).items() if k != "min_new_tokens"}
    settings.write_text(json.dumps(old))  # as written by a release whose eval sampled with min_new_tokens 0
    with pytest.raises(ConfigError, match=r"other eval settings \(min_new_tokens: 0 -> 6\)"):
        evaluation.evaluate_run(out, quiet=True)


def test_a_reference_file_with_a_prompt_twice_is_refused(trust_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trust_run, out)
    ref = tmp_path / "ref.jsonl"
    lines = [{"instruction": p, "output": "w1"} for p in ["w1 w2 w3", "w9 w8", "w4 w5 w6 w7", "w10 w11", "w9 w8"]]
    ref.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(ConfigError, match=r"ref.jsonl:5: the prompt 'w9 w8' is already on line 2") as e:
        evaluation.evaluate_run(out, [f"eval_reference={ref}"], quiet=True)
    assert "\n" not in e.value.message


def test_eval_of_a_policy_with_nan_weights_names_the_policy(trust_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    shutil.copytree(trust_run, out)
    path = out / "round-0/policy/model.safetensors"
    state = load_file(str(path))
    name = sorted(state)[3]
    state[name][0] = math.nan
    save_file(state, str(path), metadata={"format": "pt"})
    code, err = _cli(["eval", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert str(out / "round-0/policy") in lines[0] and name in lines[0] and "round 1" in lines[0]


def test_lc_win_rate_warns_when_the_length_feature_is_near_constant():
    n = 40
    # every reference is far longer than every response: tanh saturates, the length term is the intercept
    pol = [20 + i % 3 for i in range(n)]
    ref = [2000 + 7 * (i % 5) for i in range(n)]
    rows = [{"preference": 0.975, "length": p, "reference_length": r} for p, r in zip(pol, ref, strict=True)]
    summary = evaluation.summarise(rows, 50, seed=0)
    assert "near-constant" in summary["lc_warning"] and summary["lc_win_rate"] == pytest.approx(0.5, abs=0.02)
    spread = [{"preference": 0.9, "length": 10 * i, "reference_length": 100} for i in range(n)]
    assert "lc_warning" not in evaluation.summarise(spread, 50, seed=0)


@pytest.mark.parametrize("f", [0.4, 0.9, 0.15])
def test_eval_pairwise_ties_against_the_reference_are_exactly_one_half(f):
    """Eval asks a pairwise judge both orders; a judge that cannot tell the answers apart gives exactly 1/2."""
    from apo_trainer.evaluation import preferences
    from apo_trainer.oracle import PairwiseCallableOracle

    oracle = PairwiseCallableOracle(lambda ps, a, b: [f] * len(ps))
    got = preferences(oracle, ["x", "y", "z"], ["a", "b", "c"], ["r", "s", "t"], batch=4)
    assert got == [0.5, 0.5, 0.5]
