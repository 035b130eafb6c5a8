"""Hypothesis strategies for safetensors headers (random, valid, and mutated) and the properties they must keep.

Shared by tests/merge/test_fuzz_headers.py (a few thousand examples in CI) and bench/fuzz_headers.py
(100,000). The one allowed failure type is MergeError; anything else escaping the parser or the planner is a bug.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from hypothesis import strategies as st
from safetensors import deserialize

from apo_kernels.dtypes import ITEMSIZE, KERNEL_NAMES
from apo_merge.errors import MergeError
from apo_merge.io.checkpoint import Checkpoint
from apo_merge.io.header import FileHeader, TensorInfo, parse_header
from apo_merge.options import MergeOptions
from apo_merge.plan import make_plan

LABEL = "fuzz.safetensors"
DTYPES = sorted(ITEMSIZE)
_MAX_DIFFERENTIAL_BYTES = 1 << 20

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=4)),
    max_leaves=12,
)
names = st.text(min_size=0, max_size=12).filter(lambda s: s != "__metadata__")


@st.composite
def valid_headers(draw, dtypes: list[str] | None = None) -> tuple[dict, int]:
    """A header dict that tiles its data buffer exactly, and that buffer's size."""
    tensor_names = draw(st.lists(names, max_size=6, unique=True))
    specs = []
    for name in tensor_names:
        dtype = draw(st.sampled_from(dtypes or DTYPES))
        shape = draw(st.lists(st.integers(0, 6), max_size=3))
        specs.append((name, dtype, shape))
    header: dict = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3))
    pos = 0
    for name, dtype, shape in draw(st.permutations(specs)):  # byte order need not be key order
        n = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    order = draw(st.permutations(list(header)))
    return {k: header[k] for k in order}, pos


def _set_field(header: dict, name: str, key: str, value: object) -> None:
    if isinstance(header.get(name), dict):
        header[name][key] = value


@st.composite
def mutated_headers(draw) -> tuple[bytes, int]:
    """A valid header with one to three JSON-level and byte-level mutations: raw header bytes, data size."""
    header, size = draw(valid_headers())
    header = json.loads(json.dumps(header))
    tensors = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(["field", "offset", "dim", "drop_key", "add_key", "metadata", "size", "entry", "rename"])
        )
        entries = [k for k in header if k != "__metadata__" and isinstance(header[k], dict)]
        name = draw(st.sampled_from(entries)) if entries else None
        if kind == "field" and name is not None:
            _set_field(header, name, draw(st.sampled_from(["dtype", "shape", "data_offsets"])), draw(json_values))
        elif kind == "offset" and name is not None:
            offsets = header[name].get("data_offsets")
            if isinstance(offsets, list) and offsets:
                i = draw(st.integers(0, len(offsets) - 1))
                offsets[i] = draw(
                    st.one_of(
                        st.integers(-3, 3).map(lambda d, o=offsets[i]: o + d if isinstance(o, int) else d),
                        st.integers(-(2**66), 2**66),
                    )
                )
        elif kind == "dim" and name is not None:
            shape = header[name].get("shape")
            if isinstance(shape, list):
                shape.insert(
                    draw(st.integers(0, len(shape))), draw(st.one_of(st.integers(-2, 8), st.integers(0, 2**70)))
                )
        elif kind == "drop_key" and name is not None and isinstance(header[name], dict) and header[name]:
            header[name].pop(draw(st.sampled_from(sorted(header[name]))))
        elif kind == "add_key" and name is not None and isinstance(header[name], dict):
            header[name][draw(st.text(max_size=6))] = draw(json_values)
        elif kind == "metadata":
            header["__metadata__"] = draw(json_values)
        elif kind == "size":
            size = max(0, size + draw(st.integers(-9, 9)))
        elif kind == "entry":
            header[draw(names)] = draw(json_values)
        elif kind == "rename" and name is not None:
            header[draw(names)] = header.pop(name)
    raw = json.dumps(header).encode()
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "surrogate", "duplicate"]))
        i = draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw = raw[:i] + bytes([raw[i] ^ (1 << draw(st.integers(0, 7)))]) + raw[i + 1 :]
        elif op == "delete":
            raw = raw[:i] + raw[i + draw(st.integers(1, 8)) :]
        elif op == "insert":
            raw = raw[:i] + draw(st.binary(min_size=1, max_size=4)) + raw[i:]
        elif op == "truncate":
            raw = raw[:i]
        elif op == "surrogate":
            raw = raw.replace(b'"', b'"\\ud800', 1)
        elif op == "duplicate" and raw.endswith(b"}") and len(raw) > 2 and tensors and tensors[0] in header:
            raw = raw[:-1] + b", " + json.dumps({tensors[0]: header[tensors[0]]}).encode()[1:]
    return raw, size


