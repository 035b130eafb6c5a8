"""apo_kernels: accuracy against a float64 reference, bit identity across backends, aliasing, grouping.

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
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from apo_kernels import _cpu, _triton, extrapolate, extrapolate_, extrapolate_many_, supported_dtypes
from apo_kernels._numerics import CANONICAL_NAN

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
        assert (bits(out).flatten()[nan] == CANONICAL_NAN[out.dtype]).all(), "NaN outputs must be canonical"
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
    bits(y)[r.isnan()] = CANONICAL_NAN[out_dtype]
    return y


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


def _name(triple) -> str:
    return "-".join(str(d).removeprefix("torch.") for d in triple)


# --- accuracy --------------------------------------------------------------------------------------------------


def test_supported_dtypes():
    assert set(supported_dtypes()) == set(DTYPES)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("triple", TRIPLES, ids=_name)
def test_cpu_twin_accuracy(triple, alpha):
    pd, cd, od = triple
    cases = [randoms(shape, pd, cd, seed=i) for i, shape in enumerate(SHAPES)] + [special_grid(pd, cd)]
    for prev, cur in cases:
        out = extrapolate(prev, cur, alpha, out_dtype=od)
        assert out.shape == cur.shape and out.dtype == od
        assert_within_bound(out, prev, cur, alpha)
        assert_bits_equal(out, contract(prev, cur, alpha, od))


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


# --- the Triton kernel under the interpreter vs the CPU twin ------------------------------------------------


@pytest.mark.parametrize("triple", ALL_TRIPLES, ids=_name)
def test_interpreter_bit_identical_to_twin_all_dtypes(triple):
    pd, cd, od = triple
    grid = special_grid(pd, cd)
    rand = randoms((4097,), pd, cd)
    for prev, cur in (grid, rand):
        for alpha in (0.3, -0.5, 0.0):
            twin = extrapolate(prev, cur, alpha, out_dtype=od)
            kern = extrapolate(prev, cur, alpha, out_dtype=od, backend="triton")
            assert_bits_equal(kern, twin)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("triple", TRIPLES, ids=_name)
def test_interpreter_bit_identical_to_twin_shapes(triple, alpha):
    pd, cd, od = triple
    for i, shape in enumerate(SHAPES):
        prev, cur = randoms(shape, pd, cd, seed=i)
        if len(shape) == 2:  # transposed views: the launchers make inputs contiguous, outputs written back
            prev, cur = prev.t(), cur.t()
        out = torch.empty(cur.shape[::-1], dtype=od).t()
        extrapolate_(out, prev, cur, alpha, backend="triton")
        assert_bits_equal(out, extrapolate(prev, cur, alpha, out_dtype=od))


def test_interpreter_does_not_need_env_and_restores_triton_language():
    import triton.language as tl

    before = (tl.load, tl.store, tl.where, tl.tensor.__add__, tl.tensor.to)
    prev, cur = randoms((100,), BF16, BF16)
    extrapolate(prev, cur, 0.3, backend="triton")
    assert (tl.load, tl.store, tl.where, tl.tensor.__add__, tl.tensor.to) == before


def test_with_triton_interpret_env():
    """TRITON_INTERPRET=1 set before import (a common test setup) makes ``_kernel`` itself interpreted."""
    code = (
        "import torch, triton\n"
        "from apo_kernels import _triton, extrapolate\n"
        "assert not _triton._is_compiled()\n"
        "p = torch.randn(5000, dtype=torch.float32); c = torch.randn(5000).to(torch.bfloat16)\n"
        "k = extrapolate(p, c, 0.3, backend='triton'); t = extrapolate(p, c, 0.3)\n"
        "assert torch.equal(k.view(torch.int16), t.view(torch.int16))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=Path(__file__).parent.parent)


def test_interpreter_rounds_bf16_and_fp16_to_nearest_even():
    # Ties and near-ties in fp32 (cur exact, alpha = 0 keeps it): plain casts under the interpreter truncate bf16.
    base = torch.arange(1, 1 << 12, dtype=torch.int32) << 13  # varied low mantissa bits, incl. exact ties
    x = (torch.tensor(1.0).view(torch.int32) + base).view(FP32)
    x = torch.cat([x, -x, x * 2.0**-130, x * 2.0**-20])  # negatives, bf16 subnormals, fp16 subnormals
    for od in (BF16, FP16):
        kern = extrapolate(torch.zeros_like(x), x, 0.0, out_dtype=od, backend="triton")
        assert_bits_equal(kern, x.to(od))  # torch's casts round to nearest even


# --- aliasing, layouts, chunking, threads ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize(
    "triple", [(BF16, BF16, BF16), (FP32, BF16, BF16), (BF16, FP32, FP32), (FP64, FP64, FP64)], ids=_name
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


@pytest.mark.parametrize("threads", [1, 2])
def test_chunk_boundaries(monkeypatch, threads):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # picks the chunk size; no pool below 2**18
    prev, cur = randoms((3 * 4097 + 5,), FP32, BF16)
    whole = extrapolate(prev, cur, 0.3)
    for chunk in (1000, 1 << 20):  # chunk boundaries inside, then scratch larger than the cached one
        monkeypatch.setattr(_cpu, "_CHUNK", chunk)
        monkeypatch.setattr(_cpu, "_CHUNK_ONE_THREAD", chunk)
        assert_bits_equal(extrapolate(prev, cur, 0.3), whole)


def test_split_across_threads(monkeypatch):
    prev, cur = randoms((10 * 4097 + 3,), BF16, BF16)
    whole = extrapolate(prev, cur, 0.3)
    monkeypatch.setattr(_cpu, "_SPLIT_MIN", 4096)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    out = torch.empty_like(cur)
    extrapolate_(out, prev, cur, 0.3)
    assert_bits_equal(out, whole)
    extrapolate_(cur, prev, cur, 0.3)  # in place, ranges on several threads
    assert_bits_equal(cur, whole)


def test_twin_threads_do_not_share_scratch():
    pairs = [randoms((300_000,), BF16, BF16, seed=s) for s in range(4)]
    expected = [extrapolate(p, c, 0.3) for p, c in pairs]
    results: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        for _ in range(3):
            results[i] = extrapolate(*pairs[i], 0.3)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, e in enumerate(expected):
        assert_bits_equal(results[i], e)


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


# --- many tensors: grouped launches -------------------------------------------------------------------------


def _model_like(seed: int = 0):
    """A mixed list: small aligned tensors (grouped), odd sizes and views (alone), two dtype triples."""
    specs = [
        ((64,), BF16, BF16),
        ((16, 8), BF16, BF16),
        ((7,), BF16, BF16),
        ((48,), FP32, BF16),
        ((4096 + 16,), BF16, BF16),
        ((30, 5), FP32, BF16),
        ((9000,), BF16, BF16),
        ((96,), FP32, BF16),
    ]
    prevs, curs = [], []
    for i, (shape, pd, cd) in enumerate(specs):
        p, c = randoms(shape, pd, cd, seed=seed + i)
        prevs.append(p)
        curs.append(c)
    offset = randoms((33,), BF16, BF16, seed=99)  # views at an odd element offset: not 16-byte aligned
    prevs.append(offset[0][1:])
    curs.append(offset[1][1:])
    return prevs, curs


def test_many_grouped_bit_identical_to_per_tensor(monkeypatch):
    prevs, curs = _model_like()
    expected = [extrapolate(p, c, 0.3) for p, c in zip(prevs, curs, strict=True)]
    groups = []
    launch = _triton._launch_grouped
    monkeypatch.setattr(
        _triton, "_launch_grouped", lambda members, *a: groups.append(len(members)) or launch(members, *a)
    )
    monkeypatch.setattr(_triton, "_GROUP_MAX_NUMEL", 5000)  # 9000 elements: a launch of its own
    for backend in ("auto", "triton"):
        outs = [torch.empty_like(c) for c in curs]
        extrapolate_many_(outs, prevs, curs, 0.3, backend=backend)
        for o, e in zip(outs, expected, strict=True):
            assert_bits_equal(o, e)
    assert sorted(groups) == [2, 3]  # fp32 + bf16: 48, 96; bf16: 64, 16x8, 4096 + 16 (two table rows)
    cur_copies = [c.clone() for c in curs]
    extrapolate_many_(cur_copies, prevs, cur_copies, 0.3, backend="triton")  # in place, as the trainer does
    for o, e in zip(cur_copies, expected, strict=True):
        assert_bits_equal(o, e)


def test_many_validates_everything_before_writing():
    outs = [torch.zeros(4), torch.zeros(3)]
    with pytest.raises(ValueError, match="shape mismatch"):
        extrapolate_many_(outs, [torch.ones(4), torch.ones(4)], [torch.ones(4), torch.ones(4)], 0.3)
    assert torch.equal(outs[0], torch.zeros(4))


# --- the compiled kernel, checked without a GPU ---------------------------------------------------------------


def _compile_sm90(args: tuple, const: dict) -> str:
    """What ``_kernel[grid](*args, **const, **launch options)`` compiles to on an H100/H200, without a GPU: the same
    argument binding, specialization and options as ``JITFunction.run``, then PTX for sm_90."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    kernel = _triton._kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {
        **const,
        **_triton._launch_options(),
        "debug": False,
        "instrumentation_mode": knobs.compilation.instrumentation_mode,
        "fpsan_homomorphic_casts": knobs.compilation.fpsan_homomorphic_casts,
    }
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    assert options.enable_fp_fusion is False
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__).asm[
        "ptx"
    ]


