"""Input content hashes (--hash-inputs): exactly as the card defines them, taken from the engine's reads without a
second pass; by default only what is free (names, sizes)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from apo_merge.api import run_merge
from apo_merge.io import hashing
from apo_merge.io.header import read_header
from apo_merge.options import MergeOptions
from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hash-inputs")
    return {
        "prev": make_checkpoint(root / "prev", seed=0, dtype=torch.bfloat16, max_shard_size="30KB"),
        "cur": make_checkpoint(root / "cur", seed=1, dtype=torch.bfloat16, max_shard_size="30KB"),
        "single": make_checkpoint(root / "single", seed=2, dtype=torch.bfloat16),
    }


def _sha256sum_listing(folder) -> str:
    """The card's documented command, run by the shell."""
    names = sorted(
        (p.name for p in folder.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json"))),
        key=str.encode,
    )
    run = subprocess.run(
        ["sh", "-c", 'sha256sum "$@" | sha256sum', "sh", *names], cwd=folder, capture_output=True, text=True, check=True
    )
    return run.stdout.split()[0]


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils sha256sum")
def test_card_hashes_are_the_documented_sha256sum_listing(inputs, tmp_path):
    report = run_merge(
        inputs["single"], inputs["cur"], MergeOptions(0.3, device="cpu", hash_inputs=True), tmp_path / "out"
    )
    assert report.input_hashes["prev"].sha256 == _sha256sum_listing(inputs["single"])
    assert report.input_hashes["cur"].sha256 == _sha256sum_listing(inputs["cur"])
    names = [f.name for f in report.input_hashes["cur"].files]
    assert "model.safetensors.index.json" in names and len(names) > 2
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| cur content sha256 | `{_sha256sum_listing(inputs['cur'])}` |" in card
    for f in report.input_hashes["cur"].files:
        assert (
            f"| cur | `{f.name}` | {f.size} | `{hashlib.sha256((inputs['cur'] / f.name).read_bytes()).hexdigest()}` |"
            in card
        )


def _count_finish_reads(monkeypatch) -> list[int]:
    read: list[int] = []
    real = hashing.hash_file

    def counting(path, start=0, hasher=None):
        size, digest = real(path, start, hasher)
        if hasher is not None:  # StreamHasher.finish, not the separate hash of the index
            read.append(size - start)
        return size, digest

    monkeypatch.setattr(hashing, "hash_file", counting)
    return read


def test_same_layout_inputs_are_hashed_from_the_engine_reads_alone(inputs, tmp_path, monkeypatch):
    read = _count_finish_reads(monkeypatch)
    report = run_merge(
        inputs["prev"], inputs["cur"], MergeOptions(0.3, device="cpu", hash_inputs=True), tmp_path / "out"
    )
    n_shards = len(list(inputs["cur"].glob("*.safetensors")))
    assert n_shards > 1 and read == [0] * (2 * n_shards)  # nothing read again (the index is hashed separately)
    for role in ("prev", "cur"):
        for f in report.input_hashes[role].files:
            assert f.sha256 == hashlib.sha256((inputs[role] / f.name).read_bytes()).hexdigest()


def test_differently_laid_out_prev_is_completed_from_disk(inputs, tmp_path, monkeypatch):
    read = _count_finish_reads(monkeypatch)
    report = run_merge(
        inputs["single"], inputs["cur"], MergeOptions(0.3, device="cpu", hash_inputs=True), tmp_path / "out"
    )
    assert sum(read) > 0
    f = report.input_hashes["prev"].files[0]
    assert f.sha256 == hashlib.sha256((inputs["single"] / "model.safetensors").read_bytes()).hexdigest()


def test_stream_hasher_ignores_out_of_order_and_repeated_bytes(tmp_path):
    path = make_checkpoint(tmp_path / "m", seed=3) / "model.safetensors"
    data = path.read_bytes()
    header = read_header(path)
    h = hashing.StreamHasher([header], [header])
    start = header.data_start
    chunks = [(o, data[o : o + 1000]) for o in range(start, len(data), 1000)]
    order = chunks[:3] + chunks[5:7] + chunks[3:5] + chunks[2:3]  # a gap, then the gap, then a repeat
    for offset, chunk in order:
        h.update(path, offset, memoryview(chunk))
    h.update(tmp_path / "other", 0, memoryview(b"ignored"))
    with h:
        assert h.finish() == {path: (os.path.getsize(path), hashlib.sha256(data).hexdigest())}


def _golden_inputs(root):
    """Two sharded bf16 checkpoints from fixed bytes (no RNG), with an index: the golden card's inputs."""
    import json

    from tests.merge.helpers import st_tensors

    for name, seed in (("prev", 1), ("cur", 2)):
        folder = root / name
        folder.mkdir()
        weight_map = {}
        for shard in (1, 2):
            fname = f"model-{shard:05d}-of-00002.safetensors"
            tensors = {
                f"layer{shard}.{t}": (
                    "BF16",
                    [4, 8],
                    bytes((seed * 7 + shard * 13 + t * 5 + i) % 120 for i in range(64)),
                )
                for t in range(2)
            }
            (folder / fname).write_bytes(st_tensors(tensors))
            weight_map |= dict.fromkeys(tensors, fname)
        index = {"metadata": {"total_size": 256}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return root / "prev", root / "cur"


GOLDEN_CARD = Path(__file__).parent / "data" / "card_hash_inputs.md"


def test_hash_inputs_card_is_the_card_of_before_hashing_became_opt_in(tmp_path, monkeypatch):
    # GOLDEN_CARD was written by apo-merge before --hash-inputs existed (commit 650cf6c) for these inputs.
    from apo_merge import __version__

    monkeypatch.chdir(tmp_path)
    _golden_inputs(tmp_path)
    run_merge("prev", "cur", MergeOptions(0.3, device="cpu", hash_inputs=True, output_hash="sha256"), "out")
    want = GOLDEN_CARD.read_text().replace("{version}", __version__)
    assert (tmp_path / "out" / "README.md").read_text() == want


def test_default_card_lists_local_inputs_without_reading_them_through_sha256(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prev, cur = _golden_inputs(tmp_path)
    monkeypatch.setattr(hashing, "_Stream", None)  # any streamed input hash would fail
    real = hashing.hash_file

    def no_weights(path, *args, **kwargs):
        assert not str(path).endswith(".safetensors"), f"{path} was read to hash it"
        return real(path, *args, **kwargs)

    monkeypatch.setattr(hashing, "hash_file", no_weights)
    report = run_merge("prev", "cur", MergeOptions(0.3, device="cpu"), "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "content sha256 |" not in card and "`--hash-inputs`" in card
    for role, folder in (("prev", prev), ("cur", cur)):
        assert report.input_hashes[role].sha256 is None
        for p in sorted(folder.glob("*.safetensors")):
            assert f"| {role} | `{p.name}` | {p.stat().st_size} | unknown |" in card
        index = hashlib.sha256((folder / "model.safetensors.index.json").read_bytes()).hexdigest()
        assert f"| {role} | `model.safetensors.index.json` | " in card and f"`{index}`" in card
    assert "| prev | `prev` |" in card and "| cur | `cur` |" in card  # local inputs by path
