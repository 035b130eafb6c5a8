"""Helpers shared by the benchmarks: cold page cache, measured subprocesses, tables.

Linux only (posix_fadvise, mincore, /proc).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


def evict(paths: Iterable[Path]) -> None:
    """Drop the files' pages from the page cache (fsync first: dirty pages cannot be dropped)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` now in the page cache (mincore over a read-only mapping, as fincore does)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            return sum(b & 1 for b in bytes(vec)) * mmap.PAGESIZE
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file below ``folder`` and the folder itself (what a durable output needs)."""
    for path in files_under(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def floor_io(reads: Sequence[Path], writes: Sequence[tuple[str, int]], out: Path, tuned: bool) -> dict[str, float]:
    """The I/O floor of a merge: read ``reads`` (16 MiB sequential reads), then write each (name, byte count) of
    ``writes`` into the new folder ``out`` and fsync; ``tuned``: with apo-merge's I/O hints (WILLNEED ahead of the
    reads, writeback started every 64 MiB and finished windows dropped). Returns the read and write seconds."""
    t0 = time.perf_counter()
    buf = memoryview(bytearray(16 << 20))
    step = 4 << 20  # one WILLNEED reads at most the readahead size
    for path in reads:
        fd = os.open(path, os.O_RDONLY)
        if tuned:
            for off in range(0, os.fstat(fd).st_size, step):
                os.posix_fadvise(fd, off, step, os.POSIX_FADV_WILLNEED)
        while os.readv(fd, [buf]):
            pass
        os.close(fd)
    t1 = time.perf_counter()
    out.mkdir()
    window = 64 << 20
    for name, size in writes:
        fd = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        done = 0
        while done < size:
            done += os.write(fd, buf[: min(size - done, len(buf))])
            if tuned and done % window < len(buf):  # start writeback; wait for and drop the window before
                _sync_file_range(fd, done - window, window, 2)
                if done >= 2 * window:
                    _sync_file_range(fd, done - 2 * window, window, 7)
                    os.posix_fadvise(fd, done - 2 * window, window, os.POSIX_FADV_DONTNEED)
        os.fsync(fd)
        os.close(fd)
    fsync_tree(out)
    return {"read_s": t1 - t0, "write_s": time.perf_counter() - t1}


def _sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> None:
    fn = _libc.sync_file_range
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn(fd, max(0, offset), nbytes, flags)


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return pids


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


@dataclass
class Measured:
    """One timed subprocess: wall seconds, exit code, peak memory in bytes (sampled over its process tree)."""

    seconds: float
    returncode: int
    peak_rss: int  # sampled VmHWM, the kernel's high-water mark of RSS (anonymous + file pages + shmem)
    peak_anon: int  # sampled RssAnon (heap, stacks, pinned buffers): what cannot be reclaimed
    peak_file: int  # sampled RssFile: mapped file pages (reclaimable page cache)
    output_tail: str
    cpu_seconds: float = 0.0  # user + system CPU of the process and the children it waited for
    paused_s: float = 0.0  # wall time the process tree was seen stopped (SIGSTOP), or the sampler itself was


def run_measured(
    cmd: Sequence[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    after: callable | None = None,
    sample_s: float = 0.005,
) -> Measured:
    """Run ``cmd``, sampling its memory; ``after()`` runs inside the timed window once it exits (e.g. an fsync)."""
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    done = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    paused = [0.0]

    def sample() -> None:
        last = time.perf_counter()
        while not done.is_set():
            total = {k: 0 for k in peaks}
            stopped = False
            for pid in _tree(proc.pid):
                for k, v in _status_kb(pid).items():
                    if k in total:
                        total[k] += v
                stopped = stopped or _state(pid) in ("T", "t")
            for k in peaks:
                peaks[k] = max(peaks[k], total[k])
            time.sleep(sample_s)
            now = time.perf_counter()
            if stopped:  # a shared machine: something else stopped the run
                paused[0] += now - last
            elif now - last > 0.25:  # the harness itself was stopped (or starved) that long
                paused[0] += now - last - sample_s
            last = now

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read()  # the child's output is small; reading it also waits for EOF
    _, status, usage = os.wait4(proc.pid, 0)  # (its ru_maxrss may count the harness's RSS at fork time)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    if after is not None and proc.returncode == 0:
        after()
    seconds = time.perf_counter() - t0
    sampler.join()
    return Measured(
        seconds,
        proc.returncode,
        peaks["VmHWM"] * 1024,
        peaks["RssAnon"] * 1024,
        peaks["RssFile"] * 1024,
        output.decode(errors="replace")[-2000:],
        usage.ru_utime + usage.ru_stime,
        paused[0],
    )


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def machine() -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": len(os.sched_getaffinity(0)),
    }
    try:
        meminfo = Path("/proc/meminfo").read_text().split()
        info["mem_total_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
        models = [
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ]
        info["cpu"] = models[0] if models else platform.processor()
    except (OSError, ValueError):
        pass
    return info


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([line(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, cells[1:])])


def as_dict(m: Measured) -> dict[str, object]:
    d = asdict(m)
    d.pop("output_tail")
    return d
