"""The kernel tests' oracles and inputs: a float64 reference with an error bound, the contract emulated bit for bit.

The reference below is the exact value of ``cur + alpha * (cur - prev)`` (float64, with the compute dtype's
intermediate overflow to inf), and the bound every output element must meet is

    |out - v| <= ulp_out(v) / 2 + eps_w * (|cur| + |alpha * (cur - prev)|) + 3 * tiny_w

(ulp of the output dtype at v, subnormal spacing below its smallest normal; eps_w = 2**-23 for fp32 math,
2**-50 for fp64 math; tiny_w, half the compute dtype's smallest subnormal, covers the absolute error of the
three intermediate roundings near underflow). Values past the output dtype's overflow threshold must be inf.

``contract`` is a second, independent oracle: the contract's own steps (alpha rounded once; d, t, r each rounded
in the compute dtype) emulated in float64, then a hand-written round-to-nearest-even into the output dtype. The
kernels must match it bit for bit; bf16 arithmetic and torch.lerp do not.
"""

from __future__ import annotations

import itertools

import torch

from apo_kernels.dtypes import of_torch

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
DTYPES = (BF16, FP16, FP32, FP64)
ALL_TRIPLES = list(itertools.product(DTYPES, DTYPES, DTYPES))  # (prev, cur, out)
TRIPLES = [(d, d, d) for d in DTYPES] + [
    (FP32, BF16, BF16),
    (BF16, FP32, FP32),
    (BF16, BF16, FP16),
    (BF16, BF16, FP32),
    (FP64, FP32, FP32),
    (FP32, FP64, FP64),
    (FP32, FP32, BF16),
    (FP64, FP64, BF16),
    (FP64, FP32, FP16),
    (FP16, BF16, BF16),
]
ALPHAS = (0.3, -0.5, 0.0, 1e-3, 2.0)
SHAPES = ((0,), (1,), (7,), (4095,), (4097,), (5, 123), (123, 5))
_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}

# (mantissa bits, exponent of the smallest normal, exponent of the largest finite)
_FORMAT = {BF16: (7, -126, 127), FP16: (10, -14, 15), FP32: (23, -126, 127), FP64: (52, -1022, 1023)}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT[t.element_size()])


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = (bits(a).flatten() != bits(b).flatten()).nonzero().flatten()
    if diff.numel():
        i = diff[0].item()
        raise AssertionError(
            f"{diff.numel()} elements differ, first at flat index {i}: "
            f"{a.flatten()[i].item()!r} vs {b.flatten()[i].item()!r}"
        )


# --- the float64 reference ----------------------------------------------------------------------------------


def _overflow_threshold(dtype: torch.dtype) -> float:
    mant, _, emax = _FORMAT[dtype]
    return float("inf") if dtype == FP64 else 2.0 ** (emax + 1) - 2.0 ** (emax - mant - 1)


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mant, emin, _ = _FORMAT[dtype]
    _, e = torch.frexp(v)  # |v| in [2**(e-1), 2**e)
    return torch.ldexp(torch.ones_like(v), (e - 1).clamp(min=emin) - mant)


def reference(prev: torch.Tensor, cur: torch.Tensor, alpha: float, wide: torch.dtype):
    """(v, slack): the exact result in float64 and the allowed error beyond half an output ulp."""
    c, p = cur.double().flatten(), prev.double().flatten()
    if alpha == 0.0:
        return c, torch.zeros_like(c)
    limit = _overflow_threshold(wide)

    def overflow(x: torch.Tensor) -> torch.Tensor:  # what rounding x into the compute dtype does past its range
        return torch.where(x.abs() >= limit, torch.copysign(torch.full_like(x, float("inf")), x), x)

    d = overflow(c - p)
    t = overflow(alpha * d)
    v = c + t
    eps, tiny = (2.0**-23, 2.0**-150) if wide == FP32 else (2.0**-50, 2.0**-1074)
    return v, eps * (c.abs() + t.abs()) + 3 * tiny


