"""The pieces of a round: prompt split, pairs and win-rates, oracles, sampler choice, log-probs, the run folder."""

from __future__ import annotations

import importlib.machinery
import json
import math
import types

import pytest
import torch

from apo_trainer.data import build_pairs, win_rates
from apo_trainer.errors import ConfigError, TrainError
from apo_trainer.oracle import CallableOracle, RewardModelOracle, bradley_terry, load_oracle
from apo_trainer.prompts import load_prompts, round_prompts
from apo_trainer.sample import encode_prompt, select_sampler, trim_response
from apo_trainer.sequences import collate, sequence_logps
from apo_trainer.store import RunStore
from tests.checkpoints import make_model
from tests.trainer.tiny import make_tokenizer, word_sum


def test_rounds_take_fresh_prompts_until_the_set_is_exhausted():
    prompts = [f"p{i}" for i in range(10)]
    r0, reused0 = round_prompts(prompts, 0, 4, seed=1)
    r1, reused1 = round_prompts(prompts, 1, 4, seed=1)
    r2, reused2 = round_prompts(prompts, 2, 4, seed=1)
    assert len(set(r0 + r1)) == 8 and not reused0 and not reused1
    assert reused2 and len(r2) == 4 and set(r0 + r1 + r2[:2]) == set(range(10))
    assert round_prompts(prompts, 1, 4, seed=1) == (r1, False)
    assert round_prompts(prompts, 0, 4, seed=2)[0] != r0
    assert round_prompts(prompts, 0, 4, seed=1, shuffle=False)[0] == [0, 1, 2, 3]
    assert round_prompts(prompts, 3, 0, seed=1) == (list(range(10)), True)


