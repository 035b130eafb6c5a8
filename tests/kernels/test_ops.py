"""apo_kernels.ops: the public entry points on both backends: supported dtypes, alpha's decisions, aliasing, errors.

The oracles themselves are checked here too: they can tell a wrong result from a right one.
"""

from __future__ import annotations

import pytest
import torch

from apo_kernels import _cpu, _triton, extrapolate, extrapolate_, extrapolate_many_, supported_dtypes
from tests.kernels.oracle import (
    BF16,
    DTYPES,
    FP16,
    FP32,
    FP64,
    assert_bits_equal,
    assert_within_bound,
    contract,
    randoms,
    round_nearest_even,
    special_grid,
    triple_id,
)

BACKENDS = ("torch", "triton")  # "triton" on CPU tensors: the kernel under the interpreter


def test_round_nearest_even_oracle():
    x = torch.tensor(
        [
            1 + 2.0**-8,
            1 + 3 * 2.0**-8,
            -(1 + 2.0**-8 + 2.0**-30),
            2.0**-134,
            3 * 2.0**-135,
            3.3963e38,
            65519.0,
            65520.0,
            -0.0,
            float("nan"),
        ],
        dtype=FP64,
    )
    assert round_nearest_even(x, BF16).tolist()[:8] == [
        1.0,
        1 + 2.0**-6,
        -(1 + 2.0**-7),
        0.0,
        2.0**-133,
        float("inf"),
        65536.0,
        65536.0,
    ]
    assert round_nearest_even(x, FP16).tolist()[6:8] == [65504.0, float("inf")]
    assert str(round_nearest_even(x, BF16)[8].item()) == "-0.0"


# --- dtypes and alpha: decided once in ops, for both backends -------------------------------------------------


def _other_dtypes() -> list[torch.dtype]:
    """Every floating dtype torch has beyond the supported ones (fp8, fp4, ...), and common non-floating ones."""
    floating = {v for v in vars(torch).values() if isinstance(v, torch.dtype) and v.is_floating_point}
    plain = {torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64}
    return sorted((floating | plain) - set(supported_dtypes()), key=str)


@pytest.mark.parametrize("backend", BACKENDS)
def test_supported_dtypes_round_trip_and_no_other_is_taken(backend):
    """Every supported dtype goes through the backend as prev, cur and out (the contract's bits); every other dtype
    torch has (fp8, fp4, integers, complex, bool) is refused in each role before anything is written."""
    supported = supported_dtypes()
    assert len(set(supported)) == len(supported) >= 4 and all(d.is_floating_point for d in supported)
    for pd in supported:
        for cd in supported:
            prev, cur = randoms((4097,), pd, cd)
            for od in supported:
                out = extrapolate(prev, cur, 0.3, out_dtype=od, backend=backend)
                assert_bits_equal(out, contract(prev, cur, 0.3, od))
    others = _other_dtypes()
    assert torch.float8_e4m3fn in others and torch.float8_e5m2 in others
    for d in others:
        size = torch.empty(0, dtype=d).element_size()
        raw = torch.arange(4 * size, dtype=torch.uint8)
        odd, keep, fine = raw.view(d), raw.clone(), torch.ones(4)
        for role, prev, cur, out in (("prev", odd, fine, fine), ("cur", fine, odd, fine), ("out", fine, fine, odd)):
            with pytest.raises(TypeError, match=f"{role} has dtype {d}; supported: "):
                extrapolate_(out, prev, cur, 0.3, backend=backend)
        assert torch.equal(raw, keep)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_alpha_zero_returns_cur(out_dtype):
    for cd in DTYPES:
        prev, cur = special_grid(FP32, cd)
        for backend in ("auto", "triton"):
            out = extrapolate(prev, cur, 0.0, out_dtype=out_dtype, backend=backend)
            if out_dtype == cd:
                assert_bits_equal(out, cur)  # bytes copied, NaN payloads included
            else:
                assert_within_bound(out, prev, cur, 0.0)  # exactly cur, rounded once
                if cd != FP64:  # torch's own casts round once from these (not from fp64: it goes via fp32)
                    nan = cur.isnan()
                    assert_bits_equal(out[~nan], cur[~nan].to(out_dtype))
    x = torch.tensor([-0.0, 0.0, 1.5], dtype=BF16)
    assert_bits_equal(extrapolate(torch.full((3,), float("inf")), x, -0.0, out_dtype=FP32), x.float())


def test_fp64_to_16_bit_is_one_rounding():
    # x lies just above the midpoint of 1 and its bf16 (fp16) successor, by far less than an fp32 ulp: rounding
    # to fp32 first lands exactly on the midpoint, and ties-to-even then picks 1, the wrong neighbour.
    for dtype, mant in ((BF16, 7), (FP16, 10)):
        x = torch.tensor([1 + 2.0 ** -(mant + 1) + 2.0**-40, -1 - 2.0 ** -(mant + 1) - 2.0**-40], dtype=FP64)
        assert x.to(FP32).to(dtype).tolist() == [1.0, -1.0]  # what double rounding gives
        for backend in ("auto", "triton"):
            out = extrapolate(torch.zeros(2, dtype=FP64), x, 0.0, out_dtype=dtype, backend=backend)
            assert out.tolist() == [1 + 2.0**-mant, -1 - 2.0**-mant]


