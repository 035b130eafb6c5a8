"""The engine's performance paths: parallel workers with in-order writes, writeback windows, prefetch, lazy torch;
its sizes (``Tuning``) never change the bytes written."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from blake3 import blake3
from safetensors.torch import load_file, save_file

import apo_kernels
import apo_merge
from apo_kernels import cpass, numpy_twin
from apo_kernels import extrapolate_ as kernel_extrapolate_
from apo_merge.api import Hooks, run_merge, run_merges
from apo_merge.engine import Tuning, use_tuning
from apo_merge.errors import MergeError
from apo_merge.io import prefetch, writer
from apo_merge.io.prefetch import Prefetcher
from apo_merge.options import MergeOptions
from tests.checkpoints import make_checkpoint
from tests.merge.helpers import tree_state

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pair(tmp_path: Path):
    def build(dtype=torch.bfloat16, prev_dtype=None, **cfg):
        prev = make_checkpoint(tmp_path / "prev", seed=0, dtype=prev_dtype or dtype, **cfg)
        cur = make_checkpoint(tmp_path / "cur", seed=1, dtype=dtype, **cfg)
        return prev, cur

    return build


def weights(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.safetensors"))}


def test_cli_and_engine_start_without_torch():
    """The CLI starts prefetching before torch loads: its modules must not import torch themselves."""
    code = (
        "import sys, apo_merge.cli, apo_merge.engine, apo_merge.api, apo_merge.io.prefetch\n"
        "assert 'torch' not in sys.modules, 'torch imported at start-up'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_workers_finishing_out_of_order_still_write_in_order(pair, tmp_path):
    prev, cur = pair(prev_dtype=torch.float32)
    reference = apo_merge.extrapolate(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "reference")
    started: list[int] = []
    finished: list[int] = []  # calls by start order, as they return: each hands its chunk to the writer next
    lock = threading.Lock()

    def slow_first(out, prev, cur, alpha):  # the first chunk finishes last among its neighbours
        with lock:
            call = len(started)
            started.append(call)
        if call == 0:
            time.sleep(0.3)
        kernel_extrapolate_(out, prev, cur, alpha)
        with lock:
            finished.append(call)

    with use_tuning(Tuning(chunk_elems=96, cpu_workers=3)):  # 3 workers even on fewer cores
        report = run_merge(prev, cur, MergeOptions(0.3), tmp_path / "parallel", hooks=Hooks(kernel=slow_first))
    assert finished.index(0) > 0, "the chunks should have reached the writer out of order"
    assert weights(report.output) == weights(reference)
    for name, data in weights(report.output).items():
        assert report.digests[name] == blake3(data).hexdigest()


def test_writeback_windows_and_plain_fallback(pair, tmp_path, monkeypatch):
    prev, cur = pair()
    reference = apo_merge.extrapolate(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "reference")
    real = writer.SYNC_FILE_RANGE
    if real is None:
        pytest.skip("no sync_file_range on this platform")
    flags: list[int] = []

    def recording(fd, offset, nbytes, flag):
        flags.append(flag)
        return real(fd, offset, nbytes, flag)

    monkeypatch.setattr(writer, "WRITEBACK_BYTES", 4096)
    monkeypatch.setattr(writer, "SYNC_FILE_RANGE", recording)
    windows = run_merge(prev, cur, MergeOptions(0.3), tmp_path / "windows")
    assert writer.SFR_WRITE in flags and writer.SFR_WAIT_BEFORE | writer.SFR_WRITE | writer.SFR_WAIT_AFTER in flags
    monkeypatch.setattr(writer, "SYNC_FILE_RANGE", None)
    plain = run_merge(prev, cur, MergeOptions(0.3), tmp_path / "plain")
    assert weights(windows.output) == weights(plain.output) == weights(reference)
    assert windows.digests == plain.digests


def _record_fadvise(monkeypatch) -> list[tuple[str, int, int]]:
    calls: list[tuple[str, int, int]] = []
    real = os.posix_fadvise

    def recording(fd, offset, length, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            calls.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset, length))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(writer.os, "posix_fadvise", recording)
    return calls


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_prefetch_covers_inputs_side_by_side_and_stays_within_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(prefetch, "PREFETCH_STEP", 1000)
    monkeypatch.setattr(prefetch, "PREFETCH_DEPTH", 2)  # waits for older pieces too
    small, big1, big2 = tmp_path / "small", tmp_path / "big1", tmp_path / "big2"
    small.write_bytes(b"s" * 4000)
    big1.write_bytes(b"b" * 5000)
    big2.write_bytes(b"c" * 3500)
    calls = _record_fadvise(monkeypatch)
    Prefetcher().run([[small], [big1, big2]], budget=1 << 30)
    covered = {name: sum(n for f, _, n in calls if f == name) for name in ("small", "big1", "big2")}
    assert covered == {"small": 4000, "big1": 5000, "big2": 3500}
    # Side by side: the small stream (4 pieces) is spread over the big one (9 pieces), not read first or last.
    order = [f for f, _, _ in calls]
    assert order[0] in ("small", "big1") and order.index("big2") < max(i for i, f in enumerate(order) if f == "small")

    calls.clear()
    monkeypatch.setattr(prefetch, "PATIENCE_S", 0.05)
    Prefetcher().run([[big1]], budget=0)  # nobody reads: it issues one piece, waits, then gives up
    assert len(calls) == 1


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_prefetch_ranges_follow_the_given_order_across_files(tmp_path, monkeypatch):
    monkeypatch.setattr(prefetch, "PREFETCH_STEP", 1000)
    monkeypatch.setattr(prefetch, "PREFETCH_DEPTH", 2)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"a" * 6000)
    b.write_bytes(b"b" * 6000)
    calls = _record_fadvise(monkeypatch)
    Prefetcher()._run_ranges([(a, 0, 2500), (b, 0, 2500), (a, 2500, 1000), (b, 5000, 10)], budget=1 << 30)
    assert calls == [
        ("a", 0, 1000), ("a", 1000, 1000), ("a", 2000, 500),
        ("b", 0, 1000), ("b", 1000, 1000), ("b", 2000, 500),
        ("a", 2500, 1000), ("b", 5000, 10),
    ]  # fmt: skip


def _wait_for_prefetchers() -> None:
    deadline = time.monotonic() + 30
    while any(t.name.startswith("apo-prefetch") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_prefetch_checkpoints_ignores_what_is_not_a_checkpoint_and_is_not_repeated(pair, tmp_path, monkeypatch):
    prev, _ = pair()
    calls = _record_fadvise(monkeypatch)
    prefetcher = Prefetcher()
    prefetcher.checkpoints(tmp_path / "missing", tmp_path, prev)
    _wait_for_prefetchers()
    assert {f for f, _, _ in calls} == {p.name for p in prev.glob("*.safetensors")}
    calls.clear()
    prefetcher.prefetch(list(prev.glob("*.safetensors")))  # as the engine does once the CLI has started it
    _wait_for_prefetchers()
    assert calls == []
    Prefetcher().prefetch(list(prev.glob("*.safetensors")))  # another merge's prefetcher: its own state
    _wait_for_prefetchers()
    assert {f for f, _, _ in calls} == {p.name for p in prev.glob("*.safetensors")}


def test_each_merge_slides_its_own_prefetch_window(pair, tmp_path):
    """Reads are counted by the merge's own Prefetcher (none is shared between concurrent merges)."""
    prev, cur = pair()
    mine, other = Prefetcher(), Prefetcher()
    report = run_merge(prev, cur, MergeOptions(0.3), tmp_path / "out", hooks=Hooks(prefetcher=mine))
    inputs = sum(p.stat().st_size for p in cur.glob("*.safetensors")) + sum(
        p.stat().st_size for p in prev.glob("*.safetensors")
    )
    assert 0 < mine.read_bytes <= inputs and other.read_bytes == 0
    assert report.bytes_written > 0


