"""Per-element cost of the CPU compute paths, one thread, buffers the size of one engine chunk (L2-missing, as in a
merge): the compiled pass (apo_kernels.cpass) vs the numpy twin vs torch's twin (one torch thread).

    python bench/cpu_pass.py [--elems N] [--rounds R] [--json PATH]

For each case (prev, cur -> out dtypes; 1 or 3 alphas) the three paths run in alternation, R rounds, so that a
busy machine's load falls on all of them alike; each round times one call over N elements (several alphas: one
call of the compiled pass or the numpy twin, one torch call per alpha). The table gives the median and the minimum
nanoseconds per input element (all alphas together). The load average is printed with the table. Run from the
repository root with the extension built (pip install -e . or python setup.py build_ext --inplace).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apo_kernels import cpass, numpy_twin  # noqa: E402
from apo_kernels.dtypes import BY_NAME  # noqa: E402

CASES = [  # (prev, cur, out)
    ("BF16", "BF16", "BF16"),
    ("F32", "F32", "BF16"),
    ("F16", "F16", "F16"),
]


def _inputs(n: int, prev: str, cur: str) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(0)
    p = g.standard_normal(n, dtype=np.float32) * 0.02
    c = p + g.standard_normal(n, dtype=np.float32) * 0.0002

    def as_bytes(x: np.ndarray, name: str) -> np.ndarray:
        if name == "BF16":
            return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return x.astype(BY_NAME[name].numpy).view(np.uint8)

    return as_bytes(p, prev), as_bytes(c, cur)


def _torch_runner(n: int, case: tuple[str, str, str], prev: np.ndarray, cur: np.ndarray, alphas: list[float]):
    import torch

    from apo_kernels import extrapolate_

    torch.set_num_threads(1)  # as the engine runs it: one torch thread per worker
    dt = {name: BY_NAME[name].torch_dtype() for name in case}
    p, c = torch.from_numpy(prev).view(dt[case[0]]), torch.from_numpy(cur).view(dt[case[1]])
    outs = [torch.empty(n, dtype=dt[case[2]]) for _ in alphas]

    def run() -> None:
        for o, a in zip(outs, alphas):
            extrapolate_(o, p, c, a)

    return run


def measure(n: int, rounds: int, case: tuple[str, str, str], n_alpha: int, torch_too: bool) -> dict[str, dict]:
    prev, cur = _inputs(n, case[0], case[1])
    alphas = [0.3 + 0.2 * k for k in range(n_alpha)]
    outs = [np.empty(n * BY_NAME[case[2]].itemsize, np.uint8) for _ in alphas]
    args = (outs, case[2], prev, case[0], cur, case[1], alphas)
    runs = {"numpy twin": lambda: numpy_twin.extrapolate_into(*args)}
    if cpass.available():
        runs["compiled"] = lambda: cpass.extrapolate_into(*args)
    if torch_too:
        runs["torch twin"] = _torch_runner(n, case, prev, cur, alphas)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up: scratch buffers, page faults of the outputs
        fn()
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / n * 1e9)
    return {k: {"median_ns": statistics.median(v), "min_ns": min(v)} for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elems", type=int, default=1 << 20, help="elements per call [2**20, the engine's chunk]")
    ap.add_argument("--rounds", type=int, default=15, help="alternating rounds [15]")
    ap.add_argument("--no-torch", action="store_true", help="skip torch's twin (its import takes seconds)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.elems} elements, {args.rounds} rounds")
    print(f"{'case':<22} {'alphas':>6}  {'path':<11} {'median ns/elem':>15} {'min ns/elem':>12}")
    results = []
    for case in CASES:
        for n_alpha in (1, 3):
            found = measure(args.elems, args.rounds, case, n_alpha, not args.no_torch)
            label = f"{case[0]},{case[1]}->{case[2]}"
            for path, r in found.items():
                print(f"{label:<22} {n_alpha:>6}  {path:<11} {r['median_ns']:>15.2f} {r['min_ns']:>12.2f}")
                results.append({"case": label, "alphas": n_alpha, "path": path, **r})
    if args.json:
        args.json.write_text(json.dumps({"load": load, "elems": args.elems, "results": results}, indent=1))


if __name__ == "__main__":
    main()
