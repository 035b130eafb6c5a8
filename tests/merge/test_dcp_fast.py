"""The torch-free DCP path: ``.metadata`` through stand-ins equals torch's reading; a chunk rewritten inside CUR's
``torch.save`` framing equals ``torch.save`` of the new tensor byte for byte (fp32/bf16/fp16/fp64, odd sizes, empty
and 0-d tensors); the same-layout merge writes the same storage files as the torch path and never imports torch,
nor does the export; a damaged chunk header is one line."""

from __future__ import annotations

import io
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from apo_merge import extrapolate_state_dict
from apo_merge.dcp import fast
from apo_merge.dcp.blob import MAX_FRAMING, Blob, NotCanonical
from apo_merge.dcp.reader import open_dcp
from apo_merge.options import MergeOptions
from tests.merge.helpers import REPO, assert_one_line_error, cli_env, leftovers, run_cli_in_process, tree_state

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(7, 3), (13,), (), (0, 4), (1025, 3), (3, 5, 7)]


def saved(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def blob_of(raw: bytes) -> Blob:
    return Blob(raw[:MAX_FRAMING], raw[-MAX_FRAMING:], len(raw), "test")


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_a_chunk_rewritten_in_its_framing_is_what_torch_save_writes(dtype, shape):
    g = torch.Generator().manual_seed(len(shape))
    old, new = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    blob = blob_of(saved(old))
    blob.check(str(dtype).removeprefix("torch."), shape, old.element_size())
    data = raw_bytes(new)
    head, tail = blob.framed(zlib.crc32(data))
    assert head + data + tail == saved(new)


@pytest.mark.parametrize(
    "tensor",
    [torch.arange(12.0)[3:], torch.arange(12.0).reshape(3, 4).t(), torch.ones(3, requires_grad=True)],
    ids=["view with an offset", "transposed", "requires_grad"],
)
def test_a_chunk_that_is_not_a_fresh_contiguous_tensor_is_left_to_torch(tensor):
    blob = blob_of(saved(tensor))
    with pytest.raises(NotCanonical):
        blob.check("float32", tuple(tensor.shape), 4)


def test_a_damaged_framing_is_left_to_torch():
    raw = bytearray(saved(torch.ones(5)))
    raw[-22:-18] = b"XXXX"  # the zip's end record
    with pytest.raises(NotCanonical):
        blob_of(bytes(raw))


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w32": torch.randn(7, 3, generator=g),
        "wbf": torch.randn(13, generator=g).bfloat16(),
        "w16": torch.randn(5, 2, 3, generator=g).half(),
        "w64": torch.randn(1025, generator=g).double(),
        "steps": torch.arange(5) + seed,  # copied unchanged
        "empty": torch.randn(0, 4, generator=g),
        "scale": torch.tensor(2.5 + seed),
    }


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    for name, seed in (("prev", 1), ("cur", 2)):
        dcp.save({"model": tensors(seed)}, storage_writer=dcp.FileSystemWriter(tmp_path / name, thread_count=2))
    return tmp_path / "prev", tmp_path / "cur"


def test_metadata_read_without_torch_equals_torchs_reading(pair):
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(pair[1]).read_metadata()
    ckpt = open_dcp(pair[1])
    assert sorted(ckpt.entries) == sorted(meta.state_dict_metadata)
    for fqn, e in ckpt.entries.items():
        md = meta.state_dict_metadata[fqn]
        assert (e.size, e.dtype) == (tuple(md.size), str(md.properties.dtype).removeprefix("torch."))
        stored = {k.offset: v for k, v in meta.storage_data.items() if k.fqn == fqn}
        for c, mc in zip(e.chunks, md.chunks, strict=True):
            info = stored[mc.offsets]
            assert (c.offsets, c.sizes) == (tuple(mc.offsets), tuple(mc.sizes))
            assert (c.file, c.offset, c.length) == (info.relative_path, info.offset, info.length)


def _merge(prev: Path, cur: Path, out: str, alphas: str, *, torch_path: bool = False) -> None:
    from apo_merge.api import run_merges

    if torch_path:
        saved_plan, fast.plan = fast.plan, lambda *a: None
    try:
        run_merges(prev, cur, MergeOptions(alpha=tuple(float(a) for a in alphas.split(","))), out)
    finally:
        if torch_path:
            fast.plan = saved_plan


def test_the_torch_free_merge_writes_the_torch_paths_bytes(pair, tmp_path):
    prev, cur = pair
    assert fast.plan(open_dcp(cur), _prev(prev), _kinds(prev, cur), MergeOptions(alpha=0.3)) is not None
    _merge(prev, cur, str(tmp_path / "fast-{alpha}"), "0.3,-1.5")
    _merge(prev, cur, str(tmp_path / "torch-{alpha}"), "0.3,-1.5", torch_path=True)
    for alpha in ("0.3", "-1.5"):
        names = sorted(p.name for p in cur.glob("*.distcp"))
        for name in names:
            assert (tmp_path / f"fast-{alpha}" / name).read_bytes() == (tmp_path / f"torch-{alpha}" / name).read_bytes()
        got = {k: torch.empty_like(v) for k, v in tensors(0).items()}
        dcp.load({"model": got}, checkpoint_id=tmp_path / f"fast-{alpha}")
        want = extrapolate_state_dict(prev=tensors(1), cur=tensors(2), alpha=float(alpha))
        for k, w in want.items():
            assert got[k].dtype == w.dtype and raw_bytes(got[k]) == raw_bytes(w), k


