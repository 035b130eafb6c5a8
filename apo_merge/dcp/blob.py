"""One DCP chunk as ``torch.save`` wrote it (a stored, uncompressed zip), read and rewritten without torch.

A chunk's blob is a few small records (``data.pkl``: which tensor; version files; ``.data/serialization_id``), the
tensor's raw bytes as the record ``data/0``, and the zip's central directory. ``Blob`` finds the data record and
checks the pickle describes exactly a fresh contiguous tensor over all of that record (what ``torch.save`` of the
merge's output writes); ``Blob.framed`` gives the framing for new data of the same size: the CRC-32 patched in the
local header and the central directory, and the serialization id (two 20-digit numbers: a combined hash of the
record names, unchanged, and a combined hash of the records' CRC-32s) recomputed. The result is the bytes
``torch.save`` writes for a tensor of that dtype, shape and data.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from typing import Any

_LOCAL = b"PK\x03\x04"
_CENTRAL = b"PK\x01\x02"
_EOCD = b"PK\x05\x06"
_EOCD64 = b"PK\x06\x06"
_SERIAL = "/.data/serialization_id"
_M64 = (1 << 64) - 1
MAX_FRAMING = 1 << 14  # bytes read at each end of a chunk for its records (torch.save's are about 1.5 KB)
# torch.save's storage classes (pickled as torch.<Name>Storage) by torch dtype name
STORAGES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


class NotCanonical(Exception):
    """Not a blob this module reads and rewrites byte for byte: another writer's layout, or a damaged one. The
    torch path reads it instead (through ``torch.load(weights_only=True)``), and names what is wrong."""


@dataclass(frozen=True)
class _Storage:
    dtype: str
    key: str
    numel: int


@dataclass(frozen=True)
class _Rebuilt:
    storage: Any
    offset: Any
    size: Any
    stride: Any
    requires_grad: Any
    hooks: Any


def _rebuild(*args: Any) -> _Rebuilt:
    if len(args) not in (6, 7):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 with an unexpected argument count")
    return _Rebuilt(*args[:6])


class _TensorUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in STORAGES:
            return ("storage-type", STORAGES[name])
        raise NotCanonical(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], tuple)):
            raise NotCanonical("persistent id")
        return _Storage(pid[1][1], str(pid[2]), int(pid[4]))


def combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t, as torch's zip writer folds record CRCs into the serialization id."""
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & _M64) + (seed >> 2)) & _M64)) & _M64


@dataclass
class _Record:
    name: str
    local: int  # the local header's offset in the blob
    central: int  # the central directory entry's offset in the blob
    data: int  # where the record's bytes start
    size: int
    crc: int
    described: bool = False  # the CRC follows the data (a data descriptor), the local header holds 0


