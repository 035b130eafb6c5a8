"""Issue 15's edges: paths that used to exit 0 with a wrong result or lose a user's folder, each pinned here."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import torch

from apo_merge.api import Hooks, run_merge
from apo_merge.options import MergeOptions
from tests.merge.helpers import st_tensors

TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
ST = {v: k for k, v in TORCH.items()}


def _data(path: Path) -> bytes:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 + n :]


def _write(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        n: (ST[t.dtype], list(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes()) for n, t in tensors.items()
    }
    (folder / "model.safetensors").write_bytes(st_tensors(spec))
    return folder


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


# -- --on-missing copy with --dtype: a CUR-only float tensor is converted with one rounding --------------------------
SPECIAL = [
    1.0,
    2.0,
    3.0,
    -4.5,
    1.0 + 2**-9 + 2**-20,
    1.0 + 2**-8 + 2**-30,
    -0.0,
    float("inf"),
    float("nan"),
    3.0e38,
    1e-40,
]


@pytest.mark.parametrize("out_dtype,src", [("bf16", "F32"), ("fp32", "BF16"), ("fp16", "F32"), ("bf16", "F64")])
def test_on_missing_copy_converts_cur_only_tensors_exactly(tmp_path, out_dtype, src):
    shared = torch.linspace(-1, 1, 6, dtype=torch.float32)
    x64 = torch.tensor(SPECIAL, dtype=torch.float64)
    extra = x64.to(TORCH[src])
    tail = torch.tensor([7.0, 8.0, 9.0, 10.0], dtype=torch.float32)  # read past the end of `extra` shows here
    prev = _write(tmp_path / "prev", {"shared": shared, "tail": tail})
    cur = _write(tmp_path / "cur", {"extra": extra, "shared": shared * 2, "tail": tail})
    out = tmp_path / "out"
    report = run_merge(prev, cur, MergeOptions(0.3, device="cpu", dtype=out_dtype, on_missing="copy"), out)
    assert report.copied_cur_only == ["extra"]
    got = _read(out / "model.safetensors")["extra"]
    want_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[out_dtype]
    assert got.dtype == want_dtype
    # float64 reference: the CUR value (exact in float64), rounded once to nearest-even in the output dtype.
    exact = extra.double()
    if want_dtype == torch.float32 or src != "F64":
        want = exact.to(torch.float32).to(want_dtype)  # exact -> fp32 is exact here, one rounding after it
    else:
        want = torch.tensor([float(v) for v in exact], dtype=torch.float64)
        want = torch.stack([_round_once(v.item(), want_dtype) for v in want])
    assert torch.equal(got.isnan(), want.isnan())
    ok = ~want.isnan()
    bits = {torch.float32: torch.int32}.get(want_dtype, torch.int16)
    assert torch.equal(got[ok].view(bits), want[ok].view(bits))
    assert torch.equal(_read(out / "model.safetensors")["tail"], tail)


def _round_once(v: float, dtype: torch.dtype) -> torch.Tensor:
    """float64 -> dtype with a single round-to-nearest-even (not through fp32): the nearer of the two neighbours."""
    if v != v or v in (float("inf"), float("-inf")) or v == 0:
        return torch.tensor(v, dtype=dtype)
    lo = torch.tensor(v, dtype=torch.float64).to(torch.float32).to(dtype)
    cands = {lo.view(torch.int16).item() + d for d in (-1, 0, 1)} & set(range(-(2**15), 2**15))
    best = min(
        (torch.tensor([c], dtype=torch.int16).view(dtype)[0] for c in cands),
        key=lambda t: (abs(t.double().item() - v), t.view(torch.int16).item() & 1),
    )
    return best


# -- --overwrite checks what it replaces at the moment of the exchange ----------------------------------------------
@pytest.mark.parametrize("before", ["absent", "earlier output"])
def test_overwrite_keeps_a_folder_that_appeared_during_the_merge(tiny_checkpoints, tmp_path, before):
    from apo_merge.errors import MergeError
    from tests.merge.helpers import leftovers

    prev, cur, out = tiny_checkpoints["single_prev"], tiny_checkpoints["single_cur"], tmp_path / "out"
    if before == "earlier output":
        run_merge(prev, cur, MergeOptions(0.3, device="cpu"), out)
    calls = []

    def user_moves_in(n: int) -> None:  # while the merge writes, the user puts their own folder at OUT
        if not calls:
            if out.exists():
                import shutil

                shutil.rmtree(out)
            out.mkdir()
            (out / "notes.txt").write_text("mine")
        calls.append(n)

    with pytest.raises(MergeError, match="replaced during the merge"):
        run_merge(prev, cur, MergeOptions(0.3, device="cpu", overwrite=True), out, hooks=Hooks(progress=user_moves_in))
    assert calls and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    assert leftovers(out) == []


# -- the model card does not publish the user's file system --------------------------------------------------------
def _card(out: Path) -> str:
    return (out / "README.md").read_text(encoding="utf-8")


def _all_text(out: Path) -> str:
    """The card and every weight file's header (its metadata is published too)."""
    text = _card(out)
    for f in out.glob("*.safetensors"):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        text += raw[8 : 8 + n].decode("utf-8")
    return text


