"""End-to-end merge benchmark: apo-merge against the disk's floor, a naive script and mergekit, all read cold.

    python bench/merge_e2e.py                                   # ~4 GB per side (one 5 GB-limit shard), 3 runs
    python bench/merge_e2e.py --size 1.7                        # smaller pair
    python bench/merge_e2e.py --shape 8b                        # Llama-3-8B shapes: 16 GB per side, 4 shards
    python bench/merge_e2e.py --shape tiny --size 0.002 --runs 1 # a smoke run (bench/gpu_check.sh --dry)
    python bench/merge_e2e.py --mergekit /work/venvs/mergekit   # add mergekit (a venv with it installed)

The pair (cur = prev + small noise, bf16, Llama-shaped, sharded as transformers does) is built once and cached in
--scratch. Before every timed run both inputs are evicted from the page cache (fsync + POSIX_FADV_DONTNEED,
checked with mincore), so every method reads cold; every method's time includes making its output durable
(fsync), and each runs as its own process, so start-up (imports) is part of its time. Methods alternate, --runs
rounds; the table gives the median and the spread (min-max).

  floor     plain 16 MiB sequential reads of both inputs, then writing + fsyncing the output's byte count
  floor-tuned  the same with apo-merge's I/O hints: WILLNEED ahead of the reads, writeback started every 64 MiB
  floor-tuned-3  floor-tuned writing three outputs (the bytes of three alphas from one read)
  naive     per shard: safetensors load_file x2, torch.lerp(prev, cur, 1 + alpha) in bf16, save_file, fsync
  mergekit  mergekit-yaml, `linear` (1+alpha) cur - alpha prev (and/or `task_arithmetic`), fp32 math, bf16 out
  apo-cpu   the apo-merge CLI, --device cpu (default flags)
  apo-hash-inputs  the same with --hash-inputs (input content hashes in the card)
  apo-3alphas  one run, --alpha A,A+0.2,A+0.4: inputs read once, three outputs (compare with floor-tuned-3)
  apo-3runs    the same three alphas as three separate runs, inputs evicted before each
  apo-cuda  the apo-merge CLI, --device cuda (when CUDA is present)

Columns: wall seconds; ratio to the floor's median; CPU seconds (user + system) per GB moved; peak RSS (anonymous + mapped file pages) and peak anonymous
memory (RssAnon, sampled every 5 ms over the process tree), effective GB/s = (bytes read + bytes written) / wall;
and the fraction of output elements that differ from the fp32 formula rounded once to bf16 (checked on the first
run of each method). Results also go to JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    as_dict,
    evict,
    floor_io,
    fsync_tree,
    machine,
    resident_bytes,
    run_measured,
    summary,
    table,
)

REPO = Path(__file__).resolve().parent.parent
FORMAT_VERSION = 1
NOISE = 0.01  # cur = prev + N(0, (NOISE * std)^2): about what one DPO round moves a weight

# Llama widths: the 1B-class width (Llama-3.2-1B) with as many layers as the size asks, or exactly Llama-3-8B.
SHAPES = {
    "1b": dict(hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=128256, layers=None),
    "8b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, layers=32),
    "tiny": dict(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256, layers=None),  # for smoke runs
}


# -- the input pair ---------------------------------------------------------------------------------------------
def _tensors(shape: dict, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in LlamaForCausalLM state-dict order."""
    h, i, v = shape["hidden"], shape["intermediate"], shape["vocab"]
    kv = shape["kv_heads"] * h // shape["heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def _layers_for(shape: dict, size_gb: float) -> int:
    if shape["layers"] is not None:
        return shape["layers"]
    fixed = sum(math.prod(s) for _, s in _tensors(shape, 0)) * 2
    per_layer = sum(math.prod(s) for _, s in _tensors(shape, 1)) * 2 - fixed
    return max(1, round((size_gb * 1e9 - fixed) / per_layer))


