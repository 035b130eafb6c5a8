"""The model card's file tables and `apo-merge verify`: any file name round-trips through the card (one pair of
escape and unescape functions), a CRLF card still verifies, the copied side files are recorded and checked, and
with several alphas each output's report is that of a run with its alpha alone."""

from __future__ import annotations

import json
import shutil
import string

import pytest
import torch
from safetensors.torch import save_file

from apo_merge.api import run_merge, run_merges
from apo_merge.card import CardInfo, escape_name, recorded_files, recorded_side_files, render, unescape_name
from apo_merge.options import MergeOptions
from tests.merge.helpers import run_cli_in_process

SHA = "0" * 63 + "1"
# Every byte class a file name can hold: each printable ASCII character alone and all together, the table's own
# delimiters, the escape character, escapes spelled out literally, control characters, non-ASCII text, and bytes
# that are not UTF-8 (as os.listdir gives them: surrogate escapes), and a lone surrogate that is not one.
NAMES = [
    *(f"a{c}b.safetensors" for c in string.printable),
    string.printable,
    "|",
    "`",
    "\\",
    "``|``",
    "\\|\\`\\\\",
    "\\x41\\u0041\\x",
    "tab\there\nnewline\r\x7f\x00",
    "modèle-权重-🙂.safetensors",
    "".join(chr(0xDC00 + b) for b in range(0x80, 0x100)),
    "shard-\udcff\udc80.safetensors",
    "lone-\ud800-\udbff-\udfff",
]


@pytest.mark.parametrize("name", NAMES, ids=range(len(NAMES)))
def test_escape_and_unescape_are_inverse_on_every_byte_class(name):
    text = escape_name(name)
    assert unescape_name(text) == name
    text.encode("utf-8")  # writable into the card: no surrogates left
    assert "`" not in text and "\n" not in text and "\r" not in text
    assert "|" not in text.replace("\\|", "")  # every bar escaped for the table


def test_every_name_round_trips_through_a_rendered_card():
    files = {name: (i, SHA) for i, name in enumerate(NAMES)}
    info = CardInfo(alpha=0.3, prev="p", cur="c", dtype="bf16", files=files, base_models=[])
    info.side_files = {"config.json": (5, SHA), "odd|`name.json": (6, SHA)}
    card = render(info, "out")
    for text in (card, card.replace("\n", "\r\n")):
        assert recorded_files(text) == files and recorded_side_files(text) == info.side_files


@pytest.fixture
def odd_pair(tiny_checkpoints, tmp_path):
    """A sharded PREV and CUR whose second shard's name holds a backtick, a bar and non-ASCII text."""
    odd = "model-2`of|3é.safetensors"  # (a backslash in an index is refused as a path)
    pair = []
    for side in ("shard_prev", "shard_cur"):
        src = tmp_path / side
        shutil.copytree(tiny_checkpoints[side], src)
        old = "model-00002-of-00003.safetensors"
        (src / old).rename(src / odd)
        index = json.loads((src / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: (odd if v == old else v) for k, v in index["weight_map"].items()}
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
        pair.append(src)
    return pair, odd


def test_an_output_whose_shard_name_holds_a_backtick_or_bar_verifies(odd_pair, tmp_path):
    (prev, cur), odd = odd_pair
    out = tmp_path / "out"
    report = run_merge(prev, cur, MergeOptions(0.3, device="cpu"), out)
    assert odd in report.digests and (out / odd).is_file()
    res = run_cli_in_process("verify", out)
    assert res.code == 0, res.stderr
    assert odd in recorded_files((out / "README.md").read_text(encoding="utf-8"))


@pytest.fixture
def single_out(tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    run_merge(tiny_checkpoints["single_prev"], tiny_checkpoints["single_cur"], MergeOptions(0.3, device="cpu"), out)
    return out


def test_a_card_with_crlf_line_ends_verifies(single_out):
    card = single_out / "README.md"
    card.write_bytes(card.read_bytes().replace(b"\n", b"\r\n"))
    res = run_cli_in_process("verify", single_out)
    assert res.code == 0, res.stderr


def test_the_side_files_are_recorded_and_a_changed_one_fails_verify(single_out):
    side = sorted(p.name for p in single_out.iterdir() if p.suffix != ".safetensors" and p.name != "README.md")
    assert "config.json" in side
    recorded = recorded_side_files((single_out / "README.md").read_text(encoding="utf-8"))
    assert set(side) == set(recorded)
    assert run_cli_in_process("verify", single_out).code == 0
    config = json.loads((single_out / "config.json").read_text())
    config["rms_norm_eps"] = 0.5
    (single_out / "config.json").write_text(json.dumps(config))
    res = run_cli_in_process("verify", single_out)
    assert res.code == 1 and "config.json" in res.stderr and "changed after the merge" in res.stderr
    (single_out / "config.json").unlink()
    res = run_cli_in_process("verify", single_out)
    assert res.code == 1 and "config.json: recorded in the model card but missing" in res.stderr


def test_with_several_alphas_each_output_reports_its_own_overflow(tmp_path):
    # CUR-only, fp32 3.4e38: rounds to inf in bf16 in every output, whatever its alpha
    big = torch.full((4,), 3.4e38)
    prev, cur = tmp_path / "prev", tmp_path / "cur"
    for folder, tensors in ((prev, {"w": torch.ones(3)}), (cur, {"w": torch.ones(3) * 2, "extra": big})):
        folder.mkdir()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    options = MergeOptions((0.1, 0.3, 0.5), device="cpu", on_missing="copy", dtype="bf16")
    reports = run_merges(prev, cur, options, tmp_path / "out{alpha}")
    alone = run_merge(prev, cur, options.replace(alpha=0.3), tmp_path / "alone")
    assert alone.new_nonfinite == 4
    assert [r.new_nonfinite for r in reports] == [4, 4, 4]
