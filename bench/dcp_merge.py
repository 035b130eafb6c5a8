"""apo-merge on a DCP pair: against the tuned I/O floor of the same bytes (cold), and against the whole-model route
(dcp_to_torch_save of both, torch.load, merge, dcp.save).

    PYTHONPATH=. python bench/dcp_merge.py --gb 3 --runs 3 [--ranks 2] [--dir /tmp/dcp-bench] [--no-side-by-side]

Builds PREV and CUR (fp32 tensors of 4096 columns, saved by dcp.save with 2 writer threads: two storage files).

Floor part (cold, as bench/merge_e2e.py): before every timed run the inputs are evicted from the page cache (fsync
+ POSIX_FADV_DONTNEED, checked with mincore) and the last output removed; methods alternate, --runs rounds, each
in its own process (start-up is part of its time), every output fsynced inside its time:

  floor-tuned         read both inputs' storage files, write + fsync CUR's storage bytes (bench/common.floor_io,
                      apo-merge's I/O hints; a process that does not import torch)
  apo-merge           python -m apo_merge PREV CUR --alpha A -o OUT --quiet
  floor-tuned-export  read the storage files the export reads (apo-merge's output: the same files, written as
                      recently), write + fsync the export's safetensors bytes
  apo-merge export    python -m apo_merge export OUT EXPORT (OUT: apo-merge's output, cold as well)

Side-by-side part (warm page cache, each route right after reading its inputs): apo-merge in one process (and under
torchrun with --ranks), and dcp_to_torch_save x2 + merge + dcp.save; wall time, CPU seconds, peak RSS and peak
anonymous memory (sampled over the process tree). Prints tables, ratios and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Measured, evict, floor_io, fsync_tree, resident_bytes, run_measured, table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

BASELINE = """
import sys, torch, torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from apo_merge import extrapolate_state_dict
prev, cur, out, alpha = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
dcp_to_torch_save(prev, out + ".prev.pt")
dcp_to_torch_save(cur, out + ".cur.pt")
p = torch.load(out + ".prev.pt", weights_only=True)["model"]
c = torch.load(out + ".cur.pt", weights_only=True)["model"]
merged = extrapolate_state_dict(prev=p, cur=c, alpha=alpha)
del p, c
dcp.save({"model": merged}, checkpoint_id=out)
"""


def build(folder: Path, gb: float, seed: int) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    if (folder / ".metadata").exists():
        return
    g = torch.Generator().manual_seed(seed)
    rows = 2048  # 32 MiB fp32 tensors
    n = max(1, round(gb * 1e9 / (rows * 4096 * 4)))
    sd = {f"layers.{i}.weight": torch.randn(rows, 4096, generator=g) for i in range(n)}
    dcp.save({"model": sd}, storage_writer=dcp.FileSystemWriter(folder, thread_count=2))


def storage(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.distcp"))


def warm(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def measure(cmd: list[str], out: Path | None = None) -> Measured:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    m = run_measured(cmd, cwd=REPO, env=env, after=(lambda: fsync_tree(out)) if out is not None else None)
    if m.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{m.output_tail}")
    return m


def measure_unpaused(cmd: list[str], prepare, out: Path | None = None, tries: int = 4) -> Measured:
    """``measure`` again (after ``prepare()``) while something else on the machine stopped the run (SIGSTOP):
    such a run's wall time says nothing about the method."""
    for _ in range(tries):
        prepare()
        m = measure(cmd, out)
        if m.paused_s < 0.05:
            return m
        print(f"  (stopped from outside for {m.paused_s:.1f} s: measured again)", flush=True)
    return m