def test_bf16_math_and_lerp_are_not_exact():
    """The checks can tell: bf16 arithmetic breaks the bound; torch.lerp (which computes c - (c - p)(1 - w), and
    1 - 1.3f is not -0.3f) stays within it but differs from the contract's bits near ties."""
    prev, cur = randoms((1 << 16,), BF16, BF16)
    alpha = 0.3
    ours = extrapolate(prev, cur, alpha)
    assert_within_bound(ours, prev, cur, alpha)
    assert_bits_equal(ours, contract(prev, cur, alpha, BF16))
    with pytest.raises(AssertionError, match="outside the bound"):
        assert_within_bound(cur + alpha * (cur - prev), prev, cur, alpha)
    with pytest.raises(AssertionError, match="elements differ"):
        assert_bits_equal(torch.lerp(prev, cur, 1 + alpha), contract(prev, cur, alpha, BF16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_is_rounded_before_the_zero_test(backend):
    """1e-50 is 0 in fp32 (cur's bytes copied, NaN payloads kept) but not in fp64; the same in a grouped call."""
    prev, cur = special_grid(FP32, BF16)
    for run in (
        lambda p, c, o: extrapolate_(o, p, c, 1e-50, backend=backend),
        lambda p, c, o: extrapolate_many_([o], [p], [c], 1e-50, backend=backend),
    ):
        out = torch.empty_like(cur)
        run(prev, cur, out)
        assert_bits_equal(out, cur)
        wide = torch.empty_like(cur)
        run(prev.double(), cur, wide)  # fp64 math: alpha is 1e-50, not 0
        assert_bits_equal(wide, contract(prev.double(), cur, 1e-50, BF16))
        assert not torch.equal(wide.view(torch.int16), cur.view(torch.int16))  # NaNs are canonical now


def test_backends_receive_decided_values(monkeypatch):
    """ops rounds alpha and picks the compute dtype once; each backend gets them and never sees alpha == 0 with
    out in cur's dtype (ops copies cur then)."""
    seen = []
    for module in (_cpu, _triton):
        real = module.extrapolate_
        monkeypatch.setattr(
            module,
            "extrapolate_",
            lambda p, c, o, a, w, real=real, m=module: seen.append((m, a, w)) or real(p, c, o, a, w),
        )
    x = torch.ones(8, dtype=BF16)
    for backend in BACKENDS:
        extrapolate(torch.zeros(8), x, 0.1, backend=backend)
        extrapolate(torch.zeros(8, dtype=FP64), x, 0.1, backend=backend)
        extrapolate(torch.zeros(8), x, 0.0, backend=backend)  # copied by ops
        extrapolate(torch.zeros(8), x, 0.0, out_dtype=FP16, backend=backend)  # rounded once by the backend
    single = 0.10000000149011612  # 0.1 rounded to fp32
    assert seen == [
        (_cpu, single, FP32),
        (_cpu, 0.1, FP64),
        (_cpu, 0.0, FP32),
        (_triton, single, FP32),
        (_triton, 0.1, FP64),
        (_triton, 0.0, FP32),
    ]


# --- aliasing and errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize(
    "triple", [(BF16, BF16, BF16), (FP32, BF16, BF16), (BF16, FP32, FP32), (FP64, FP64, FP64)], ids=triple_id
)
def test_in_place(triple, backend):
    pd, cd, od = triple
    prev, cur = randoms((4097,), pd, cd)
    expected = extrapolate(prev, cur, 0.3, out_dtype=od)
    if od == cd:
        c = cur.clone()
        assert extrapolate_(c, prev, c, 0.3, backend=backend) is c
        assert_bits_equal(c, expected)
    if od == pd:
        p = prev.clone()
        extrapolate_(p, p, cur, 0.3, backend=backend)
        assert_bits_equal(p, expected)


def test_partial_overlap_is_refused():
    buf = torch.randn(20)
    with pytest.raises(ValueError, match="partly overlaps cur"):
        extrapolate_(buf[1:11], torch.zeros(10), buf[:10], 0.3)
    with pytest.raises(ValueError, match="partly overlaps prev"):
        extrapolate_(buf[:10], buf[5:15], torch.zeros(10), 0.3)
    extrapolate_(buf[:10], torch.zeros(10), buf[10:], 0.3)  # same storage, disjoint: fine


def test_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="shape mismatch"):
        extrapolate(torch.zeros(4), x, 0.3)
    with pytest.raises(TypeError, match="prev has dtype torch.int32"):
        extrapolate(torch.zeros(3, dtype=torch.int32), x, 0.3)
    with pytest.raises(ValueError, match="unknown backend"):
        extrapolate(x, x, 0.3, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="list lengths differ"):
        extrapolate_many_([x], [x, x], [x], 0.3)


def test_requires_grad_parameters_in_place():
    w = torch.nn.Parameter(torch.ones(4))
    extrapolate_(w, torch.zeros(4), w, 0.5)
    assert torch.equal(w.detach(), torch.full((4,), 1.5))


def test_many_validates_everything_before_writing():
    outs = [torch.zeros(4), torch.zeros(3)]
    with pytest.raises(ValueError, match="shape mismatch"):
        extrapolate_many_(outs, [torch.ones(4), torch.ones(4)], [torch.ones(4), torch.ones(4)], 0.3)
    assert torch.equal(outs[0], torch.zeros(4))