def test_compiles_for_sm90_without_fma():
    """The launcher's real arguments compile for sm_90: no fused multiply-add, no flush to zero, 16-byte accesses
    (also in the grouped mode, whose pointers come from the table)."""
    if not _triton._is_compiled():
        pytest.skip("TRITON_INTERPRET=1: no compiled kernel")
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        pytest.skip("triton without its NVIDIA backend")
    prev, cur = randoms((8192,), FP32, BF16)
    small = [randoms((64,), FP32, BF16, seed=s) for s in range(2)]
    table = torch.zeros((32, 4), dtype=torch.int64)
    cases = [  # (prev, cur, out, table, n, alpha, wide)
        (prev, cur, torch.empty_like(cur), None, 8192, 0.3, FP32),
        (*small[0], torch.empty_like(small[0][1]), table, 0, 0.3, FP32),
        (prev.double(), cur, torch.empty(8192, dtype=FP16), None, 8192, 0.3, FP64),
        (prev[:1], cur[:1], torch.empty(1, dtype=BF16), None, 1, 0.3, FP32),  # n == 1 becomes a constexpr
    ]
    for case in cases:
        ptx = _compile_sm90(*_triton._kernel_args(*case))
        assert not re.search(r"\bfma\.", ptx)
        assert ".ftz" not in ptx
        if case[4] != 1:
            assert "ld.global.v4.b32" in ptx
        assert re.search(r"sub\.rn\.f(32|64)", ptx) and re.search(r"mul\.rn\.f(32|64)", ptx)


