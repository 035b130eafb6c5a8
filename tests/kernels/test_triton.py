"""apo_kernels._triton, the fused kernel: under the interpreter bit for bit against the CPU twin (every dtype
triple, shapes, layouts), grouped launches, the PTX compiled for sm_90 (no GPU needed), and on CUDA."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apo_kernels import _triton, extrapolate, extrapolate_, extrapolate_many_
from tests.kernels.oracle import (
    ALL_TRIPLES,
    ALPHAS,
    BF16,
    FP16,
    FP32,
    FP64,
    SHAPES,
    TRIPLES,
    assert_bits_equal,
    randoms,
    special_grid,
    triple_id,
)


@pytest.mark.parametrize("triple", ALL_TRIPLES, ids=triple_id)
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
@pytest.mark.parametrize("triple", TRIPLES, ids=triple_id)
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
    # The knobs JITFunction.run passes on: triton 3.6 has instrumentation_mode, 3.9 also fpsan_homomorphic_casts.
    passed = ("instrumentation_mode", "fpsan_homomorphic_casts")
    kwargs = {
        **const,
        **_triton._launch_options(),
        "debug": False,
        **{k: getattr(knobs.compilation, k) for k in passed if hasattr(knobs.compilation, k)},
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
@pytest.mark.parametrize("triple", ALL_TRIPLES, ids=triple_id)
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
