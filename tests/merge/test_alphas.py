"""Several alphas from one read: each output is byte for byte the output of a run with that alpha alone."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import save_file

from apo_kernels import extrapolate_ as kernel_extrapolate_
from apo_merge.api import Hooks, run_merge, run_merges
from apo_merge.engine import Tuning, use_tuning
from apo_merge.errors import MergeError
from apo_merge.options import MergeOptions
from tests.merge.helpers import leftovers, run_cli_in_process, tree_state

ALPHAS = (0.1, -0.5, 2.0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """PREV and CUR with mixed float dtypes, an integer tensor (copied) and a CUR-only tensor (copied/converted)."""
    root = tmp_path_factory.mktemp("alphas")
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype):
        return (torch.randn(*shape, generator=g) * 3).to(dtype)

    prev = {"a": rand(64, 33, dtype=torch.float32), "b": rand(300, dtype=torch.bfloat16), "i": torch.arange(7)}
    cur = {
        "a": rand(64, 33, dtype=torch.bfloat16),
        "b": rand(300, dtype=torch.bfloat16),
        "i": torch.arange(7) * 2,
        "extra": rand(10, dtype=torch.float16),
    }
    for name, tensors in (("prev", prev), ("cur", cur)):
        (root / name).mkdir()
        save_file(tensors, root / name / "model.safetensors", metadata={"format": "pt"})
        (root / name / "config.json").write_text('{"model_type": "llama"}\n')
    return root / "prev", root / "cur"


CASES = {
    "cpu": {},
    "dtype": {"dtype": "fp16"},
    "shards": {"max_shard_size": "2KB"},
    "hash-inputs": {"hash_inputs": True, "dtype": "bf16"},
    "triton": {"kernel": functools.partial(kernel_extrapolate_, backend="triton")},
}


@pytest.mark.parametrize("case", CASES)
def test_each_output_equals_a_run_with_its_alpha_alone(pair, case, tmp_path):
    fields = dict(CASES[case])
    kernel = fields.pop("kernel", None)
    prev, cur = pair
    (tmp_path / "many").mkdir()
    (tmp_path / "one").mkdir()
    options = MergeOptions(ALPHAS, device="cpu", on_missing="copy", **fields)
    with use_tuning(Tuning(chunk_elems=500, copy_chunk_bytes=24)):  # tensors span several chunks, tails included
        reports = run_merges(prev, cur, options, tmp_path / "many" / "out{alpha}", hooks=Hooks(kernel=kernel))
        assert [r.output.name for r in reports] == ["out0.1", "out-0.5", "out2"]
        for alpha, report in zip(ALPHAS, reports):
            out = tmp_path / "one" / report.output.name
            alone = run_merge(prev, cur, options.replace(alpha=alpha), out, hooks=Hooks(kernel=kernel))
            assert tree_state(report.output) == tree_state(alone.output)  # weights, index, card, side files
            assert report.digests == alone.digests and report.n_tensors == alone.n_tensors == 4
    if case == "shards":
        assert len(reports[0].digests) > 1


def test_a_failure_in_any_output_leaves_none(pair, tmp_path):
    def failing(out, prev, cur, alpha):
        if alpha == 2.0:
            raise RuntimeError("kernel failed")
        return kernel_extrapolate_(out, prev, cur, alpha)

    outs = [tmp_path / f"out{a:g}" for a in ALPHAS]
    with pytest.raises(RuntimeError, match="kernel failed"):
        run_merges(
            *pair,
            MergeOptions(ALPHAS, device="cpu", on_missing="copy"),
            tmp_path / "out{alpha}",
            hooks=Hooks(kernel=failing),
        )
    assert not any(o.exists() for o in outs) and not any(leftovers(o) for o in outs)


def test_an_output_that_cannot_be_put_in_place_takes_back_the_others(pair, tmp_path):
    outs = [tmp_path / f"out{a:g}" for a in ALPHAS]

    def on_plan(plan) -> None:  # another process takes the last OUT while the merge runs
        outs[-1].mkdir(exist_ok=True)

    with pytest.raises(MergeError, match="appeared while merging"):
        run_merges(
            *pair,
            MergeOptions(ALPHAS, device="cpu", on_missing="copy"),
            tmp_path / "out{alpha}",
            hooks=Hooks(on_plan=on_plan),
        )
    assert not outs[0].exists() and not outs[1].exists()
    assert outs[2].is_dir() and not any(outs[2].iterdir())  # the other process's folder, untouched
    assert not any(leftovers(o) for o in outs)


def test_default_names_beside_cur(pair):
    prev, cur = pair
    reports = run_merges(prev, cur, MergeOptions((0.25, 0.5), device="cpu", on_missing="copy"))
    try:
        assert [r.output for r in reports] == [cur.parent / "cur-apo0.25", cur.parent / "cur-apo0.5"]
        assert all((r.output / "README.md").is_file() for r in reports)
    finally:
        for r in reports:
            for f in r.output.iterdir():
                f.unlink()
            r.output.rmdir()


@pytest.mark.parametrize(
    "options, output, needle",
    [
        (MergeOptions(ALPHAS), "out", "names one folder for 3 alphas; put {alpha} in it"),
        (MergeOptions((0.1, 0.1000000001)), None, "both give output"),
        (MergeOptions(ALPHAS, push_to_hub="me/x"), "out{alpha}", "--push-to-hub uploads one output"),
        (MergeOptions(0.3), "out{alpha}", None),
    ],
)
def test_refusals_are_usage_errors(pair, tmp_path, monkeypatch, options, output, needle):
    monkeypatch.chdir(tmp_path)
    if needle is None:  # one alpha with {alpha}: the name is filled in
        assert run_merge(*pair, options.replace(device="cpu", on_missing="copy"), output).output.name == "out0.3"
        return
    with pytest.raises(MergeError, match=needle.replace("{", r"\{").replace("}", r"\}")) as e:
        run_merges(*pair, options, output)
    assert e.value.exit_code == 2


def test_options_take_a_sequence_and_refuse_repeats():
    assert MergeOptions([0.1, 0.3]).alphas == (0.1, 0.3) and MergeOptions([0.3]).alpha == 0.3
    with pytest.raises(MergeError, match="given twice"):
        MergeOptions((0.3, 0.3))
    with pytest.raises(MergeError, match="not a finite number"):
        MergeOptions((0.3, float("nan")))
    with pytest.raises(MergeError, match="use run_merges"):
        run_merge("a", "b", MergeOptions((0.1, 0.3)))


def test_lora_adapters_take_one_alpha(tmp_path):
    for name in ("p", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    with pytest.raises(MergeError, match="for LoRA adapters run one --alpha at a time"):
        run_merges(tmp_path / "p", tmp_path / "c", MergeOptions(ALPHAS), tmp_path / "o{alpha}")


def test_cli_repeated_and_comma_separated_alphas(pair, tmp_path, keep_sigterm):
    prev, cur = pair
    res = run_cli_in_process(
        prev,
        cur,
        "--alpha",
        "0.1,-0.5",
        "--alpha",
        "2",
        "-o",
        tmp_path / "o{alpha}",
        "--on-missing",
        "copy",
        "--device",
        "cpu",
    )
    assert res.code == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o-0.5", "o0.1", "o2"]
    bad = run_cli_in_process(prev, cur, "--alpha", "0.1,x", "-o", tmp_path / "o{alpha}")
    assert bad.code == 2 and "'0.1,x' is not a number" in bad.stderr
    plain = run_cli_in_process(prev, cur, "--alpha", "0.1,0.2", "-o", tmp_path / "plain")
    assert plain.code == 2 and "put {alpha} in it" in plain.stderr and len(plain.stderr.strip().splitlines()) == 1


@pytest.mark.gpu
def test_cuda_outputs_equal_cpu_runs_alone(pair, tmp_path):
    """The CUDA path (per-alpha device buffers, two streams) writes each alpha's bytes as a CPU run alone."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    prev, cur = pair
    (tmp_path / "many").mkdir()
    (tmp_path / "one").mkdir()
    options = MergeOptions(ALPHAS, device="cuda", on_missing="copy", dtype="fp16")
    for report, alpha in zip(run_merges(prev, cur, options, tmp_path / "many" / "out{alpha}"), ALPHAS):
        alone = run_merge(prev, cur, options.replace(alpha=alpha, device="cpu"), tmp_path / "one" / report.output.name)
        assert report.digests == alone.digests