def test_failure_in_one_worker_stops_every_stage(pair, tmp_path):
    prev, cur = pair()
    calls = []

    def failing(out, prev, cur, alpha):
        calls.append(None)
        if len(calls) == 5:
            raise RuntimeError("kernel failed")
        return kernel_extrapolate_(out, prev, cur, alpha)

    with pytest.raises(RuntimeError, match="kernel failed"), use_tuning(Tuning(chunk_elems=64, cpu_workers=2)):
        run_merge(prev, cur, MergeOptions(0.3), tmp_path / "out", hooks=Hooks(kernel=failing))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cur", "prev"]
    assert not [t for t in threading.enumerate() if t.name.startswith(("apo-read", "apo-write", "apo-compute"))]


@pytest.mark.parametrize("kernel", [None, kernel_extrapolate_], ids=["numpy-twin", "torch-kernel"])
def test_new_nonfinite_counts_overflow_of_finite_inputs_only(tmp_path, kernel):
    inf, nan = float("inf"), float("nan")
    inputs = {  # (prev, cur); alpha 1: out = 2 cur - prev
        "big": ([3e38] * 4, [3e38] * 4),  # finite outputs whose fp32 sum overflows: none counted
        "mix": ([0.0, nan, 1.0, -3e38], [1.0, 1.0, inf, 3e38]),  # only the last overflows from finite inputs
    }
    for side in (0, 1):
        (tmp_path / str(side)).mkdir()
        tensors = {name: torch.tensor(pair[side], dtype=torch.bfloat16) for name, pair in inputs.items()}
        save_file(tensors, tmp_path / str(side) / "model.safetensors", metadata={"format": "pt"})
    report = run_merge(
        tmp_path / "0", tmp_path / "1", MergeOptions(1.0, device="cpu"), tmp_path / "out", hooks=Hooks(kernel=kernel)
    )
    assert report.new_nonfinite == 1