def _prev(path: Path):
    from apo_merge.dcp.sources import open_prev

    return open_prev(path, str(path))


def _kinds(prev: Path, cur: Path) -> dict:
    from apo_merge.dcp.merge import pair

    return pair(_prev(prev), open_dcp(cur))


def test_the_same_layout_merge_and_the_export_never_import_torch(pair, tmp_path):
    prev, cur = pair
    code = (
        "import sys\nfrom apo_merge.api import run_merges\nfrom apo_merge.dcp import export_hf\n"
        "from apo_merge.options import MergeOptions\n"
        f"run_merges({str(prev)!r}, {str(cur)!r}, MergeOptions(alpha=0.3), {str(tmp_path / 'out')!r})\n"
        f"export_hf({str(tmp_path / 'out')!r}, {str(tmp_path / 'hf')!r})\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
    from safetensors.torch import load_file

    got = load_file(tmp_path / "hf" / "model.safetensors")
    want = extrapolate_state_dict(prev=tensors(1), cur=tensors(2), alpha=0.3)
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape and raw_bytes(got[k]) == raw_bytes(w), k


def test_a_damaged_chunk_header_is_one_line(pair, tmp_path, keep_sigterm):
    prev, cur = pair
    ckpt = open_dcp(cur)
    chunk = ckpt.entries["model.w32"].chunks[0]
    with open(cur / chunk.file, "r+b") as f:
        f.seek(chunk.offset)
        f.write(b"JUNK")
    out = tmp_path / "out"
    before = tree_state(tmp_path, skip=out)
    res = run_cli_in_process(prev, cur, "--alpha", "0.3", "-o", out, "--quiet")
    assert_one_line_error(res, 1, chunk.file, "'model.w32'", "torch.load")
    assert not out.exists() and leftovers(out) == []
    assert tree_state(tmp_path, skip=out) == before


def test_a_chunk_only_torch_load_reads_sends_the_merge_through_torch(pair, tmp_path):
    """A chunk saved as a transposed view (valid for torch.load, not a fresh contiguous tensor): the torch-free
    path gives way mid-run, what it wrote is removed, and the torch path writes the right values."""
    prev, cur = pair
    chunk = open_dcp(cur).entries["model.w32"].chunks[0]
    g = torch.Generator().manual_seed(7)
    view = torch.randn(3, 7, generator=g).t()
    raw = saved(view)
    assert len(raw) == chunk.length
    with open(cur / chunk.file, "r+b") as f:
        f.seek(chunk.offset)
        f.write(raw)
    with pytest.raises(NotCanonical), open(cur / chunk.file, "rb") as f:
        open_dcp(cur).blob("model.w32", chunk, f.fileno())
    _merge(prev, cur, str(tmp_path / "out"), "0.3")
    got = {k: torch.empty_like(v) for k, v in tensors(0).items()}
    dcp.load({"model": got}, checkpoint_id=tmp_path / "out")
    want = extrapolate_state_dict(prev=tensors(1), cur={**tensors(2), "w32": view}, alpha=0.3)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and raw_bytes(got[k]) == raw_bytes(w), k
    assert leftovers(tmp_path / "out") == []


def test_strict_counts_the_same_new_infs_on_both_paths(pair, tmp_path):
    from apo_merge.errors import MergeError

    prev, cur = pair
    counts = []
    for torch_path in (False, True):
        out = tmp_path / f"out-{torch_path}"
        if torch_path:
            saved_plan, fast.plan = fast.plan, lambda *a: None
        try:
            with pytest.raises(MergeError, match="inf or NaN although both inputs were finite") as e:
                from apo_merge.api import run_merges

                run_merges(prev, cur, MergeOptions(alpha=1e30, strict=True), out)
        finally:
            if torch_path:
                fast.plan = saved_plan
        assert not out.exists() and leftovers(out) == []
        counts.append(int(str(e.value).split()[0]))
    assert counts[0] == counts[1] > 0


def test_every_torch_dtype_is_known_to_the_metadata_reader():
    from apo_merge.dcp.meta import TORCH_DTYPE_NAMES

    names = {str(getattr(torch, n)).removeprefix("torch.") for n in dir(torch)}
    assert {n for n in names if isinstance(getattr(torch, n, None), torch.dtype)} <= TORCH_DTYPE_NAMES


def test_a_dtype_outside_the_table_is_copied_through_torch(tmp_path):
    """complex128 has no row in apo_kernels' dtype table: the merge still copies it, through the torch path."""
    sides = {}
    for name, seed in (("prev", 1), ("cur", 2)):
        sides[name] = {**tensors(seed), "z": torch.randn(3, 2, dtype=torch.complex128) + seed}
        dcp.save({"model": sides[name]}, checkpoint_id=tmp_path / name)
    _merge(tmp_path / "prev", tmp_path / "cur", str(tmp_path / "out"), "0.3")
    got = {k: torch.empty_like(v) for k, v in sides["cur"].items()}
    dcp.load({"model": got}, checkpoint_id=tmp_path / "out")
    assert torch.equal(got["z"], sides["cur"]["z"])
    want = extrapolate_state_dict(prev=tensors(1), cur=tensors(2), alpha=0.3)
    for k, w in want.items():
        assert raw_bytes(got[k]) == raw_bytes(w), k