def clean(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def cold(inputs: list[Path]) -> float:
    """Evict ``inputs``; the largest fraction of one still cached."""
    os.sync()
    evict(inputs)
    return max(resident_bytes(p) / max(1, p.stat().st_size) for p in inputs)


def floor_part(args, prev: Path, cur: Path) -> None:
    root, py = args.dir, sys.executable
    out, hf, floor_out = root / "out", root / "out-hf", root / "floor-out"
    clean(out, hf, floor_out)
    me = [py, str(Path(__file__).resolve()), "--floor-worker"]
    export_bytes = _export_bytes(cur)
    merge_writes = [(p.name, p.stat().st_size) for p in storage(cur)]
    methods = {
        "floor-tuned": me
        + [json.dumps([[str(p) for p in storage(prev) + storage(cur)], merge_writes, str(floor_out)])],
        "apo-merge": [py, "-m", "apo_merge", str(prev), str(cur), "--alpha", str(args.alpha), "-o", str(out), "-q"],
        "floor-tuned-export": [],  # made in the loop: it reads apo-merge's output, as the export does
        "apo-merge export": [py, "-m", "apo_merge", "export", str(out), str(hf)],
    }
    runs: dict[str, list[Measured]] = {k: [] for k in methods}
    loads = []
    order = list(methods)
    for r in range(args.runs):
        # Each pair in turn goes first. On this VM the first cold read of files just written (and dropped from the
        # page cache) was measured 2-3x slower and CPU-bound in the kernel's copy, whichever process read them.
        pairs = [order[:2], order[2:]] if r % 2 == 0 else [order[1::-1], order[:1:-1]]
        for name in [n for pair in pairs for n in pair]:
            cmd = methods[name]
            if name.endswith("export") and not (out / ".metadata").exists():
                measure(methods["apo-merge"])  # the export reads apo-merge's output
            if name == pairs[1][0]:
                warm(out)  # that first read, untimed: both export methods then read OUT as any later reader does
            inputs = storage(prev) + storage(cur) if name in ("floor-tuned", "apo-merge") else storage(out)
            if name == "floor-tuned-export":
                cmd = me + [json.dumps([[str(p) for p in inputs], export_bytes, str(hf)])]
            cached = [0.0]

            def prepare(name=name, inputs=inputs, cached=cached) -> None:
                if name == "apo-merge":
                    clean(out)
                clean(hf, floor_out)
                cached[0] = cold(inputs)

            loads.append(os.getloadavg()[0])
            m = measure_unpaused(cmd, prepare)
            cached = cached[0]
            runs[name].append(m)
            print(
                f"run {r + 1}/{args.runs} {name:20s} {m.seconds:6.2f} s  CPU {m.cpu_seconds:5.2f} s  "
                f"anon {m.peak_anon / 2**20:5.0f} MiB  (load {loads[-1]:.1f}, inputs cached {cached:.1%})",
                flush=True,
            )
    med = {k: statistics.median(x.seconds for x in v) for k, v in runs.items()}
    rows = []
    for name, ms in runs.items():
        base = med["floor-tuned" if name in ("floor-tuned", "apo-merge") else "floor-tuned-export"]
        rows.append(
            [
                name,
                f"{med[name]:.2f}",
                f"{min(x.seconds for x in ms):.2f}-{max(x.seconds for x in ms):.2f}",
                f"{med[name] / base:.2f}",
                f"{statistics.median(x.cpu_seconds for x in ms):.2f}",
                f"{max(x.peak_anon for x in ms) / 2**20:.0f}",
            ]
        )
    size = sum(p.stat().st_size for p in storage(cur))
    print(f"\ncold, {size / 1e9:.2f} GB per side ({len(storage(cur))} storage files), median of {args.runs} runs")
    print(table(["method", "wall s", "spread", "x its floor", "CPU s", "peak anon MiB"], rows))
    print(
        f"apo-merge / floor-tuned x{med['apo-merge'] / med['floor-tuned']:.2f}; export / floor-tuned-export "
        f"x{med['apo-merge export'] / med['floor-tuned-export']:.2f}; load average {min(loads):.1f}-{max(loads):.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    clean(out, hf, floor_out)


def _export_bytes(cur: Path) -> list[tuple[str, int]]:
    """The safetensors file apo-merge export writes for ``cur`` (one file under 5 GB): header + tensor bytes."""
    sys.path.insert(0, str(REPO))
    from apo_merge.dcp.export import _header, _layout, _nbytes
    from apo_merge.dcp.reader import open_dcp

    groups = _layout(open_dcp(cur), 5 * 10**9)
    names = (
        ["model.safetensors"] if len(groups) == 1 else [f"model-{i + 1:05d}.safetensors" for i in range(len(groups))]
    )
    return [(n, len(_header(g, {"format": "pt"})[0]) + sum(_nbytes(e) for _, e in g)) for n, g in zip(names, groups)]


def side_by_side(args, prev: Path, cur: Path) -> None:
    root, py = args.dir, sys.executable
    size = sum(p.stat().st_size for p in cur.iterdir())
    routes = {
        "apo-merge (1 process)": [py, "-m", "apo_merge", prev, cur, "--alpha", args.alpha, "-o", "{out}", "--quiet"],
        "dcp_to_torch_save x2 + merge + dcp.save": [py, "-c", BASELINE, prev, cur, "{out}", args.alpha],
    }
    routes["(import torch, nothing done)"] = [py, "-c", "import torch"]
    if args.ranks > 1:
        routes[f"apo-merge (torchrun, {args.ranks} ranks)"] = [
            py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks), "-m", "apo_merge",
            prev, cur, "--alpha", args.alpha, "-o", "{out}", "--quiet",
        ]  # fmt: skip
    rows, results = [], {}
    for name, cmd in routes.items():
        out = root / "out"

        def prepare(name=name, out=out) -> None:
            for p in root.glob("out*"):
                clean(p)
            warm(prev)
            warm(cur)
            if name.startswith("(import"):
                out.mkdir()  # nothing to write: the fsync after it has a folder

        m = measure_unpaused([str(c).replace("{out}", str(out)) for c in cmd], prepare, out)
        results[name] = m
        rows.append(
            [
                name,
                f"{m.seconds:.2f}",
                f"{m.cpu_seconds:.2f}",
                f"{m.peak_rss / 2**20:.0f}",
                f"{m.peak_anon / 2**20:.0f}",
            ]
        )
    for p in root.glob("out*"):
        clean(p)
    print(f"\nwarm, CUR: {size / 1e9:.2f} GB in {len(storage(cur))} storage files")
    print(table(["route", "wall s", "CPU s", "peak RSS MiB", "peak anon MiB"], rows))
    base = results["dcp_to_torch_save x2 + merge + dcp.save"]
    ours = results["apo-merge (1 process)"]
    print(
        f"apo-merge / whole-model: time x{ours.seconds / base.seconds:.2f}, peak RSS x{ours.peak_rss / base.peak_rss:.3f}"
        f"; load average {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="GB per side")
    ap.add_argument("--runs", type=int, default=3, help="rounds of the cold floor comparison (0: skip it)")
    ap.add_argument("--ranks", type=int, default=1, help="also time apo-merge under torchrun with this many ranks")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dcp-bench"))
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--no-side-by-side", action="store_true", help="skip the warm side-by-side with the whole model")
    args = ap.parse_args()
    root = args.dir
    root.mkdir(parents=True, exist_ok=True)
    prev, cur = root / "prev", root / "cur"
    build(prev, args.gb, 1)
    build(cur, args.gb, 2)
    if args.runs:
        floor_part(args, prev, cur)
    if not args.no_side_by_side:
        side_by_side(args, prev, cur)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--floor-worker":
        reads, writes, out = json.loads(sys.argv[2])
        print(json.dumps(floor_io([Path(p) for p in reads], [tuple(w) for w in writes], Path(out), tuned=True)))
    else:
        main()
