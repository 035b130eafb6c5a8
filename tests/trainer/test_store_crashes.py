"""The run store replaces a result in one step: SIGKILL at random moments never leaves neither old nor new."""

from __future__ import annotations

from pathlib import Path

import pytest

from apo_trainer.store import RunStore
from tests.killing import sigkill_while_saving

FILES = ["model.safetensors", "config.json", "train_log.jsonl"]


@pytest.mark.slow
def test_sigkill_during_store_commits_never_loses_the_result(tmp_path):
    store = RunStore(tmp_path / "run")
    final = store.trained(0)
    final.parent.mkdir(parents=True)

    def save(version: int) -> None:
        tmp = store.tmp_path(final)
        if tmp.exists():  # a killed child's leftover (the next run's remove_stale_temporaries would delete it)
            store.remove_stale_temporaries()
        tmp.mkdir()
        for name in FILES:
            (tmp / name).write_text(f"{version}\n" * 2000)
        store.commit(tmp, final)

    def version_of(folder: Path) -> int:
        versions = {(folder / name).read_text() for name in FILES}
        assert len(versions) == 1, "files of different saves"
        (text,) = versions
        version = int(text.split("\n")[0])
        assert text == f"{version}\n" * 2000, "a partial file"
        return version

    finished = sigkill_while_saving(save, final, FILES, version_of, trials=20, seed=1)
    assert max(finished) > 1
    store.remove_stale_temporaries()
    assert sorted(p.name for p in final.parent.iterdir()) == ["trained"]