class Blob:
    """The framing of one chunk's blob, read from its first and last bytes (``head``, ``tail``)."""

    def __init__(self, head: bytes, tail: bytes, length: int, where: str) -> None:
        self.length, self.where = length, where
        if length < 22 or len(tail) < 22 or not head.startswith(_LOCAL):
            raise NotCanonical("no zip header")
        self.tail_at = length - len(tail)
        self.records = self._records(head, tail)
        data = [r for r in self.records if r.name.split("/", 1)[-1].startswith("data/")]
        pkl = [r for r in self.records if r.name.endswith("/data.pkl")]
        serial = [r for r in self.records if r.name.endswith(_SERIAL)]
        if len(data) != 1 or len(pkl) != 1 or len(serial) != 1 or serial[0] is not self.records[-1]:
            raise NotCanonical("records")
        self.data, self.pkl, self.serial = data[0], pkl[0], serial[0]
        if (
            self.pkl.data + self.pkl.size > len(head)
            or self.data.data > len(head)
            or self.data.data + self.data.size < self.tail_at
        ):
            raise NotCanonical("layout")  # the pickle after the data, or framing larger than read
        self.head = head[: self.data.data]
        self.tail = tail[self.data.data + self.data.size - self.tail_at :]
        self.tensor = self._tensor(head[self.pkl.data : self.pkl.data + self.pkl.size])

    def _records(self, head: bytes, tail: bytes) -> list[_Record]:
        end = tail.rfind(_EOCD)
        if end < 0 or end + 22 > len(tail):
            raise NotCanonical("has no zip end record (truncated?)")
        count, cd_size, cd_at = struct.unpack_from("<HII", tail, end + 10)
        if 0xFFFFFFFF in (cd_size, cd_at) or count == 0xFFFF:
            at = tail.rfind(_EOCD64, 0, end)
            if at < 0:
                raise NotCanonical("zip64 end record missing")
            count, cd_size, cd_at = struct.unpack_from("<QQQ", tail, at + 32)
        rel = cd_at - self.tail_at
        if rel < 0 or rel + cd_size > len(tail):
            raise NotCanonical("central directory outside the tail read")
        out, pos = [], rel
        for _ in range(count):
            if tail[pos : pos + 4] != _CENTRAL:
                raise NotCanonical("damaged zip directory")
            method, crc, csize, usize, n_name, n_extra, n_comment = struct.unpack_from("<HxxxxIIIHHH", tail, pos + 10)
            local_at = struct.unpack_from("<I", tail, pos + 42)[0]
            name = tail[pos + 46 : pos + 46 + n_name].decode("utf-8", "replace")
            extra = tail[pos + 46 + n_name : pos + 46 + n_name + n_extra]
            if 0xFFFFFFFF in (csize, usize, local_at):
                usize, csize, local_at = _zip64(extra, usize, csize, local_at)
            if method != 0 or csize != usize:
                raise NotCanonical("a compressed record")
            out.append(_Record(name, local_at, self.tail_at + pos, -1, usize, crc))
            pos += 46 + n_name + n_extra + n_comment
        for r in out:
            if r.local + 30 > len(head) and r.local < self.tail_at:
                raise NotCanonical("local header outside the head read")
            src, at = (head, r.local) if r.local + 30 <= len(head) else (tail, r.local - self.tail_at)
            if src[at : at + 4] != _LOCAL:
                raise NotCanonical("damaged zip record")
            n_name, n_extra = struct.unpack_from("<HH", src, at + 26)
            r.data = r.local + 30 + n_name + n_extra
            r.described = bool(struct.unpack_from("<H", src, at + 6)[0] & 8)
        return out

    def _tensor(self, raw: bytes) -> _Rebuilt:
        import io

        try:
            t = _TensorUnpickler(io.BytesIO(raw)).load()
        except NotCanonical:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged pickle: torch.load names it
            raise NotCanonical("data.pkl") from e
        if not isinstance(t, _Rebuilt) or not isinstance(t.storage, _Storage):
            raise NotCanonical("not one tensor")
        return t

    def check(self, dtype: str, sizes: tuple[int, ...], itemsize: int) -> None:
        """The pickle is a fresh contiguous ``dtype`` tensor of ``sizes`` over all of ``data/<key>``."""
        t, numel = self.tensor, 1
        for s in sizes:
            numel *= s
        stride, acc = [], 1
        for s in reversed(sizes):
            stride.append(acc)
            acc *= s
        ok = (
            t.storage.dtype == dtype
            and t.offset == 0
            and tuple(t.size) == tuple(sizes)
            and tuple(t.stride) == tuple(reversed(stride))
            and t.requires_grad is False
            and not t.hooks
            and t.storage.numel == numel
            and self.data.name.endswith(f"/data/{t.storage.key}")
            and self.data.size == numel * itemsize
        )
        if not ok:
            raise NotCanonical("tensor")

    def framed(self, crc: int) -> tuple[bytes, bytes]:
        """The (head, tail) around new data whose CRC-32 is ``crc``."""
        crcs = [crc if r is self.data else r.crc for r in self.records[:-1] if r.size]  # torch skips empty ones
        combined = 0
        for c in crcs:
            combined = combine(combined, c)
        old = self.tail[self.serial.data - self.data.data - self.data.size :][: self.serial.size]
        if len(old) != 40 or not old.isdigit():
            raise NotCanonical("serialization id")
        sid = old[:20] + b"%020d" % combined
        sid_crc = _crc(sid)
        head, tail = bytearray(self.head), bytearray(self.tail)
        base = self.data.data + self.data.size  # tail[0] is at this blob offset
        for r, value in ((self.data, crc), (self.serial, sid_crc)):
            struct.pack_into("<I", tail, r.central - base + 16, value)
            if r.described:  # after the data, with or without the descriptor's signature
                at = r.data + r.size - base
                at += 4 if tail[at : at + 4] == b"PK\x07\x08" else 0
                struct.pack_into("<I", tail, at, value)
            else:
                buf, at = (head, r.local) if r is self.data else (tail, r.local - base)
                struct.pack_into("<I", buf, at + 14, value)
        tail[self.serial.data - base : self.serial.data - base + 40] = sid
        return bytes(head), bytes(tail)


def _crc(data) -> int:
    import zlib

    return zlib.crc32(data)


def _zip64(extra: bytes, usize: int, csize: int, local_at: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            vals, at = [], pos + 4
            for v in (usize, csize, local_at):
                if v == 0xFFFFFFFF:
                    vals.append(struct.unpack_from("<Q", extra, at)[0])
                    at += 8
                else:
                    vals.append(v)
            return vals[0], vals[1], vals[2]
        pos += 4 + n
    return usize, csize, local_at
