"""Writing safetensors files front to back with writeback kept moving, and exact reads.

Every WRITEBACK_BYTES the writer starts writeback of the new window with sync_file_range and waits for the
previous one, then drops its pages: the final fsync has little left to do and the page cache does not fill with
dirty output. The space is reserved up front (a full disk fails before hours of work).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

from apo_merge.errors import MergeError

WRITEBACK_BYTES = 1 << 26  # start writeback of the output every this many bytes

SFR_WAIT_BEFORE, SFR_WRITE, SFR_WAIT_AFTER = 1, 2, 4


def advise(fd: int, offset: int, length: int, advice: str) -> None:
    """posix_fadvise where the platform has it: a hint, the result is correct without it."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, getattr(os, f"POSIX_FADV_{advice}"))


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


SYNC_FILE_RANGE = _load_sync_file_range()


def pread_exact(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; a file that ends early is a MergeError naming ``path``."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise MergeError(
                f"{path}: file ended early at byte {offset + got} (changed or truncated while "
                "merging); check the input and rerun"
            )
        got += n


class SafetensorsWriter:
    """One output file of ``size`` bytes starting with ``header``, its data written at absolute offsets."""

    def __init__(self, path: Path, header: bytes, size: int) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.end = self.started = self.dropped = 0  # written / handed to writeback / on disk and dropped
        try:
            try:  # reserve the space now: a full disk fails here, before hours of work
                os.posix_fallocate(self.fd, 0, size)
            except OSError as e:
                if e.errno not in (95, 22):  # EOPNOTSUPP / EINVAL: the filesystem cannot preallocate
                    raise
            self.write(memoryview(header), 0)
        except BaseException:
            self.close()
            raise

    def write(self, data: memoryview | bytes, offset: int) -> None:
        data = memoryview(data)
        written = 0
        while written < len(data):
            written += os.pwrite(self.fd, data[written:], offset + written)
        self.end = offset + len(data)
        if SYNC_FILE_RANGE is not None and self.end - self.started >= WRITEBACK_BYTES:
            # Start writing the new window, then wait for the previous one and drop its pages: the disk always
            # has a window in flight and at most two windows of output sit in memory.
            SYNC_FILE_RANGE(self.fd, self.started, self.end - self.started, SFR_WRITE)
            if self.started > self.dropped:
                SYNC_FILE_RANGE(
                    self.fd, self.dropped, self.started - self.dropped, SFR_WAIT_BEFORE | SFR_WRITE | SFR_WAIT_AFTER
                )
                advise(self.fd, self.dropped, self.started - self.dropped, "DONTNEED")
                self.dropped = self.started
            self.started = self.end

    def finish(self) -> None:
        os.fsync(self.fd)
        advise(self.fd, 0, 0, "DONTNEED")
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