def assert_within_bound(out: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor, alpha: float) -> None:
    wide = FP64 if FP64 in (prev.dtype, cur.dtype, out.dtype) else FP32
    v, slack = reference(prev, cur, alpha, wide)
    y = out.double().flatten()
    nan = v.isnan()
    assert torch.equal(y.isnan(), nan), "NaN in must give NaN out, and only then"
    if out.dtype != cur.dtype or alpha != 0.0:
        assert (bits(out).flatten()[nan] == of_torch(out.dtype).nan).all(), "NaN outputs must be canonical"
    inf = v.isinf()
    assert torch.equal(y[inf], v[inf]), "infinite results must be the same inf"
    fin = ~(nan | inf)
    v, y, slack = v[fin], y[fin], slack[fin]
    limit = _overflow_threshold(out.dtype)
    must_overflow = v.abs() - slack >= limit
    may_overflow = v.abs() + slack >= limit
    assert torch.equal(
        y[must_overflow], torch.copysign(torch.full_like(y[must_overflow], float("inf")), v[must_overflow])
    ), "results past the range must be inf"
    ok = (y - v).abs() <= _ulp(v, out.dtype) / 2 + slack
    ok |= must_overflow | (may_overflow & y.isinf() & (torch.sign(y) == torch.sign(v)))
    bad = (~ok).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{bad.numel()} of {v.numel()} elements outside the bound, e.g. exact "
        f"{v[bad[0]].item()!r} got {y[bad[0]].item()!r}"
    )


def round_nearest_even(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 -> ``dtype`` with one correct rounding, in exact float64 steps (no torch casts to 16 bits)."""
    if dtype == FP64:
        return x.clone()
    mag = x.abs()
    ulp = _ulp(mag, dtype)
    q = mag / ulp  # exact: a power-of-two scaling
    low = q.floor()
    rem = q - low
    up = (rem > 0.5) | ((rem == 0.5) & (low.remainder(2) == 1))
    y = (low + up.double()) * ulp
    y = torch.where(y > torch.finfo(dtype).max, float("inf"), y)
    y = torch.where(mag.isfinite(), y, mag)
    return torch.copysign(y, x).to(dtype)  # exactly representable now: the cast only changes the format


def contract(prev: torch.Tensor, cur: torch.Tensor, alpha: float, out_dtype: torch.dtype) -> torch.Tensor:
    """The documented numerics emulated step by step in float64."""
    c, p = cur.double(), prev.double()
    if alpha == 0.0 and out_dtype == cur.dtype:
        return cur.clone()
    if FP64 in (prev.dtype, cur.dtype, out_dtype):
        r = c if alpha == 0.0 else c + alpha * (c - p)  # float64 ops round like the kernel's
    else:

        def rnd(x: torch.Tensor) -> torch.Tensor:  # fp32 rounding of an exact (or harmlessly rounded) value
            return x.float().double()

        a = rnd(torch.tensor(alpha, dtype=FP64))
        r = c if alpha == 0.0 else rnd(c + rnd(a * rnd(c - p)))
    y = round_nearest_even(r, out_dtype)
    bits(y)[r.isnan()] = of_torch(out_dtype).nan
    return y


# --- inputs --------------------------------------------------------------------------------------------------


def specials(dtype: torch.dtype) -> torch.Tensor:
    """Signed zeros, subnormals, normal extremes, overflow-prone magnitudes, inf, NaN (incl. a non-canonical one)."""
    fi = torch.finfo(dtype)
    mant = _FORMAT[dtype][0]
    sub_min = fi.tiny * 2.0**-mant
    vals = [
        0.0,
        -0.0,
        sub_min,
        -sub_min,
        fi.tiny - sub_min,
        fi.tiny,
        -fi.tiny,
        1.0,
        -1.0,
        0.3,
        1 + fi.eps,
        fi.max,
        -fi.max,
        fi.max / 2,
        -fi.max / 3,
        float("inf"),
        float("-inf"),
        float("nan"),
    ]
    if dtype != FP64:
        vals += [3e38, -2e38, 65504.0, 60000.0, -40000.0, 1e-40, 6e-8]
    t = torch.tensor(vals, dtype=FP64).to(dtype)
    negative_nan = torch.tensor([float("nan")], dtype=dtype)
    bits(negative_nan)[0] = -1  # all ones: sign set, full payload
    return torch.cat([t, negative_nan])


def special_grid(prev_dtype: torch.dtype, cur_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every special of prev's dtype against every special of cur's dtype."""
    sp, sc = specials(prev_dtype), specials(cur_dtype)
    return sp.repeat_interleave(sc.numel()), sc.repeat(sp.numel())


def randoms(
    shape: tuple[int, ...], prev_dtype: torch.dtype, cur_dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights-like values over many binades, cur close to prev (as after a round of training)."""
    g = torch.Generator().manual_seed(seed)
    scale = 2.0 ** torch.randint(-12, 4, shape, generator=g).double()
    prev = torch.randn(shape, generator=g, dtype=FP64) * scale
    cur = prev + 0.01 * torch.randn(shape, generator=g, dtype=FP64) * scale
    return prev.to(prev_dtype), cur.to(cur_dtype)


def triple_id(triple) -> str:
    return "-".join(str(d).removeprefix("torch.") for d in triple)
