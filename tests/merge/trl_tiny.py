"""A tiny Llama policy folder, preference pairs and DPOConfig for tests against TRL's DPOTrainer (nothing downloaded).

Import it after ``pytest.importorskip("trl")``: it imports trl and datasets.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file
from trl import DPOConfig

from tests.trainer.tiny import WORDS, make_policy

__all__ = ["dpo_args", "make_policy", "pairs", "raw_weights"]


def pairs(seed: int, n: int = 8) -> Dataset:
    """``n`` prompt/chosen/rejected rows of random words (every row the same length: no padding)."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return Dataset.from_list([{"prompt": words(3), "chosen": words(4), "rejected": words(4)} for _ in range(n)])


def dpo_args(output_dir: Path, **overrides) -> DPOConfig:
    """Two fp32 steps of 4 pairs on the CPU with a large lr (the weights move), the loss logged at every step."""
    kw = dict(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    kw.update(overrides)
    return DPOConfig(**kw)


def raw_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a one-file checkpoint folder (save_pretrained, a Trainer checkpoint, APOCallback's save_raw)."""
    return load_file(Path(folder) / "model.safetensors")
