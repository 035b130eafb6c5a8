"""APOCallback under FSDP2 (2 gloo processes on the CPU): every rank extrapolates its own shards in place, and the
gathered result is bit-identical to the single-process step on the consolidated weights; world sizes 1 and 2, and
2 -> 1 between rounds through the DCP folder that ``save_raw`` writes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from apo_merge import extrapolate_state_dict
from tests.merge import dcp_build

pytestmark = pytest.mark.slow
ALPHA = 0.3


def _full(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.is_initialized():
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.clone() for k, v in full.items()}


def _train_step(model, seed: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, dcp_build.CONFIG["vocab_size"], (2, 8), generator=gen)
    model(ids).logits.float().square().mean().backward()
    opt.step()


def _rounds(model, cb, rank: int, seeds: list[int]) -> dict[str, dict[str, torch.Tensor]]:
    """Run the callback around one optimizer step per round; the consolidated weights at each point."""
    out = {"start": _full(model)}
    st = SimpleNamespace(global_step=0, max_steps=1, is_world_process_zero=rank == 0)
    for i, seed in enumerate(seeds):
        cb.on_train_begin(None, st, None, model=model)
        _train_step(model, seed)
        out[f"raw{i}"] = _full(model)
        cb.on_train_end(None, st, None, model=model)
        out[f"out{i}"] = _full(model)
    return out


def _worker(rank: int, world: int, init_file: str, tmp: str, mode: str) -> None:
    from apo_merge import APOCallback

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if mode == "fresh":
            model = dcp_build._sharded(torch.float32, 1, world)
            cb = APOCallback(ALPHA, save_raw=Path(tmp) / f"raw-w{world}")
            local = next(model.parameters()).to_local()
            got = _rounds(model, cb, rank, [10, 11])
            got["prev_elements"] = sum(t.numel() for t in cb.prev_raw.values())
            assert next(model.parameters()).to_local().data_ptr() == local.data_ptr()  # in place
        else:  # resume at this world size from the raw DCP folder a 2-process run saved
            model = dcp_build._sharded(torch.float32, 1, world)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            full = torch.load(Path(tmp) / "w2.pt")["out1"]
            set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
            cb = APOCallback(ALPHA, prev=Path(tmp) / "raw-w2")
            got = _rounds(model, cb, rank, [12])
        if rank == 0:
            torch.save(got, Path(tmp) / f"{mode}-w{world}.pt" if mode != "fresh" else Path(tmp) / f"w{world}.pt")
        dist.barrier()  # no rank tears gloo down while another still uses it (std::terminate in gloo)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp: Path, mode: str) -> dict:
    dcp_build.spawn(_worker, (world, str(tmp / f"init-{mode}-{world}"), str(tmp), mode), world)
    return torch.load(tmp / (f"w{world}.pt" if mode == "fresh" else f"{mode}-w{world}.pt"))


def _expect_step(got: dict, prev: str, cur: str, out: str) -> None:
    want = extrapolate_state_dict(prev=got[prev], cur=got[cur], alpha=ALPHA)
    assert want.keys() == got[out].keys()
    for name, w in want.items():
        assert torch.equal(w, got[out][name]), name
    assert any(not torch.equal(got[cur][n], got[out][n]) for n in want)  # the step did something


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp-callback")
    return tmp, {w: _spawn(w, tmp, "fresh") for w in (1, 2)}


@pytest.mark.parametrize("world", [1, 2])
def test_sharded_step_equals_consolidated_merge(runs, world):
    _, got = runs
    _expect_step(got[world], "start", "raw0", "out0")  # theta_hat_0 = the model round 1 starts from
    _expect_step(got[world], "raw0", "raw1", "out1")  # raw vs raw, never the extrapolated weights
    n = sum(t.numel() for t in got[world]["start"].values())
    assert got[world]["prev_elements"] == n // world  # each rank keeps its shards only (every dim-0 size is even)


def test_save_raw_writes_dcp_of_the_raw_weights(runs):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tmp, got = runs
    dcp_to_torch_save(tmp / "raw-w2", tmp / "raw-w2.pt")
    saved = torch.load(tmp / "raw-w2.pt")["model"]
    assert saved.keys() == got[2]["raw1"].keys()
    assert all(torch.equal(saved[n], got[2]["raw1"][n]) for n in saved)


def test_two_to_one_between_rounds_through_dcp(runs):
    tmp, got2 = runs
    got = _spawn(1, tmp, "resume")
    assert all(torch.equal(got["start"][n], got2[2]["out1"][n]) for n in got["start"])
    got["prev_raw"] = got2[2]["raw1"]
    _expect_step(got, "prev_raw", "raw0", "out0")


def _layout_worker(rank: int, world: int, init_file: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from apo_merge import APOCallback

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = dcp_build._model(torch.float32, 1)
        cb = APOCallback(ALPHA)
        st = SimpleNamespace(global_step=0, max_steps=1, is_world_process_zero=rank == 0)
        cb.on_train_begin(None, st, None, model=model)
        fully_shard(model)
        before = {k: v.to_local().clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=r"^APOCallback: the model's shards changed layout"):
            cb.on_train_end(None, st, None, model=model)
        assert all(torch.equal(before[k], v.to_local()) for k, v in model.state_dict().items())  # nothing written
        dist.barrier()  # no rank tears gloo down while another still uses it (std::terminate in gloo)
    finally:
        dist.destroy_process_group()


def test_layout_change_between_rounds_is_refused(tmp_path):
    dcp_build.spawn(_layout_worker, (2, str(tmp_path / "init")), 2)


def _mixed_worker(rank: int, world: int, init_file: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = dcp_build._model(torch.float32, 1)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        _train_step(model, 3)
        # The sharded parameters (what the callback extrapolates) are the fp32 masters; bf16 is only the gathered
        # copy used for compute.
        assert {p.to_local().dtype for p in model.parameters()} == {torch.float32}
        assert {t.dtype for t in model.state_dict().values()} == {torch.float32}
        dist.barrier()  # no rank tears gloo down while another still uses it (std::terminate in gloo)
    finally:
        dist.destroy_process_group()


def test_mixed_precision_shards_are_fp32_masters(tmp_path):
    dcp_build.spawn(_mixed_worker, (2, str(tmp_path / "init")), 2)


def test_zero3_and_fsdp1_refused_naming_fsdp2():
    from apo_merge import APOCallback

    model = torch.nn.Linear(2, 2)
    model.weight.ds_id = 0  # how DeepSpeed ZeRO-3 marks its partitioned parameters
    with pytest.raises(ValueError, match="use FSDP2"):
        APOCallback(ALPHA).on_train_begin(None, SimpleNamespace(global_step=0, max_steps=1), None, model=model)
