"""Per-element cost of MXFP4 dequantization on the CPU, one thread: the compiled pass (apo_kernels.cpass) vs the
numpy lines (apo_merge.quant.mxfp4), over one expert tensor of about 256 MiB of fp32 output.

    python bench/dequant_mxfp4.py [--rounds R]

Cases: a power-of-two row stride ([8, 4096, 2048], 256 MiB) and gpt-oss's down_proj ([8, 2880, 2880]), each in
engine chunks (1 Mi elements: several output rows of one expert) and in whole experts. The two paths alternate,
R rounds, so that a busy machine's load falls on both; the table gives the median and minimum ns per output
element and the median ratio. Run from the repository root with the extension built (python setup.py build_ext
--inplace).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apo_kernels import cpass  # noqa: E402
from apo_merge.quant.layout import QuantInfo  # noqa: E402
from apo_merge.quant.mxfp4 import GROUP, dequant_experts  # noqa: E402

CASES = [(8, 2048, 128), (8, 2880, 90)]  # experts, stored rows, groups: output [E, groups * 32, rows]


def _time(experts, info, out: np.ndarray, chunk: int, compiled) -> float:
    start = time.perf_counter()
    for begin in range(0, out.size, chunk):
        dequant_experts(experts, begin, info, out[begin : begin + chunk], compiled)
    return (time.perf_counter() - start) * 1e9 / out.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if cpass.dequant_mxfp4() is None:
        sys.exit("apo_kernels._cpass is not built: python setup.py build_ext --inplace")
    rng = np.random.default_rng(0)
    print(f"load average {os.getloadavg()[0]:.2f}; ns per output element, median (min)")
    for e, rows, groups in CASES:
        blk = rng.integers(0, 256, (e, rows, groups, GROUP // 2), dtype=np.uint8)
        scales = rng.integers(110, 130, (e, rows, groups), dtype=np.uint8)
        info = QuantInfo("w", "F32", (e, groups * GROUP, rows), 0, blk.size, raw_dtype="U8", kind="mxfp4")
        experts = [(k, blk[k], scales[k]) for k in range(e)]
        out = np.ones(e * groups * GROUP * rows, np.float32)  # touched: page faults are no part of either path
        for chunk in (1 << 20, groups * GROUP * rows):
            times: dict[str, list[float]] = {"numpy": [], "C": []}
            for _ in range(args.rounds):
                times["numpy"].append(_time(experts, info, out, chunk, None))
                times["C"].append(_time(experts, info, out, chunk, cpass.dequant_mxfp4()))
            med = {k: statistics.median(v) for k, v in times.items()}
            cells = "  ".join(f"{k} {med[k]:.2f} ({min(v):.2f})" for k, v in times.items())
            print(
                f"[{e}, {groups * GROUP}, {rows}] {out.nbytes / 2**20:.0f} MiB, chunk {chunk}: {cells}  "
                f"numpy/C {med['numpy'] / med['C']:.1f}x"
            )


if __name__ == "__main__":
    main()
