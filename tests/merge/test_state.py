"""apo_merge.state: the one in-memory extrapolation (state dicts, tensor lists) behind APOCallback and apo-train."""

from __future__ import annotations

import pytest
import torch

import apo_merge
from apo_kernels import extrapolate
from apo_merge import state
from apo_merge.state import StateMismatchError

ALPHA = 0.3


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _pair(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    prev = {
        "a": torch.randn(17, 5, generator=g).to(torch.bfloat16),
        "b": torch.randn(300, generator=g),
        "ids": torch.arange(4),
        "c": torch.randn(3, 3, generator=g, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
    }
    cur = {
        n: (t + 1 if not t.is_floating_point() else t + 0.01 * torch.randn(t.shape, generator=g).to(t.dtype))
        for n, t in prev.items()
    }
    prev["b"] = prev["b"].double()  # another dtype than cur's: read in its own dtype
    return prev, cur


def test_every_in_memory_function_takes_prev_and_cur_by_keyword_only():
    from apo_trainer.extrapolate import extrapolate_state_

    prev, cur = _pair()
    for f in (apo_merge.extrapolate_state_dict, apo_merge.extrapolate_state_dict_, extrapolate_state_):
        with pytest.raises(TypeError, match="positional"):
            f(prev, cur, ALPHA)
    with pytest.raises(TypeError, match="positional"):
        apo_merge.extrapolate_tensors_([prev["a"]], [cur["a"]], ALPHA)


def test_state_dict_equals_the_kernel_name_by_name():
    prev, cur = _pair()
    before = {n: t.clone() for n, t in cur.items()}
    for out_dtype in (None, torch.float32):
        out = apo_merge.extrapolate_state_dict(prev=prev, cur=cur, alpha=ALPHA, out_dtype=out_dtype)
        assert list(out) == list(cur)
        for n in ("a", "b", "c", "empty"):
            assert _equal(out[n], extrapolate(prev[n], cur[n], ALPHA, out_dtype=out_dtype)), n
        assert torch.equal(out["ids"], cur["ids"]) and out["ids"].data_ptr() != cur["ids"].data_ptr()
    assert all(_equal(cur[n], before[n]) for n in cur)  # inputs untouched

    want = apo_merge.extrapolate_state_dict(prev=prev, cur=cur, alpha=ALPHA)
    assert apo_merge.extrapolate_state_dict_(prev=prev, cur=cur, alpha=ALPHA) == 4  # a, b, c, empty
    assert all(_equal(cur[n], want[n]) for n in cur)


def test_swapped_prev_and_cur_is_another_model():
    # What the keyword-only signatures guard against: the order matters.
    prev, cur = _pair()
    right = apo_merge.extrapolate_state_dict(prev=prev, cur=cur, alpha=ALPHA)
    swapped = apo_merge.extrapolate_state_dict(prev=cur, cur=prev, alpha=ALPHA)
    assert not torch.equal(right["a"], swapped["a"])


def _tied_model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16, bias=False))
    m[1].weight = m[0].weight  # tied: one Parameter under two names
    m.register_buffer("steps", torch.tensor([3]))
    return m


def test_tied_weights_are_computed_once():
    model = _tied_model()
    prev = {n: t.clone() - 0.5 for n, t in model.state_dict().items() if n != "1.weight"}  # save_pretrained drops it
    prev["steps"] = torch.tensor([2])
    want = extrapolate(prev["0.weight"], model[0].weight.detach(), ALPHA)
    out = apo_merge.extrapolate_state_dict(prev=prev, cur=model.state_dict(), alpha=ALPHA)
    assert out["1.weight"] is out["0.weight"]  # still tied in the result
    assert apo_merge.extrapolate_state_dict_(prev=prev, cur=model.state_dict(), alpha=ALPHA) == 1
    assert _equal(model[0].weight.detach(), want) and _equal(out["0.weight"], want)  # once, not twice
    assert model[1].weight is model[0].weight and model.steps.item() == 3


def test_a_tensor_listed_twice_is_updated_once():
    prev, cur = _pair()
    w = cur["a"].clone()
    want = extrapolate(prev["a"], w, ALPHA)
    apo_merge.extrapolate_tensors_(prev=[prev["a"], prev["a"]], cur=[w, w], alpha=ALPHA)
    assert _equal(w, want)


