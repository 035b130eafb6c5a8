"""Benchmark of the extrapolation kernels against baselines measured in the same run.

    python bench/kernel.py [--cpu-numel N] [--reps R] [--no-cpu] [--no-cuda] [--no-sweep] [--json PATH]

CPU section (always, unless --no-cpu): the CPU twin vs a naive fp32 torch formula (fresh full-size temporaries)
vs torch.lerp (bf16 math, not exact), on N bf16 elements (default 64 Mi), and the twin on mixed prev fp32 + cur
bf16. CUDA section (when CUDA is present, unless --no-cuda): on one 2**30-element bf16 tensor the fused kernel
vs torch.lerp vs a device copy moving the same bytes (and, unless --no-sweep, a few BLOCK / num_warps choices);
mixed prev fp32 + cur bf16; a Llama-3-8B-shaped set of 291 tensors (grouped launches vs per-tensor launches vs a
per-tensor torch.lerp loop vs torch._foreach_lerp); in-place extrapolation of those 8.03 G parameters.

Bandwidth counts bytes read + written. Each figure is the median of R timed repetitions after warm-up (CUDA
events on the GPU, perf_counter on the CPU). Ratios compare against baselines from this same run. Run from the
repository root (or with the project installed).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apo_kernels import _triton, extrapolate_, extrapolate_many_  # noqa: E402  (_triton: the BLOCK sweep)

ALPHA = 0.3


def _median_cuda(fn: Callable[[], object], reps: int, inner: int = 1, warmup: int = 2) -> float:
    """Median seconds per call; ``inner`` back-to-back calls per timed repetition keep the GPU busy, so a
    single kernel's figure is its throughput rather than its launch latency."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _Table:
    def __init__(self, title: str, results: dict, baseline: str | None = None) -> None:
        self.title, self.rows, self.results, self.baseline = title, [], results.setdefault(title, {}), baseline
        print(f"\n== {title}")

    def add(self, name: str, seconds: float, nbytes: int, **extra: object) -> None:
        gbs = nbytes / seconds / 1e9
        self.results[name] = {"ms": seconds * 1e3, "GB/s": gbs, **extra}
        base = self.results.get(self.baseline) if self.baseline else None
        ratio = f"  x{base['ms'] / (seconds * 1e3):5.2f} vs {self.baseline}" if base else ""
        more = "".join(f"  {k}={v}" for k, v in extra.items())
        print(f"  {name:<44} {seconds * 1e3:9.2f} ms {gbs:9.1f} GB/s{ratio}{more}")


