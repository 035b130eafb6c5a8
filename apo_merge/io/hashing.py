"""Content hashes of the inputs, taken from the bytes the engine reads anyway.

Definition (the model card states it too): an input's content sha256 is the SHA-256 of its ``sha256sum``
listing, i.e. of the lines ``"<sha256 of file>  <file name>\\n"`` for each of its weight files, sorted by file
name in byte order. Weight files: the .safetensors files the checkpoint is made of, plus
model.safetensors.index.json when present (a PEFT adapter: adapter_model.safetensors and adapter_config.json).
Each file's sha256 covers all of its bytes, so it equals ``sha256sum FILE`` and the SHA256 the Hub shows for an
LFS file.

Cost: the engine reads every byte of CUR, and every byte of PREV that CUR also holds, in CUR's tensor order.
``StreamHasher`` hashes a file's bytes as they pass whenever they arrive in file order (CUR always; PREV when it
is laid out like CUR, the usual case for two rounds of one trainer) and reads only what it did not see from disk
at the end (PREV laid out differently, PREV-only tensors): no file is read twice in the usual case. The reader
thread only copies the bytes; SHA-256 runs on one thread per input, beside the merge.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from apo_merge.io.header import FileHeader

_CHUNK = 1 << 23


@dataclass(frozen=True)
class FileDigest:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class InputDigest:
    """The per-file hashes of one input and its content sha256 (see the module docstring)."""

    files: tuple[FileDigest, ...]  # sorted by name

    @property
    def sha256(self) -> str:
        listing = "".join(f"{f.sha256}  {f.name}\n" for f in self.files)
        return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def digest(named_files: dict[str, tuple[int, str]]) -> InputDigest:
    """``{file name: (bytes, sha256)}`` -> InputDigest."""
    names = sorted(named_files, key=lambda n: n.encode("utf-8"))
    return InputDigest(tuple(FileDigest(n, *named_files[n]) for n in names))


def hash_file(path: Path, start: int = 0, hasher=None) -> tuple[int, str]:
    """(bytes, sha256) of ``path``, continuing ``hasher`` from byte ``start`` when given."""
    hasher = hasher or hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        size = start
        while block := f.read(_CHUNK):
            hasher.update(block)
            size += len(block)
    return size, hasher.hexdigest()


class _Lane:
    """A worker thread that hashes copies of the engine's buffers, so the reader thread only copies."""

    def __init__(self, max_pending: int) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.thread: threading.Thread | None = None

    def submit(self, hasher, data: bytes) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="apo-hash", daemon=True)
            self.thread.start()
        self.queue.put((hasher, data))

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            item[0].update(item[1])
            self.queue.task_done()
        self.queue.task_done()

    def drain(self) -> None:
        if self.thread is not None:
            self.queue.join()

    def close(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None


class _Stream:
    __slots__ = ("hasher", "pos", "lane")

    def __init__(self, path: Path, prefix: int, lane: _Lane) -> None:
        self.hasher, self.pos, self.lane = hashlib.sha256(), 0, lane
        with open(path, "rb") as f:  # the header, which the engine does not read again
            while self.pos < prefix and (block := f.read(min(_CHUNK, prefix - self.pos))):
                self.hasher.update(block)
                self.pos += len(block)


class StreamHasher:
    """Per-file SHA-256 fed with ``update(path, offset, data)`` from the engine's reader thread.

    Bytes that continue a file exactly where its hash stands are copied to a hashing thread (one per group of
    files, e.g. one for PREV and one for CUR, so both hash in parallel); others are ignored and read again at
    ``finish`` (from the first byte the hash has not seen), so the result never depends on the read order.
    Use as a context manager (or call ``close``) to stop the threads.
    """

    def __init__(self, *groups: Iterable[FileHeader], max_pending: int = 8) -> None:
        self._streams: dict[Path, _Stream] = {}
        self._lanes = [_Lane(max_pending) for _ in groups]
        for lane, group in zip(self._lanes, groups):
            for f in group:
                if f.path not in self._streams:
                    self._streams[f.path] = _Stream(f.path, f.data_start, lane)

    def update(self, path: Path, offset: int, data: memoryview) -> None:
        stream = self._streams.get(path)
        if stream is not None and offset == stream.pos and len(data):
            stream.pos += len(data)
            stream.lane.submit(stream.hasher, bytes(data))  # ``data`` is valid only during this call

    def finish(self) -> dict[Path, tuple[int, str]]:
        """(bytes, sha256) per file, reading from disk whatever the stream did not cover."""
        for lane in self._lanes:
            lane.drain()
        return {p: hash_file(p, s.pos, s.hasher) for p, s in self._streams.items()}

    def close(self) -> None:
        for lane in self._lanes:
            lane.close()

    def __enter__(self) -> StreamHasher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