def random_headers() -> st.SearchStrategy[tuple[bytes, int]]:
    """Arbitrary bytes, or arbitrary JSON, as a header."""
    as_json = json_values.map(lambda v: json.dumps(v).encode())
    objects = st.dictionaries(names, json_values, max_size=5).map(lambda v: json.dumps(v).encode())
    return st.tuples(st.one_of(st.binary(max_size=64), as_json, objects), st.integers(0, 64))


def check_parse(raw: bytes, data_size: int) -> dict[str, TensorInfo] | None:
    """parse_header either refuses with a one-line MergeError or returns tensors that tile the buffer exactly;
    whatever it accepts, the reference safetensors reader accepts too."""
    try:
        tensors, _ = parse_header(raw, data_size, LABEL)
    except MergeError as e:
        assert e.message.startswith(LABEL) and "\n" not in e.message and len(e.message) < 1000, e.message
        return None
    pos = 0
    for t in tensors.values():
        assert t.begin == pos and t.nbytes == math.prod(t.shape) * ITEMSIZE[t.dtype]
        pos = t.end
    assert pos == data_size
    if data_size <= _MAX_DIFFERENTIAL_BYTES:
        loaded = dict(deserialize(struct.pack("<Q", len(raw)) + raw + bytes(data_size)))
        assert set(loaded) == set(tensors)
    return tensors


def _checkpoint(label: str, raw: bytes, data_size: int, tensors: dict[str, TensorInfo]) -> Checkpoint:
    fh = FileHeader(Path(label) / "model.safetensors", 8 + len(raw) + data_size, 8 + len(raw), tensors, {})
    return Checkpoint(Path(label), label, [fh], {n: (fh, t) for n, t in tensors.items()})


plan_options = st.fixed_dictionaries(
    {
        "alpha": st.floats(allow_nan=False, allow_infinity=False, width=32),
        "dtype": st.sampled_from(["keep", "bf16", "fp16", "fp32", "int8"]),
        "max_shard_size": st.one_of(st.none(), st.integers(-2, 200), st.sampled_from(["1KB", "0.5KiB", "2B", "x"])),
        "on_missing": st.sampled_from(["error", "copy", "skip"]),
    }
)


def check_plan(
    prev: tuple[bytes, int, dict[str, TensorInfo]], cur: tuple[bytes, int, dict[str, TensorInfo]], options: dict
) -> None:
    """make_plan either refuses with MergeError or lays out files whose headers the hardened parser accepts."""
    options = dict(options)
    alpha = options.pop("alpha")
    try:
        plan = make_plan(_checkpoint("prev", *prev), _checkpoint("cur", *cur), MergeOptions(alpha, **options))
    except MergeError as e:
        assert "Traceback" not in e.message
        return
    names = []
    for f in plan.files:
        (n,) = struct.unpack("<Q", f.header[:8])
        assert n == len(f.header) - 8 and n % 8 == 0
        out = parse_header(f.header[8:], f.size - len(f.header), f.name)  # a MergeError here is a planner bug
        assert list(out[0]) == [p.name for p in f.pieces]
        for p in f.pieces:
            assert p.offset == len(f.header) + out[0][p.name].begin
            assert p.prev is None or (p.cur[1].dtype in KERNEL_NAMES and p.prev[1].dtype in KERNEL_NAMES)
        names += [p.name for p in f.pieces]
    assert sorted(names) == sorted(n for n in cur[2] if n in prev[2] or options["on_missing"] == "copy")


@st.composite
def header_pairs(draw) -> tuple[tuple[bytes, int], tuple[bytes, int]]:
    """CUR, and a PREV made from it (same names mostly; sometimes a dtype, shape or name changed)."""
    cur, cur_size = draw(valid_headers(dtypes=draw(st.sampled_from([list(KERNEL_NAMES), DTYPES]))))
    prev: dict = {}
    pos = 0
    for name, entry in cur.items():
        if name == "__metadata__":
            continue
        dtype, shape = entry["dtype"], list(entry["shape"])
        change = draw(st.sampled_from(["same"] * 6 + ["dtype", "shape", "drop", "rename"]))
        if change == "drop":
            continue
        if change == "dtype":
            dtype = draw(st.sampled_from(DTYPES))
        elif change == "shape":
            shape = draw(st.lists(st.integers(0, 6), max_size=3))
        elif change == "rename":
            name = draw(names)
        if name in prev:
            continue
        n = math.prod(shape) * ITEMSIZE[dtype]
        prev[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    return (json.dumps(prev).encode(), pos), (json.dumps(cur).encode(), cur_size)