def _interleaved_cpu(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per call; the methods take turns within each repetition, so a busy machine slows them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_cpu(numel: int, reps: int, results: dict) -> None:
    torch.manual_seed(0)
    prev = torch.randn(numel).to(torch.bfloat16)
    cur = (prev.float() + 0.01 * torch.randn(numel)).to(torch.bfloat16)
    prev32 = prev.float()
    out = torch.empty_like(cur)

    def naive() -> None:
        c = cur.float()
        out.copy_(c + ALPHA * (c - prev.float()))

    def naive_mixed() -> None:
        c = cur.float()
        out.copy_(c + ALPHA * (c - prev32))

    base = "naive fp32 formula (fresh temporaries)"
    fns = {
        base: naive,
        "torch.lerp(prev, cur, 1 + alpha, out=), bf16": lambda: torch.lerp(prev, cur, 1 + ALPHA, out=out),
        "apo_kernels CPU twin (exact)": lambda: extrapolate_(out, prev, cur, ALPHA),
        "mixed prev fp32 + cur bf16: naive fp32": naive_mixed,
        "mixed prev fp32 + cur bf16: CPU twin": lambda: extrapolate_(out, prev32, cur, ALPHA),
    }
    try:
        load = f", load average {Path('/proc/loadavg').read_text().split()[0]}"
    except OSError:
        load = ""
    t = _Table(
        f"CPU, {numel / 2**20:.0f} Mi bf16 elements, {torch.get_num_threads()} torch threads, {_cpu_name()}{load}",
        results,
        baseline=base,
    )
    for name, secs in _interleaved_cpu(fns, reps).items():
        t.add(name, secs, (8 if name.startswith("mixed") else 6) * numel)
    ratio = (
        t.results["apo_kernels CPU twin (exact)"]["GB/s"]
        / t.results["torch.lerp(prev, cur, 1 + alpha, out=), bf16"]["GB/s"]
    )
    print(f"  CPU twin bandwidth / torch.lerp bandwidth = {ratio:.2f}")
    results["cpu_twin_over_lerp"] = ratio


def _llama3_8b_shapes() -> list[tuple[int, ...]]:
    hidden, inter, kv, vocab = 4096, 14336, 1024, 128256
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(32):
        shapes += [
            (hidden, hidden),
            (kv, hidden),
            (kv, hidden),
            (hidden, hidden),
            (inter, hidden),
            (inter, hidden),
            (hidden, inter),
            (hidden,),
            (hidden,),
        ]
    return shapes + [(hidden,), (vocab, hidden)]


def _cuda_pair(n: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    prev = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    return prev, prev + torch.empty_like(prev).normal_(std=0.01)


def _cuda_large(dev: torch.device, reps: int, sweep: bool, results: dict) -> None:
    n = 1 << 30
    prev, cur = _cuda_pair(n, dev)
    out = torch.empty_like(cur)
    nbytes = 3 * 2 * n
    lerp_name = "torch.lerp(prev, cur, 1 + alpha, out=)"
    t = _Table("CUDA, one bf16 tensor of 2**30 elements", results, baseline=lerp_name)
    src = torch.empty(3 * n // 2, dtype=torch.bfloat16, device=dev)  # a copy of src moves 6 * n bytes too
    dst = torch.empty_like(src)
    t.add("device copy of equal bytes (memory ceiling)", _median_cuda(lambda: dst.copy_(src), reps, inner=5), nbytes)
    src = dst = None
    t.add(lerp_name, _median_cuda(lambda: torch.lerp(prev, cur, 1 + ALPHA, out=out), reps, inner=5), nbytes)
    t.add(
        "eager fp32 formula (upcasts, temporaries)",
        _median_cuda(lambda: out.copy_(cur.float() + ALPHA * (cur.float() - prev.float())), reps, inner=5),
        nbytes,
    )
    t.add("apo_kernels fused kernel", _median_cuda(lambda: extrapolate_(out, prev, cur, ALPHA), reps, inner=5), nbytes)
    fused = out.clone()
    ratio = t.results["apo_kernels fused kernel"]["GB/s"] / t.results[lerp_name]["GB/s"]
    print(f"  fused kernel bandwidth / torch.lerp bandwidth = {ratio:.3f} (target >= 0.97)")
    results["large_bf16_kernel_over_lerp"] = ratio
    results["large_bf16_GBps"] = {
        k: t.results[name]["GB/s"]
        for k, name in (("copy", "device copy of equal bytes (memory ceiling)"), ("lerp", lerp_name))
    } | {"kernel": t.results["apo_kernels fused kernel"]["GB/s"]}
    if sweep:
        block, warps = _triton._BLOCK, _triton._NUM_WARPS
        try:
            for b, w in ((1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 16)):
                _triton._BLOCK, _triton._NUM_WARPS = b, w
                secs = _median_cuda(lambda: extrapolate_(out, prev, cur, ALPHA), reps, inner=5)
                same = bool(torch.equal(out.view(torch.int16), fused.view(torch.int16)))
                t.add(f"  sweep BLOCK={b} num_warps={w}", secs, nbytes, identical=same)
        finally:
            _triton._BLOCK, _triton._NUM_WARPS = block, warps
    t.add(
        "apo_kernels fused kernel, in place (out is cur)",
        _median_cuda(lambda: extrapolate_(cur, prev, cur, ALPHA), reps, inner=5),
        nbytes,
    )


def _cuda_mixed(dev: torch.device, reps: int, results: dict) -> None:
    n = 1 << 30
    prev, cur = _cuda_pair(n, dev)
    prev32 = prev.float()
    prev = None
    out = torch.empty_like(cur)
    nbytes = (4 + 2 + 2) * n
    eager = "eager: cur.float() + a * (cur.float() - prev32), cast"
    t = _Table("CUDA, mixed prev fp32 + cur bf16 -> bf16, 2**30 elements", results, baseline=eager)
    t.add(eager, _median_cuda(lambda: out.copy_(cur.float() + ALPHA * (cur.float() - prev32)), reps, inner=5), nbytes)
    t.add(
        "apo_kernels fused kernel (no upcast copy)",
        _median_cuda(lambda: extrapolate_(out, prev32, cur, ALPHA), reps, inner=5),
        nbytes,
    )


def _cuda_8b(dev: torch.device, reps: int, results: dict) -> None:
    shapes = _llama3_8b_shapes()
    prevs = [torch.empty(s, dtype=torch.bfloat16, device=dev).normal_(std=0.02) for s in shapes]
    curs = [p + torch.empty_like(p).normal_(std=1e-3) for p in prevs]
    outs = [torch.empty_like(c) for c in curs]
    numel = sum(p.numel() for p in prevs)
    nbytes = 3 * 2 * numel
    lerp_name = "per-tensor torch.lerp loop"
    t = _Table(
        f"CUDA, Llama-3-8B-shaped set: {len(shapes)} bf16 tensors, {numel / 1e9:.2f} G parameters",
        results,
        baseline=lerp_name,
    )

    def lerp_loop() -> None:
        for o, p, c in zip(outs, prevs, curs, strict=True):
            torch.lerp(p, c, 1 + ALPHA, out=o)

    def per_tensor() -> None:
        for o, p, c in zip(outs, prevs, curs, strict=True):
            extrapolate_(o, p, c, ALPHA)

    t.add(lerp_name, _median_cuda(lerp_loop, reps), nbytes)
    t.add(
        "torch._foreach_lerp (allocates outputs)",
        _median_cuda(lambda: torch._foreach_lerp(prevs, curs, 1 + ALPHA), reps),
        nbytes,
    )
    t.add("apo_kernels per-tensor launches", _median_cuda(per_tensor, reps), nbytes)
    single = [o.clone() for o in outs]
    t.add(
        "apo_kernels extrapolate_many_ (grouped)",
        _median_cuda(lambda: extrapolate_many_(outs, prevs, curs, ALPHA), reps),
        nbytes,
    )
    same = all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(single, outs, strict=True))
    print(f"  grouped == per-tensor, bit for bit: {same}")
    results["8b_grouped_identical_to_per_tensor"] = same
    single.clear()
    outs.clear()
    torch.cuda.empty_cache()
    t.add(
        "in place: extrapolate_many_(curs, prevs, curs)",
        _median_cuda(lambda: extrapolate_many_(curs, prevs, curs, ALPHA), reps),
        nbytes,
        target_ms_on_h200="< 20",
    )
    results["8b_ms"] = {
        "lerp_loop": t.results[lerp_name]["ms"],
        "grouped": t.results["apo_kernels extrapolate_many_ (grouped)"]["ms"],
        "in_place": t.results["in place: extrapolate_many_(curs, prevs, curs)"]["ms"],
        "parameters": numel,
        "tensors": len(shapes),
    }


def bench_cuda(reps: int, sweep: bool, results: dict) -> None:
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    print(f"\nCUDA device: {name}; torch {torch.__version__}, triton {_triton.triton.__version__}")
    results["device"] = name
    torch.manual_seed(0)
    for section in (
        lambda: _cuda_large(dev, reps, sweep, results),
        lambda: _cuda_mixed(dev, reps, results),
        lambda: _cuda_8b(dev, reps, results),
    ):
        section()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-numel", type=int, default=64 * 2**20, help="bf16 elements in the CPU section (64 Mi)")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per figure; the median is reported")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU section")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA section even when CUDA is present")
    ap.add_argument("--no-sweep", action="store_true", help="skip the BLOCK / num_warps sweep on CUDA")
    ap.add_argument("--json", type=Path, help="also write all figures to this JSON file")
    args = ap.parse_args(argv)

    results: dict = {"torch": torch.__version__, "alpha": ALPHA, "reps": args.reps}
    if not args.no_cpu:
        bench_cpu(args.cpu_numel, args.reps, results)
    if torch.cuda.is_available() and not args.no_cuda:
        bench_cuda(args.reps, not args.no_sweep, results)
    elif not args.no_cuda:
        print("\n(no CUDA device: CUDA section skipped)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
