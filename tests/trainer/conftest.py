from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apo_trainer.config import APOConfig
from tests.trainer.tiny import make_policy, make_prompts


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (a busy CI machine makes a second one spin). Module scope, so that
    module fixtures that run the trainer see the same thread count as the tests (results depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A folder holding a tiny policy (``policy/``) and 16 prompts (``prompts.jsonl``)."""
    root = tmp_path_factory.mktemp("tiny")
    make_policy(root / "policy")
    make_prompts(root / "prompts.jsonl", n=16)
    return root


def tiny_config(tiny: Path, out: Path, **overrides) -> APOConfig:
    """A config that runs a round in about a second on the CPU."""
    values = dict(
        model=str(tiny / "policy"),
        prompts=str(tiny / "prompts.jsonl"),
        oracle="callable:tests.trainer.tiny:word_sum",
        output_dir=str(out),
        rounds=2,
        samples_per_prompt=4,
        max_new_tokens=6,
        prompts_per_round=6,
        learning_rate=1e-2,
        beta=0.5,
        batch_size=2,
        grad_accum=2,
        warmup_ratio=0.0,
        seed=3,
        eval_fraction=0.0,  # every prompt trains, as the tests' expectations were set (the default holds 5% out)
    )
    values.update(overrides)
    return APOConfig.from_dict(values)


@pytest.fixture(scope="session")
def reference_run(tiny, tmp_path_factory):
    """An uninterrupted two-round run (alpha 0.3, final evaluation) on one thread: (folder, records)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    from apo_trainer.loop import run

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = run(tiny_config(tiny, out, alpha=0.3), quiet=True)
    finally:
        torch.set_num_threads(before)
    return out, records