def test_prompt_sources(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\n\n{"prompt": "y"}\n')
    (tmp_path / "a.jsonl").write_text('{"prompt": "w"}\n')
    assert load_prompts(tmp_path) == ["w", "x", "y"]
    assert load_prompts(tmp_path / "b.jsonl") == ["x", "y"]
    (tmp_path / "c.jsonl").write_text("not json\n")
    with pytest.raises(ConfigError, match=r"c.jsonl:1: not a JSON object"):
        load_prompts(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "dataset_info.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="install `datasets`"):
            load_prompts(tmp_path / "d")


def test_win_rates_follow_the_definition():
    s = [0.0, 1.0, 3.0]
    p = win_rates(s)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for i in range(3):
        assert p[i] == pytest.approx(sum(sig(s[i] - s[j]) for j in range(3)) / 3, rel=1e-12)
    P = bradley_terry(s)
    assert torch.equal(torch.diagonal(P), torch.full((3,), 0.5, dtype=torch.float64))
    assert torch.allclose(P + P.T, torch.ones(3, 3, dtype=torch.float64))


def test_pairs_are_best_vs_worst_and_all_tie_prompts_are_dropped():
    pairs, ties = build_pairs([[0.2, 0.9, 0.1, 0.9], [0.5, 0.5, 0.5], [1.0, -1.0, 0.0]])
    assert ties == 1 and [p["prompt"] for p in pairs] == [0, 2]
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == (1, 2)
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == (0, 1)
    assert pairs[0]["p_chosen"] == pytest.approx(win_rates([0.2, 0.9, 0.1, 0.9])[1])
    assert pairs[1]["p_chosen"] > 0.5 > pairs[1]["p_rejected"]


def test_callable_oracle_batches_and_checks_lengths():
    calls = []

    def fn(ps, rs):
        calls.append(len(ps))
        return [len(r) for r in rs]

    assert CallableOracle(fn, batch_size=2).score(["a"] * 5, ["x", "xy", "", "abc", "z"]) == [1, 2, 0, 3, 1]
    assert calls == [2, 2, 1]
    with pytest.raises(TrainError, match="returned 1 scores for 2 responses"):
        CallableOracle(lambda ps, rs: [0.0]).score(["a", "b"], ["c", "d"])
    oracle = load_oracle("callable:tests.trainer.tiny:word_sum")
    assert oracle.score(["w1", "w1"], ["w10 w20", "w3"]) == word_sum(["w1", "w1"], ["w10 w20", "w3"])


def test_reward_model_oracle_scores_with_the_scalar_head(tmp_path):
    from transformers import LlamaForSequenceClassification

    from tests.checkpoints import tiny_llama_config

    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(tiny_llama_config(num_labels=1, pad_token_id=0))
    rm.save_pretrained(tmp_path / "rm")
    tok = make_tokenizer()
    tok.save_pretrained(tmp_path / "rm")
    oracle = load_oracle(f"reward-model:{tmp_path / 'rm'}", batch_size=2)
    assert isinstance(oracle, RewardModelOracle)
    prompts, responses = ["w1 w2", "w3", "w4 w5 w6"], [" w7", " w8 w9 w10", " w11"]
    got = oracle.score(prompts, responses)
    for p, r, g in zip(prompts, responses, got, strict=True):
        ids = tok(p + r, return_tensors="pt")
        assert g == pytest.approx(rm(**ids).logits[0, 0].item(), abs=1e-5)
    rm2 = LlamaForSequenceClassification(tiny_llama_config(num_labels=2, pad_token_id=0))
    rm2.save_pretrained(tmp_path / "rm2")
    tok.save_pretrained(tmp_path / "rm2")
    with pytest.raises(TrainError, match="needs a scalar head"):
        load_oracle(f"reward-model:{tmp_path / 'rm2'}")


@pytest.mark.parametrize(
    "requested, cuda, procs, vllm, want",
    [
        ("auto", False, 1, False, "generate"),
        ("auto", False, 1, True, "generate"),
        ("auto", True, 1, False, "static"),
        ("auto", True, 1, True, "vllm"),
        ("auto", True, 2, True, "static"),
        ("generate", True, 1, True, "generate"),
        ("static", False, 1, False, "static"),
        ("vllm", True, 1, True, "vllm"),
    ],
)
def test_sampler_selection(requested, cuda, procs, vllm, want):
    assert select_sampler(requested, cuda=cuda, num_processes=procs, vllm_available=vllm) == want


def test_vllm_sampler_refused_when_missing_and_allowed_on_several_processes():
    with pytest.raises(ConfigError, match="needs the vllm package"):
        select_sampler("vllm", cuda=True, num_processes=1, vllm_available=False)
    # one engine per process (issue 26): no longer refused
    assert select_sampler("vllm", cuda=True, num_processes=2, vllm_available=True) == "vllm"


def test_trim_response_keeps_the_first_end_token():
    assert trim_response([5, 6, 2, 0, 0], [2]) == ([5, 6, 2], True)
    assert trim_response([5, 6, 7], [2, 9]) == ([5, 6, 7], False)
    assert trim_response([9, 2], [2, 9]) == ([9], True)


def test_prompts_use_the_chat_template_when_there_is_one():
    plain, chat = make_tokenizer(), make_tokenizer(chat_template=True)
    assert encode_prompt(plain, "w1 w2", True) == [1, 5, 6]
    ids = encode_prompt(chat, "w1 w2", True)
    assert chat.decode(ids) == "user : w1 w2 ; assistant :"
    assert encode_prompt(chat, "w1 w2", False) == [1, 5, 6]


def test_sequence_logps_sum_the_response_tokens_only():
    torch.manual_seed(0)
    model = make_model(0).eval()
    pairs = [([1, 5, 6], [7, 8, 2]), ([1, 9], [10])]
    enc = collate(pairs, pad_id=0)
    assert enc["input_ids"].tolist() == [[1, 5, 6, 7, 8, 2], [1, 9, 10, 0, 0, 0]]
    got = sequence_logps(model, **enc)
    for row, (p, r) in enumerate(pairs):
        ids = torch.tensor([p + r])
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
        want = sum(logp[len(p) + i - 1, tok].item() for i, tok in enumerate(r))
        assert got[row].item() == pytest.approx(want, abs=1e-4)


def test_commit_replaces_a_stale_result_and_stale_temporaries_are_removed(tmp_path):
    store = RunStore(tmp_path)
    final = store.trained(0)
    final.mkdir(parents=True)
    (final / "old.bin").write_bytes(b"old")
    tmp = store.tmp_path(final)
    tmp.mkdir()
    (tmp / "new.bin").write_bytes(b"new")
    store.commit(tmp, final)
    assert [p.name for p in final.iterdir()] == ["new.bin"]
    (store.round_dir(0) / ".tmp-samples.jsonl-123").write_text("half")
    (store.round_dir(0) / ".tmp-policy-123").mkdir()
    assert len(store.remove_stale_temporaries()) == 2
    assert sorted(p.name for p in store.round_dir(0).iterdir()) == ["trained"]


def test_eos_ids_come_from_the_generation_config_else_the_tokenizer(tiny, tmp_path):
    from apo_trainer.sample import eos_ids

    tok = make_tokenizer()
    assert eos_ids(tiny / "policy", tok) == [2]
    tok.save_pretrained(tmp_path)
    assert eos_ids(tmp_path, tok) == [tok.eos_token_id]


class _FakeVLLM:
    """Stands in for the vllm package: records how the backend drives it, returns fixed token ids."""

    def __init__(self):
        self.module = types.ModuleType("vllm")
        self.module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
        self.module.LLM = self._llm
        self.module.SamplingParams = lambda **kw: kw
        self.calls = []

    def _llm(self, **kw):
        fake = self

        class LLM:
            def generate(self, prompts, params, use_tqdm):
                fake.calls.append((kw, prompts, params))
                out = []
                for i, p in enumerate(prompts):
                    # one seeded request per sample (n=1): sample j of a prompt is request i, j = i % 4
                    n, first = (1, i % 4) if isinstance(params, list) else (params["n"], 0)
                    rows = [
                        _ns(token_ids=[10 + j, 11], finish_reason="stop" if j % 2 else "length")
                        for j in range(first, first + n)
                    ]
                    out.append(_ns(outputs=rows, prompt=p))
                return out

        return LLM()


def _ns(**kw):
    return types.SimpleNamespace(**kw)


def test_vllm_backend_drives_the_engine_and_keeps_end_tokens(tiny, tmp_path, monkeypatch):
    import sys

    from apo_trainer.loop import run
    from tests.trainer.conftest import tiny_config

    fake = _FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    cfg = tiny_config(tiny, tmp_path / "out", rounds=1, final_eval=False, sampler="vllm", temperature=0.7)
    records = run(cfg, quiet=True)
    assert records[0]["sampler"] == "vllm"
    kw, prompts, params = fake.calls[0]
    assert kw["model"] == str(tiny / "policy") and kw["dtype"] == "float32"
    assert all(p["n"] == 1 and p["temperature"] == 0.7 and p["max_tokens"] == 6 for p in params)
    assert all("prompt_token_ids" in p for p in prompts) and len(prompts) == len(params) == 4 * 6
    rows = [json.loads(line) for line in (tmp_path / "out/round-0/samples.jsonl").open()]
    assert sorted(p["seed"] for p in params) == sorted(x for r in rows for x in r["seeds"])
    assert rows[0]["response_ids"] == [[10, 11], [11, 11, 2], [12, 11], [13, 11, 2]]
    assert rows[0]["finished"] == [False, True, False, True]


@pytest.mark.parametrize("world", [1, 2])
def test_vllm_under_a_launcher_runs_one_engine_per_process_and_keeps_the_process_group(monkeypatch, world):
    import sys

    from apo_trainer.config import APOConfig
    from apo_trainer.sample import generate_vllm

    fake = _FakeVLLM()
    torn = []
    state = types.ModuleType("vllm.distributed.parallel_state")
    state.destroy_model_parallel = lambda: torn.append("model_parallel")
    state.destroy_distributed_environment = lambda: torn.append("distributed_environment")
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    monkeypatch.setitem(sys.modules, "vllm.distributed", types.ModuleType("vllm.distributed"))
    monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", state)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = APOConfig(max_new_tokens=4)
    out = generate_vllm("m", "m", [[1, 2]], k=4, config=cfg, seed=0, eos=[2], quiet=True, seeds=[[5, 6, 7, 8]])
    assert [r[0] for r in out[0]] == [10, 11, 12, 13]
    kw = fake.calls[0][0]
    assert kw.get("distributed_executor_backend") == ("external_launcher" if world > 1 else None)
    assert torn == (["model_parallel"] if world > 1 else ["model_parallel", "distributed_environment"])
    two = APOConfig(vllm_tensor_parallel_size=2)
    if world > 1:
        with pytest.raises(ConfigError, match="vllm_tensor_parallel_size > 1 runs in one process"):
            generate_vllm("m", "m", [[1]], k=1, config=two, seed=0, eos=[], quiet=True)
    else:
        generate_vllm("m", "m", [[1]], k=1, config=two, seed=0, eos=[], quiet=True)
        assert fake.calls[-1][0]["tensor_parallel_size"] == 2
