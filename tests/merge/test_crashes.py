"""Crashes and interruptions of a real apo-merge process on a 2 x 16 MiB merge.

SIGKILL at seeded random moments, SIGINT, SIGTERM, a file-size limit (RLIMIT_FSIZE) standing in for a full disk,
and two processes writing the same OUT. After each: OUT is absent or complete and valid (verify passes, weights
equal an undisturbed run's), no temporary folder of a finished process remains, and the inputs are unchanged.
The child runs the CLI with the engine's sizes scaled down as the inputs are (``TUNING``), so the merge is cut into
as many chunks as a default run of 8 times the size, and kills still land while the output is being written.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

from apo_merge.api import run_merge
from apo_merge.engine import Tuning
from apo_merge.errors import MergeError
from apo_merge.io.hashing import hash_file
from apo_merge.io.output import StagedFolder, _process_start, remove_stale_temporaries
from apo_merge.options import MergeOptions
from apo_merge.verify import verify_output
from tests.merge.helpers import (
    REPO,
    Result,
    assert_one_line_error,
    cli_env,
    leftovers,
    st_tensors,
    tree_state,
)

pytestmark = pytest.mark.slow

N_SHARDS, N_TENSORS, SHAPE = 4, 4, (256, 1024)  # 4 x 4 x 1 MiB = 16 MiB of float32 per checkpoint
TUNING = Tuning(chunk_elems=1 << 17, copy_chunk_bytes=1 << 19)  # the defaults / 8: 2 chunks per tensor, as at 8x

# `python -m apo_merge` with TUNING
_CHILD = f"""
import sys
from apo_merge.cli import main
from apo_merge.engine import Tuning, use_tuning
sys.argv = ["apo-merge", *sys.argv[1:]]
with use_tuning(Tuning(**{asdict(TUNING)!r})):
    main()