def _shards(tensors: list, limit: int) -> list[list]:
    """Greedy in state-dict order, as transformers' save_pretrained splits (max_shard_size)."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _header(entries: list[tuple[str, tuple[int, ...]]]) -> bytes:
    body: dict[str, object] = {"__metadata__": {"format": "pt"}}
    begin = 0
    for name, shape in entries:
        end = begin + math.prod(shape) * 2
        body[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [begin, end]}
        begin = end
    raw = json.dumps(body, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _config(shape: dict, layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["intermediate"],
        "num_hidden_layers": layers,
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "head_dim": shape["hidden"] // shape["heads"],
        "vocab_size": shape["vocab"],
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    }


def build_pair(scratch: Path, shape_name: str, size_gb: float, shard_limit: int, seed: int = 0) -> tuple[Path, Path]:
    """Create (or reuse) the cached pair and return (prev, cur) folders."""
    import torch

    shape = SHAPES[shape_name]
    layers = _layers_for(shape, size_gb)
    tensors = _tensors(shape, layers)
    root = scratch / f"pair-{shape_name}-L{layers}-shard{shard_limit}-seed{seed}-v{FORMAT_VERSION}"
    prev, cur = root / "prev", root / "cur"
    if (root / "complete").exists():
        return prev, cur
    shutil.rmtree(root, ignore_errors=True)
    prev.mkdir(parents=True)
    cur.mkdir()
    shards = _shards(tensors, shard_limit)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    total = sum(math.prod(s) for _, s in tensors) * 2
    print(
        f"building a {total / 1e9:.2f} GB-per-side pair ({layers} layers, {len(tensors)} tensors, "
        f"{len(shards)} file(s)) in {root} ...",
        flush=True,
    )
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    piece = 1 << 24
    for fname, entries in zip(names, shards):
        entries = sorted(entries)  # safetensors writes a file's tensors sorted by name
        header = _header(entries)
        with open(prev / fname, "wb") as fp, open(cur / fname, "wb") as fc:
            fp.write(header)
            fc.write(header)
            for _name, shp in entries:
                n = math.prod(shp)
                norm = len(shp) == 1
                for s in range(0, n, piece):
                    k = min(piece, n - s)
                    base = torch.randn(k, generator=gen).mul_(0.02)
                    if norm:
                        base.add_(1.0)
                    p = base.bfloat16()
                    c = (p.float() + torch.randn(k, generator=gen).mul_(0.02 * NOISE)).bfloat16()
                    fp.write(memoryview(p.view(torch.uint8).numpy()))
                    fc.write(memoryview(c.view(torch.uint8).numpy()))
            fp.flush()
            fc.flush()
            os.fsync(fp.fileno())
            os.fsync(fc.fileno())
    for folder in (prev, cur):
        (folder / "config.json").write_text(json.dumps(_config(shape, layers), indent=2) + "\n")
        if len(shards) > 1:
            weight_map = {n: names[k] for k, entries in enumerate(shards) for n, _ in entries}
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (root / "complete").write_text(json.dumps({"layers": layers, "tensors": len(tensors), "bytes": total}))
    print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    return prev, cur


def weight_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


# -- workers (each runs as its own process, so that its start-up is timed) ----------------------------------------
def _worker_floor(prev: Path, cur: Path, out: Path, tuned: bool, copies: int = 1) -> None:
    """Read both inputs, then write the output's byte count ``copies`` times and fsync; ``tuned``: with
    apo-merge's I/O hints."""
    writes = [(f"{c}-{p.name}", p.stat().st_size) for c in range(copies) for p in weight_files(cur)]
    print(json.dumps(floor_io(weight_files(prev) + weight_files(cur), writes, out, tuned)))


def _worker_runs(prev: Path, cur: Path, out: Path, alphas: list[float]) -> None:
    """apo-merge once per alpha, the inputs evicted before each run (as three separate tries would read them)."""
    out.mkdir()
    inputs = weight_files(prev) + weight_files(cur)
    for alpha in alphas:
        os.sync()
        evict(inputs)
        cmd = [sys.executable, "-m", "apo_merge", str(prev), str(cur), "--alpha", repr(alpha), "-q"]
        subprocess.run(cmd + ["-o", str(out / f"o{alpha:g}"), "--device", "cpu"], check=True)


def _worker_naive(prev: Path, cur: Path, out: Path, alpha: float) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir()
    for path in weight_files(cur):
        p, c = load_file(prev / path.name), load_file(path)
        merged = {name: torch.lerp(p[name], c[name], 1 + alpha) for name in c}
        save_file(merged, out / path.name, metadata={"format": "pt"})
        del p, c, merged
    for name in ("config.json", "model.safetensors.index.json"):
        if (cur / name).exists():
            shutil.copyfile(cur / name, out / name)
    fsync_tree(out)


