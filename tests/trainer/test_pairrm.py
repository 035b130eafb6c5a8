"""PairRM on plain transformers (apo_trainer.pairrm): llm-blender's input layout and head, batched, on a tiny random
DeBERTa-v2 saved in llm-blender's checkpoint layout. Fidelity to llm-blender's own code: bench/pairrm_fidelity.py."""

from __future__ import annotations

import json
import math
import string
import sys

import pytest
import torch

from apo_trainer.errors import ConfigError
from apo_trainer.oracle import PairRMOracle, load_oracle, preference_matrices
from apo_trainer.pairrm import CAND, CAND1, CAND2, SOURCE, PairRMModel, load_pairrm

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "is", "good", "bad", "answer", "question", "why"]


def tiny_tokenizer():
    from transformers import DebertaV2Tokenizer

    vocab = [("[PAD]", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0), ("[UNK]", 0.0), ("[MASK]", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in WORDS]
    vocab += [(c, -5.0) for c in string.ascii_lowercase + string.digits + ".,?!"]
    vocab += [("▁" + c, -6.0) for c in string.ascii_lowercase]
    return DebertaV2Tokenizer(vocab=vocab, unk_id=3)


def tiny_config(vocab_size: int):
    from transformers import DebertaV2Config

    # deberta-v3-large's layout (relative attention, no absolute positions), shrunk
    return DebertaV2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=256,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        max_relative_positions=-1,
        type_vocab_size=0,
        pad_token_id=0,
    )


@pytest.fixture(scope="module")
def ranker_dir(tmp_path_factory):
    """llm-blender/PairRM's layout: a RankerConfig config.json naming the backbone, and the ranker's weights."""
    from safetensors.torch import save_file
    from transformers import DebertaV2Model

    root = tmp_path_factory.mktemp("pairrm")
    tok = tiny_tokenizer()
    backbone = root / "backbone"
    torch.manual_seed(0)
    DebertaV2Model(tiny_config(len(tok))).save_pretrained(backbone)
    tok.save_pretrained(backbone)
    torch.manual_seed(1)
    model = PairRMModel(tiny_config(len(tok) + 4))
    for p in model.head_layer.parameters():  # random head, larger than the default init so logits move
        torch.nn.init.normal_(p, std=0.5)
    ranker = root / "ranker"
    ranker.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ranker / "model.safetensors"))
    cfg = {"ranker_type": "pairranker", "model_type": "deberta", "model_name": str(backbone), "n_tasks": 1}
    cfg.update(source_maxlength=24, candidate_maxlength=10, drop_out=0.05, fp16=True, inference_mode="bubble")
    (ranker / "config.json").write_text(json.dumps(cfg))
    return ranker


def test_input_layout_is_llm_blenders(ranker_dir):
    rm = load_pairrm(str(ranker_dir))
    tok = rm.tokenizer
    long = "a dog ran on the mat is good " * 3
    ids, marks = rm.encode("why is the cat[SEP] on the mat", "the cat sat", long)
    cls, sep = tok.cls_token_id, tok.sep_token_id
    src = tok("<|source|>why is the cat  on the mat")["input_ids"]  # [SEP] inside a text becomes a space
    assert src[:2] == [cls, rm.ids[SOURCE]] and src[-1] == sep and len(src) <= 24
    room = 10 + (24 - len(src)) // 2
    c1 = tok("<|candidate|>the cat sat", max_length=room, truncation=True)["input_ids"]
    c2 = tok("<|candidate|>" + long, max_length=room, truncation=True)["input_ids"]
    assert len(c2) == room and c2[-1] == sep  # truncated to 10 + half the prompt's unused room
    c1[1], c2[1] = rm.ids[CAND1], rm.ids[CAND2]
    assert ids == src + c1 + c2
    assert marks == (1, len(src) + 1, len(src) + len(c1) + 1)
    assert [ids[m] for m in marks] == [rm.ids[SOURCE], rm.ids[CAND1], rm.ids[CAND2]]
    assert rm.ids[CAND] not in ids
    # markers in a user's text do not move the pooled positions
    ids, marks = rm.encode("<|candidate1|> x", "<|source|>", "b")
    assert [ids[m] for m in marks] == [rm.ids[SOURCE], rm.ids[CAND1], rm.ids[CAND2]] and marks[0] == 1


