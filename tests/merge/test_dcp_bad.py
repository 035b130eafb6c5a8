"""Bad DCP inputs: one line each (exit 1), no output, no leftovers, inputs unchanged, nothing from the files run."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.merge.helpers import assert_one_line_error, leftovers, run_cli_in_process, tree_state

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / "apo-merge-dcp-test-ran-code"


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def save(folder: Path, tensors: dict[str, object]) -> Path:
    """``dcp.save({"model": tensors})`` from this one process (no process group)."""
    dcp.save({"model": tensors}, checkpoint_id=folder)
    return folder


def model(seed: int, bias: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(bias, generator=g)}


def edit_metadata(folder: Path, change) -> None:
    meta = pickle.loads((folder / ".metadata").read_bytes())
    change(meta)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    return save(tmp_path / "prev", model(0)), save(tmp_path / "cur", model(1))


def _fails(prev: Path, cur: Path, out: Path, *needles: str) -> None:
    before = tree_state(out.parent, skip=out)
    res = run_cli_in_process(prev, cur, "--alpha", "0.3", "-o", out, "--quiet")
    assert_one_line_error(res, 1, *needles)
    assert not out.exists() and leftovers(out) == []
    assert tree_state(out.parent, skip=out) == before  # inputs unchanged
    assert not MARKER.exists()


def test_a_good_pair_merges_and_verifies_and_a_changed_file_does_not(pair, tmp_path, keep_sigterm):
    out = tmp_path / "out"
    res = run_cli_in_process(*pair, "--alpha", "0.3", "-o", out, "--quiet")
    assert res.code == 0, res.stderr
    res = run_cli_in_process("verify", out)
    assert res.code == 0 and "every blake3 matches" in res.stdout, res.stderr
    with open(out / "__0_0.distcp", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    assert_one_line_error(run_cli_in_process("verify", out), 1, "__0_0.distcp", "changed after the merge")


def test_missing_storage_file(pair, tmp_path, keep_sigterm):
    (pair[1] / "__0_0.distcp").unlink()
    _fails(*pair, tmp_path / "out", "__0_0.distcp", "missing")


def test_metadata_that_does_not_match_the_files(pair, tmp_path, keep_sigterm):
    def to_bf16(meta):
        meta.state_dict_metadata["model.b.bias"].properties.dtype = torch.bfloat16

    edit_metadata(pair[1], to_bf16)
    _fails(*pair, tmp_path / "out", "model.b.bias", "torch.float32", "metadata does not match")


def test_offsets_past_the_end_of_a_file(pair, tmp_path, keep_sigterm):
    f = pair[0] / "__0_0.distcp"
    os.truncate(f, f.stat().st_size - 10)
    _fails(*pair, tmp_path / "out", "past the file's end")


def test_a_model_entry_that_is_a_pickled_object(tmp_path, keep_sigterm):
    prev = save(tmp_path / "prev", {**model(0), "note": "a string is stored pickled"})
    cur = save(tmp_path / "cur", {**model(1), "note": "a string is stored pickled"})
    _fails(prev, cur, tmp_path / "out", "'model.note'", "pickled object")


def test_a_chunk_that_is_a_pickle_of_code_is_not_run(pair, tmp_path, keep_sigterm):
    buf = io.BytesIO()
    torch.save(Evil(), buf)
    evil = pair[1] / "__0_0.distcp"
    start = evil.stat().st_size
    with open(evil, "ab") as f:
        f.write(buf.getvalue())

    def point_at_evil(meta):
        for key, info in meta.storage_data.items():
            if key.fqn == "model.a.weight":
                info.offset, info.length = start, len(buf.getvalue())

    edit_metadata(pair[1], point_at_evil)
    _fails(*pair, tmp_path / "out", "model.a.weight", "weights_only")


def test_a_metadata_pickle_of_code_is_not_run(pair, tmp_path, keep_sigterm):
    (pair[1] / ".metadata").write_bytes(pickle.dumps(Evil()))
    _fails(*pair, tmp_path / "out", "is not DCP metadata", "posix.system")


@pytest.mark.parametrize(
    ("other", "needle"),
    [
        ({"a.weight": torch.zeros(4, 3), "b.bias": torch.zeros(6)}, "shape (6,) in PREV, (5,) in CUR"),
        ({"a.weight": torch.zeros(4, 3), "c.bias": torch.zeros(5)}, "only in PREV: 'c.bias'"),
    ],
)
def test_prev_and_cur_of_different_models(pair, tmp_path, keep_sigterm, other, needle):
    prev = save(tmp_path / "other", other)
    _fails(prev, pair[1], tmp_path / "out", needle)


def test_dcp_prev_with_a_safetensors_cur(pair, tmp_path, keep_sigterm):
    from safetensors.torch import save_file

    (tmp_path / "hf").mkdir()
    save_file(model(1), tmp_path / "hf" / "model.safetensors")
    _fails(pair[0], tmp_path / "hf", tmp_path / "out", "CUR is not a DCP folder", "apo-merge export")


def test_hf_storage_writer_metadata_is_named(pair, tmp_path, keep_sigterm):
    (pair[1] / ".metadata").write_text('{"metadata": {}, "weight_map": {}}')
    _fails(*pair, tmp_path / "out", "HuggingFaceStorageWriter")


def test_export_of_a_bad_folder_leaves_nothing(pair, tmp_path, keep_sigterm):
    (pair[1] / "__0_0.distcp").unlink()
    res = run_cli_in_process("export", pair[1], tmp_path / "hf")
    assert_one_line_error(res, 1, "missing")
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path / "hf") == []


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--max-shard-size", "1GB"], "--max-shard-size"),
        (["--hash-inputs"], "--hash-inputs"),
        (["--on-missing", "copy"], "--on-missing copy"),
        (["--device", "cuda"], "--device cuda"),
    ],
)
def test_options_that_do_not_apply_are_refused(pair, tmp_path, keep_sigterm, flags, needle):
    res = run_cli_in_process(*pair, "--alpha", "0.3", "-o", tmp_path / "out", "--quiet", *flags)
    assert_one_line_error(res, 2, needle)
    assert not (tmp_path / "out").exists()


def test_the_safetensors_serialization_is_named(tmp_path, keep_sigterm):
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    for name, seed in (("prev", 0), ("cur", 1)):
        writer = FileSystemWriter(tmp_path / name, serialization_format=SerializationFormat.SAFETENSORS)
        dcp.save({"model": model(seed)}, storage_writer=writer)
    _fails(tmp_path / "prev", tmp_path / "cur", tmp_path / "out", "serialization_format=SAFETENSORS")


def test_accelerate_checkpoint_folders_are_found(tmp_path, keep_sigterm):
    """accelerate's SHARDED_STATE_DICT saves the model into <checkpoint>/pytorch_model_fsdp_0."""
    from apo_merge.dcp import open_dcp

    prev = save(tmp_path / "checkpoint-1" / "pytorch_model_fsdp_0", model(0)).parent
    cur = save(tmp_path / "checkpoint-2" / "pytorch_model_fsdp_0", model(1)).parent
    res = run_cli_in_process(prev, cur, "--alpha", "0.3", "-o", tmp_path / "out", "--quiet")
    assert res.code == 0, res.stderr
    got = {
        k: open_dcp(tmp_path / "out").read_chunk(k, e.chunks[0]) for k, e in open_dcp(tmp_path / "out").entries.items()
    }
    from apo_merge import extrapolate_state_dict

    want = extrapolate_state_dict(prev=model(0), cur=model(1), alpha=0.3)
    assert {k: v.view(torch.int32) for k, v in got.items()}.keys() == {f"model.{k}" for k in want}
    for name, w in want.items():
        assert torch.equal(got[f"model.{name}"].view(torch.int32), w.view(torch.int32)), name
