"""The Python blocks of README.md and docs/merge.md fenced as ```python tested run as written, with their own
imports, on a tiny Llama and tiny preference data: three APO rounds in TRL's DPOTrainer. The free names a block
uses are the ones its prose defines: ``model`` and ``tokenizer`` (theta_0) and ``rounds`` (one dataset per round).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MARK = "```python tested"
DOCS = ["README.md", "docs/merge.md"]
# Pairs per round: merge.md's block takes 64 pairs per step and warms up for 10% of the steps (lr 0 at the first).
PAIRS = {"README.md": 8, "docs/merge.md": 72}


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Trainer leaves accelerate's process-wide state (device, mixed precision) behind; later tests build their own."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def marked_blocks(doc: str) -> list[str]:
    """The code of every block fenced with MARK in ``doc`` (a path relative to the repository root)."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    return re.findall(r"^" + re.escape(MARK) + r"\n(.*?)^```$", text, flags=re.M | re.S)


@pytest.mark.parametrize("doc", DOCS)
def test_the_apocallback_block_is_marked(doc):
    blocks = marked_blocks(doc)
    assert len(blocks) == 1 and "APOCallback" in blocks[0], f"{doc}: mark its APOCallback block with {MARK!r}"


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS)
def test_the_block_runs_three_apo_rounds(doc, tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint

    from apo_merge import extrapolate_state_dict
    from tests.merge.trl_tiny import make_policy, pairs, raw_weights

    theta0 = make_policy(tmp_path / "theta0")
    model = AutoModelForCausalLM.from_pretrained(theta0)
    names = {
        "model": model,
        "tokenizer": AutoTokenizer.from_pretrained(theta0),
        "rounds": [pairs(t, PAIRS[doc]) for t in (1, 2, 3)],
    }
    monkeypatch.chdir(tmp_path)
    if not torch.cuda.is_available():  # the blocks keep DPOConfig's default bf16=True, which asks for a GPU
        monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    (code,) = marked_blocks(doc)
    exec(compile(code, f"{doc}'s tested block", "exec"), names)  # the callback refuses a reference that is not theta_t

    assert names["apo"].rounds == 3
    # Each round's last checkpoint holds its raw output; the model is the APO step between the last two.
    raw2, raw3 = (raw_weights(get_last_checkpoint(str(tmp_path / "runs" / f"round-{t}"))) for t in (2, 3))
    want = extrapolate_state_dict(prev=raw2, cur=raw3, alpha=0.3)
    state = model.state_dict()
    assert any(not torch.equal(raw2[n], raw3[n]) for n in raw3)  # round 3 trained
    for name, t in want.items():
        assert torch.equal(state[name].view(torch.int32), t.view(torch.int32)), name
