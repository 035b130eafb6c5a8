"""TRL's side of bench/trainer_vs_trl.py, run by the python of a venv with trl: DPOTrainer on the exported pairs.

Reads the JSON spec named on the command line and prints one JSON line. The pairs arrive tokenized (the ids
apo-train trained on) with the reference log-probs of apo-train's reference phase, so TRL's dataset preparation
(EOS appending, tokenization) and its ``precompute_ref_log_probs`` pass are skipped and both trainers see the same
sequences; a sequential sampler gives apo-train's data order. Imports nothing from this project.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    os.environ["TQDM_DISABLE"] = "1"
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    keep = ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")
    data = Dataset.from_list([{k: r[k] for k in keep} for r in rows])
    losses: list[torch.Tensor] = []

    class Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already tokenized

        def _precompute_ref_logps(self, dataset, *args, **kwargs):
            return dataset  # already holds apo-train's reference log-probs

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            losses.append((loss[0] if isinstance(loss, tuple) else loss).detach())
            return loss

    steps = -(-len(rows) // spec["batch_size"])
    cuda = torch.cuda.is_available()
    args = DPOConfig(
        output_dir=spec["save_dir"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        learning_rate=spec["learning_rate"],
        lr_scheduler_type=spec["lr_scheduler"],
        warmup_steps=round(spec["warmup_ratio"] * steps),
        weight_decay=spec["weight_decay"],
        max_grad_norm=spec["max_grad_norm"],
        optim="adamw_torch",
        gradient_checkpointing=False,  # TRL's default is on; apo-train's is off
        beta=spec["beta"],
        loss_type=["sigmoid"],
        max_length=None,
        precompute_ref_log_probs=True,
        bf16=spec["bf16"],
        use_cpu=not cuda,
        seed=spec["seed"],
        save_strategy="no",
        report_to="none",
        logging_steps=10**6,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    tok = AutoTokenizer.from_pretrained(spec["model"])
    base_rss = _rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tok)
    if cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    loop = time.perf_counter() - t1
    trainer.save_model(spec["save_dir"])
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"wall_s": wall, "loop_s": loop, "first_loss": losses[0].item(), "steps": trainer.state.global_step}
    out.update(peak_rss=peak, rss_rise=peak - base_rss)
    if cuda:
        out["max_allocated"] = torch.cuda.max_memory_allocated()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
