"""apo_kernels._cpu, the CPU twin: accuracy against both oracles, chunk boundaries, threads, scratch buffers."""

from __future__ import annotations

import threading

import pytest
import torch

from apo_kernels import _cpu, extrapolate, extrapolate_
from tests.kernels.oracle import (
    ALPHAS,
    BF16,
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


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("triple", TRIPLES, ids=triple_id)
def test_cpu_twin_accuracy(triple, alpha):
    pd, cd, od = triple
    cases = [randoms(shape, pd, cd, seed=i) for i, shape in enumerate(SHAPES)] + [special_grid(pd, cd)]
    for prev, cur in cases:
        out = extrapolate(prev, cur, alpha, out_dtype=od)
        assert out.shape == cur.shape and out.dtype == od
        assert_within_bound(out, prev, cur, alpha)
        assert_bits_equal(out, contract(prev, cur, alpha, od))


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


def test_parameters_split_across_threads(monkeypatch):
    # The worker threads do not inherit ops' no_grad: a parameter updated in place there must arrive detached.
    monkeypatch.setattr(_cpu, "_SPLIT_MIN", 4096)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    prev, cur = randoms((10 * 4097 + 3,), FP32, BF16)
    w = torch.nn.Parameter(cur.clone())
    extrapolate_(w, prev, w, 0.3)
    assert w.requires_grad
    assert_bits_equal(w.detach(), extrapolate(prev, cur, 0.3))


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
