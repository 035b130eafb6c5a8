"""apo-merge on a DCP pair vs the whole-model route (dcp_to_torch_save of both, torch.load, merge, dcp.save).

    PYTHONPATH=. python bench/dcp_merge.py --gb 1 [--ranks 2] [--dir /tmp/dcp-bench]

Builds PREV and CUR (fp32 tensors of 4096 columns, saved by dcp.save with 2 writer threads: two storage files),
then times each route in a fresh process, sampling its peak RSS and anonymous memory, with the output fsynced
inside the timed window. The page cache is warm (each route's inputs were read just before). Prints a table and
the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Measured, fsync_tree, run_measured, table  # noqa: E402

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


def warm(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def measure(cmd: list[str], out: Path) -> Measured:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    m = run_measured(cmd, cwd=REPO, env=env, after=lambda: fsync_tree(out))
    if m.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{m.output_tail}")
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--ranks", type=int, default=1, help="also time apo-merge under torchrun with this many ranks")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dcp-bench"))
    ap.add_argument("--alpha", type=float, default=0.3)
    args = ap.parse_args()
    root = args.dir
    root.mkdir(parents=True, exist_ok=True)
    prev, cur = root / "prev", root / "cur"
    build(prev, args.gb, 1)
    build(cur, args.gb, 2)
    size = sum(p.stat().st_size for p in cur.iterdir())
    py = sys.executable
    routes = {
        "apo-merge (1 process)": [py, "-m", "apo_merge", prev, cur, "--alpha", args.alpha, "-o", "{out}", "--quiet"],
        "dcp_to_torch_save x2 + merge + dcp.save": [py, "-c", BASELINE, prev, cur, "{out}", args.alpha],
    }
    routes["(floor: python + torch + apo_merge.dcp imported)"] = [py, "-c", "import torch, apo_merge.dcp.merge"]
    if args.ranks > 1:
        routes[f"apo-merge (torchrun, {args.ranks} ranks)"] = [
            py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks), "-m", "apo_merge",
            prev, cur, "--alpha", args.alpha, "-o", "{out}", "--quiet",
        ]  # fmt: skip
    rows, results = [], {}
    for name, cmd in routes.items():
        out = root / "out"
        for p in root.glob("out*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        warm(prev)
        warm(cur)
        if name.startswith("(floor"):
            out.mkdir()  # nothing to write: the fsync after it has a folder
        m = measure([str(c).replace("{out}", str(out)) for c in cmd], out)
        results[name] = m
        rows.append([name, f"{m.seconds:.2f}", f"{m.peak_rss / 2**20:.0f}", f"{m.peak_anon / 2**20:.0f}"])
    print(f"CUR: {size / 1e9:.2f} GB in {len(list(cur.glob('*.distcp')))} storage files")
    print(table(["route", "wall s", "peak RSS MiB", "peak anon MiB"], rows))
    base = results["dcp_to_torch_save x2 + merge + dcp.save"]
    ours = results["apo-merge (1 process)"]
    print(
        f"apo-merge / whole-model: time x{ours.seconds / base.seconds:.2f}, peak RSS x{ours.peak_rss / base.peak_rss:.3f}"
    )


if __name__ == "__main__":
    main()