def test_overflow_reported_and_strict(tmp_path):
    for name, value in (("prev", -60000.0), ("cur", 60000.0)):
        (tmp_path / name).mkdir()
        tensors = {"w": torch.full((3000,), value, dtype=torch.float16), "b": torch.ones(7, dtype=torch.float16)}
        save_file(tensors, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
    report = run_merge(tmp_path / "prev", tmp_path / "cur", MergeOptions(0.3), tmp_path / "out")
    assert report.new_nonfinite == 3000
    with pytest.raises(MergeError, match="inf or NaN"):
        run_merge(tmp_path / "prev", tmp_path / "cur", MergeOptions(0.3, strict=True), tmp_path / "strict")
    assert not (tmp_path / "strict").exists()


def test_cpu_merge_restores_torch_threads(pair, tmp_path):
    prev, cur = pair()
    before = torch.get_num_threads()
    apo_merge.extrapolate(prev=prev, cur=cur, alpha=0.3, output=tmp_path / "out", device="cpu")
    assert torch.get_num_threads() == before


@pytest.mark.gpu
def test_cuda_pipeline_chunks_mixed_dtypes_copies_and_overflow(pair, tmp_path):
    prev, cur = pair(prev_dtype=torch.float32)
    extra = cur / "model.safetensors"
    tensors = load_file(extra)
    tensors["extra.weight"] = torch.arange(1001, dtype=torch.bfloat16)
    save_file(tensors, extra, metadata={"format": "pt"})
    # odd tails, many chunks, both device buffer sets
    with use_tuning(Tuning(gpu_chunk_elems=1000, copy_chunk_bytes=600, gpu_slots=2)):
        cpu = run_merge(prev, cur, MergeOptions(0.3, device="cpu", on_missing="copy"), tmp_path / "cpu")
        gpu = run_merge(prev, cur, MergeOptions(0.3, device="cuda", on_missing="copy"), tmp_path / "gpu")
    assert weights(gpu.output) == weights(cpu.output)
    assert gpu.digests == cpu.digests

    for name, value in (("p16", -60000.0), ("c16", 60000.0)):
        (tmp_path / name).mkdir()
        save_file(
            {"w": torch.full((2500,), value, dtype=torch.float16)},
            tmp_path / name / "model.safetensors",
            metadata={"format": "pt"},
        )
    report = run_merge(tmp_path / "p16", tmp_path / "c16", MergeOptions(0.3, device="cuda"), tmp_path / "o16")
    assert report.new_nonfinite == 2500


_NO_TORCH = """
import sys
from apo_merge.cli import main
sys.argv = ["apo-merge", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
assert "torch" not in sys.modules, "torch was imported"
"""


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cpu_merge_and_verify_never_import_torch(tiny_checkpoints, tmp_path, device):
    """torch's start-up is a third of a 1 GB merge on two cores: the CPU path computes with the numpy twin."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # auto without a GPU
    out = tmp_path / "out"
    merge = [tiny_checkpoints["shard_prev"], tiny_checkpoints["shard_cur"], "--alpha", "0.3", "-o", out]
    for args in (merge + ["--device", device], ["verify", out]):
        p = subprocess.run([sys.executable, "-c", _NO_TORCH, *map(str, args)], env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr


_numpy_into = numpy_twin.extrapolate_into  # the originals, for the spies below
_compiled_into = cpass.extrapolate_into


@pytest.mark.parametrize("built", [True, False], ids=["compiled", "not-built"])
@pytest.mark.parametrize(
    ("cur_dtype", "out", "twin"),
    [
        (torch.bfloat16, "keep", "numpy"),
        (torch.float32, "bf16", "numpy"),
        (torch.float16, "keep", "torch"),
        (torch.bfloat16, "fp16", "torch"),
    ],
)
def test_cpu_twin_choice_by_dtype_same_bytes(tmp_path, monkeypatch, cur_dtype, out, twin, built):
    """The compiled pass computes every dtype where the install built it. Without it, numpy's fp16 conversions run
    an element at a time (8x slower than torch's): fp16 merges take torch's twin. All write the same bytes."""
    if built and not cpass.available():
        pytest.skip("apo_kernels._cpass is not built")
    if not built:
        monkeypatch.setattr(cpass, "_cpass", None)
    prev = make_checkpoint(tmp_path / "prev", seed=0, dtype=torch.float32)
    cur = make_checkpoint(tmp_path / "cur", seed=1, dtype=cur_dtype)
    used = []
    monkeypatch.setattr(numpy_twin, "extrapolate_into", lambda *a: used.append("numpy") or _numpy_into(*a))
    monkeypatch.setattr(cpass, "extrapolate_into", lambda *a: used.append("compiled") or _compiled_into(*a))
    # The engine takes apo_kernels' extrapolate_ when it loads torch's twin.
    monkeypatch.setattr(apo_kernels, "extrapolate_", lambda *a: used.append("torch") or kernel_extrapolate_(*a))
    options = MergeOptions(0.3, device="cpu", dtype=out)
    run_merge(prev, cur, options, tmp_path / "auto")
    assert set(used) == {"compiled" if built else twin}
    run_merge(
        prev, cur, options, tmp_path / "forced", hooks=Hooks(kernel=kernel_extrapolate_)
    )  # the torch twin, always
    for name in os.listdir(tmp_path / "auto"):
        if name.endswith(".safetensors"):
            assert (tmp_path / "auto" / name).read_bytes() == (tmp_path / "forced" / name).read_bytes()


def _pair_with_copies(root: Path) -> tuple[Path, Path]:
    """A sharded fp32 PREV and bf16 CUR, CUR with one tensor PREV lacks (copied with on_missing="copy")."""
    prev = make_checkpoint(root / "prev", seed=0, dtype=torch.float32, max_shard_size="20KB")
    cur = make_checkpoint(root / "cur", seed=1, dtype=torch.bfloat16, max_shard_size="20KB")
    last = sorted(cur.glob("*.safetensors"))[-1]
    tensors = load_file(last)
    tensors["extra.weight"] = torch.arange(1001, dtype=torch.bfloat16)
    save_file(tensors, last, metadata={"format": "pt"})
    index = json.loads((cur / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra.weight"] = last.name
    (cur / "model.safetensors.index.json").write_text(json.dumps(index))
    return prev, cur


TINY = Tuning(chunk_elems=7, copy_chunk_bytes=5, cpu_workers=3, spare_slots=1)  # every tensor in many chunks


@pytest.mark.parametrize(
    "fields",
    [
        {"alpha": (0.3, -0.5, 2.0)},
        {"alpha": 0.7, "dtype": "fp16"},
        {"alpha": 1.5, "dtype": "fp32", "hash_inputs": True},
    ],
    ids=["alphas", "fp16-torch-twin", "fp32-hash-inputs"],
)
def test_tiny_and_default_tuning_write_identical_bytes(tmp_path, fields):
    """The golden check of the staged engine: its sizes change how the work is cut, never a byte of any output."""
    prev, cur = _pair_with_copies(tmp_path)
    options = MergeOptions(device="cpu", on_missing="copy", **fields)
    reports, writes = {}, {}
    for name, tuning in (("default", Tuning()), ("tiny", TINY)):
        (tmp_path / name).mkdir()
        calls: list[int] = []
        with use_tuning(tuning):
            reports[name] = run_merges(
                prev, cur, options, tmp_path / name / "out{alpha}", hooks=Hooks(progress=calls.append)
            )
        writes[name] = len(calls)
    assert writes["tiny"] > 10 * writes["default"]  # the tiny Tuning did reach the engine
    for default, tiny in zip(reports["default"], reports["tiny"]):
        assert tree_state(default.output) == tree_state(tiny.output)  # weights, index, card, side files
        assert default.digests == tiny.digests and default.new_nonfinite == tiny.new_nonfinite
        assert default.input_hashes == tiny.input_hashes


def test_tuning_refuses_sizes_below_one():
    assert Tuning().workers(gpu=True) == 1 and Tuning(cpu_workers=3).workers(gpu=False) == 3
    for bad in ({"chunk_elems": 0}, {"gpu_slots": -1}, {"cpu_workers": 0}, {"copy_chunk_bytes": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Tuning(**bad)


def test_reader_runs_ahead_of_a_stalled_hash_by_the_output_window(tmp_path, monkeypatch):
    """Input buffers are free once a chunk is computed; only outputs wait for the writer and the hash. While the
    hash stage is stalled the reader fills the whole output window (before the split it stopped after the few
    shared slots), and the bytes are those of an unstalled run."""
    from apo_merge.engine import write as write_mod
    from apo_merge.io.checkpoint import open_checkpoint
    from apo_merge.plan import make_plan

    prev, cur = make_checkpoint(tmp_path / "prev", seed=1), make_checkpoint(tmp_path / "cur", seed=2)
    options = MergeOptions(alpha=0.3, device="cpu")
    plan = make_plan(open_checkpoint(prev), open_checkpoint(cur), options)
    tuning = Tuning(chunk_elems=64, copy_chunk_bytes=256, cpu_workers=2, spare_slots=1, output_window_bytes=256 * 24)
    assert tuning.slots(gpu=False) == 3 and tuning.outputs(False, 256) == 24
    gate, reads = threading.Event(), []

    class Stalled:
        def __init__(self):
            self.inner = hashlib.sha256()  # stands in for the output hash: only its timing matters here

        def update(self, data):
            gate.wait(30)
            self.inner.update(data)

        def hexdigest(self):
            return self.inner.hexdigest()

    monkeypatch.setattr(write_mod, "new_hasher", lambda name: Stalled())
    from apo_merge.engine import Hooks as EngineHooks
    from apo_merge.engine import execute

    hooks = EngineHooks(on_read=lambda path, offset, data: reads.append(offset))

    (tmp_path / "out").mkdir()
    done = threading.Thread(target=execute, args=(plan, tmp_path / "out", "cpu", hooks, tuning))
    done.start()
    last, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 1.0:  # wait until the reader stops
        if len(reads) != last:
            last, stable_since = len(reads), time.monotonic()
        time.sleep(0.05)
    stalled_reads = len(reads)
    gate.set()
    done.join(60)
    # 24 output sets: the first waits in the stalled hash, the rest queue behind it; two reads per computed chunk
    assert stalled_reads >= 2 * 20, stalled_reads
    monkeypatch.undo()
    (tmp_path / "again").mkdir()
    execute(plan, tmp_path / "again", "cpu", tuning=Tuning())
    for f in plan.files:
        assert (tmp_path / "out" / f.name).read_bytes() == (tmp_path / "again" / f.name).read_bytes()
