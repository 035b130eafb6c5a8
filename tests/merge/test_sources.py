"""PREV / CUR as Hub repo ids, resolved by the real huggingface_hub code from a pre-filled cache, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import IncompleteSnapshotError
from huggingface_hub.utils import filter_repo_objects

from apo_merge import sources
from apo_merge.api import run_merge
from apo_merge.card import recorded_files
from apo_merge.errors import MergeError
from apo_merge.io import hashing
from apo_merge.options import MergeOptions
from tests.checkpoints import make_checkpoint
from tests.merge.hubcache import fill_cache

COMMIT_A, COMMIT_B, COMMIT_B_DEV = "a" * 40, "b" * 40, "c" * 40
DEAD_ENDPOINT = "http://127.0.0.1:9"  # refused at once, should anything try the network


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub-models")
    return {
        "a": make_checkpoint(root / "a", seed=0),
        "b": make_checkpoint(root / "b", seed=1),
        "b_dev": make_checkpoint(root / "b_dev", seed=2, max_shard_size="20KB"),
    }


@pytest.fixture
def cache(tmp_path, models, monkeypatch) -> Path:
    cache = tmp_path / "hub-cache"
    fill_cache(cache, "org/a", models["a"], COMMIT_A)
    fill_cache(cache, "org/b", models["b"], COMMIT_B)
    fill_cache(cache, "org/b", models["b_dev"], COMMIT_B_DEV, refs=("dev",))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", DEAD_ENDPOINT)
    monkeypatch.chdir(tmp_path)
    return cache


def test_cache_layout_is_the_one_huggingface_hub_reads(cache):
    info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {"org/a", "org/b"}
    revisions = {r.commit_hash: r for r in repos["org/b"].revisions}
    assert revisions[COMMIT_B].refs == frozenset({"main"}) and revisions[COMMIT_B_DEV].refs == frozenset({"dev"})
    assert {f.file_name for f in revisions[COMMIT_B_DEV].files} >= {"model.safetensors.index.json", "config.json"}


@pytest.mark.parametrize(
    "spec, commit", [("org/b", COMMIT_B), ("org/b@dev", COMMIT_B_DEV), (f"org/b@{COMMIT_B}", COMMIT_B)]
)
def test_resolves_repo_ids_and_revisions_offline(cache, spec, commit):
    src = sources.resolve(spec)
    repo_cache = cache / "models--org--b"
    assert src.path == repo_cache / "snapshots" / commit
    assert src.trusted_root == repo_cache and src.hub_id == "org/b" and src.commit == commit
    assert (src.path / "config.json").is_symlink()  # snapshots link into ../../blobs


def _no_input_hashing(monkeypatch) -> None:
    """Reading a weight file through SHA-256 (streamed or from disk) fails the test."""

    def stream(*args, **kwargs):
        raise AssertionError("an input weight file was hashed from the engine's reads")

    def hash_file(path, *args, **kwargs):
        assert not str(path).endswith(".safetensors"), f"{path} was read to hash it"
        return real(path, *args, **kwargs)

    real = hashing.hash_file
    monkeypatch.setattr(hashing, "_Stream", stream)
    monkeypatch.setattr(hashing, "hash_file", hash_file)


def test_merge_from_the_hub_equals_the_local_merge_and_cards_the_ids(cache, models, tmp_path, monkeypatch):
    local = run_merge(
        models["a"], models["b_dev"], MergeOptions(0.3, device="cpu", hash_inputs=True), tmp_path / "local-out"
    )
    _no_input_hashing(monkeypatch)  # the Hub cache names LFS blobs by their SHA-256: nothing is read to hash them
    hub = run_merge("org/a", "org/b@dev", MergeOptions(0.3, device="cpu"), tmp_path / "hub-out")
    assert set(hub.digests) == set(local.digests) and len(hub.digests) > 1  # b_dev is sharded
    assert _tensors(tmp_path / "hub-out") == _tensors(tmp_path / "local-out")
    card = (tmp_path / "hub-out" / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model:\n- org/a\n- org/b\n" in front and "base_model_relation: merge" in front
    assert f"| cur | `org/b@{COMMIT_B_DEV}` |" in card  # Hub inputs: repo@commit
    # content hashes do not depend on where the input came from; the Hub's are the cache's blob names
    assert hub.input_hashes == local.input_hashes
    assert f"| cur content sha256 | `{local.input_hashes['cur'].sha256}` |" in card and "unknown" not in card
    assert (tmp_path / "hub-out" / "config.json").is_file() and not (tmp_path / "hub-out" / "config.json").is_symlink()


def test_a_local_folder_of_the_same_name_wins(cache, models, tmp_path):
    make_checkpoint(tmp_path / "org" / "b", seed=5)
    src = sources.resolve("org/b")
    assert src.hub_id is None and src.path == Path("org/b")


def test_not_cached_while_offline_is_a_clear_error(cache):
    with pytest.raises(MergeError, match="HF_HUB_OFFLINE=1") as e:
        sources.resolve("org/missing")
    assert e.value.exit_code == 1
    with pytest.raises(MergeError, match="HF_HUB_OFFLINE"):
        sources.resolve("org/b@no-such-branch")


def test_non_repo_ids_stay_local_paths(cache):
    for spec in ("./org/b", "runs", "/abs/x/y", "a/b/c", "org/b@x@y"):
        assert sources.resolve(spec).hub_id is None
    with pytest.raises(MergeError, match="no such folder"):
        run_merge("runs", "./org/b", MergeOptions(0.3), "out")


def test_symlink_leaving_the_repo_cache_is_refused(cache, tmp_path, models):
    snapshot = cache / "models--org--b" / "snapshots" / COMMIT_B
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((models["b"] / "model.safetensors").read_bytes())
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(outside)
    with pytest.raises(MergeError, match="symlink leading outside"):
        run_merge("org/a", "org/b", MergeOptions(0.3), tmp_path / "out")


def test_fetch_patterns_take_weights_and_side_files_never_pickles():
    repo_files = [
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "chat_template.jinja",
        "merges.txt",
        "vocab.json",
        "LICENSE",
        "adapter_config.json",
        "adapter_model.safetensors",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "training_args.bin",
        "model.pt",
        "original/consolidated.00.pth",
        "original/params.json",
        "onnx/model.onnx",
        "model.gguf",
        "flax_model.msgpack",
        "tf_model.h5",
        "README.md",
        ".gitattributes",
    ]
    kept = set(
        filter_repo_objects(
            repo_files, allow_patterns=sources.HUB_ALLOW_PATTERNS, ignore_patterns=sources.HUB_IGNORE_PATTERNS
        )
    )
    assert kept == {
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "chat_template.jinja",
        "merges.txt",
        "vocab.json",
        "LICENSE",
        "adapter_config.json",
        "adapter_model.safetensors",
        "pytorch_model.bin.index.json",
    }


def test_offline_snapshot_may_lack_the_files_apo_merge_does_not_fetch(tmp_path, models, monkeypatch):
    cache = tmp_path / "c"
    fill_cache(cache, "org/t", models["a"], COMMIT_A, extra_tree={"pytorch_model.bin": b"pickle", "README.md": b"x"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", DEAD_ENDPOINT)
    with pytest.raises(IncompleteSnapshotError):  # the cached tree listing is checked ...
        snapshot_download("org/t")
    assert sources.resolve("org/t").commit == COMMIT_A  # ... and our patterns leave the pickle out


def test_cli_honours_hf_hub_offline_and_hf_hub_cache_from_the_environment(tmp_path, models):
    cache = tmp_path / "env-cache"
    fill_cache(cache, "org/a", models["a"], COMMIT_A)
    fill_cache(cache, "org/b", models["b"], COMMIT_B)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": DEAD_ENDPOINT}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "apo_merge",
            "org/a",
            "org/b",
            "--alpha",
            "0.5",
            "-o",
            str(tmp_path / "out"),
            "-q",
            "--device",
            "cpu",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    local = run_merge(models["a"], models["b"], MergeOptions(0.5, device="cpu"), tmp_path / "local")
    card = (tmp_path / "out" / "README.md").read_text()
    assert set(recorded_files(card)) == set(local.digests)
    assert _tensors(tmp_path / "out") == _tensors(tmp_path / "local")
    assert "base_model:\n- org/a\n- org/b\n" in card


def _tensors(folder: Path) -> dict[str, bytes]:
    """Every tensor's name, dtype, shape and bytes (headers differ: they name the inputs)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as g:
            for name in g.keys():  # noqa: SIM118 - safe_open has no __iter__
                t = g.get_tensor(name)
                out[name] = (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return out
