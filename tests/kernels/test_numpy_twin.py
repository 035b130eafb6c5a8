"""apo_kernels.numpy_twin, the numpy twin the merge engine runs: bit-identical to the torch twin and both oracles."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from apo_kernels import extrapolate, numpy_twin
from apo_kernels.dtypes import of_torch
from tests.kernels.oracle import (
    ALL_TRIPLES,
    ALPHAS,
    BF16,
    DTYPES,
    FP16,
    FP32,
    FP64,
    SHAPES,
    TRIPLES,
    assert_bits_equal,
    assert_within_bound,
    contract,
    randoms,
    special_grid,
    specials,
    triple_id,
)


def name(dtype: torch.dtype) -> str:
    return of_torch(dtype).name


def raw(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def run(prev: torch.Tensor, cur: torch.Tensor, alphas, out_dtype) -> tuple[list[torch.Tensor], list[int]]:
    """The twin on its own terms (byte buffers, several alphas); the outputs as tensors and the counts."""
    outs = [torch.empty(cur.shape, dtype=out_dtype) for _ in alphas]
    found = numpy_twin.extrapolate_into(
        [raw(o) for o in outs], name(out_dtype), raw(prev), name(prev.dtype), raw(cur), name(cur.dtype), alphas
    )
    return outs, found


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("triple", TRIPLES, ids=triple_id)
def test_numpy_twin_accuracy(triple, alpha):
    pd, cd, od = triple
    cases = [randoms(shape, pd, cd, seed=i) for i, shape in enumerate(SHAPES)] + [special_grid(pd, cd)]
    for prev, cur in cases:
        out = extrapolate(prev, cur, alpha, out_dtype=od, backend="numpy")
        assert_within_bound(out, prev, cur, alpha)
        assert_bits_equal(out, contract(prev, cur, alpha, od))


@pytest.mark.parametrize("triple", ALL_TRIPLES, ids=triple_id)
def test_bit_identical_to_torch_twin_all_dtypes(triple):
    pd, cd, od = triple
    for prev, cur in (randoms((4097,), pd, cd), special_grid(pd, cd)):
        for alpha in (0.3, 0.0, -2.5):
            (out,), _ = run(prev, cur, [alpha], od)
            assert_bits_equal(out, extrapolate(prev, cur, alpha, out_dtype=od, backend="torch"))


def _random_bits(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Any bit pattern: NaN with every payload, infinities, subnormals, both zeros."""
    g = torch.Generator().manual_seed(seed)
    width = torch.finfo(dtype).bits
    ints = torch.randint(-(2 ** (width - 1)), 2 ** (width - 1) - 1, (n,), generator=g, dtype=torch.int64)
    return ints.to({16: torch.int16, 32: torch.int32, 64: torch.int64}[width]).view(dtype)


@pytest.mark.parametrize("triple", ALL_TRIPLES, ids=triple_id)
def test_bit_identical_to_torch_twin_on_any_bit_pattern(triple):
    pd, cd, od = triple
    prev, cur = _random_bits(3000, pd, 1), _random_bits(3000, cd, 2)
    for alpha in (0.3, 0.0):
        (out,), (found,) = run(prev, cur, [alpha], od)
        expected = extrapolate(prev, cur, alpha, out_dtype=od, backend="torch")
        assert_bits_equal(out, expected)
        assert found == (~expected.double().isfinite() & prev.isfinite() & cur.isfinite()).sum().item()


def test_several_alphas_equal_single_runs_and_pieces(monkeypatch):
    prev, cur = randoms((3 * 1000 + 7,), FP32, BF16)
    alphas = [0.1, 0.0, 0.3, -1.0]
    singles = [run(prev, cur, [a], BF16)[0][0] for a in alphas]
    monkeypatch.setattr(numpy_twin, "PIECE", 1000)  # piece boundaries inside the buffers
    numpy_twin._scratch.__dict__.clear()
    outs, _ = run(prev, cur, alphas, BF16)
    for out, single in zip(outs, singles):
        assert_bits_equal(out, single)


@pytest.mark.parametrize("od", DTYPES, ids=str)
def test_new_nonfinite_count(od):
    """Counted exactly: outputs that are inf or NaN while both inputs are finite (overflow), not those whose
    inputs already were."""
    cd = FP64 if od == FP64 else FP32
    prev, cur = special_grid(cd, cd)
    prev = torch.cat([prev, torch.zeros(5, dtype=cd)])
    cur = torch.cat([cur, torch.tensor([1e300 if cd == FP64 else 3e38, 7e4, 1.0, -7e4, 2.0], dtype=cd)])
    for alpha in (0.3, 0.0, 2.0):
        (out,), (found,) = run(prev, cur, [alpha], od)
        expected = (~out.double().isfinite() & prev.isfinite() & cur.isfinite()).sum().item()
        assert found == expected
    (out,), (found,) = run(prev, cur, [2.0], od)
    assert found > 0 or od == FP64 and cd == FP64


def test_inputs_are_not_written():
    prev, cur = special_grid(FP32, FP32)
    before = prev.clone(), cur.clone()
    for od in DTYPES:
        for alpha in (0.0, 0.3):
            run(prev, cur, [alpha], od)
    assert_bits_equal(prev, before[0])
    assert_bits_equal(cur, before[1])


def test_refuses_mismatched_buffers_and_unknown_dtypes():
    x = np.zeros(8, np.uint8)
    with pytest.raises(ValueError, match="same number of elements"):
        numpy_twin.extrapolate_into([np.zeros(8, np.uint8)], "BF16", x, "F32", x, "BF16", [0.3])
    with pytest.raises(TypeError, match="I8"):
        numpy_twin.extrapolate_into([x], "I8", x, "F32", x, "F32", [0.3])


def test_specials_cover_the_overflow_edges():
    # the fast path's range test sits exactly at each output dtype's rounding threshold
    for od in (BF16, FP16):
        edges = torch.tensor([65519.99, 65520.0, 3.3961e38, float.fromhex("0x1.ffp127")], dtype=FP32)
        edges = torch.cat([edges, -edges, specials(FP32)])
        (out,), _ = run(torch.zeros_like(edges), edges, [0.0], od)
        assert_bits_equal(out, contract(torch.zeros_like(edges), edges, 0.0, od))


def test_import_does_not_load_torch():
    code = "import sys, apo_kernels.numpy_twin; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
