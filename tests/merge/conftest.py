from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Two tiny Llamas (seeds 0 and 1), each saved as one file and as three shards with an index."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "single_prev": make_checkpoint(root / "single_prev", seed=0),
        "single_cur": make_checkpoint(root / "single_cur", seed=1),
        "shard_prev": make_checkpoint(root / "shard_prev", seed=0, max_shard_size="50KB"),
        "shard_cur": make_checkpoint(root / "shard_cur", seed=1, max_shard_size="50KB"),
    }


@pytest.fixture
def keep_sigterm():
    """The merge command installs a SIGTERM handler; in-process runs must not leave it on pytest."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)
