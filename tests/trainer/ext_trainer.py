"""A stand-in external trainer for tests/trainer/test_external.py: reads the round's TRL pairs, moves theta_t by a
seeded step and saves what a real trainer would (an HF folder, checkpoint-N folders or a LoRA adapter).

Usable in process (``train``) and as a command: ``python -m tests.trainer.ext_trainer KIND POLICY PAIRS OUTPUT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def _step(policy: str, pairs: str, salt: int):
    from transformers import AutoModelForCausalLM

    rows = [json.loads(x) for x in (Path(pairs) / "train.jsonl").read_text().splitlines() if x.strip()]
    assert rows and {"prompt", "chosen", "rejected", "p_chosen", "p_rejected"} <= set(rows[0])
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    g = torch.Generator().manual_seed(len(rows) * 1000 + salt)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=1e-2)
    return model


def train(policy: str, pairs: str, output: str, kind: str = "checkpoints") -> None:
    """``kind``: 'hf' (weights in OUTPUT), 'checkpoints' (OUTPUT/checkpoint-{1,2}, the last one the result),
    'lora' (a PEFT adapter with a random B), 'dcp' (torch DCP), 'wide' (another architecture), 'nothing'."""
    out = Path(output)
    if kind == "nothing":
        return
    if kind == "checkpoints":
        _step(policy, pairs, 1).save_pretrained(out / "checkpoint-1")
        _step(policy, pairs, 2).save_pretrained(out / "checkpoint-10")
        return
    if kind == "dcp":
        import torch.distributed.checkpoint as dcp

        dcp.save({"model": _step(policy, pairs, 2).state_dict()}, checkpoint_id=out)
        return
    if kind == "wide":
        from tests.checkpoints import make_model

        make_model(0, pad_token_id=0, bos_token_id=1, eos_token_id=2, intermediate_size=96).save_pretrained(out)
        return
    if kind == "lora":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
        torch.manual_seed(5)
        peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        peft_model.save_pretrained(out)
        return
    _step(policy, pairs, 2).save_pretrained(out)


if __name__ == "__main__":
    train(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[1])


def flat(prompts: list[str], responses: list[str]) -> list[float]:
    """An oracle under which every response ties: rounds without pairs."""
    return [0.0] * len(responses)