def test_card_names_local_inputs_without_absolute_paths(tiny_checkpoints, tmp_path, monkeypatch):
    import shutil

    runs = tmp_path / "home" / "alice" / "runs"
    runs.mkdir(parents=True)
    shutil.copytree(tiny_checkpoints["single_prev"], runs / "round-1")
    shutil.copytree(tiny_checkpoints["single_cur"], runs / "round-2")
    run_merge(
        runs / "round-1", str(runs / "round-2"), MergeOptions(0.3, device="cpu"), tmp_path / "abs"
    )  # absolute, as given
    monkeypatch.chdir(tmp_path / "home" / "alice")
    run_merge("runs/round-1", "runs/round-2", MergeOptions(0.3, device="cpu"), tmp_path / "rel")  # relative, as given
    for out in (tmp_path / "abs", tmp_path / "rel"):
        assert str(tmp_path) not in _all_text(out)
    assert "| prev | `round-1` |" in _card(tmp_path / "abs") and "| cur | `round-2` |" in _card(tmp_path / "abs")
    assert "| prev | `runs/round-1` |" in _card(tmp_path / "rel")
    report = run_merge(
        "runs/round-1", "runs/round-2", MergeOptions(0.3, device="cpu", card_paths="absolute"), tmp_path / "full"
    )
    assert f"| cur | `{runs / 'round-2'}` |" in _card(report.output)
    from apo_merge.verify import verify_output

    for out in ("abs", "rel", "full"):
        verify_output(tmp_path / out)


def test_card_paths_through_the_cli(tiny_checkpoints, tmp_path):
    from tests.merge.helpers import run_cli_in_process

    prev, cur = tiny_checkpoints["single_prev"], tiny_checkpoints["single_cur"]
    res = run_cli_in_process(prev, cur, "--alpha", "0.3", "-o", tmp_path / "o", "--device", "cpu", "-q")
    assert res.code == 0, res.stderr
    assert str(cur) not in _all_text(tmp_path / "o") and f"| cur | `{cur.name}` |" in _card(tmp_path / "o")
    res = run_cli_in_process(
        prev, cur, "--alpha", "0.3", "-o", tmp_path / "a", "--device", "cpu", "-q", "--card-paths", "absolute"
    )
    assert res.code == 0, res.stderr
    assert f"| cur | `{cur}` |" in _card(tmp_path / "a")


def test_input_name_with_a_non_utf8_byte_merges(tiny_checkpoints, tmp_path):
    import shutil

    odd = Path(os.fsdecode(bytes(tmp_path) + b"/cur\xff"))
    shutil.copytree(tiny_checkpoints["single_cur"], odd)
    out = tmp_path / "out"
    run_merge(tiny_checkpoints["single_prev"], odd, MergeOptions(0.3, device="cpu"), out)
    assert "| cur | `cur\\xff` |" in _card(out)
    from apo_merge.verify import verify_output

    verify_output(out)


# -- re-shard planning is linear in the number of tensors ------------------------------------------------------------
def test_reshard_planning_sizes_each_tensor_once(tmp_path, monkeypatch):
    from apo_merge import plan as plan_module
    from apo_merge.io.checkpoint import open_checkpoint

    n = 16_000
    tensors = {f"t{i:05d}": ("F32", [2], b"\0" * 8) for i in range(n)}
    for side in ("prev", "cur"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "model.safetensors").write_bytes(st_tensors(tensors))
    prev, cur = open_checkpoint(tmp_path / "prev"), open_checkpoint(tmp_path / "cur")
    calls = []
    real = plan_module.Piece.nbytes
    monkeypatch.setattr(plan_module.Piece, "nbytes", property(lambda piece: calls.append(1) or real.fget(piece)))
    plan = plan_module.make_plan(prev, cur, MergeOptions(0.3, max_shard_size=8 * 4000))  # 4000 tensors per shard
    assert len(plan.files) == 4 and plan.n_tensors == n
    assert len(calls) <= 8 * n  # linear; the quadratic planner re-summed the open shard per tensor