def test_head_and_pooling_match_a_hand_computation(ranker_dir):
    rm = load_pairrm(str(ranker_dir))
    prompt, a, b = "why is the sky", "the cat sat on the mat", "bad"
    ids, (s, i, j) = rm.encode(prompt, a, b)
    m = rm.model.double().requires_grad_(False)
    h = m.pretrained_model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    w1, b1 = m.head_layer[1].weight, m.head_layer[1].bias
    w2, b2 = m.head_layer[4].weight, m.head_layer[4].bias

    def head(x, y):  # Linear(2H, H), tanh, Linear(H, 1), by hand
        z = torch.cat([x, y])
        return [
            sum(w2[0, k] * math.tanh(sum(w1[k, n] * z[n] for n in range(len(z))) + b1[k]) for k in range(32)) + b2[0]
        ]

    want = float(head(h[s], h[i])[0] - head(h[s], h[j])[0])
    (got,) = rm.logits([prompt], [a], [b])
    assert got == pytest.approx(want, abs=1e-9) and abs(want) > 1e-3


def test_batching_does_not_change_a_row(ranker_dir):
    rm = load_pairrm(str(ranker_dir), batch_size=1)
    prompts = ["why", "the cat sat on the mat and the dog ran on the mat too", "is it good", "q"] * 2
    a = ["good answer", "a", "the mat is a mat is a mat is a mat", "why is the cat", "x", "yy", "bad", "dog"]
    b = ["bad", "the dog ran", "a", "cat cat", "the cat sat on the mat", "z", "q?", "dog"]
    one = rm.logits(prompts, a, b)
    rm.batch_size = 8
    eight = rm.logits(prompts, a, b)
    assert len(set(one)) > 4
    assert max(abs(x - y) for x, y in zip(one, eight)) <= 1e-6
    d = rm.compare(prompts, a, b)  # llm-blender's comparison logit: L(a, b) - L(b, a)
    rev = rm.logits(prompts, b, a)
    assert d == pytest.approx([x - y for x, y in zip(eight, rev)], abs=1e-6)
    assert d[7] == 0.0  # the same answer twice: the two orders are the same sequence


def test_the_oracle_is_symmetric_and_ties_are_exact(ranker_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_blender", None)  # importing it would fail: it is not used
    oracle = load_oracle(f"pairrm:{ranker_dir}", batch_size=3)
    assert isinstance(oracle, PairRMOracle)
    f_ab = oracle.compare(["p", "p"], ["good answer", "a"], ["bad", "a"])
    f_ba = oracle.compare(["p", "p"], ["bad", "a"], ["good answer", "a"])
    assert f_ab[0] + f_ba[0] == pytest.approx(1.0, abs=1e-12) and f_ab[0] != 0.5
    assert f_ab[1] == f_ba[1] == 0.5
    assert oracle._seen == {}  # every reverse has been asked: nothing kept
    rm = oracle.model
    calls = []
    real = rm.logits
    rm.logits = lambda *c: calls.append(len(c[0])) or real(*c)
    responses = ["good answer", "bad", "the cat sat", "the cat sat"]
    (m,), _ = preference_matrices(oracle, ["why"], [responses], batch_size=5)
    assert sum(calls) == 12  # 12 ordered pairs, each through the encoder once
    assert torch.allclose(m + m.T, torch.ones(4, 4, dtype=torch.float64), atol=1e-12)
    assert m[2, 3] == m[3, 2] == 0.5
    d = rm.compare(["why"], ["good answer"], ["bad"])[0]
    assert m[0, 1] == pytest.approx(1 / (1 + math.exp(-d)), abs=1e-6)


def test_a_checkpoint_that_is_not_pairrm_is_one_line(ranker_dir, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"ranker_type": "summareranker", "model_type": "roberta"}))
    with pytest.raises(ConfigError, match="only llm-blender's DeBERTa pairranker"):
        load_pairrm(str(tmp_path))
    cfg = json.loads((ranker_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="neither model.safetensors nor pytorch_model.bin"):
        load_pairrm(str(tmp_path))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="not a PairRM checkpoint"):
        load_pairrm(str(tmp_path))


def test_a_tokenizer_that_does_not_load_names_its_error_and_the_extra(ranker_dir, tmp_path):
    import shutil

    cfg = json.loads((ranker_dir / "config.json").read_text())
    backbone = tmp_path / "backbone"
    shutil.copytree(cfg["model_name"], backbone)
    (backbone / "tokenizer.json").unlink()
    (backbone / "spm.model").write_bytes(b"not a sentencepiece model")
    ranker = tmp_path / "ranker"
    shutil.copytree(ranker_dir, ranker)
    (ranker / "config.json").write_text(json.dumps({**cfg, "model_name": str(backbone)}))
    with pytest.raises(
        ConfigError, match=r"cannot load the tokenizer of .*\(\w+Error: .*pip install 'apo-merge\[pairrm\]'"
    ):
        load_pairrm(str(ranker))
