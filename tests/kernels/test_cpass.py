"""apo_kernels.cpass, the compiled CPU pass: bit-identical to the numpy twin, the torch twin, the Triton kernel under
its interpreter and the contract's oracle, for every dtype triple and any bit pattern; no fused multiply-add."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from apo_kernels import cpass, extrapolate, numpy_twin
from tests.kernels.oracle import (
    ALL_TRIPLES,
    ALPHAS,
    BF16,
    FP16,
    FP32,
    SHAPES,
    TRIPLES,
    assert_bits_equal,
    assert_within_bound,
    contract,
    randoms,
    special_grid,
    triple_id,
)
from tests.kernels.test_numpy_twin import _random_bits, name, raw

built = pytest.mark.skipif(not cpass.available(), reason="apo_kernels._cpass is not built (no C compiler)")


def run(into, prev: torch.Tensor, cur: torch.Tensor, alphas, out_dtype) -> tuple[list[torch.Tensor], list[int]]:
    outs = [torch.empty(cur.shape, dtype=out_dtype) for _ in alphas]
    found = into(
        [raw(o) for o in outs], name(out_dtype), raw(prev), name(prev.dtype), raw(cur), name(cur.dtype), alphas
    )
    return outs, found


def test_built_in_ci():
    """CI installs with a compiler (pip install -e ".[dev]"): there the pass must have been built, so that the suite
    runs it; elsewhere the numpy twin stands in and the tests below skip."""
    if os.environ.get("CI") != "true":
        pytest.skip("only CI guarantees a C compiler")
    assert cpass.available(), "setup.py did not build apo_kernels._cpass"


def test_best_falls_back_to_the_numpy_twin(monkeypatch):
    monkeypatch.setattr(cpass, "_cpass", None)
    assert cpass.best() is numpy_twin.extrapolate_into
    with pytest.raises(RuntimeError, match="not built"):
        cpass.extrapolate_into([], "F32", np.zeros(0, np.uint8), "F32", np.zeros(0, np.uint8), "F32", [])


@built
@pytest.mark.parametrize("triple", ALL_TRIPLES, ids=triple_id)
def test_bit_identical_to_numpy_twin_on_any_bit_pattern(triple):
    """NaN with every payload, infinities, subnormals, overflow; several alphas in one call (one overflows fp32),
    a length that ends inside a block; the counts of new non-finite results too."""
    pd, cd, od = triple
    alphas = [0.3, 0.0, -2.5, 1e-3, 1e39]
    for prev, cur in ((_random_bits(5000, pd, 1), _random_bits(5000, cd, 2)), special_grid(pd, cd)):
        twin, twin_found = run(numpy_twin.extrapolate_into, prev, cur, alphas, od)
        outs, found = run(cpass.extrapolate_into, prev, cur, alphas, od)
        for out, expected in zip(outs, twin):
            assert_bits_equal(out, expected)
        assert found == twin_found


@built
@pytest.mark.parametrize("triple", ALL_TRIPLES, ids=triple_id)
def test_bit_identical_to_torch_twin_and_contract(triple):
    pd, cd, od = triple
    for prev, cur in (randoms((4097,), pd, cd), special_grid(pd, cd)):
        for alpha in (0.3, 0.0, -2.5):
            (out,), _ = run(cpass.extrapolate_into, prev, cur, [alpha], od)
            assert_bits_equal(out, extrapolate(prev, cur, alpha, out_dtype=od, backend="torch"))
            assert_bits_equal(out, contract(prev, cur, alpha, od))


@built
@pytest.mark.parametrize("triple", ALL_TRIPLES, ids=triple_id)
def test_bit_identical_to_triton_interpreter(triple):
    pytest.importorskip("triton")
    pd, cd, od = triple
    prev, cur = _random_bits(3000, pd, 3), _random_bits(3000, cd, 4)
    for alpha in (0.3, 0.0):
        (out,), _ = run(cpass.extrapolate_into, prev, cur, [alpha], od)
        assert_bits_equal(out, extrapolate(prev, cur, alpha, out_dtype=od, backend="triton"))


@built
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("triple", TRIPLES, ids=triple_id)
def test_accuracy_against_float64(triple, alpha):
    pd, cd, od = triple
    for i, shape in enumerate(SHAPES):
        prev, cur = randoms(shape, pd, cd, seed=i)
        (out,), _ = run(cpass.extrapolate_into, prev, cur, [alpha], od)
        assert_within_bound(out, prev, cur, alpha)
        assert_bits_equal(out, contract(prev, cur, alpha, od))


def _fused32(c: np.ndarray, d: np.ndarray, a: np.float32) -> np.ndarray:
    """fp32 fma(a, d, c): a * d is exact in fp64 (24 + 24 bits); the sum rounds once to fp64, then to fp32."""
    return (c.astype(np.float64) + np.float64(a) * d.astype(np.float64)).astype(np.float32)


@built
def test_no_fused_multiply_add_in_the_results():
    """Inputs where cur + alpha * d rounds differently fused: the pass gives the unfused result everywhere."""
    g = np.random.default_rng(5)
    prev = g.standard_normal(100_000).astype(np.float32)
    cur = (prev + g.standard_normal(100_000) * 1e-2).astype(np.float32)
    a = np.float32(0.3)
    d = cur - prev
    unfused = cur + a * d  # numpy rounds each ufunc's result: d, t and r each rounded
    assert np.count_nonzero(_fused32(cur, d, a) != unfused) > 1000  # the inputs do tell the two apart
    out = np.empty(100_000, np.float32)
    cpass.extrapolate_into([out.view(np.uint8)], "F32", prev.view(np.uint8), "F32", cur.view(np.uint8), "F32", [0.3])
    assert np.array_equal(out.view(np.uint32), unfused.view(np.uint32))

    prev64, cur64 = prev[:400].astype(np.float64) / 3, cur[:400].astype(np.float64) / 3
    d64 = cur64 - prev64
    unfused64 = cur64 + 0.3 * d64
    fused64 = np.array([float(Fraction(c) + Fraction(0.3) * Fraction(x)) for c, x in zip(cur64, d64)])
    assert np.count_nonzero(fused64 != unfused64) > 5
    out64 = np.empty(400, np.float64)
    args = ([out64.view(np.uint8)], "F64", prev64.view(np.uint8), "F64", cur64.view(np.uint8), "F64", [0.3])
    cpass.extrapolate_into(*args)
    assert np.array_equal(out64.view(np.uint64), unfused64.view(np.uint64))


@built
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
def test_no_fused_multiply_add_in_the_machine_code():
    """No fma instruction anywhere in the extension (x86-64 vfmadd/vfmsub/vfnmadd..., AArch64 fmadd/fmla...)."""
    from apo_kernels import _cpass

    asm = subprocess.run(["objdump", "-d", _cpass.__file__], capture_output=True, text=True, check=True).stdout
    assert "mulps" in asm or "mulpd" in asm or "fmul" in asm  # the disassembly is of real code
    fma = re.findall(r"\s(v?fn?m(?:add|sub)\w*|fml[as]\w*)\s", asm)
    assert not fma, f"fused multiply-add instructions: {sorted(set(fma))}"


@built
def test_empty_and_block_edges_equal_numpy_twin():
    for n in (0, 1, 1023, 1024, 1025, 3 * 1024 + 7):
        prev, cur = randoms((n,), FP32, BF16, seed=n)
        alphas = [0.1, 0.0, 0.3]
        outs, _ = run(cpass.extrapolate_into, prev, cur, alphas, FP16)
        twins, _ = run(numpy_twin.extrapolate_into, prev, cur, alphas, FP16)
        for out, twin in zip(outs, twins):
            assert_bits_equal(out, twin)


@built
def test_more_alphas_than_one_call_takes():
    prev, cur = randoms((3000,), FP32, BF16)
    alphas = [0.01 * k for k in range(70)]  # the C code takes 64 per call
    outs, found = run(cpass.extrapolate_into, prev, cur, alphas, BF16)
    twins, twin_found = run(numpy_twin.extrapolate_into, prev, cur, alphas, BF16)
    for out, twin in zip(outs, twins):
        assert_bits_equal(out, twin)
    assert found == twin_found


@built
def test_refuses_bad_buffers_and_leaves_inputs_alone():
    x = np.zeros(8, np.uint8)
    with pytest.raises(ValueError, match="same number of elements"):
        cpass.extrapolate_into([np.zeros(8, np.uint8)], "BF16", x, "F32", x, "BF16", [0.3])
    with pytest.raises(TypeError, match="I8"):
        cpass.extrapolate_into([x], "I8", x, "F32", x, "F32", [0.3])
    with pytest.raises(ValueError, match="share memory"):
        cpass.extrapolate_into([x], "F32", np.zeros(8, np.uint8), "F32", x, "F32", [0.3])
    with pytest.raises((TypeError, BufferError)):
        cpass.extrapolate_into([bytes(8)], "F32", x, "F32", np.zeros(8, np.uint8), "F32", [0.3])
    prev, cur = special_grid(FP32, FP16)
    before = prev.clone(), cur.clone()
    run(cpass.extrapolate_into, prev, cur, [0.3, 0.0], BF16)
    assert_bits_equal(prev, before[0])
    assert_bits_equal(cur, before[1])


_NO_TORCH = """
import sys
from apo_merge.cli import main
sys.argv = ["apo-merge", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
assert "torch" not in sys.modules, "torch was imported"
"""


def test_import_does_not_load_torch():
    code = "import sys, apo_kernels.cpass, apo_merge.engine; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@built
def test_fp16_cpu_merge_needs_no_torch(tmp_path):
    """With the pass built, fp16 merges on the CPU no longer start torch (its twin was the fast fp16 path)."""
    from tests.checkpoints import make_checkpoint

    prev = make_checkpoint(tmp_path / "prev", seed=0, dtype=FP16)
    cur = make_checkpoint(tmp_path / "cur", seed=1, dtype=FP16)
    args = [prev, cur, "--alpha", "0.3", "--device", "cpu", "-o", tmp_path / "out"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run([sys.executable, "-c", _NO_TORCH, *map(str, args)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
