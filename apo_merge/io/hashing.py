"""Content hashes of the inputs: taken from the bytes the engine reads anyway (``--hash-inputs``), or, by
default, only what is free: names, sizes and the SHA-256 the Hub cache names an LFS blob by.

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
thread only copies the bytes; SHA-256 runs on one thread per input, beside the merge. SHA-256 runs at about
1-1.5 GB/s per core, slower than a fast disk on a small machine, which is why it is opt-in.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from apo_merge.io.header import FileHeader

_CHUNK = 1 << 23
_SHA256_BLOB = re.compile(r"[0-9a-f]{64}")

# The hashes an output's card can record for its files. BLAKE3 (``b3sum`` prints it) runs at about 7 GB/s on one
# core against SHA-256's 2 (with SHA instructions): on two cores SHA-256 of the output costs a merge more wall time
# than anything but the disk. SHA-256 (``sha256sum``) is the Hub's LFS id. Inputs are always named by SHA-256.
OUTPUT_HASHES = ("blake3", "sha256")


def new_hasher(name: str = "sha256"):
    """A hashlib-style object (``update``, ``hexdigest``) for one of OUTPUT_HASHES."""
    if name == "blake3":
        return _blake3()()  # one thread: the merge's other stages use the other cores
    if name == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown hash {name!r}; use one of {', '.join(OUTPUT_HASHES)}")


def _blake3():
    """The blake3 package's hasher class; a MergeError naming the fix where the install lacks it."""
    try:
        from blake3 import blake3
    except ImportError:
        from apo_merge.errors import MergeError

        raise MergeError(
            "the blake3 package is not installed (apo-merge depends on it for the output hash); "
            "pip install blake3, or pass --output-hash sha256"
        ) from None
    return blake3


def check_available(name: str) -> None:
    """Raise the MergeError of ``new_hasher`` now, before any input is read, where hash ``name`` is missing."""
    if name == "blake3":
        _blake3()


@dataclass(frozen=True)
class FileDigest:
    name: str
    size: int
    sha256: str | None  # None: not computed (see ``listing``)


@dataclass(frozen=True)
class InputDigest:
    """The per-file hashes of one input and its content sha256 (see the module docstring)."""

    files: tuple[FileDigest, ...]  # sorted by name

    @property
    def sha256(self) -> str | None:
        """The content sha256, or None when some file's hash is unknown."""
        if any(f.sha256 is None for f in self.files):
            return None
        listing = "".join(f"{f.sha256}  {f.name}\n" for f in self.files)
        return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def digest(named_files: dict[str, tuple[int, str | None]]) -> InputDigest:
    """``{file name: (bytes, sha256 or None)}`` -> InputDigest."""
    names = sorted(named_files, key=lambda n: n.encode("utf-8"))
    return InputDigest(tuple(FileDigest(n, *named_files[n]) for n in names))


def hub_cache_sha256(path: Path) -> str | None:
    """The SHA-256 the Hub cache names a file's blob by, without reading the file; None when it does not.

    huggingface_hub stores LFS files as ``blobs/<sha256>`` (it checks the hash when it downloads) and links
    ``snapshots/<commit>/<file>`` to them; other files' blobs are named by their git sha1 (40 hex digits).
    """
    try:
        target = Path(os.readlink(path))
    except OSError:
        return None
    return target.name if target.parent.name == "blobs" and _SHA256_BLOB.fullmatch(target.name) else None


def listing(files: Iterable[Path], small: Iterable[Path] = (), *, hub: bool = False) -> InputDigest:
    """An input described without reading its weights: each file's name and size, its SHA-256 where the Hub
    cache names the blob by it (``hub``), else unknown; ``small`` files (an index, a config) are hashed."""
    named: dict[str, tuple[int, str | None]] = {}
    for path in files:
        named[path.name] = (os.path.getsize(path), hub_cache_sha256(path) if hub else None)
    for path in small:
        named[path.name] = hash_file(path)
    return digest(named)


def hash_file(path: Path, start: int = 0, hasher=None, name: str = "sha256") -> tuple[int, str]:
    """(bytes, hex digest) of ``path`` by hash ``name``, continuing ``hasher`` from byte ``start`` when given."""
    hasher = hasher or new_hasher(name)
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