"""


@dataclass
class Big:
    prev: Path
    cur: Path
    inputs: dict[str, str]  # tree_state of both inputs
    weights: dict[str, str]  # sha256 per weight file of the undisturbed alpha=0.3 output
    old_out: Path  # a finished alpha=0.5 output, the OUT that --overwrite replaces
    old_weights: dict[str, str]
    t_tmp: float  # seconds from start until the temporary folder appeared
    t_weights: float  # ... until the first weight file appeared in it (the writer opens each at its full size)
    t_written: float  # ... until the weights were written (the side files and the card appear)
    t_end: float  # seconds from start until exit


def _write_checkpoint(root: Path, seed: int) -> None:
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    for s in range(N_SHARDS):
        name = f"model-{s + 1:05d}-of-{N_SHARDS:05d}.safetensors"
        tensors = {
            f"layers.{s}.w{k}": ("F32", list(SHAPE), torch.randn(SHAPE, generator=g).numpy().tobytes())
            for k in range(N_TENSORS)
        }
        (root / name).write_bytes(st_tensors(tensors))
        weight_map.update(dict.fromkeys(tensors, name))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "toy"}))


def _weights(out: Path) -> dict[str, str]:
    return {p.name: hash_file(p)[1] for p in sorted(out.glob("*.safetensors"))}


def _start(big_or_paths, out: Path, *extra: str, alpha: str = "0.3", preexec=None) -> subprocess.Popen:
    prev, cur = big_or_paths
    args = (prev, cur, "--alpha", alpha, "-o", out, "--device", "cpu", "-q", *extra)
    cmd = [sys.executable, "-c", _CHILD, *map(str, args)]

    def child_setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a CI shell may start us with SIGINT ignored
        if preexec:
            preexec()

    return subprocess.Popen(
        cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=child_setup
    )


def _finish(p: subprocess.Popen, timeout: float = 300) -> Result:
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hang: SIGABRT makes the child's faulthandler print every thread's stack
        p.send_signal(signal.SIGABRT)
        _, stderr = p.communicate(timeout=60)
        raise AssertionError(f"apo-merge hung for {timeout} s; its threads when aborted:\n{stderr}") from None
    return Result(p.returncode, stdout, stderr)


def _temporaries(out: Path, pid: int | None = None) -> list[Path]:
    """The temporary folders beside ``out``: all of them, or those of process ``pid`` (not stale ones)."""
    mark = ".apo-tmp-" if pid is None else f".apo-tmp-{pid}-"
    return [out.parent / name for name in leftovers(out) if mark in name]


PHASES = ("started", "temp", "weights", "written")


def _phase(p: subprocess.Popen, out: Path) -> str:
    """How far run ``p`` into ``out`` has come: its temporary folder, a weight file in it, the weights written."""
    phase = "started"
    for tmp in _temporaries(out, p.pid):
        phase = "temp"
        if next(tmp.glob("*.safetensors"), None):
            phase = "weights"
        if (tmp / "config.json").exists() or (tmp / "README.md").exists():  # copied or written after the weights
            return "written"
    return phase


def _wait_for(p: subprocess.Popen, out: Path, phase: str, timeout: float = 120) -> bool:
    """Poll until the run has reached ``phase`` (True) or the process has exited (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if PHASES.index(_phase(p, out)) >= PHASES.index(phase):
            return True
        if p.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError(f"the merge never reached {phase!r}")


def _wait_for_temp(p: subprocess.Popen, out: Path, timeout: float = 120) -> bool:
    return _wait_for(p, out, "temp", timeout)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Big:
    root = tmp_path_factory.mktemp("big")
    prev, cur = root / "prev", root / "cur"
    _write_checkpoint(prev, 0)
    _write_checkpoint(cur, 1)
    old_out = root / "old"
    run_merge(prev, cur, MergeOptions(0.5, device="cpu"), old_out)
    out = root / "baseline"
    t0 = time.monotonic()
    p = _start((prev, cur), out)
    marks = []
    for phase in PHASES[1:]:
        # The card and side files land just before the rename: on a fast run that phase can open and close between
        # two polls, and then the run's end marks it.
        assert _wait_for(p, out, phase) or phase == "written"
        marks.append(time.monotonic() - t0)
    res = _finish(p)
    t_end = time.monotonic() - t0
    assert res.code == 0, res.stderr
    verify_output(out)
    big = Big(prev, cur, tree_state(root, skip=out), _weights(out), old_out, _weights(old_out), *marks, t_end)
    shutil.rmtree(out)
    return big


def _inputs_unchanged(big: Big) -> None:
    assert tree_state(big.prev.parent, skip=big.prev.parent / "baseline") == big.inputs


def _out_state(out: Path, big: Big, old_allowed: bool = False) -> str:
    """ "absent", or "new" / "old" for a complete output (verify passes, weights equal an undisturbed run's)."""
    if not out.exists():
        return "absent"
    verify_output(out)  # raises MergeError on any mismatch
    weights = _weights(out)
    if old_allowed and weights == big.old_weights:
        return "old"
    assert weights == big.weights
    return "new"


def _part_written(p: subprocess.Popen, out: Path, big: Big) -> bool:
    """Whether killed run ``p`` left the output part-written: weight files begun (the writer opens each at its full
    size) but not all of them holding the finished output's bytes."""
    return any(_weights(tmp) and _weights(tmp) != big.weights for tmp in _temporaries(out, p.pid))


class _Window:
    """How long a run spends from reaching ``start`` ("temp": its temporary folder appeared; "weights": it began
    writing weights) until the end of that stretch (exit; the weights written). Starts from the baseline and
    shrinks whenever a run gets through sooner, so that delays drawn from it stay inside the window under any
    load."""

    def __init__(self, seconds: float, start: str = "temp") -> None:
        self.seconds, self.start = seconds, start
        self.writing = False  # whether the last signal was sent while the weights were being written

    def _over(self, p: subprocess.Popen, out: Path) -> bool:
        return p.poll() is not None or (self.start == "weights" and _phase(p, out) == "written")

    def signal_inside(self, p: subprocess.Popen, out: Path, delay: float, sig: int) -> bool:
        """Wait for ``start``, then ``delay`` seconds, then send ``sig``; False if the run ended first."""
        self.writing = False
        if not _wait_for(p, out, self.start):
            return False
        seen = time.monotonic()
        while time.monotonic() - seen < delay and not self._over(p, out):
            time.sleep(0.002)
        if self._over(p, out):
            self.seconds = min(self.seconds, time.monotonic() - seen)
        if p.poll() is not None:
            return False
        self.writing = _phase(p, out) == "weights"
        p.send_signal(sig)
        return True


def test_sigkill_at_random_moments(big: Big, tmp_path):
    """12 kills: 5 anywhere in the run, 4 while the output is being written, 3 while --overwrite replaces an
    existing OUT (which must then be the old or the new output, never absent)."""
    rng = random.Random(20241007)
    out = tmp_path / "out"
    window = _Window(big.t_end - big.t_tmp)
    writing = _Window(big.t_written - big.t_weights, start="weights")
    outcomes = []
    for trial in range(12):
        overwrite = trial >= 9
        if overwrite:
            shutil.copytree(big.old_out, out)
        p = _start((big.prev, big.cur), out, *(["--overwrite"] if overwrite else []))
        if trial < 5:
            time.sleep(rng.uniform(0, big.t_end))
            p.kill()
        elif not overwrite:
            writing.signal_inside(p, out, rng.uniform(0, writing.seconds), signal.SIGKILL)
        else:
            window.signal_inside(p, out, rng.uniform(0, 1.1 * window.seconds), signal.SIGKILL)
        res = _finish(p)
        killed = res.code == -signal.SIGKILL
        assert killed or res.code == 0, res.stderr
        stale = _temporaries(out)
        mid_write = _part_written(p, out, big)
        state = _out_state(out, big, old_allowed=overwrite)
        if overwrite:
            assert state != "absent", "an existing OUT must never disappear"
        outcomes.append((trial, "killed" if killed else "finished", state, len(stale), mid_write))
        if out.exists():
            shutil.rmtree(out)  # the user removes it before rerunning
    print("kill trials (trial, outcome, OUT, stale temporary folders, killed while writing):", outcomes)
    assert sum(o[1] == "killed" and o[4] for o in outcomes) >= 2, outcomes  # kills left part-written outputs

    res = _finish(_start((big.prev, big.cur), out))  # the next run succeeds and removes what killed runs left
    assert res.code == 0, res.stderr
    assert leftovers(out) == []
    verify_output(out)
    assert _weights(out) == big.weights
    _inputs_unchanged(big)


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_interrupt_while_writing(big: Big, tmp_path, sig, code, word):
    rng = random.Random(int(sig))
    out = tmp_path / "out"
    window = _Window(big.t_written - big.t_weights, start="weights")
    interrupted = while_writing = 0
    for _ in range(6):
        p = _start((big.prev, big.cur), out)
        window.signal_inside(p, out, rng.uniform(0, window.seconds), sig)
        res = _finish(p)
        if res.code in (0, -sig):  # finished first; or the signal hit interpreter exit, where Python's handler is gone
            assert "tensors" in res.stdout and _out_state(out, big) == "new", (res.code, res.stdout, res.stderr)
        else:
            assert_one_line_error(res, code, word, "no partial output was left", "inputs are unchanged")
            interrupted += 1
            while_writing += window.writing
            _out_state(out, big)
        assert leftovers(out) == []  # the interrupted run removed its own temporary folder
        if out.exists():
            shutil.rmtree(out)
        if interrupted >= 2 and while_writing:
            break
    assert while_writing >= 1, (interrupted, while_writing)  # at least one signal landed while writing
    _inputs_unchanged(big)


def test_two_writers_of_one_out(big: Big, tmp_path):
    out = tmp_path / "out"
    a = _start((big.prev, big.cur), out, alpha="0.3")
    b = _start((big.prev, big.cur), out, alpha="0.5")
    ra, rb = _finish(a), _finish(b)
    assert sorted([ra.code, rb.code]) == [0, 1], (ra.stderr, rb.stderr)
    winner, loser = (ra, rb) if ra.code == 0 else (rb, ra)
    line = assert_one_line_error(loser, 1, str(out))
    assert "appeared while merging" in line or "already exists" in line
    verify_output(out)  # the card's hashes match every file: not a mix of two runs
    assert _weights(out) == (big.weights if winner is ra else big.old_weights)
    assert leftovers(out) == []
    _inputs_unchanged(big)


# -- a file-size limit in place of a full disk ---------------------------------------------------------------------
def _fsize_limit(nbytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


def _tiny_pair(root: Path, sizes: list[int], side_file_bytes: int = 0) -> tuple[Path, Path]:
    """PREV and CUR with one F32 tensor of each size (in elements) per shard, and optionally a big tokenizer.json."""
    paths = []
    for name, fill in (("prev", 1.0), ("cur", 2.0)):
        folder = root / name
        folder.mkdir()
        weight_map = {}
        for i, n in enumerate(sizes):
            shard = f"model-{i + 1:05d}-of-{len(sizes):05d}.safetensors"
            (folder / shard).write_bytes(st_tensors({f"w{i}": ("F32", [n], torch.full((n,), fill).numpy().tobytes())}))
            weight_map[f"w{i}"] = shard
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        if side_file_bytes:
            (folder / "tokenizer.json").write_text("x" * side_file_bytes)
        paths.append(folder)
    return paths[0], paths[1]


@pytest.mark.parametrize(
    "where,sizes,side,limit",
    [
        ("first weight file", [64 * 1024], 0, 32 * 1024),  # posix_fallocate fails first (EFBIG)
        ("second shard", [256, 64 * 1024], 0, 32 * 1024),  # after a finished first file
        ("side file copy", [256], 256 * 1024, 64 * 1024),  # weights fit, tokenizer.json does not
    ],
)
def test_file_size_limit_fails_cleanly(tmp_path, where, sizes, side, limit):
    prev, cur = _tiny_pair(tmp_path, sizes, side)
    out = tmp_path / "out"
    before = tree_state(tmp_path)
    res = _finish(_start((prev, cur), out, preexec=_fsize_limit(limit)))
    assert_one_line_error(res, 1, str(out), "File too large [EFBIG]", "file-size limit, ulimit -f", "--max-shard-size")
    assert not out.exists() and leftovers(out) == []
    assert tree_state(tmp_path) == before


# -- the output folder's own guarantees, in process ---------------------------------------------------------------
def test_out_appearing_during_a_merge_is_never_replaced_or_mixed(tmp_path):
    out = tmp_path / "out"
    staged = StagedFolder(out)
    with pytest.raises(MergeError) as e, staged as tmp:
        (tmp / "model.safetensors").write_bytes(b"ours")
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"theirs")
        staged.commit()
    assert e.value.exit_code == 1 and "appeared while merging" in e.value.message
    assert (out / "model.safetensors").read_bytes() == b"theirs" and len(list(out.iterdir())) == 1
    assert leftovers(out) == []


def test_interrupt_while_the_stage_threads_start(tiny_checkpoints, tmp_path, monkeypatch):
    """Ctrl-C landing between the reader's and the writer's start: the reader is stopped and joined before the
    temporary folder is removed (a reader left running kept feeding the input hasher, whose cleanup then failed)."""
    import apo_merge.engine.runner as runner

    class InterruptedWriterStart(threading.Thread):
        def start(self) -> None:
            if self.name == "apo-write":
                raise KeyboardInterrupt
            super().start()

    monkeypatch.setattr(runner.threading, "Thread", InterruptedWriterStart)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_merge(tiny_checkpoints["single_prev"], tiny_checkpoints["single_cur"], MergeOptions(0.3, device="cpu"), out)
    assert not [t for t in threading.enumerate() if t.name == "apo-read"]
    assert not out.exists() and leftovers(out) == []


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_temporaries_removed_only_when_provably_orphaned(tmp_path):
    out = tmp_path / "out"
    me, my_start = os.getpid(), _process_start(os.getpid())
    dead = _dead_pid()
    folders = {
        f".out.apo-tmp-{dead}-123-0123abcd": True,  # owner gone
        f".out.apo-tmp-{me}-{int(my_start) + 1}-0123abcd": True,  # pid reused by another process
        f".out.apo-tmp-{me}-{my_start}-0123abcd": False,  # owner alive
        f".out.apo-tmp-{me}-0-0123abcd": False,  # start time unknown and pid alive: not provable
        ".out.apo-tmp-mine": False,  # not our naming
        f".other.apo-tmp-{dead}-123-0123abcd": False,  # another OUT's
    }
    for name in folders:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x")
    target = tmp_path / "keep"
    target.mkdir()
    (tmp_path / f".out.apo-tmp-{dead}-124-0123abcd").symlink_to(target)  # a link is never followed or removed
    removed = {p.name for p in remove_stale_temporaries(out)}
    assert removed == {n for n, gone in folders.items() if gone}
    assert all((tmp_path / n).exists() for n, gone in folders.items() if not gone)
    assert target.is_dir() and (tmp_path / f".out.apo-tmp-{dead}-124-0123abcd").is_symlink()


def test_sigkill_during_callback_saves_never_loses_the_raw_weights(tmp_path):
    """APOCallback's save_raw folder (the theta_hat_t the next APO step needs) is old or new at every moment."""
    from safetensors.torch import load_file

    from apo_merge.callback import _save
    from tests.killing import sigkill_while_saving

    folder = tmp_path / "raw"

    def save(version: int) -> None:
        raw = {f"layer{i}.weight": torch.full((64, 64), float(version)) for i in range(8)}
        _save(torch.nn.Module(), raw, folder)

    def version_of(folder: Path) -> int:
        values = {float(t.unique().item()) for t in load_file(folder / "model.safetensors").values()}
        assert len(values) == 1, values
        return int(values.pop())

    finished = sigkill_while_saving(save, folder, ["model.safetensors"], version_of, trials=20, seed=0)
    assert max(finished) > 1  # kills landed after several saves, not only at the first
