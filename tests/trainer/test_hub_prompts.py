"""Prompts from a Hub dataset id, through `datasets` on local files and an offline cache (never the network)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from apo_trainer.errors import ConfigError
from apo_trainer.prompts import load_prompts
from tests.trainer.conftest import tiny_config

ROWS = [
    {"prompt": "w1 w2", "messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]},
    {
        "prompt": "w4",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "w5"},
            {"role": "assistant", "content": "w6"},
            {"role": "user", "content": "w7 w8"},
            {"role": "assistant", "content": "w9"},
        ],
    },
]


def offline_cache(tmp: Path, repo: str, splits: dict[str, list[dict]]) -> Path:
    """A datasets cache holding ``repo`` as `load_dataset(repo)` leaves it (built from local JSON files)."""
    datasets = pytest.importorskip("datasets")
    src, cache = tmp / "src", tmp / "cache"
    src.mkdir(parents=True)
    files = {}
    for split, rows in splits.items():
        files[split] = str(src / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.load_dataset("json", data_files=files, cache_dir=str(cache))
    name = repo.split("/")[1]
    (built,) = [
        d for d in (cache / "json").iterdir() if d.is_dir()
    ]  # json/default-<hash>/0.0.0/<hash>/json-<split>.arrow
    target = cache / repo.replace("/", "___") / "default"
    shutil.copytree(built, target)
    (version_dir,) = [d for d in (target / "0.0.0").iterdir() if d.is_dir()]
    for f in version_dir.glob("json-*.arrow"):
        f.rename(f.with_name(f.name.replace("json-", f"{name}-", 1)))
    info = version_dir / "dataset_info.json"
    info.write_text(info.read_text().replace('"json"', json.dumps(name)))
    return cache


@pytest.fixture
def offline(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    cache = offline_cache(tmp_path, "org/prefs", {"train_prefs": ROWS, "test_prefs": ROWS[:1]})
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_hub_dataset_from_the_offline_cache(offline):
    assert load_prompts("org/prefs", "prompt", split="train_prefs") == ["w1 w2", "w4"]
    assert load_prompts("org/prefs", "prompt", split="test_prefs") == ["w1 w2"]


def test_chat_rows_take_the_last_user_turn(offline):
    assert load_prompts("org/prefs", "messages", split="train_prefs") == ["w1 w2", "w7 w8"]


def test_hub_dataset_errors_are_one_line(offline):
    for kwargs, needle in (
        (
            dict(path="org/prefs", prompt_field="prompt", split="nope"),
            "cannot load Hub dataset 'org/prefs' split 'nope'",
        ),
        (dict(path="org/missing", prompt_field="prompt", split="train"), "cannot load Hub dataset 'org/missing'"),
        (dict(path="org/prefs", prompt_field="text", split="train_prefs"), "has no column 'text'"),
    ):
        with pytest.raises(ConfigError) as e:
            load_prompts(**kwargs)
        assert needle in e.value.message and "\n" not in e.value.message and e.value.exit_code == 1


def test_datasets_folder_chat_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "d"))
    assert load_prompts(tmp_path / "d", "messages") == ["w1 w2", "w7 w8"]


@pytest.mark.slow
def test_a_run_reads_prompts_from_the_hub_dataset(offline, tiny, tmp_path):
    from apo_trainer.loop import run

    cfg = tiny_config(
        tiny, tmp_path / "out", prompts="org/prefs", prompts_split="train_prefs", rounds=1, final_eval=False
    )
    cfg.validate()
    run(cfg, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "out" / "round-0" / "samples.jsonl").read_text().splitlines()]
    assert sorted({r["prompt"] for r in rows}) == ["w1 w2", "w4"]


def test_missing_datasets_names_the_extra(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConfigError) as e:
        tiny_config(tiny, tmp_path / "out", prompts="org/prefs").validate()
    assert "pip install 'apo-merge[data]'" in e.value.message and e.value.exit_code == 1
