"""Core semantics of apo-merge (issue: streaming checkpoint extrapolation)."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from blake3 import blake3
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import apo_merge
from apo_kernels import extrapolate_ as kernel_extrapolate_
from apo_merge.api import Hooks, run_merge
from apo_merge.cli import app
from apo_merge.errors import MergeError
from apo_merge.io import writer
from apo_merge.options import MergeOptions
from tests.checkpoints import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

_BITS = {torch.bfloat16: (7, -126), torch.float16: (10, -14), torch.float32: (23, -126)}


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def half_ulp(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half a unit in the last place of ``dtype`` at the float64 values ``exact``."""
    mbits, emin = _BITS[dtype]
    _, e = torch.frexp(exact.abs())
    exp = torch.clamp(e.to(torch.float64) - 1, min=emin)
    return torch.pow(2.0, exp - mbits) / 2


def assert_within_bound(out: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor, alpha: float) -> None:
    c, p = cur.double(), prev.double()
    exact = c + alpha * (c - p)
    bound = half_ulp(exact, out.dtype) + 2.0**-23 * (c.abs() + (alpha * (c - p)).abs())
    err = (out.double() - exact).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


def formula(prev: torch.Tensor, cur: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """The documented operation order: fp32 d = c - p, t = alpha * d, r = c + t, one rounding."""
    c = cur.float()
    d = c - prev.float()
    t = d * torch.tensor(alpha, dtype=torch.float32)
    return (c + t).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def merge(*args: str) -> object:
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture
def pair(tmp_path: Path):
    def build(dtype=torch.bfloat16, prev_dtype=None, prev_shard="50GB", cur_shard="50GB", **cfg):
        prev = make_checkpoint(tmp_path / "prev", seed=0, dtype=prev_dtype or dtype, max_shard_size=prev_shard, **cfg)
        cur = make_checkpoint(tmp_path / "cur", seed=1, dtype=dtype, max_shard_size=cur_shard, **cfg)
        return prev, cur

    return build


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_exact_formula_and_float64_bound(pair, tmp_path, dtype):
    prev, cur = pair(dtype)
    out = apo_merge.extrapolate(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "out")
    P, C, O = load_dir(prev), load_dir(cur), load_dir(out)
    assert O.keys() == C.keys()
    for name in C:
        assert O[name].dtype == dtype
        assert torch.equal(bits(O[name]), bits(formula(P[name], C[name], 0.3, dtype))), name
        assert_within_bound(O[name], P[name], C[name], 0.3)


def test_mixed_input_dtypes_and_dtype_option(pair, tmp_path):
    prev, cur = pair(torch.bfloat16, prev_dtype=torch.float32)
    out = apo_merge.extrapolate(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "out")
    P, C, O = load_dir(prev), load_dir(cur), load_dir(out)
    for name in C:
        assert P[name].dtype == torch.float32 and O[name].dtype == torch.bfloat16
        assert torch.equal(bits(O[name]), bits(formula(P[name], C[name], 0.3, torch.bfloat16)))
        assert_within_bound(O[name], P[name], C[name], 0.3)
    for flag, dt in (("fp32", torch.float32), ("fp16", torch.float16)):
        o = apo_merge.extrapolate(prev=prev, cur=cur, alpha=0.3, output=tmp_path / flag, dtype=flag)
        O = load_dir(o)
        for name in C:
            assert O[name].dtype == dt
            assert torch.equal(bits(O[name]), bits(formula(P[name], C[name], 0.3, dt)))


def test_alpha_zero_is_bit_identical_to_cur(pair, tmp_path):
    prev, cur = pair(torch.bfloat16)
    C = load_dir(cur)
    C["model.norm.weight"][:3] = torch.tensor([-0.0, float("nan"), float("inf")])
    save_file(C, cur / "model.safetensors", metadata={"format": "pt"})
    O = load_dir(apo_merge.extrapolate(prev=prev, cur=cur, alpha=0.0, output=tmp_path / "out"))
    for name in C:
        assert torch.equal(bits(O[name]), bits(C[name])), name


def test_negative_alpha_moves_toward_prev(pair, tmp_path):
    prev, cur = pair(torch.float32)
    P, C = load_dir(prev), load_dir(cur)
    O = load_dir(apo_merge.extrapolate(prev=prev, cur=cur, alpha=-1.0, output=tmp_path / "out"))
    for name in C:
        assert torch.equal(O[name], formula(P[name], C[name], -1.0, torch.float32))
        assert torch.allclose(O[name], P[name], atol=1e-6)


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf"])
def test_non_finite_alpha_is_usage_error(pair, tmp_path, alpha):
    prev, cur = pair()
    r = merge(prev, cur, "--alpha", alpha, "-o", tmp_path / "out")
    assert r.exit_code == 2 and "finite" in r.output
    assert not (tmp_path / "out").exists()


def test_non_floating_tensors_copied_from_cur(tmp_path):
    for name, seed in (("prev", 0), ("cur", 1)):
        torch.manual_seed(seed)
        save_file(
            {"w": torch.randn(5, 3), "steps": torch.arange(seed, seed + 4), "mask": torch.rand(6) > 0.5},
            str(tmp_path / f"{name}.st"),
        )
        (tmp_path / name).mkdir()
        os.replace(tmp_path / f"{name}.st", tmp_path / name / "model.safetensors")
    out = apo_merge.extrapolate(prev=tmp_path / "prev", cur=tmp_path / "cur", alpha=0.3, output=tmp_path / "out")
    C, O = load_dir(tmp_path / "cur"), load_dir(out)
    assert torch.equal(O["steps"], C["steps"]) and torch.equal(O["mask"], C["mask"])
    assert O["steps"].dtype == torch.int64 and O["mask"].dtype == torch.bool


def test_different_sharding_matched_by_name_and_cur_layout_kept(pair, tmp_path):
    prev, cur = pair(torch.bfloat16, prev_shard="20KB", cur_shard="30KB")
    assert len(list(prev.glob("*.safetensors"))) != len(list(cur.glob("*.safetensors")))
    out = apo_merge.extrapolate(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "out")
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in cur.glob("*.safetensors"))
    cur_index = json.loads((cur / "model.safetensors.index.json").read_text())
    out_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == cur_index["weight_map"]
    assert out_index["metadata"]["total_size"] == cur_index["metadata"]["total_size"]
    P, C, O = load_dir(prev), load_dir(cur), load_dir(out)
    for name in C:
        assert torch.equal(bits(O[name]), bits(formula(P[name], C[name], 0.3, torch.bfloat16)))