# -- exactness --------------------------------------------------------------------------------------------------
def count_differing(out: Path, prev: Path, cur: Path, alpha: float) -> tuple[int, int, int]:
    """(elements differing from the fp32 formula rounded once to bf16, elements compared, tensors missing)."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
        found = {}
        for path in weight_files(folder):
            with safe_open(path, "pt") as f:
                found.update({k: (path, k) for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
        return found

    def load(where: tuple[Path, str]) -> torch.Tensor:
        with safe_open(where[0], "pt") as f:
            return f.get_tensor(where[1]).reshape(-1)

    t_out, t_prev, t_cur = tensors(out), tensors(prev), tensors(cur)
    a = torch.tensor(alpha, dtype=torch.float32)
    differing = compared = missing = 0
    for name, where in t_cur.items():
        if name not in t_out:
            missing += 1
            continue
        o, p, c = load(t_out[name]), load(t_prev[name]), load(where)
        step = 1 << 24
        for s in range(0, c.numel(), step):
            cs, ps, got = c[s : s + step].float(), p[s : s + step].float(), o[s : s + step]
            ref = (cs - ps).mul_(a).add_(cs).to(got.dtype)
            bits = torch.int16 if got.element_size() == 2 else torch.int32
            differing += int((ref.view(bits) != got.view(bits)).sum())
            compared += got.numel()
    return differing, compared, missing


# -- the driver -------------------------------------------------------------------------------------------------
def _mergekit_config(path: Path, method: str, prev: Path, cur: Path, alpha: float) -> Path:
    if method == "linear":
        text = (
            f"merge_method: linear\nmodels:\n  - model: {cur}\n    parameters:\n      weight: {1 + alpha}\n"
            f"  - model: {prev}\n    parameters:\n      weight: {-alpha}\n"
            "parameters:\n  normalize: false\ndtype: float32\nout_dtype: bfloat16\n"
        )
    else:
        text = (
            f"merge_method: task_arithmetic\nbase_model: {prev}\nmodels:\n  - model: {cur}\n"
            f"    parameters:\n      weight: {1 + alpha}\n"
            "parameters:\n  normalize: false\ndtype: float32\nout_dtype: bfloat16\n"
        )
    cfg = path / f"mergekit-{method}.yaml"
    cfg.write_text(text)
    return cfg


def _commands(args, prev: Path, cur: Path, out: Path, cuda: bool) -> dict[str, list[str]]:
    me = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    cmds = {
        "floor": me + ["floor", str(prev), str(cur), str(out)],
        "floor-tuned": me + ["floor-tuned", str(prev), str(cur), str(out)],
        "floor-tuned-3": me + ["floor-tuned-3", str(prev), str(cur), str(out)],
        "naive": me + ["naive", str(prev), str(cur), str(out), repr(args.alpha)],
    }
    if args.mergekit:
        exe = Path(args.mergekit) / "bin" / "mergekit-yaml"
        for method in args.mergekit_methods.split(","):
            cfg = _mergekit_config(args.scratch, method, prev, cur, args.alpha)
            cmds[f"mergekit {method}"] = [str(exe), str(cfg), str(out), "--no-copy-tokenizer", "--quiet"]
    apo = [sys.executable, "-m", "apo_merge", str(prev), str(cur), "--alpha", repr(args.alpha), "-o", str(out), "-q"]
    cmds["apo-cpu"] = apo + ["--device", "cpu"]
    cmds["apo-hash-inputs"] = apo + ["--device", "cpu", "--hash-inputs"]
    alphas = _three(args.alpha)
    many = ",".join(map(repr, alphas))
    cmds["apo-3alphas"] = apo[:5] + ["--alpha", many, "-o", str(out / "o{alpha}"), "-q", "--device", "cpu"]
    cmds["apo-3runs"] = me + ["runs", str(prev), str(cur), str(out), many]
    if cuda:
        cmds["apo-cuda"] = apo + ["--device", "cuda"]
    wanted = args.methods.split(",") if args.methods else None
    return {k: v for k, v in cmds.items() if wanted is None or k in wanted or k.split()[0] in wanted}


def _three(alpha: float) -> list[float]:
    return [alpha, round(alpha + 0.2, 6), round(alpha + 0.4, 6)]


def _prepare(out: Path, inputs: list[Path], many: bool) -> float:
    """Remove the last output, flush, evict the inputs; return the largest fraction of an input still cached."""
    shutil.rmtree(out, ignore_errors=True)
    if many:  # the outputs go below it
        out.mkdir()
    os.sync()
    evict(inputs)
    return max(resident_bytes(p) / max(1, p.stat().st_size) for p in inputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=4.0, help="GB per side (1b shape; layers chosen to fit) [4]")
    ap.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="1b",
        help="1b: Llama-3.2-1B widths; 8b: Llama-3-8B; tiny: smoke runs",
    )
    ap.add_argument("--shard-size", type=float, default=5.0, help="max shard size in GB, as transformers [5]")
    ap.add_argument(
        "--scratch",
        type=Path,
        default=Path("~/.cache/apo-merge-bench").expanduser(),
        help="cache and output folder (needs about 3x the pair size free)",
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--methods", default="", help="comma-separated subset, e.g. floor,apo-cpu [all]")
    ap.add_argument("--mergekit", default="", help="a virtual environment with mergekit installed")
    ap.add_argument("--mergekit-methods", default="linear", help="linear, task_arithmetic or both [linear]")
    ap.add_argument("--repo", type=Path, default=REPO, help="source tree to run apo-merge from [this checkout]")
    ap.add_argument("--no-check", action="store_true", help="skip the exactness check")
    ap.add_argument("--json", type=Path, default=None, help="where to write results [SCRATCH/results/...]")
    args = ap.parse_args()

    import torch

    args.scratch.mkdir(parents=True, exist_ok=True)
    prev, cur = build_pair(args.scratch, args.shape, args.size, int(args.shard_size * 1e9))
    inputs = weight_files(prev) + weight_files(cur)
    out = args.scratch / "out"
    in_bytes = sum(p.stat().st_size for p in inputs)
    out_bytes = sum(p.stat().st_size for p in weight_files(cur))
    cmds = _commands(args, prev, cur, out, torch.cuda.is_available())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(args.repo), os.environ.get("PYTHONPATH")])))
    print(
        f"pair: {in_bytes / 2e9:.2f} GB per side ({len(weight_files(cur))} file(s)); methods: {', '.join(cmds)}; "
        f"{args.runs} runs each",
        flush=True,
    )

    runs: dict[str, list[dict]] = {name: [] for name in cmds}
    exact: dict[str, dict] = {}
    for r in range(args.runs):
        for name, cmd in cmds.items():
            cached = _prepare(out, inputs, name == "apo-3alphas")
            load = os.getloadavg()[0]
            after = (lambda: fsync_tree(out)) if name.startswith("mergekit") else None
            m = run_measured(cmd, cwd=args.repo, env=env, after=after)
            if m.returncode != 0:
                sys.exit(f"{name} failed (exit {m.returncode}):\n{m.output_tail}")
            runs[name].append({**as_dict(m), "load_before": load, "input_cached_before": cached})
            if name.startswith("floor"):
                runs[name][-1].update(json.loads(m.output_tail.strip().splitlines()[-1]))
            print(
                f"run {r + 1}/{args.runs} {name:26s} {m.seconds:7.2f} s  anon {m.peak_anon / 2**20:7.0f} MiB  "
                f"rss {m.peak_rss / 2**20:7.0f} MiB  (load {load:.1f}, inputs cached {cached:.1%})",
                flush=True,
            )
            if r == 0 and not args.no_check and not name.startswith("floor"):
                first = out / f"o{args.alpha:g}" if name in ("apo-3alphas", "apo-3runs") else out
                d, n, missing = count_differing(first, prev, cur, args.alpha)
                exact[name] = {"differing": d, "compared": n, "missing_tensors": missing}
    shutil.rmtree(out, ignore_errors=True)

    floor, tuned, tuned3 = (
        summary([x["seconds"] for x in runs[k]])["median"] if k in runs else float("nan")
        for k in ("floor", "floor-tuned", "floor-tuned-3")
    )
    rows, results = [], {}
    for name, rs in runs.items():
        s = summary([x["seconds"] for x in rs])
        three = name in ("floor-tuned-3", "apo-3alphas", "apo-3runs")
        moved = in_bytes * (3 if name == "apo-3runs" else 1) + out_bytes * (3 if three else 1)
        cpu = summary([x["cpu_seconds"] for x in rs])["median"]
        base = tuned3 if three else tuned
        rss, anon = max(x["peak_rss"] for x in rs), max(x["peak_anon"] for x in rs)
        ex = exact.get(name)
        off = (
            "n/a"
            if ex is None
            else f"{ex['differing'] / max(1, ex['compared']):.3%}"
            + (f" ({ex['missing_tensors']} tensors missing)" if ex and ex["missing_tensors"] else "")
        )
        results[name] = {
            "seconds": s,
            "ratio_to_floor": s["median"] / floor,
            "ratio_to_floor_tuned": s["median"] / tuned,
            "ratio_to_floor_tuned_same_bytes": s["median"] / base,
            "cpu_seconds": cpu,
            "cpu_s_per_gb_moved": cpu / (moved / 1e9),
            "peak_rss": rss,
            "peak_anon": anon,
            "gb_per_s": moved / s["median"] / 1e9,
            "exactness": ex,
            "runs": rs,
        }
        rows.append(
            [
                name,
                f"{s['median']:.2f}",
                f"{s['min']:.2f}-{s['max']:.2f}",
                f"{s['median'] / floor:.2f}",
                f"{s['median'] / tuned:.2f}",
                f"{s['median'] / base:.2f}",
                f"{cpu:.1f}",
                f"{cpu / (moved / 1e9):.2f}",
                f"{rss / 2**30:.2f} GiB",
                f"{anon / 2**20:.0f} MiB",
                f"{moved / s['median'] / 1e9:.2f}",
                off,
            ]
        )
    print()
    print(
        table(
            [
                "method",
                "wall s (median)",
                "spread",
                "x floor",
                "x floor-tuned",
                "x tuned, same bytes",
                "CPU s",
                "CPU s/GB",
                "peak RSS",
                "peak anon",
                "GB/s",
                "elements off vs fp32 formula",
            ],
            rows,
        )
    )
    for name in ("floor", "floor-tuned"):
        if name in runs:
            print(
                f"\n{name} = cold read {summary([x['read_s'] for x in runs[name]])['median']:.2f} s + write and "
                f"fsync {summary([x['write_s'] for x in runs[name]])['median']:.2f} s (medians)",
                end="",
            )
    print()
    loads = [x["load_before"] for rs in runs.values() for x in rs]
    print(
        f"\n{in_bytes / 2e9:.2f} GB per side, {out_bytes / 1e9:.2f} GB written; GB/s counts "
        f"{(in_bytes + out_bytes) / 1e9:.2f} GB moved; load average before runs {min(loads):.1f}-{max(loads):.1f} "
        f"on {os.cpu_count()} CPUs"
    )

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.repo, capture_output=True, text=True)
    report = {
        "bench": "merge_e2e",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine(),
        "torch": torch.__version__,
        "commit": commit.stdout.strip(),
        "config": {
            "shape": args.shape,
            "size_gb_per_side": in_bytes / 2e9,
            "files_per_side": len(weight_files(cur)),
            "alpha": args.alpha,
            "runs": args.runs,
            "bytes_read": in_bytes,
            "bytes_written": out_bytes,
        },
        "results": results,
    }
    path = args.json or args.scratch / "results" / f"merge_e2e-{args.shape}-{in_bytes / 2e9:.1f}GB.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, a = sys.argv[2], sys.argv[3:]
        if kind.startswith("floor"):
            _worker_floor(
                Path(a[0]), Path(a[1]), Path(a[2]), tuned=kind != "floor", copies=3 if kind.endswith("-3") else 1
            )
        elif kind == "runs":
            _worker_runs(Path(a[0]), Path(a[1]), Path(a[2]), [float(x) for x in a[3].split(",")])
        else:
            _worker_naive(Path(a[0]), Path(a[1]), Path(a[2]), float(a[3]))
    else:
        main()
