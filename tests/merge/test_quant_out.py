"""FP8 block-scaled output (issue 28 §2, ``--quantize fp8-block``): the merged fp32 result written back as e4m3
with a scale_inv = max(amax / 448, 2^-126) per block, checked bit for bit against an independent float64
quantizer written here, on odd shapes, zero blocks, values at 448 * scale and e4m3 subnormals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from blake3 import blake3
from safetensors import safe_open

from apo_merge.api import run_merge, run_merges
from apo_merge.engine import Tuning, use_tuning
from apo_merge.errors import MergeError
from apo_merge.options import MergeOptions
from apo_merge.quant.quantize import quantize_rows, to_e4m3
from apo_merge.verify import verify_output
from tests.kernels.oracle import assert_bits_equal, contract
from tests.merge import quant_build as qb
from tests.merge.helpers import assert_one_line_error, leftovers, run_cli_in_process, tree_state
from tests.merge.test_quant import _load, _side, e4m3_f64

ALPHA = 0.3
FP8 = {"fp8-block": "--quantize"}
_CODES = np.arange(256)
_FINITE = (_CODES & 0x7F) != 0x7F
_VALUES = e4m3_f64(_CODES)  # float64, NaN at 0x7F and 0xFF


def ref_e4m3(y: np.ndarray) -> np.ndarray:
    """The e4m3fn code nearest to each float32 ``y`` (ties to the even code, beyond 448 the largest finite
    value, the sign kept for zeros), by search over every finite code's value in float64."""
    mag = np.abs(y.astype(np.float64)).reshape(-1, 1)
    codes = _CODES[_FINITE & (_CODES < 0x80)]  # the non-negative finite codes, value increasing with code
    dist = np.abs(mag - _VALUES[codes])
    best = dist.min(axis=1, keepdims=True)
    tied = dist == best
    # among the nearest: the even code (the mantissa's last bit), else the only one
    even = tied & (codes % 2 == 0)
    pick = np.where(even.any(axis=1), even.argmax(axis=1), tied.argmax(axis=1))
    code = codes[pick].astype(np.uint8)
    return (code | np.where(np.signbit(y.reshape(-1)), 0x80, 0).astype(np.uint8)).reshape(y.shape)