# --- CUDA ------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("triple", ALL_TRIPLES, ids=_name)
def test_cuda_bit_identical_to_twin(triple):
    pd, cd, od = triple
    for prev, cur in (special_grid(pd, cd), randoms(((1 << 20) + 3,), pd, cd), randoms((123, 5), pd, cd)):
        for alpha in (0.3, -0.5, 0.0, 2.0):
            twin = extrapolate(prev, cur, alpha, out_dtype=od)
            gpu = extrapolate(prev.cuda(), cur.cuda(), alpha, out_dtype=od)
            assert_bits_equal(gpu.cpu(), twin)


@pytest.mark.gpu
def test_cuda_interpreter_and_compiled_in_one_process():
    prev, cur = randoms((4097,), FP32, BF16)
    interp = extrapolate(prev, cur, 0.3, backend="triton")
    compiled = extrapolate(prev.cuda(), cur.cuda(), 0.3)
    assert_bits_equal(compiled.cpu(), interp)
    assert_bits_equal(extrapolate(prev, cur, 0.3, backend="triton"), interp)  # interpreter still fine after


@pytest.mark.gpu
def test_cuda_in_place_and_layouts():
    prev, cur = randoms((1000, 37), BF16, BF16)
    expected = extrapolate(prev, cur, 0.3)
    c = cur.cuda()
    extrapolate_(c, prev.cuda(), c, 0.3)
    assert_bits_equal(c.cpu(), expected)
    out = torch.empty(37, 1000, dtype=BF16, device="cuda").t()
    extrapolate_(out, prev.t().contiguous().cuda().t(), cur.cuda(), 0.3)
    assert_bits_equal(out.cpu(), expected)


@pytest.mark.gpu
def test_cuda_grouped_bit_identical_to_per_tensor(monkeypatch):
    prevs, curs = _model_like()
    big = randoms((1 << 21,), BF16, BF16, seed=7)  # above the grouping limit
    prevs.append(big[0])
    curs.append(big[1])
    expected = [extrapolate(p, c, 0.3) for p, c in zip(prevs, curs, strict=True)]
    groups = []
    launch = _triton._launch_grouped
    monkeypatch.setattr(
        _triton, "_launch_grouped", lambda members, *a: groups.append(len(members)) or launch(members, *a)
    )
    prevs_g, curs_g = [p.cuda() for p in prevs], [c.cuda() for c in curs]
    odd_p, odd_c = randoms((33,), BF16, BF16, seed=98)  # a view 2 bytes into its storage: must not be grouped
    prevs_g.append(odd_p.cuda()[1:])
    curs_g.append(odd_c.cuda()[1:])
    expected.append(extrapolate(odd_p[1:], odd_c[1:], 0.3))
    outs = [torch.empty_like(c) for c in curs_g]
    extrapolate_many_(outs, prevs_g, curs_g, 0.3)
    for o, e in zip(outs, expected, strict=True):
        assert_bits_equal(o.cpu(), e)
    assert groups, "small CUDA tensors were not grouped"
    extrapolate_many_(curs_g, prevs_g, curs_g, 0.3)  # in place
    for c, e in zip(curs_g, expected, strict=True):
        assert_bits_equal(c.cpu(), e)


@pytest.mark.gpu
def test_cuda_more_than_2_31_elements():
    n = (1 << 31) + 4099
    try:
        prev = torch.empty(n, dtype=BF16, device="cuda").normal_()
        cur = torch.empty(n, dtype=BF16, device="cuda").normal_()
        out = extrapolate(prev, cur, 0.3)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for 3 x 4 GiB")
    for sl in (slice(0, 5000), slice(n - 9000, n)):
        assert_bits_equal(out[sl].cpu(), extrapolate(prev[sl].cpu(), cur[sl].cpu(), 0.3))
