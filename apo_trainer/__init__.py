"""apo-train: the APO round runner (sample, judge, train with DPO or SPPO, extrapolate), arXiv 2410.06293.

Public API (heavy modules import lazily, so the CLI starts fast)::

    from apo_trainer import APOConfig, run
    records = run(APOConfig.from_yaml("run.yaml", ["rounds=2"]))
    wins = evaluate_run("runs/apo")   # win rates per round on held-out prompts (apo-train eval)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from apo_kernels.lazy import lazy_exports

__all__ = ["APOConfig", "ConfigError", "Oracle", "PairwiseOracle", "TrainError", "evaluate_run", "run"]

_LAZY = {
    "APOConfig": "apo_trainer.config",
    "ConfigError": "apo_trainer.errors",
    "TrainError": "apo_trainer.errors",
    "Oracle": "apo_trainer.oracle",
    "PairwiseOracle": "apo_trainer.oracle",
    "evaluate_run": "apo_trainer.evaluation",
    "run": "apo_trainer.loop",
}

if TYPE_CHECKING:
    from apo_trainer.config import APOConfig
    from apo_trainer.errors import ConfigError, TrainError
    from apo_trainer.evaluation import evaluate_run
    from apo_trainer.loop import run
    from apo_trainer.oracle import Oracle, PairwiseOracle


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