def ref_quantize(r: np.ndarray, block=(128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """(e4m3 codes, float32 scale_inv) of float32 ``r``: per block scale = max(fp32(amax / 448), 2^-126) and
    q = e4m3(fp32(r / scale)), each division in float64 rounded once to float32 (the same as fp32 division)."""
    rows, cols = r.shape
    bo, bi = block
    scales = np.empty((math.ceil(rows / bo), math.ceil(cols / bi)), np.float32)
    q = np.empty(r.shape, np.uint8)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            blk = r[i * bo : (i + 1) * bo, j * bi : (j + 1) * bi].astype(np.float64)
            s = max(np.float32(np.abs(blk).max() / 448.0), np.float32(2.0**-126))
            scales[i, j] = s
            q[i * bo : (i + 1) * bo, j * bi : (j + 1) * bi] = ref_e4m3((blk / np.float64(s)).astype(np.float32))
    return q, scales


def test_e4m3_rounding_matches_torch_and_the_reference():
    g = np.random.default_rng(0)
    x = g.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[np.isfinite(x)]
    edges = np.array([448, 464, 465, 479.9, 480, 1e30, 2.0**-10, 1.5 * 2.0**-9, 2.5 * 2.0**-9, 2.0**-6, 1e-45])
    x = np.concatenate([x, edges, -edges, [0.0, -0.0]]).astype(np.float32)
    ours = to_e4m3(x)
    assert np.array_equal(ours, torch.from_numpy(x.copy()).to(torch.float8_e4m3fn).view(torch.uint8).numpy())
    small = x[np.abs(x) < 1e4]
    assert np.array_equal(to_e4m3(small), ref_e4m3(small))
    mid = np.arange(0, 0x43F00000, 4099, dtype=np.uint32).view(np.float32)  # every binade up to 480
    assert np.array_equal(to_e4m3(mid), ref_e4m3(mid))


def _hard_matrix(shape, seed) -> np.ndarray:
    """Random rows with: an all-zero block, a block of one value (every q = 448), values a hair either side of
    amax, a block whose results are e4m3 subnormals, a block of fp32-subnormal values, signed zeros."""
    g = np.random.default_rng(seed)
    r = (g.standard_normal(shape) * 0.02).astype(np.float32)
    rows, cols = shape
    r[:128, :128] = 0.0
    if rows > 128 and cols > 128:
        r[128:, 128:256] = np.float32(-0.75)
    r[: min(rows, 128), -1] = np.float32(3.0)  # amax of the last column blocks
    r[: min(rows, 128), -min(2, cols)] = np.nextafter(np.float32(3.0), np.float32(0))
    if rows > 128:
        r[128:, :128] *= np.float32(1e-4)
        r[128:, 0] = np.float32(0.02)  # the block's amax: the rest quantize to e4m3 subnormals
    r[-1, :] = np.float32(1e-41) * np.sign(r[-1, :])  # fp32 subnormals in the last row (its blocks may hold more)
    r[0, min(1, cols - 1)] = -0.0
    return r


@pytest.mark.parametrize("shape", [(200, 300), (130, 129), (1, 5), (129, 1), (256, 384), (300, 257)])
@pytest.mark.parametrize("block", [(128, 128), (64, 32)])
def test_quantizer_bit_for_bit(shape, block):
    r = _hard_matrix(shape, shape[0] + shape[1])
    want_q, want_s = ref_quantize(r, block)
    got_q, got_s, error = quantize_rows(r, block, "w")
    assert np.array_equal(got_q.reshape(shape), want_q)
    assert np.array_equal(got_s.view(np.uint32), want_s.view(np.uint32))
    expanded = np.repeat(np.repeat(want_s, block[0], 0), block[1], 1)[: shape[0], : shape[1]]
    torch_q = (torch.from_numpy(r) / torch.from_numpy(expanded)).to(torch.float8_e4m3fn)  # the torch recipe
    assert np.array_equal(torch_q.view(torch.uint8).numpy(), want_q)
    back = e4m3_f64(want_q) * expanded  # dequantized: within half an e4m3 step of each block's scale
    assert np.all(np.abs(back - r) <= expanded * 16 + 1e-45)
    bf = torch.from_numpy(r).bfloat16().double().numpy()
    assert math.isclose(error.max_abs, np.abs(back.astype(np.float32) - bf).max(), rel_tol=1e-12, abs_tol=1e-300)


def _weights(folder) -> dict[str, torch.Tensor]:
    return _load(folder)


def _expected(prev, cur, alpha) -> dict[str, tuple]:
    """name -> (codes, scales) for the linear weights, the bf16 result for the others."""
    p, c = _side(prev), _side(cur)
    out = {}
    for name in c:
        if name in qb.LINEAR:
            r = contract(p[name], c[name], alpha, torch.float32).numpy()
            out[name] = ref_quantize(r)
        else:
            out[name] = contract(p[name], c[name], alpha, torch.bfloat16)
    return out


def _check(out_dir, prev, cur, alpha):
    got = _weights(out_dir)
    want = _expected(prev, cur, alpha)
    assert sorted(got) == sorted([*want, *(n + "_scale_inv" for n in qb.LINEAR)])
    for name, w in want.items():
        if name in qb.LINEAR:
            assert got[name].dtype == torch.float8_e4m3fn, name
            assert got[name + "_scale_inv"].dtype == torch.float32
            assert np.array_equal(got[name].view(torch.uint8).numpy(), w[0]), name
            assert np.array_equal(got[name + "_scale_inv"].numpy().view(np.uint32), w[1].view(np.uint32)), name
        else:
            assert_bits_equal(got[name], w)


@pytest.mark.parametrize(("prev_q", "cur_q"), [(True, False), (False, True), (True, True)])
def test_merge_writes_fp8(tmp_path, prev_q, cur_q):
    prev, cur = qb.checkpoint(tmp_path / "prev", 0, prev_q), qb.checkpoint(tmp_path / "cur", 1, cur_q)
    before = tree_state(tmp_path)
    with use_tuning(Tuning(chunk_elems=333, copy_chunk_bytes=4096)):  # chunks of one block row each
        run_merge(prev, cur, MergeOptions(ALPHA, quantize="fp8-block"), tmp_path / "out")
    assert tree_state(tmp_path, skip=tmp_path / "out") == before
    _check(tmp_path / "out", prev, cur, ALPHA)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == qb.QCONFIG and config["model_type"] == "deepseek_v3"
    card = (tmp_path / "out" / "README.md").read_text()
    side = "CUR" if cur_q else "PREV"
    assert f"| quantized output | 4 weights in F8_E4M3 with F32 _scale_inv per 128x128 block ({side}'s layout)" in card
    assert card.count("| `model.layers.") == 4 and "scale tensors dropped" not in card
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    for name in qb.LINEAR:  # the scales sit beside their weight
        assert index["weight_map"][name + "_scale_inv"] == index["weight_map"][name]
    verify_output(tmp_path / "out")


def test_card_errors_match_a_reference(tmp_path):
    prev, cur = qb.checkpoint(tmp_path / "prev", 0, True), qb.checkpoint(tmp_path / "cur", 1, False)
    run_merge(prev, cur, MergeOptions(ALPHA, quantize="fp8-block"), tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    p, c, got = _side(prev), _side(cur), _weights(tmp_path / "out")
    for name in qb.LINEAR:
        bf = contract(p[name], c[name], ALPHA, torch.bfloat16).double().numpy()
        s = got[name + "_scale_inv"].double().numpy()
        expanded = np.repeat(np.repeat(s, 128, 0), 128, 1)[: bf.shape[0], : bf.shape[1]]
        back = (e4m3_f64(got[name].view(torch.uint8).numpy()) * expanded).astype(np.float32).astype(np.float64)
        err = back - bf
        row = f"| `{name}` | {np.abs(err).max():.3g} | {math.sqrt((err**2).sum() / (bf**2).sum()):.3g} |"
        assert row in card


def test_several_alphas_write_each_single_run(tmp_path):
    prev, cur = qb.checkpoint(tmp_path / "prev", 0, True), qb.checkpoint(tmp_path / "cur", 1, False)
    alphas = (0.3, -0.5, 0.0)
    with use_tuning(Tuning(chunk_elems=1000)):
        reports = run_merges(prev, cur, MergeOptions(alphas, quantize="fp8-block"), tmp_path / "many{alpha}")
        for a in alphas:
            run_merge(prev, cur, MergeOptions(a, quantize="fp8-block"), tmp_path / f"one{a:g}")
    for a, report in zip(alphas, reports):
        one = tmp_path / f"one{a:g}"
        assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in report.output.iterdir())
        for f in one.iterdir():
            if f.name != "README.md":
                assert f.read_bytes() == (report.output / f.name).read_bytes(), (a, f.name)
        tables = [
            d.joinpath("README.md").read_text().split("Input files")[0].split("| tool |")[1]
            for d in (one, report.output)
        ]
        assert tables[0] == tables[1]
        _check(one, prev, cur, a)


def test_tuning_changes_no_byte(tmp_path):
    prev, cur = qb.checkpoint(tmp_path / "prev", 0, True), qb.checkpoint(tmp_path / "cur", 1, True)
    outs = []
    for i, t in enumerate(
        (Tuning(chunk_elems=1), Tuning(chunk_elems=1 << 20, cpu_workers=1), Tuning(chunk_elems=40000))
    ):
        with use_tuning(t):
            outs.append(run_merge(prev, cur, MergeOptions(ALPHA, quantize="fp8-block"), tmp_path / f"o{i}").output)
    for f in outs[0].iterdir():  # the card too, but for its title (the folder's name)
        assert all(_untitled(f) == _untitled(o / f.name) for o in outs[1:]), f.name


def _untitled(path) -> bytes:
    data = path.read_bytes()
    return data.replace(f"# {path.parent.name}\n".encode(), b"") if path.name == "README.md" else data


def test_cur_only_fp8_weight_is_copied_as_it_is(tmp_path):
    prev, cur = qb.checkpoint(tmp_path / "prev", 0, True), qb.checkpoint(tmp_path / "cur", 1, True)
    name = "model.layers.1.mlp.up_proj.weight"
    from tests.merge.test_quant import _tamper

    _tamper(prev, lambda t: [t.pop(name), t.pop(name + "_scale_inv")])
    run_merge(prev, cur, MergeOptions(ALPHA, quantize="fp8-block", on_missing="copy"), tmp_path / "out")
    got, src = _weights(tmp_path / "out"), _load(cur)
    for n in (name, name + "_scale_inv"):
        assert got[n].dtype == src[n].dtype and torch.equal(got[n].view(torch.uint8), src[n].view(torch.uint8))


def test_unquantized_inputs_refused(tmp_path, keep_sigterm):
    prev, cur = qb.checkpoint(tmp_path / "prev", 0, False), qb.checkpoint(tmp_path / "cur", 1, False)
    before = tree_state(tmp_path)
    res = run_cli_in_process(prev, cur, "--alpha", ALPHA, "--quantize", "fp8-block", "-o", tmp_path / "out")
    assert_one_line_error(res, (1, 2), "neither PREV nor CUR holds FP8 block-scaled weights", "drop --quantize")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path / "out")
    assert tree_state(tmp_path) == before
    res = run_cli_in_process(prev, cur, "--alpha", ALPHA, "--quantize", "fp4", "-o", tmp_path / "out")
    assert_one_line_error(res, 2, "--quantize")


def test_nonfinite_result_refused_nothing_left(tmp_path, keep_sigterm):
    prev, cur = qb.checkpoint(tmp_path / "prev", 0, True), qb.checkpoint(tmp_path / "cur", 1, False)
    from tests.merge.test_quant import _tamper

    name = "model.layers.0.mlp.down_proj.weight"

    def edit(t):
        t[name] = t[name].clone()
        t[name][150, 7] = float("inf")

    _tamper(cur, edit)
    before = tree_state(tmp_path)
    res = run_cli_in_process(prev, cur, "--alpha", "0.3,0.5", "--quantize", "fp8-block", "-o", tmp_path / "o{alpha}")
    assert_one_line_error(res, (1, 2), name, "1 merged values are inf or NaN", "--quantize")
    assert tree_state(tmp_path) == before and not leftovers(tmp_path / "o0.3")


def test_verify_catches_a_changed_byte(tmp_path):
    prev, cur = qb.checkpoint(tmp_path / "prev", 0, True), qb.checkpoint(tmp_path / "cur", 1, False)
    name = "model.layers.0.self_attn.q_proj.weight"
    for target in (name, name + "_scale_inv"):
        out = tmp_path / target
        run_merge(prev, cur, MergeOptions(ALPHA, quantize="fp8-block"), out)
        verify_output(out)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        path = out / index["weight_map"][target]
        with safe_open(path, "pt") as f:
            header_len = int.from_bytes(path.read_bytes()[:8], "little")
            begin = json.loads(path.read_bytes()[8 : 8 + header_len])[target]["data_offsets"][0]
            assert target in f.keys()  # noqa: SIM118
        data = bytearray(path.read_bytes())
        data[8 + header_len + begin + 1] ^= 0x01  # one bit of one element
        path.write_bytes(bytes(data))
        with pytest.raises(MergeError, match="blake3"):
            verify_output(out)


def test_transformers_loads_the_output(tmp_path):
    """A tiny Llama: PREV saved in FP8 (the release layout), CUR in bf16; the --quantize output loads through
    transformers' FineGrainedFP8 path (on a CPU it dequantizes to bf16) and holds bf16(fp32(q) * scale_inv).
    (transformers 5's loader needs each dimension to divide evenly into its scale grid: k_proj's 64 rows are one
    partial block; 320 rows in 3 blocks it refuses, whoever wrote the file.)"""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=256, intermediate_size=384, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, tie_word_embeddings=False, torch_dtype="bfloat16",
    )  # fmt: skip
    dirs = {}
    for seed, name in ((0, "prev"), (1, "cur")):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    f = dirs["prev"] / "model.safetensors"
    tensors = load_file(f)
    for n in [n for n in tensors if n.endswith("proj.weight")]:
        tensors[n], tensors[n + "_scale_inv"] = qb.quantize(tensors[n])
    save_file(tensors, f, metadata={"format": "pt"})
    cfg = json.loads((dirs["prev"] / "config.json").read_text())
    cfg["quantization_config"] = dict(qb.QCONFIG)
    (dirs["prev"] / "config.json").write_text(json.dumps(cfg))
    run_merge(dirs["prev"], dirs["cur"], MergeOptions(ALPHA, quantize="fp8-block"), tmp_path / "out")
    raw = load_file(tmp_path / "out" / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    state = model.state_dict()
    checked = 0
    for n, w in raw.items():
        if w.dtype != torch.float8_e4m3fn:
            continue
        s = raw[n + "_scale_inv"]
        expanded = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
        want = (w.float() * expanded).to(state[n].dtype)
        assert torch.equal(state[n], want), n
        checked += 1
    assert checked == 7


def test_verify_checks_the_fp8_layout(tmp_path):
    """Bytes as recorded but inconsistent (config.json without quantization_config, its card row re-recorded):
    verify names the FP8 layout, not a hash."""

    prev, cur = qb.checkpoint(tmp_path / "prev", 0, True), qb.checkpoint(tmp_path / "cur", 1, False)
    out = tmp_path / "out"
    run_merge(prev, cur, MergeOptions(ALPHA, quantize="fp8-block"), out)
    config = out / "config.json"
    old = config.read_bytes()
    data = json.loads(old)
    del data["quantization_config"]
    config.write_text(json.dumps(data))
    new = config.read_bytes()
    card = out / "README.md"
    old_row = f"| `config.json` | {len(old)} | `{blake3(old).hexdigest()}` |"
    new_row = f"| `config.json` | {len(new)} | `{blake3(new).hexdigest()}` |"
    assert old_row in card.read_text()
    card.write_text(card.read_text().replace(old_row, new_row))
    with pytest.raises(MergeError, match="FP8 weights do not agree .* no quantization_config"):
        verify_output(out)


def test_torch_kernel_writes_the_same_bytes(tmp_path):
    from apo_kernels import extrapolate_
    from apo_merge.api import Hooks

    prev, cur = qb.checkpoint(tmp_path / "prev", 0, False), qb.checkpoint(tmp_path / "cur", 1, True)
    options = MergeOptions(ALPHA, quantize="fp8-block")
    with use_tuning(Tuning(chunk_elems=1000)):
        a = run_merge(prev, cur, options, tmp_path / "a")
        b = run_merge(prev, cur, options, tmp_path / "b", hooks=Hooks(kernel=extrapolate_))
    assert a.digests == b.digests


@pytest.mark.gpu
@pytest.mark.parametrize(("prev_q", "cur_q"), [(True, False), (False, True), (True, True)])
def test_cuda_writes_the_cpu_bytes(tmp_path, prev_q, cur_q):
    prev, cur = qb.checkpoint(tmp_path / "prev", 0, prev_q), qb.checkpoint(tmp_path / "cur", 1, cur_q)
    options = MergeOptions((ALPHA, -0.5), quantize="fp8-block")
    with use_tuning(Tuning(chunk_elems=333, gpu_chunk_elems=1000, gpu_slots=2)):
        cpu = run_merges(prev, cur, options.replace(device="cpu"), tmp_path / "cpu{alpha}")
        gpu = run_merges(prev, cur, options.replace(device="cuda"), tmp_path / "gpu{alpha}")
    assert [r.digests for r in gpu] == [r.digests for r in cpu]


def test_resharded(tmp_path):
    prev, cur = qb.checkpoint(tmp_path / "prev", 0, False), qb.checkpoint(tmp_path / "cur", 1, True)
    run_merge(prev, cur, MergeOptions(ALPHA, quantize="fp8-block", max_shard_size="60KB"), tmp_path / "out")
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 2
    _check(tmp_path / "out", prev, cur, ALPHA)
    verify_output(tmp_path / "out")


def test_adapters_and_dcp_refused(tmp_path):
    for kind, marker in (("LoRA adapters", "adapter_config.json"), ("torch DCP", ".metadata")):
        pair = [tmp_path / kind / s for s in ("prev", "cur")]
        for p in pair:
            p.mkdir(parents=True)
            (p / marker).write_text("{}")
        before = tree_state(tmp_path)
        with pytest.raises(MergeError, match=f"--quantize fp8-block .*{kind.split()[-1]}"):
            run_merge(*pair, MergeOptions(ALPHA, quantize="fp8-block"), tmp_path / "out")
        assert tree_state(tmp_path) == before


def test_chunks_are_whole_block_rows(tmp_path):
    """The engine's flat chunks of a quantized weight start at a block row and hold whole block rows (one at least),
    and a slot holds the widest of them in fp32: memory stays bounded by the chunk size, not the tensor."""
    from apo_merge.engine.chunks import slot_elems, tasks
    from apo_merge.io.checkpoint import open_checkpoint
    from apo_merge.plan import make_plan

    prev, cur = qb.checkpoint(tmp_path / "prev", 0, True), qb.checkpoint(tmp_path / "cur", 1, False)
    plan = make_plan(open_checkpoint(prev), open_checkpoint(cur), MergeOptions(ALPHA, quantize="fp8-block"))
    for chunk in (1, 333, 40000, 1 << 20):
        seen = {}
        for task in tasks(plan, chunk, 4096):
            piece = task.piece
            if piece.block:
                row = piece.block[0] * piece.shape[1]
                assert task.begin % row == 0 and (task.count % row == 0 or task.begin + task.count == piece.numel)
                assert task.count <= max(chunk, row) <= slot_elems(plan, chunk)
                seen[piece.name] = seen.get(piece.name, 0) + task.count
            elif piece.scales_of:  # one task, after every chunk of its weight
                assert seen[piece.scales_of] == math.prod(qb.LINEAR[piece.scales_of]) and task.count == piece.nbytes
        assert sorted(seen) == sorted(qb.LINEAR)


def test_layouts_not_written_back_refused(tmp_path, keep_sigterm):
    """--quantize writes DeepSeek's block layout only: a compressed-tensors CUR (whose layout it would replace) is
    refused with one line, nothing written."""
    from tests.merge import test_quant_ct as ct

    prev, cur = qb.checkpoint(tmp_path / "prev", 0, True), ct.checkpoint(tmp_path / "cur", 1, "channel")
    before = tree_state(tmp_path)
    res = run_cli_in_process(prev, cur, "--alpha", ALPHA, "--quantize", "fp8-block", "-o", tmp_path / "out")
    assert_one_line_error(res, (1, 2), "compressed-tensors", "not fp8 with weight_block_size", "drop --quantize")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path / "out")
    assert tree_state(tmp_path) == before
