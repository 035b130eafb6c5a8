"""Reading the inputs into the page cache ahead of the merge (POSIX_FADV_WILLNEED), one Prefetcher per merge.

A daemon thread asks the kernel to read PREV and CUR side by side, in read order, starting before torch is
imported so that the disk streams while the process starts. It stays at most half the available memory ahead of
the merge's reads, which the merge reports with ``consumed``; the pages are reclaimable page cache. All state
lives in the object: two merges in one process each have their own window.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from apo_merge.io.writer import advise

PREFETCH_STEP = 4 << 20  # one WILLNEED reads at most the device's readahead size (often 4-8 MiB)
# Pieces in flight at once: enough for the disk's bandwidth, few enough that the reads on the critical path
# (headers, file-system metadata for the output, torch's own files) do not queue behind gigabytes of readahead.
PREFETCH_DEPTH = 16
PATIENCE_S = 60.0  # a prefetcher whose readers stopped reading gives up after this long
FRESH_S = 60.0  # a file this prefetcher started in the last minute is not prefetched again


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 30


class Prefetcher:
    """A hint only: every error is ignored, and the merge is correct without it."""

    def __init__(self) -> None:
        self.read_bytes = 0  # input bytes the merge's readers have consumed (the window slides with it)
        self._started: dict[str, float] = {}  # real path -> when its prefetch started
        self._lock = threading.Lock()

    def consumed(self, n: int) -> None:
        """Called by the readers after each read (races between readers only blur the window)."""
        self.read_bytes += n

    def prefetch(self, *streams: Sequence[Path]) -> None:
        """Start reading files into the page cache in a background thread.

        Each stream is a list of files read in that order; streams advance together (PREV and CUR are read side
        by side). Files this prefetcher started in the last minute (e.g. from the CLI, before the engine asks
        again) are skipped.
        """
        now = time.monotonic()
        with self._lock:
            todo = []
            for stream in streams:
                fresh = [Path(p) for p in stream if now - self._started.get(os.path.realpath(p), -math.inf) > FRESH_S]
                self._started.update((os.path.realpath(p), now) for p in fresh)
                todo.append(fresh)
        if any(todo):
            threading.Thread(
                target=self.run, args=(todo, available_memory() // 2), name="apo-prefetch", daemon=True
            ).start()

    def checkpoints(self, *folders: str | os.PathLike) -> None:
        """``prefetch`` the weight files of local checkpoint folders (the CLI calls it first, before torch loads)."""

        def run() -> None:
            from apo_merge.io.checkpoint import open_checkpoint

            streams = []
            for folder in folders:
                # Not a local checkpoint, or a broken one: the merge itself reports it.
                with contextlib.suppress(Exception):
                    streams.append(_dcp_files(folder) or [h.path for h in open_checkpoint(folder).files])
            self.prefetch(*streams)

        threading.Thread(target=run, name="apo-prefetch-open", daemon=True).start()

    def ranges(self, ranges: Sequence[tuple[Path, int, int]]) -> None:
        """Start reading ``(file, offset, length)`` ranges into the page cache in this order, in a background
        thread: for a reader that moves between files (an export takes each tensor's chunks from every rank's
        file), where whole files one after another would leave all but the first cold."""
        threading.Thread(
            target=self._run_ranges, args=(list(ranges), available_memory() // 2), name="apo-prefetch", daemon=True
        ).start()

    def run(self, streams: list[list[Path]], budget: int) -> None:
        """Issue the reads of ``streams`` (on the calling thread), at most ``budget`` bytes ahead of the readers."""
        # Cut every stream into PREFETCH_STEP pieces and issue them in order of their position within their
        # stream, so that the streams advance in proportion to their sizes, as the merge reads them.
        try:
            pieces = []
            for stream in streams:
                sizes = [os.path.getsize(path) for path in stream]
                total, at = max(1, sum(sizes)), 0
                for path, size in zip(stream, sizes):
                    for off in range(0, size, PREFETCH_STEP):
                        pieces.append(((at + off) / total, path, off, min(PREFETCH_STEP, size - off)))
                    at += size
        except OSError:
            return
        pieces.sort(key=lambda p: p[0])
        self._run_ranges([p[1:] for p in pieces], budget)

    def _run_ranges(self, ranges: list[tuple[Path, int, int]], budget: int) -> None:
        fds: dict[Path, int] = {}
        try:
            pieces = []
            for path, start, length in ranges:
                if path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY)
                pieces += [
                    (fds[path], o, min(PREFETCH_STEP, start + length - o))
                    for o in range(start, start + length, PREFETCH_STEP)
                ]
            self._issue(pieces, budget)
        except OSError:
            pass
        finally:
            for fd in fds.values():
                os.close(fd)

    def _issue(self, pieces: list[tuple[int, int, int]], budget: int) -> None:
        """WILLNEED each (fd, offset, length) in order, at most ``budget`` bytes ahead of the readers and
        PREFETCH_DEPTH pieces ahead of the disk."""
        issued, base = 0, self.read_bytes
        for i, (fd, off, n) in enumerate(pieces):
            last, since = self.read_bytes, time.monotonic()
            while issued - (self.read_bytes - base) > budget:  # far enough ahead: wait for the readers
                if self.read_bytes != last:
                    last, since = self.read_bytes, time.monotonic()
                elif time.monotonic() - since > PATIENCE_S:
                    return
                time.sleep(0.05)
            advise(fd, off, n, "WILLNEED")
            issued += n
            if i >= PREFETCH_DEPTH:  # wait for an older piece to arrive: reading its last byte blocks until then
                old_fd, old_off, old_n = pieces[i - PREFETCH_DEPTH]
                os.pread(old_fd, 1, old_off + old_n - 1)


def _dcp_files(folder: str | os.PathLike) -> list[Path]:
    """A DCP folder's storage files, in the order one process merges them; none under torchrun with several ranks
    (each rank prefetches its own share once it knows it)."""
    from apo_merge.dcp.reader import dcp_root

    root = dcp_root(folder)
    if root is None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return []
    return sorted(root.glob("*.distcp"))