@pytest.mark.parametrize("views", [lambda w: (w[:2], w), lambda w: (w[1:], w[:3])], ids=["prefix", "partial"])
def test_overlapping_tensors_are_refused_before_writing(views):
    w = torch.randn(4, 6)
    first, second = views(w)
    before = w.clone()
    cur = {"x": first, "y": second}
    prev = {n: torch.zeros(t.shape) for n, t in cur.items()}
    with pytest.raises(StateMismatchError, match="share part of their memory") as e:
        apo_merge.extrapolate_state_dict_(prev=prev, cur=cur, alpha=ALPHA)
    assert e.value.kind == "overlap" and str(e.value).count("\n") == 0
    assert torch.equal(w, before)
    disjoint = {"x": w[:2], "y": w[2:]}  # one storage, no shared element: fine
    apo_merge.extrapolate_state_dict_(
        prev={n: torch.zeros(t.shape) for n, t in disjoint.items()}, cur=disjoint, alpha=ALPHA
    )


@pytest.mark.parametrize(
    "edit, kind, names",
    [
        (lambda p, c: p.pop("c"), "names", ["c"]),  # a floating tensor of cur lacks in prev
        (lambda p, c: p.__setitem__("extra", torch.ones(1)), "names", ["extra"]),  # prev holds another model's
        (lambda p, c: p.__setitem__("c", torch.ones(2, 3)), "shape", ["c"]),
        (lambda p, c: p.__setitem__("ids", torch.arange(5)), "shape", ["ids"]),
        (lambda p, c: p.__setitem__("c", torch.ones(3, 3, dtype=torch.int32)), "dtype", ["c"]),
        (lambda p, c: p.__setitem__("c", torch.ones(3, 3, dtype=torch.float8_e4m3fn)), "dtype", ["c"]),
    ],
    ids=["missing", "extra", "shape", "shape-int", "dtype-int", "dtype-fp8"],
)
def test_mismatches_are_one_line_and_nothing_is_written(edit, kind, names):
    prev, cur = _pair()
    edit(prev, cur)
    before = {n: t.clone() for n, t in cur.items()}
    for f in (apo_merge.extrapolate_state_dict_, apo_merge.extrapolate_state_dict):
        with pytest.raises(StateMismatchError) as e:
            f(prev=prev, cur=cur, alpha=ALPHA)
        assert isinstance(e.value, ValueError) and e.value.kind == kind and e.value.names == names
        assert str(e.value).count("\n") == 0 and names[0] in str(e.value)
        assert all(_equal(cur[n], before[n]) for n in cur)  # "a", "b" come first: checked before any write


def test_list_length_and_shape_errors():
    with pytest.raises(ValueError, match="2 cur tensors but 1 prev"):
        apo_merge.extrapolate_tensors_(prev=[torch.ones(2)], cur=[torch.ones(2), torch.ones(2)], alpha=ALPHA)
    with pytest.raises(StateMismatchError, match=r"tensor 1: shape \(3,\) in prev, \(2,\) in cur"):
        apo_merge.extrapolate_tensors_(
            prev=[torch.ones(2), torch.ones(3)], cur=[torch.ones(2), torch.ones(2)], alpha=ALPHA
        )


def test_groups_bound_the_prev_tensors_moved_at_once(monkeypatch):
    prev, cur = _pair()
    want = apo_merge.extrapolate_state_dict(prev=prev, cur=cur, alpha=ALPHA)
    calls = []
    real = state.extrapolate_many_
    monkeypatch.setattr(state, "extrapolate_many_", lambda o, p, c, a: calls.append(len(c)) or real(o, p, c, a))
    monkeypatch.setattr(state, "GROUP_BYTES", 1000)  # a: 170 bf16 (340 B), b: 300 fp32 (1200 B), c: 72 B, empty
    apo_merge.extrapolate_state_dict_(prev=prev, cur=cur, alpha=ALPHA)
    assert calls == [2, 2]  # [a, b] reaches 1000 bytes, then [c, empty]
    assert all(_equal(cur[n], want[n]) for n in cur)


@pytest.mark.gpu
@pytest.mark.parametrize("prev_on", ["cuda", "cpu"])
def test_tensors_in_place_on_cuda_equal_the_cpu_twin(prev_on, monkeypatch):
    """On the device, in place over a model's parameter list (a tied one listed twice), prev on the device or
    moved there group by group: the same bits as the CPU twin."""
    prev, cur = _pair()
    names = ["a", "b", "c", "empty"]
    want = {n: extrapolate(prev[n], cur[n], ALPHA) for n in names}
    monkeypatch.setattr(state, "GROUP_BYTES", 1000)  # several groups, so prev moves in pieces
    live = [cur[n].cuda() for n in names]
    pointers = [t.data_ptr() for t in live]
    prevs = [prev[n].to(prev_on) for n in names]
    apo_merge.extrapolate_tensors_(prev=[*prevs, prevs[0]], cur=[*live, live[0]], alpha=ALPHA)
    assert [t.data_ptr() for t in live] == pointers and all(t.is_cuda for t in live)
    for n, t in zip(names, live, strict=True):
        assert _equal(t.cpu(), want[n]), n
