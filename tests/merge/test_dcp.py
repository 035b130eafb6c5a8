"""apo-merge on torch DCP checkpoints saved by FSDP2 (``fully_shard``, gloo, CPU): bit-identical to the merge of
the consolidated weights at world sizes 1 and 2 and across a world-size change; the output dcp.loads into FSDP2;
torchrun ranks write the same bytes as one process; a killed rank leaves nothing; export equals
dcp_to_torch_save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from apo_merge import extrapolate_state_dict
from apo_merge.dcp import export_hf
from tests.merge.dcp_build import CONFIG, build, load_full
from tests.merge.helpers import REPO, cli_env, leftovers, run_cli_in_process

pytestmark = pytest.mark.slow
ALPHA = 0.3


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """DCP checkpoints of one Llama-shaped model: rounds 1 and 2 saved by 2 FSDP2 ranks (fp32 with the optimizer,
    and bf16), round 3 by 1 rank."""
    root = tmp_path_factory.mktemp("dcp")
    two = {"p2": (1, torch.float32, True), "c2": (2, torch.float32, True), "pb": (1, torch.bfloat16, False)}
    two["cb"] = (2, torch.bfloat16, False)
    build(2, [(root / name, *spec) for name, spec in two.items()])
    build(1, [(root / "c1", 3, torch.float32, False)])
    return {name: root / name for name in [*two, "c1"]}


def consolidated(folder: Path) -> dict[str, torch.Tensor]:
    """The model's full tensors, as torch's own dcp_to_torch_save gives them (names without "model.")."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    file = folder.parent / f"{folder.name}.full.pt"
    if not file.exists():
        dcp_to_torch_save(folder, file)
    return torch.load(file, weights_only=True)["model"]


def assert_same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g.contiguous().view(-1).view(torch.uint8), w.contiguous().view(-1).view(torch.uint8)), name


def expected(prev: Path, cur: Path, alpha: float = ALPHA) -> dict[str, torch.Tensor]:
    """Today's single-process merge of the consolidated weights."""
    return extrapolate_state_dict(prev=consolidated(prev), cur=consolidated(cur), alpha=alpha)


def merge(prev: Path, cur: Path, out: Path, *extra: object) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    res = run_cli_in_process(prev, cur, "--alpha", ALPHA, "-o", out, "--quiet", *extra)
    assert res.code == 0, res.stderr
    return out


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(("prev", "cur"), [("p2", "c2"), ("pb", "cb"), ("p2", "c1"), ("c1", "c2"), ("pb", "c2")])
def test_merge_equals_the_consolidated_merge(ckpts, tmp_path, keep_sigterm, prev, cur):
    """Same layout (fp32, bf16), 2 -> 1 and 1 -> 2 ranks, and a bf16 PREV under an fp32 CUR: bit for bit."""
    out = merge(ckpts[prev], ckpts[cur], tmp_path / "out")
    assert_same_bits(consolidated(out), expected(ckpts[prev], ckpts[cur]))
    names = {p.name for p in out.iterdir()}
    assert names == {".metadata", "README.md", *(p.name for p in ckpts[cur].glob("*.distcp"))}
    assert leftovers(out) == []


def test_optimizer_is_left_out_with_a_line(ckpts, tmp_path, keep_sigterm):
    res = run_cli_in_process(ckpts["p2"], ckpts["c2"], "--alpha", ALPHA, "-o", tmp_path / "out", "--quiet")
    assert res.code == 0 and "left out (not model weights): optimizer" in res.stdout, res.stdout
    from apo_merge.dcp import open_dcp

    assert all(k.startswith("model.") for k in open_dcp(tmp_path / "out").meta.state_dict_metadata)


