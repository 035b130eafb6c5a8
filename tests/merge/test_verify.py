"""`apo-merge verify`, non-finite outputs (--strict), and PREV == CUR."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from apo_merge.api import run_merge
from apo_merge.io.header import read_header
from apo_merge.options import MergeOptions
from tests.merge.helpers import (
    Result,
    assert_one_line_error,
    leftovers,
    run_cli,
    run_cli_in_process,
    st_tensors,
    tree_state,
)

INDEX = "model.safetensors.index.json"
SHARD2 = "model-00002-of-00003.safetensors"


def _verify(out) -> Result:
    return run_cli_in_process("verify", out)


@pytest.fixture
def sharded_out(tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    run_merge(tiny_checkpoints["shard_prev"], tiny_checkpoints["shard_cur"], MergeOptions(0.3, device="cpu"), out)
    return out


def test_verify_passes_on_a_fresh_output_through_the_real_cli(sharded_out):
    res = run_cli("verify", sharded_out)
    assert res.code == 0, res.stderr
    assert "OK, 3 file(s), 21 tensors" in res.stdout and "every blake3 matches" in res.stdout


def test_verify_single_file_output(tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    run_merge(tiny_checkpoints["single_prev"], tiny_checkpoints["single_cur"], MergeOptions(0.3, device="cpu"), out)
    res = _verify(out)
    assert res.code == 0 and "OK, 1 file(s), 21 tensors" in res.stdout


@pytest.mark.parametrize("algo", ["blake3", "sha256"])
def test_verify_lora_adapter_output(tmp_path, algo):
    peft = pytest.importorskip("peft")
    from tests.checkpoints import make_model

    adapters = []
    for seed in (1, 2):
        model = peft.get_peft_model(make_model(0), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        model.save_pretrained(tmp_path / f"a{seed}")
        adapters.append(tmp_path / f"a{seed}")
    out = tmp_path / "out"
    run_merge(adapters[0], adapters[1], MergeOptions(0.3, output_hash=algo), out)
    res = _verify(out)
    assert res.code == 0 and "OK, 2 file(s)" in res.stdout, res.stderr  # weights + adapter_config.json
    config = out / "adapter_config.json"  # recorded too: a changed rank or scaling changes the model
    text = config.read_text()
    config.write_text(text.replace('"lora_alpha": ', '"lora_alpha": 1'))
    assert_one_line_error(_verify(out), 1, str(config))
    config.write_text(text)
    assert _verify(out).code == 0
    weights = out / "adapter_model.safetensors"
    _flip(weights, weights.stat().st_size - 1)
    assert_one_line_error(_verify(out), 1, str(weights), algo)


def _flip(path, offset) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_verify_flipped_data_byte(sharded_out):
    shard = sharded_out / SHARD2
    _flip(shard, shard.stat().st_size - 3)
    assert_one_line_error(_verify(sharded_out), 1, str(shard), "blake3", "differs from the", "model card")


def test_verify_flipped_header_byte(sharded_out):
    shard = sharded_out / SHARD2
    raw = shard.read_bytes()
    _flip(shard, raw.index(b'"data_offsets":[0,') + len(b'"data_offsets":[0,'))  # an end offset changes
    assert_one_line_error(_verify(sharded_out), 1, str(shard), "invalid safetensors header")


def test_verify_missing_shard(sharded_out):
    (sharded_out / SHARD2).unlink()
    assert_one_line_error(_verify(sharded_out), 1, str(sharded_out / INDEX), SHARD2, "missing")


def test_verify_extra_weight_file(sharded_out):
    shutil.copy(sharded_out / SHARD2, sharded_out / "model-00004-of-00003.safetensors")
    assert_one_line_error(_verify(sharded_out), 1, "model-00004-of-00003.safetensors", "does not record")


def _edit_index(out, edit) -> None:
    index = json.loads((out / INDEX).read_text())
    edit(index)
    (out / INDEX).write_text(json.dumps(index))


def test_verify_index_missing_a_name(sharded_out):
    name = next(iter(read_header(sharded_out / SHARD2).tensors))
    _edit_index(sharded_out, lambda ix: ix["weight_map"].pop(name))
    assert_one_line_error(_verify(sharded_out), 1, str(sharded_out / SHARD2), repr(name), "the index does not map")


def test_verify_index_maps_a_name_to_the_wrong_shard(sharded_out):
    name = next(iter(read_header(sharded_out / SHARD2).tensors))
    _edit_index(sharded_out, lambda ix: ix["weight_map"].update({name: "model-00001-of-00003.safetensors"}))
    assert_one_line_error(_verify(sharded_out), 1, str(sharded_out / INDEX), repr(name), "has no such tensor")


def test_verify_index_total_size_edited(sharded_out):
    _edit_index(sharded_out, lambda ix: ix["metadata"].update(total_size=ix["metadata"]["total_size"] + 4))
    assert_one_line_error(_verify(sharded_out), 1, str(sharded_out / INDEX), "total_size")


def test_verify_missing_card(sharded_out):
    (sharded_out / "README.md").unlink()
    assert_one_line_error(_verify(sharded_out), 1, str(sharded_out / "README.md"), "cannot read the model card")


def test_verify_card_that_is_not_ours(sharded_out):
    (sharded_out / "README.md").write_text("# my model\n")
    assert_one_line_error(_verify(sharded_out), 1, "is not an apo-merge model card")


def test_verify_card_hash_edited(sharded_out):
    card = sharded_out / "README.md"
    text = card.read_text()
    row = next(line for line in text.splitlines() if line.startswith(f"| `{SHARD2}`"))
    sha = row.split("`")[3]
    card.write_text(text.replace(sha, sha[::-1]))
    assert_one_line_error(_verify(sharded_out), 1, str(sharded_out / SHARD2), "blake3")


def test_verify_not_a_folder(tmp_path):
    assert_one_line_error(_verify(tmp_path / "nope"), 1, str(tmp_path / "nope"), "no such folder")


# -- non-finite outputs from finite inputs ------------------------------------------------------------------------
F16_MAX_ISH = torch.tensor([60000.0, 1.0, -2.0], dtype=torch.float16)


def _overflowing_pair(tmp_path):
    prev, cur = tmp_path / "prev", tmp_path / "cur"
    prev.mkdir()
    cur.mkdir()
    nan = torch.tensor([float("nan")], dtype=torch.float16)
    (prev / "model.safetensors").write_bytes(
        st_tensors({"w": ("F16", [3], (-F16_MAX_ISH).numpy().tobytes()), "n": ("F16", [1], nan.numpy().tobytes())})
    )
    (cur / "model.safetensors").write_bytes(
        st_tensors({"w": ("F16", [3], F16_MAX_ISH.numpy().tobytes()), "n": ("F16", [1], nan.numpy().tobytes())})
    )
    return prev, cur


def test_nonfinite_outputs_are_counted_and_reported(tmp_path, keep_sigterm):
    prev, cur = _overflowing_pair(tmp_path)
    out = tmp_path / "out"
    res = run_cli_in_process(prev, cur, "--alpha", "1", "-o", out, "--device", "cpu", "-q")
    assert res.code == 0, res.stderr
    # 60000 + 1 * 120000 overflows fp16; the NaN that was already in both inputs is not counted
    assert "warning: 1 inf/NaN values from finite inputs" in res.stdout
    assert _verify(out).code == 0


def test_strict_makes_nonfinite_outputs_an_error(tmp_path, keep_sigterm):
    prev, cur = _overflowing_pair(tmp_path)
    out = tmp_path / "out"
    before = tree_state(tmp_path)
    res = run_cli_in_process(prev, cur, "--alpha", "1", "-o", out, "--device", "cpu", "-q", "--strict")
    assert_one_line_error(res, 1, "1 output values are inf or NaN although both inputs were finite", "--strict")
    assert not out.exists() and leftovers(out) == []
    assert tree_state(tmp_path) == before


def test_strict_passes_when_all_outputs_are_finite(tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    report = run_merge(
        tiny_checkpoints["single_prev"],
        tiny_checkpoints["single_cur"],
        MergeOptions(0.3, device="cpu", strict=True),
        out,
    )
    assert report.new_nonfinite == 0 and _verify(out).code == 0


# -- PREV == CUR ---------------------------------------------------------------------------------------------------
def _data(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 + n :]


def test_same_folder_as_prev_and_cur_reproduces_cur(tiny_checkpoints, tmp_path):
    cur = tiny_checkpoints["single_cur"]
    values = torch.frombuffer(bytearray(_data(cur / "model.safetensors")), dtype=torch.float32)
    assert torch.isfinite(values).all() and not (values == 0).any()  # no -0, inf or NaN: see the next test
    out = tmp_path / "out"
    res = run_cli(cur, cur, "--alpha", "0.3", "-o", out, "--device", "cpu", "-q")
    assert res.code == 0, res.stderr
    assert _data(out / "model.safetensors") == _data(cur / "model.safetensors")  # bit for bit, same layout


SPECIALS = [1.5, -0.0, 0.0, float("inf"), float("-inf"), float("nan"), 3.0e38, -1.0e-45]


@pytest.mark.parametrize("dtype,code", [(torch.float32, "F32"), (torch.bfloat16, "BF16")])
@pytest.mark.parametrize("alpha", [0.3, -0.3, 0.0])
def test_same_folder_special_values(tmp_path, dtype, code, alpha):
    """cur + a*(cur - cur) is cur bit for bit except: alpha > 0 turns -0 into +0 (+0 + -0 = +0) and any alpha != 0
    turns +-inf into NaN (inf - inf); NaN stays NaN. alpha == 0 copies CUR exactly."""
    cur = tmp_path / "cur"
    cur.mkdir()
    x = torch.tensor(SPECIALS, dtype=torch.float32).to(dtype)
    assert torch.signbit(x[1]) and x[1] == 0
    (cur / "model.safetensors").write_bytes(
        st_tensors({"w": (code, [len(SPECIALS)], x.view(torch.uint8).numpy().tobytes())})
    )
    out = tmp_path / "out"
    run_merge(cur, cur, MergeOptions(alpha, device="cpu"), out)
    y = torch.frombuffer(bytearray(_data(out / "model.safetensors")), dtype=dtype)
    expected = x.clone()
    if alpha != 0:
        expected[torch.isinf(x)] = float("nan")
    if alpha > 0:
        expected[(x == 0) & torch.signbit(x)] = 0.0
    assert torch.equal(y.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(
        y[finite].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        expected[finite].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )


# -- issue 15: what the index names and what the card claims ---------------------------------------------------------
def test_verify_index_names_a_file_the_card_does_not_record(sharded_out):
    (sharded_out / "ghost.bin").write_bytes(st_tensors({"ghost.weight": ("F32", [2], b"\0" * 8)}))
    _edit_index(sharded_out, lambda ix: ix["weight_map"].update({"ghost.weight": "ghost.bin"}))
    assert_one_line_error(_verify(sharded_out), 1, str(sharded_out / "ghost.bin"), "does not record")


@pytest.mark.parametrize("row,edit", [("alpha", "0.5"), ("prev", "`/somewhere/else`"), ("cur", "`other`")])
def test_verify_card_summary_edited(sharded_out, row, edit):
    card = sharded_out / "README.md"
    lines = card.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(f"| {row} | "))
    lines[i] = f"| {row} | {edit} |"
    card.write_text("\n".join(lines) + "\n")
    assert_one_line_error(_verify(sharded_out), 1, f"apo_{row}", "model card records")


def test_verify_card_summary_row_removed(sharded_out):
    card = sharded_out / "README.md"
    card.write_text("".join(line for line in card.read_text().splitlines(True) if not line.startswith("| alpha |")))
    assert_one_line_error(_verify(sharded_out), 1, "apo_alpha", "model card records")


def test_verify_card_that_is_a_fifo_does_not_hang(sharded_out):
    import os

    (sharded_out / "README.md").unlink()
    os.mkfifo(sharded_out / "README.md")
    res = run_cli("verify", sharded_out, timeout=60)  # a regression blocks in open(): the timeout fails the test
    assert_one_line_error(res, 1, str(sharded_out / "README.md"), "not a regular file")
