"""--output-hash: the card records each output file by BLAKE3 (default) or SHA-256, and verify checks by the card's."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from blake3 import blake3

from apo_merge.api import run_merge
from apo_merge.card import recorded_files, recorded_hash, recorded_side_files
from apo_merge.dcp.verify import verify_dcp
from apo_merge.errors import MergeError
from apo_merge.io.hashing import hash_file, new_hasher
from apo_merge.options import MergeOptions
from apo_merge.verify import verify_output
from tests.merge.helpers import assert_one_line_error, run_cli_in_process

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
REFERENCE = {"blake3": lambda b: blake3(b).hexdigest(), "sha256": lambda b: hashlib.sha256(b).hexdigest()}


@pytest.mark.parametrize(
    "name, data, digest",
    [  # the published test vectors, so the card's hashes do not rest on the library alone
        ("blake3", b"", "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"),
        ("blake3", b"abc", "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"),
        ("sha256", b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
    ],
)
def test_hashes_match_the_published_vectors(name, data, digest, tmp_path):
    h = new_hasher(name)
    h.update(data)
    assert h.hexdigest() == digest
    (tmp_path / "f").write_bytes(data)
    assert hash_file(tmp_path / "f", name=name) == (len(data), digest)


@pytest.mark.parametrize("algo", ["blake3", "sha256"])
def test_card_records_every_file_by_the_chosen_hash_and_verify_checks_it(tiny_checkpoints, tmp_path, algo):
    prev, cur = tiny_checkpoints["shard_prev"], tiny_checkpoints["shard_cur"]
    out = tmp_path / "out"
    report = run_merge(prev, cur, MergeOptions(0.3, output_hash=algo), out)
    text = (out / "README.md").read_text()
    assert recorded_hash(text) == algo and report.output_hash == algo
    assert f"| file | bytes | {algo} |" in text
    weights = recorded_files(text)
    assert len(weights) > 1 and set(weights) == set(report.digests)
    for name, (size, digest) in {**weights, **recorded_side_files(text)}.items():
        data = (out / name).read_bytes()
        assert (size, digest) == (len(data), REFERENCE[algo](data)), name
    assert verify_output(out).output_hash == algo

    victim = out / sorted(weights)[0]  # same size, one byte changed
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 1
    victim.write_bytes(raw)
    with pytest.raises(MergeError, match=f"{algo} .* differs from"):
        verify_output(out)


def test_same_bytes_whatever_the_hash(tiny_checkpoints, tmp_path):
    prev, cur = tiny_checkpoints["single_prev"], tiny_checkpoints["single_cur"]
    a = run_merge(prev, cur, MergeOptions(0.3, output_hash="blake3"), tmp_path / "a")
    b = run_merge(prev, cur, MergeOptions(0.3, output_hash="sha256"), tmp_path / "b")
    for name in a.digests:
        assert (a.output / name).read_bytes() == (b.output / name).read_bytes()
        assert a.digests[name] != b.digests[name]


def test_a_card_whose_hash_column_was_changed_fails_verify(tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    run_merge(tiny_checkpoints["single_prev"], tiny_checkpoints["single_cur"], MergeOptions(0.3), out)
    card = out / "README.md"
    card.write_text(card.read_text().replace("| file | bytes | blake3 |", "| file | bytes | sha256 |"))
    with pytest.raises(MergeError, match="sha256 .* differs from"):
        verify_output(out)


def test_cli_option_and_its_refusal(tiny_checkpoints, tmp_path):
    prev, cur = tiny_checkpoints["single_prev"], tiny_checkpoints["single_cur"]
    res = run_cli_in_process(prev, cur, "--alpha", "0.3", "-o", tmp_path / "out", "--output-hash", "sha256")
    assert res.code == 0, res.stderr
    res = run_cli_in_process("verify", tmp_path / "out")
    assert res.code == 0 and "every sha256 matches" in res.stdout, res.stdout + res.stderr
    res = run_cli_in_process(prev, cur, "--alpha", "0.3", "-o", tmp_path / "bad", "--output-hash", "md5")
    assert res.code == 2 and not (tmp_path / "bad").exists()
    with pytest.raises(MergeError, match="--output-hash 'md5' is not one of blake3, sha256"):
        MergeOptions(0.3, output_hash="md5")


@pytest.mark.parametrize("algo", ["blake3", "sha256"])
def test_dcp_output_and_its_export_by_the_chosen_hash(tmp_path, algo):
    from apo_merge.dcp.export import export_hf

    g = torch.Generator().manual_seed(0)
    for name in ("prev", "cur"):
        tensors = {"a.weight": torch.randn(64, 8, generator=g), "b.bias": torch.randn(8, generator=g)}
        dcp.save({"model": tensors}, checkpoint_id=tmp_path / name)
    out = tmp_path / "out"
    run_merge(tmp_path / "prev", tmp_path / "cur", MergeOptions(0.3, output_hash=algo), out)
    text = (out / "README.md").read_text()
    assert recorded_hash(text) == algo
    for name, (size, digest) in recorded_files(text).items():
        assert (size, digest) == (len(data := (out / name).read_bytes()), REFERENCE[algo](data)), name
    assert verify_dcp(out).output_hash == algo

    hf = export_hf(out, tmp_path / "hf")  # the card carries over, by the same hash
    exported = (hf / "README.md").read_text()
    assert recorded_hash(exported) == algo
    for name, (size, digest) in recorded_files(exported).items():
        assert (size, digest) == (len(data := (hf / name).read_bytes()), REFERENCE[algo](data)), name

    victim = sorted(Path(out).glob("*.distcp"))[0]
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 1
    victim.write_bytes(raw)
    res = run_cli_in_process("verify", out)
    assert_one_line_error(res, 1, algo)


def test_a_missing_blake3_is_one_line_with_its_fix(tiny_checkpoints, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "blake3", None)  # as an install without the package
    prev, cur = tiny_checkpoints["single_prev"], tiny_checkpoints["single_cur"]
    res = run_cli_in_process(prev, cur, "--alpha", "0.3", "-o", tmp_path / "out")
    assert_one_line_error(res, 1, "blake3 package is not installed", "--output-hash sha256")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
    res = run_cli_in_process(prev, cur, "--alpha", "0.3", "-o", tmp_path / "out", "--output-hash", "sha256")
    assert res.code == 0, res.stderr