def test_hf_prev_gives_the_bytes_of_a_dcp_prev(ckpts, tmp_path, keep_sigterm):
    """Round 0 as a Hugging Face folder, round 1 as DCP: the same output as with PREV in DCP."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    model.load_state_dict(consolidated(ckpts["p2"]))
    model.save_pretrained(tmp_path / "hf")
    a = merge(tmp_path / "hf", ckpts["c2"], tmp_path / "a" / "out")
    b = merge(ckpts["p2"], ckpts["c2"], tmp_path / "b" / "out")
    got, want = files(a), files(b)
    assert got.pop("README.md") != want.pop("README.md")  # names another PREV
    assert got == want


def test_several_alphas_each_as_alone(ckpts, tmp_path, keep_sigterm):
    res = run_cli_in_process(ckpts["p2"], ckpts["c2"], "--alpha", "0.1,0.5", "-o", tmp_path / "o{alpha}", "--quiet")
    assert res.code == 0, res.stderr
    for a in (0.1, 0.5):
        assert_same_bits(consolidated(tmp_path / f"o{a:g}"), expected(ckpts["p2"], ckpts["c2"], a))


# With the optimizer left out, the torch path writes the output; model-only and the same layout, the torch-free one.
PAIRS = pytest.mark.parametrize(("prev", "cur", "dtype"), [("p2", "c2", torch.float32), ("pb", "cb", torch.bfloat16)])


@pytest.mark.parametrize("world", [1, 2])
@PAIRS
def test_output_dcp_loads_into_fsdp2(ckpts, tmp_path, keep_sigterm, world, prev, cur, dtype):
    """The next round dcp.loads the output straight into FSDP2 shards, at the saving world size or another."""
    out = merge(ckpts[prev], ckpts[cur], tmp_path / "out")
    load_full(world, [(out, dtype, tmp_path / "full.pt")])
    assert_same_bits(torch.load(tmp_path / "full.pt", weights_only=True), expected(ckpts[prev], ckpts[cur]))


def test_export_equals_dcp_to_torch_save_and_loads(ckpts, tmp_path, keep_sigterm):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    out = merge(ckpts["p2"], ckpts["c2"], tmp_path / "out")
    LlamaConfig(**CONFIG).save_pretrained(tmp_path / "cfg")
    res = run_cli_in_process("export", out, tmp_path / "hf", "--config-from", tmp_path / "cfg")
    assert res.code == 0, res.stderr
    assert_same_bits(load_file(tmp_path / "hf" / "model.safetensors"), consolidated(out))
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert_same_bits(model.state_dict(), consolidated(out))
    assert run_cli_in_process("verify", tmp_path / "hf").code == 0  # the card carried over from the DCP output
    # Sharded, from a checkpoint that is not an apo-merge output (bf16, world size 2): the same tensors.
    export_hf(ckpts["cb"], tmp_path / "hf2", max_shard_size=100_000)
    shards = sorted((tmp_path / "hf2").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "hf2" / "model.safetensors.index.json").is_file()
    assert_same_bits({k: v for s in shards for k, v in load_file(s).items()}, consolidated(ckpts["cb"]))


def _torchrun(*args: object, script: str | None = None) -> subprocess.Popen:
    entry = [script] if script else ["-m", "apo_merge"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *entry]
    return subprocess.Popen(
        [*cmd, *map(str, args)], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


@PAIRS
def test_torchrun_two_ranks_write_the_bytes_of_one(ckpts, tmp_path, keep_sigterm, prev, cur, dtype):
    one = merge(ckpts[prev], ckpts[cur], tmp_path / "a" / "out")
    (tmp_path / "b").mkdir()
    p = _torchrun(ckpts[prev], ckpts[cur], "--alpha", ALPHA, "-o", tmp_path / "b" / "out", "--quiet")
    log = p.communicate(timeout=120)[0].decode()
    assert p.returncode == 0, log
    assert "rank 1 of 2" in log and "rank 0 of 2" in log
    assert files(tmp_path / "b" / "out") == files(one)


def _rank_pid(parent: int, rank: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            if f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


@PAIRS
def test_kill_9_of_a_rank_commits_nothing_and_the_rerun_gives_the_same_bytes(
    ckpts, tmp_path, keep_sigterm, prev, cur, dtype
):
    out = tmp_path / "b" / "out"
    out.parent.mkdir()
    p = _torchrun(
        ckpts[prev], ckpts[cur], "--alpha", ALPHA, "-o", out, "--quiet", script="tests/merge/dcp_slow_merge.py"
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until rank 1 has written part of its file
            written = [f for d in out.parent.glob(".out.apo-tmp-*") for f in d.glob("__*_0.distcp") if f.stat().st_size]
            pid = _rank_pid(p.pid, 1)
            if written and pid:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the merge did not start")
        os.kill(pid, signal.SIGKILL)
        log = p.communicate(timeout=90)[0].decode()
    finally:
        p.kill()
    assert p.returncode != 0, log
    assert not out.exists()
    one = merge(ckpts[prev], ckpts[cur], tmp_path / "a" / "out")
    merge(ckpts[prev], ckpts[cur], out)  # the rerun removes what the killed run left
    assert leftovers(out) == []
    assert files(out) == files(one)