def test_single_file_prev_with_sharded_cur_and_reshard(pair, tmp_path):
    prev, cur = pair(torch.float32, cur_shard="40KB")
    out = apo_merge.extrapolate(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "out", max_shard_size="30KB")
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n > 1 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_dir(out).values())
    for f in files:
        size = (out / f).stat().st_size
        with safe_open(out / f, "pt") as sf:
            assert all(index["weight_map"][k] == f for k in sf.keys())
        assert size < 30_000 + 4096 or len(load_file(out / f)) == 1
    one = apo_merge.extrapolate(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "one", max_shard_size="5GB")
    assert sorted(p.name for p in one.iterdir() if p.suffix in (".safetensors", ".json")) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert load_dir(one).keys() == load_dir(out).keys()


def test_tied_embeddings(pair, tmp_path):
    prev, cur = pair(torch.bfloat16, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_dir(cur)
    out = apo_merge.extrapolate(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "out")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_loads_with_from_pretrained_and_metadata(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    prev, cur = pair(torch.bfloat16, cur_shard="30KB")
    (cur / "tokenizer.json").write_text("{}")
    (cur / "chat_template.jinja").write_text("{{ messages }}")
    (cur / "README.md").write_text("old card")
    (cur / "pytorch_model.bin").write_bytes(b"pickle")
    out = apo_merge.extrapolate(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    expected, loaded = load_dir(out), model.state_dict()
    assert expected and set(expected) <= set(loaded), sorted(set(expected) - set(loaded))
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (cur / name).read_bytes()
    assert not (out / "pytorch_model.bin").exists()
    card = (out / "README.md").read_text()
    for needle in (
        "base_model_relation: merge",
        "alpha | 0.3",
        f"`{prev.name}`",
        f"`{cur.name}`",
        apo_merge.__version__,
    ):
        assert needle in card
    assert str(tmp_path) not in card  # absolute inputs are named by their folder (--card-paths absolute to opt in)
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            meta = sf.metadata()
        assert meta["format"] == "pt" and meta["apo_alpha"] == "0.3"
        assert meta["apo_prev"] == prev.name and meta["apo_merge_version"] == apo_merge.__version__
        assert blake3(f.read_bytes()).hexdigest() in card


def test_missing_names_and_shape_mismatch(pair, tmp_path):
    prev, cur = pair(torch.float32)
    C = load_dir(cur)
    C["extra.weight"] = torch.ones(3)
    save_file(C, cur / "model.safetensors", metadata={"format": "pt"})
    r = merge(prev, cur, "--alpha", "0.3", "-o", tmp_path / "out")
    assert r.exit_code == 1 and "only in CUR: extra.weight" in r.output and "--on-missing copy" in r.output
    assert not (tmp_path / "out").exists()
    r = merge(prev, cur, "--alpha", "0.3", "-o", tmp_path / "out", "--on-missing", "copy")
    assert r.exit_code == 0, r.output
    assert "1 CUR-only tensors copied unchanged" in r.output
    assert torch.equal(load_dir(tmp_path / "out")["extra.weight"], torch.ones(3))

    C = {k: v for k, v in load_dir(cur).items() if k != "extra.weight"}
    for i in range(12):
        C[f"model.layers.{i % 2}.bad{i}"] = torch.ones(2)
    C["model.norm.weight"] = torch.ones(7)
    save_file(C, cur / "model.safetensors", metadata={"format": "pt"})
    P = load_dir(prev)
    for i in range(12):
        P[f"model.layers.{i % 2}.bad{i}"] = torch.ones(3)
    save_file(P, prev / "model.safetensors", metadata={"format": "pt"})
    r = merge(prev, cur, "--alpha", "0.3", "-o", tmp_path / "out2")
    assert r.exit_code == 1 and "shape mismatch" in r.output and "and 3 more" in r.output
    assert not (tmp_path / "out2").exists()


def test_output_safety(pair, tmp_path):
    prev, cur = pair(torch.bfloat16)
    out = tmp_path / "out"
    assert merge(prev, cur, "--alpha", "0.3", "-o", out).exit_code == 0
    first = (out / "model.safetensors").read_bytes()
    r = merge(prev, cur, "--alpha", "0.5", "-o", out)
    assert r.exit_code == 1 and "--overwrite" in r.output  # the state of the world, not a wrong command line
    assert (out / "model.safetensors").read_bytes() == first
    assert merge(prev, cur, "--alpha", "0.5", "-o", out, "--overwrite").exit_code == 0
    assert (out / "model.safetensors").read_bytes() != first
    for bad in (cur, cur / "sub", prev / "x"):
        r = merge(prev, cur, "--alpha", "0.3", "-o", bad, "--overwrite")
        assert r.exit_code == 2 and "inside" in r.output
    r = merge(prev, cur, "--alpha", "0.3", "-o", tmp_path, "--overwrite")
    assert r.exit_code == 2  # OUT containing the inputs is never replaced
    other = tmp_path / "notours"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    r = merge(prev, cur, "--alpha", "0.3", "-o", other, "--overwrite")
    assert r.exit_code == 1 and "not an apo-merge output" in r.output and (other / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if ".apo-tmp-" in p.name]


def test_corrupt_inputs_fail_cleanly(pair, tmp_path):
    prev, cur = pair(torch.bfloat16, cur_shard="30KB")
    shard = sorted(cur.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    r = merge(prev, cur, "--alpha", "0.3", "-o", tmp_path / "out")
    assert r.exit_code == 1 and str(shard) in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    shard.unlink()
    r = merge(prev, cur, "--alpha", "0.3", "-o", tmp_path / "out")
    assert r.exit_code == 1 and "missing" in r.output and shard.name in r.output
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".apo-tmp-" in p.name]


def test_error_during_write_leaves_no_output(pair, tmp_path, monkeypatch):
    prev, cur = pair(torch.bfloat16)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.os, "pwrite", boom)
    r = merge(prev, cur, "--alpha", "0.3", "-o", tmp_path / "out")
    assert r.exit_code == 1 and "No space left on device" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cur", "prev"]


def test_folder_api_names_prev_and_cur_and_takes_options(pair, tmp_path):
    prev, cur = pair(torch.float32)
    P, C = load_dir(prev), load_dir(cur)
    out = apo_merge.extrapolate_checkpoints(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "kw", dtype="bf16")
    O = load_dir(out)
    assert O.keys() == C.keys()
    for name in C:
        assert torch.equal(bits(O[name]), bits(formula(P[name], C[name], 0.3, torch.bfloat16))), name
    # options as one object; the explicit alpha wins over options.alpha
    options = MergeOptions(0.7, dtype="bf16")
    again = apo_merge.extrapolate_checkpoints(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "obj", options=options)
    assert weights_of(again) == weights_of(out)
    assert weights_of(
        apo_merge.extrapolate(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "alias", dtype="bf16")
    ) == weights_of(out)
    with pytest.raises(TypeError):
        apo_merge.extrapolate_checkpoints(prev, cur, 0.3)  # prev and cur must be named
    with pytest.raises(TypeError, match="keyword arguments only.*extrapolate_checkpoints\\(prev=") as e:
        apo_merge.extrapolate(prev, cur, 0.3, tmp_path / "positional")  # the former name: named too
    assert str(e.value).count("\n") == 0 and not (tmp_path / "positional").exists()
    with pytest.raises(MergeError, match="--dtype 'int8'"):
        apo_merge.extrapolate_checkpoints(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "bad", dtype="int8")
    assert not (tmp_path / "bad").exists()


def weights_of(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.safetensors"))}


def test_merge_options_validate_once_and_feed_the_cli_choices():
    import typer

    from apo_merge import cli
    from apo_merge.options import choices

    options = MergeOptions(1, max_shard_size="2KiB")
    assert options.alpha == 1.0 and isinstance(options.alpha, float) and options.max_shard_size == 2048
    assert "token" not in repr(MergeOptions(0.3, token="hf_secret")) and "hf_secret" not in repr(options)
    parser = {p.name: p.type_descriptor.annotation for p in typer.main.get_command(cli.app).params}
    for field in ("device", "dtype", "on_missing", "card_paths"):  # the CLI's choices are generated from the field
        assert tuple(e.value for e in parser[field]) == choices(field)
    for bad, match in (
        (dict(alpha=float("nan")), "--alpha nan is not a finite number"),
        (dict(alpha=0.3, device="tpu"), "--device 'tpu' is not one of auto, cpu, cuda"),
        (dict(alpha=0.3, on_missing="skip"), "--on-missing 'skip' is not one of error, copy"),
        (dict(alpha=0.3, max_shard_size="5 apples"), "--max-shard-size '5 apples' is not a size"),
        (dict(alpha=0.3, max_shard_size="9" * 400), "--max-shard-size .* is too large"),
    ):
        with pytest.raises(MergeError, match=match) as e:
            MergeOptions(**bad)
        assert e.value.exit_code == 2
    assert MergeOptions(0.3, device="cuda:1").device == "cuda:1"


def test_chunked_streaming_matches_whole_tensor(pair, tmp_path):
    from apo_merge.engine import Tuning, use_tuning

    prev, cur = pair(torch.bfloat16, prev_dtype=torch.float32)
    whole = apo_merge.extrapolate(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "whole")
    with use_tuning(Tuning(chunk_elems=100, copy_chunk_bytes=64)):  # tensors span many chunks, tails included
        chunked = apo_merge.extrapolate(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "chunked")
    for f in whole.glob("*.safetensors"):
        assert (chunked / f.name).read_bytes() == f.read_bytes()


def test_triton_path_bit_identical_to_cpu_twin(pair, tmp_path):
    """The same merge through the Triton kernel (interpreter on the CPU) writes identical bytes."""
    prev, cur = pair(torch.bfloat16, prev_dtype=torch.float32, num_hidden_layers=1)
    cpu = apo_merge.extrapolate(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "cpu")
    triton = functools.partial(kernel_extrapolate_, backend="triton")
    tri = run_merge(prev, cur, MergeOptions(0.3), tmp_path / "triton", hooks=Hooks(kernel=triton)).output
    for f in cpu.glob("*.safetensors"):
        assert (tri / f.name).read_bytes() == f.read_bytes()


@pytest.mark.gpu
def test_cuda_merge_bit_identical_to_cpu(pair, tmp_path):
    prev, cur = pair(torch.bfloat16, prev_dtype=torch.float32)
    cpu = apo_merge.extrapolate(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "cpu", device="cpu")
    gpu = apo_merge.extrapolate(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "gpu", device="cuda")
    for f in cpu.glob("*.safetensors"):
        assert (gpu / f.name).read_bytes() == f.read_bytes()


def test_default_output_name_and_summary(pair, tmp_path):
    prev, cur = pair(torch.bfloat16)
    r = merge(prev, cur, "--alpha", "0.3", "--quiet")
    assert r.exit_code == 0, r.output
    out = tmp_path / "cur-apo0.3"
    assert out.is_dir()
    line = r.output.strip().splitlines()[-1]
    assert "21 tensors" in line and "GB/s" in line and str(out) in line


def test_version_help_and_cuda_request():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and apo_merge.__version__ in r.output
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "Example" in r.output and "--alpha 0.3" in r.output
    if not torch.cuda.is_available():
        r = runner.invoke(app, ["a", "b", "--alpha", "0.3", "--device", "cuda"])
        assert r.exit_code == 1 and "no CUDA device" in r.output  # the machine, not the command line


def test_console_entry_point_subprocess(pair, tmp_path):
    prev, cur = pair(torch.bfloat16)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-m", "apo_merge", str(prev), str(cur), "--alpha", "0.3", "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "apo_merge", str(prev), str(tmp_path / "nope"), "--alpha", "0.3"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_in_memory_api():
    torch.manual_seed(0)
    prev = {"w": torch.randn(17, 5, dtype=torch.bfloat16), "n": torch.arange(3)}
    cur = {"w": torch.randn(17, 5, dtype=torch.bfloat16), "n": torch.arange(3) + 1}
    out = apo_merge.extrapolate_state_dict(prev=prev, cur=cur, alpha=0.3)
    assert torch.equal(bits(out["w"]), bits(formula(prev["w"], cur["w"], 0.3, torch.bfloat16)))
    assert torch.equal(out["n"], cur["n"])
    params = [cur["w"].clone()]
    apo_merge.extrapolate_tensors_(prev=[prev["w"]], cur=params, alpha=0.3)
    assert torch.equal(bits(params[0]), bits(out["w"]))
    with pytest.raises(ValueError, match="only one"):
        apo_merge.extrapolate_state_dict(prev={"a": torch.ones(1)}, cur={"b": torch.ones(1)}, alpha=0.3)
    assert math.isfinite(float(out["w"].float().sum()))
