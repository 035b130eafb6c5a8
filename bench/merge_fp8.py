"""FP8-PREV + bf16-CUR merge against the tuned floor of the same bytes (issue 28), all read cold.

    python bench/merge_fp8.py                 # CUR ~0.7 GB bf16, PREV its FP8 block-scaled twin (~1.05 GB pair)
    python bench/merge_fp8.py --size 2 --runs 5
    python bench/merge_fp8.py --fp8-out       # also apo-cpu-fp8out: the CLI with --quantize fp8-block

The bf16 pair comes from merge_e2e.build_pair (Llama-shaped, a small vocabulary so that most bytes are linear
weights); PREV's linear weights are then quantized as DeepSeek's releases are (e4m3, scale = amax / 448 per
128x128 block, ``weight_scale_inv`` in the same shard, ``quantization_config`` in config.json). Methods alternate
and read cold: ``floor-tuned`` (merge_e2e's: read both inputs, write CUR's byte count, fsync) and ``apo-cpu``
(the CLI), and both again with PREV in bf16 (``-bf16``: the same CUR, the bf16 PREV it was quantized from).
Columns as merge_e2e's: wall seconds (median, min-max), ratio to the floor, peak anonymous memory; then CPU seconds
(user + system, median) per GB moved, which a shared machine's load disturbs less than wall time, and the load
average. ``--code DIR`` runs apo-merge from another checkout (before/after comparisons on the same bytes).
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

import merge_e2e  # noqa: E402
from common import evict, fsync_tree, run_measured  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QCONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
merge_e2e.SHAPES["fp8"] = dict(hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=8192, layers=None)


def quantize_folder(src: Path, dst: Path) -> Path:
    """``src``'s linear weights as FP8 block-scaled (one shard at a time in memory), the rest unchanged."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (dst / "complete").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for path in merge_e2e.weight_files(src):
        out = {}
        with safe_open(path, "pt") as f:
            for name in f.keys():  # noqa: SIM118
                t = f.get_tensor(name)
                if t.dim() == 2 and "embed" not in name and "lm_head" not in name:
                    r, c = t.shape
                    blocks = t.float().reshape(r // 128, 128, c // 128, 128)  # the shapes are multiples of 128
                    scale = blocks.abs().amax(dim=(1, 3)) / 448.0
                    q = (blocks / scale[:, None, :, None]).reshape(r, c).to(torch.float8_e4m3fn)
                    out[name], out[name + "_scale_inv"] = q, scale.contiguous()
                else:
                    out[name] = t
        save_file(out, dst / path.name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, path.name))
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": QCONFIG}, indent=2))
    if len(merge_e2e.weight_files(src)) > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (dst / "complete").write_text("")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=0.7, help="GB of the bf16 CUR [0.7]")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--scratch", type=Path, default=Path("~/.cache/apo-merge-bench").expanduser())
    ap.add_argument("--fp8-out", action="store_true", help="also time the output written in FP8 (--quantize)")
    ap.add_argument("--code", type=Path, default=REPO, help="the checkout whose apo-merge runs [this one]")
    args = ap.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    prev_bf16, cur = merge_e2e.build_pair(args.scratch, "fp8", args.size, int(5e9))
    prev = quantize_folder(prev_bf16, prev_bf16.parent / "prev-fp8")
    inputs = merge_e2e.weight_files(prev) + merge_e2e.weight_files(cur)
    out = args.scratch / "out-fp8"
    moved = sum(p.stat().st_size for p in inputs) + sum(p.stat().st_size for p in merge_e2e.weight_files(cur))
    me = [sys.executable, str(Path(merge_e2e.__file__).resolve()), "--worker"]
    cmds = {}
    for tag, p in (("", prev), ("-bf16", prev_bf16)):  # the same CUR with the bf16 PREV: how far apo is from it
        cmds["floor-tuned" + tag] = me + ["floor-tuned", str(p), str(cur), str(out)]
        cmds["apo-cpu" + tag] = [sys.executable, "-m", "apo_merge", str(p), str(cur), "--alpha", repr(args.alpha)]
        cmds["apo-cpu" + tag] += ["-o", str(out), "-q", "--device", "cpu"]
        if args.fp8_out and not tag:
            cmds["apo-cpu-fp8out"] = [*cmds["apo-cpu"], "--quantize", "fp8-block"]
    code = str(args.code.resolve())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")])))
    print(
        f"inputs {sum(p.stat().st_size for p in inputs) / 1e9:.2f} GB (PREV FP8, CUR bf16), {moved / 1e9:.2f} GB moved"
    )
    times: dict[str, list[float]] = {k: [] for k in cmds}
    anon: dict[str, int] = dict.fromkeys(cmds, 0)
    cpu: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(args.runs):
        for name, cmd in cmds.items():
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            evict(inputs + merge_e2e.weight_files(prev_bf16))
            m = run_measured(cmd, cwd=code, env=env, after=lambda: fsync_tree(out))
            if m.returncode != 0:
                raise SystemExit(f"{name} failed: {m.output_tail}")
            times[name].append(m.seconds)
            cpu[name].append(m.cpu_seconds)
            anon[name] = max(anon[name], m.peak_anon)
    for name, ts in times.items():
        med = statistics.median(ts)
        floor = statistics.median(times["floor-tuned" + ("-bf16" if name.endswith("-bf16") else "")])
        print(
            f"{name:17s} {med:6.2f} s ({min(ts):.2f}-{max(ts):.2f})  x{med / floor:.2f} its floor-tuned  "
            f"anon {anon[name] / 2**20:.0f} MiB  cpu {statistics.median(cpu[name]) / (moved / 1e9):.2f} s/GB"
        )
    print(f"code {code}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
