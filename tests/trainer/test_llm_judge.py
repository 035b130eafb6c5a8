"""oracle: llm:URL:MODEL against the stand-in server: AlpacaEval's pairwise prompt, preference from logprobs or the
parsed answer, both orders averaged, verdicts cached on disk, bad answers as one line."""

from __future__ import annotations

import json
import math

import pytest

from apo_trainer.errors import ConfigError, TrainError
from apo_trainer.llm_judge import LLMJudge, parse_spec
from apo_trainer.oracle import load_oracle, preference_matrices
from tests.trainer.conftest import tiny_config
from tests.trainer.standin_server import StandIn


def sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr("apo_trainer.server.time.sleep", lambda s: None)
    with StandIn() as s:
        yield s


def test_spec_parsing():
    assert parse_spec("http://127.0.0.1:8000:Qwen/Qwen2.5-7B-Instruct") == (
        "http://127.0.0.1:8000",
        "Qwen/Qwen2.5-7B-Instruct",
    )
    assert parse_spec("https://judge.example/v1:llama3:8b") == ("https://judge.example/v1", "llama3:8b")
    with pytest.raises(ConfigError, match="must be 'llm:URL:MODEL'"):
        parse_spec("127.0.0.1:8000:m")


def test_preference_from_logprobs_else_the_answer_and_both_orders_cancel_the_bias(server, tmp_path):
    judge = load_oracle(f"llm:{server.url}:judge-7b", batch_size=4, cache_dir=tmp_path)
    assert isinstance(judge, LLMJudge)
    # "aaaa" vs "a": gap 3 -> logit 1 + 3/4 for the first output; reversed: 1 - 3/4
    assert judge.compare(["q", "q"], ["aaaa", "a"], ["a", "aaaa"]) == pytest.approx([sig(1.75), sig(0.25)], abs=1e-12)
    req = server.requests[0]
    assert req["model"] == "judge-7b" and req["max_tokens"] == 1 and req["temperature"] == 0 and req["logprobs"] == 5
    assert '"instruction": """q"""' in req["prompt"] and "m or M" in req["prompt"]
    (m,), _ = preference_matrices(judge, ["q"], [["aaaa", "a", "aa"]], batch_size=8)
    assert m[0, 1] == pytest.approx(0.5 + (sig(1.75) - sig(0.25)) / 2, abs=1e-12)  # the bias 1 cancels
    assert m[0, 1] > m[0, 2] > 0.5 and m[1, 0] < 0.5
    server.faults["no_logprobs"] = True
    fresh = LLMJudge(server.url, "judge-7b")  # no cache: asks again, reads the answer
    assert fresh.compare(["q", "q"], ["aaaa", "a"], ["a", "aaaaaaaaaa"]) == [1.0, 0.0]


def test_verdicts_are_cached_on_disk_and_a_rerun_asks_nothing(server, tmp_path):
    judge = LLMJudge(server.url, "j", cache_dir=tmp_path)
    first = judge.compare(["p"] * 3, ["a", "bb", "ccc"], ["bb", "ccc", "a"])
    assert len(server.requests) == 3
    again = LLMJudge(server.url, "j", cache_dir=tmp_path)
    assert again.compare(["p"] * 3, ["a", "bb", "ccc"], ["bb", "ccc", "a"]) == first
    assert len(server.requests) == 3
    other = LLMJudge(server.url, "another-judge", cache_dir=tmp_path)  # the judge is part of the key
    other.compare(["p"], ["a"], ["bb"])
    assert len(server.requests) == 4
    lines = [json.loads(x) for p in tmp_path.glob("llm-judge-cache-*.jsonl") for x in p.read_text().splitlines()]
    assert len(lines) == 4


def test_a_judge_that_answers_neither_m_nor_m_is_one_line(server):
    server.faults["bad_answer"] = True
    with pytest.raises(TrainError, match=r"answered 'maybe'; it must answer m or M") as e:
        LLMJudge(server.url, "j").compare(["p"], ["a"], ["b"])
    assert "\n" not in str(e.value)
    server.faults.update(bad_answer=False, nan_logprob=True)
    with pytest.raises(TrainError, match="gave the logprob 'NaN' for 'm'; expected a number"):
        LLMJudge(server.url, "j").compare(["p"], ["a"], ["b"])


def test_a_run_judged_by_the_llm_judge_and_resumed_pays_nothing_twice(tiny, tmp_path, server):
    from apo_trainer.loop import run
    from apo_trainer.store import RunStore

    out = tmp_path / "out"
    cfg = tiny_config(tiny, out, rounds=1, final_eval=False, oracle=f"llm:{server.url}:judge")
    run(cfg, quiet=True)
    scores = json.loads((out / "round-0" / "scores.json").read_text())
    assert scores["scores"] is None and len(server.requests) == 6 * 12  # 6 prompts x 12 ordered pairs
    RunStore(out).clear_markers(0, ("judge", "reference", "data", "train", "extrapolate"))
    (out / "round-0" / "scores.json").unlink()
    run(cfg, quiet=True)
    assert len(server.requests) == 6 * 12  # every verdict came from the cache
    assert json.loads((out / "round-0" / "scores.json").read_text()) == scores
