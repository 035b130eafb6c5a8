"""apo-train with ``checkpoint_format: dcp``: the extrapolate phase on each process's own FSDP2 shards (2 gloo
processes on the CPU, driving ``fully_shard`` directly: accelerate turns FSDP into DDP on a CPU), bit-identical to
the single-process step on the consolidated weights for world sizes 1, 2 and 2 -> 1 between rounds; kill -9 of a
rank mid-phase leaves nothing committed and the rerun gives the same bytes. And one whole run on one process in the
DCP format, equal to the Hugging Face format run tensor for tensor."""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from apo_merge import extrapolate_state_dict
from tests.merge import dcp_build

pytestmark = pytest.mark.slow
ALPHA = 0.3


def _full(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.clone() for k, v in full.items()}


def _read_dcp(folder: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, folder.with_suffix(".pt"))
    return torch.load(folder.with_suffix(".pt"))["model"]


def _phase_worker(rank: int, world: int, init_file: str, tmp: str, job: dict) -> None:
    """The extrapolate phase as apo-train runs it, on this rank's shards: read theta_hat_t into the model's
    layout, extrapolate in place, write the policy as DCP."""
    from apo_merge import shards
    from apo_trainer.extrapolate import extrapolate_shards_, read_previous

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    try:
        tmp = Path(tmp)
        if job.get("save_prev"):  # theta_hat_t as a previous round at this world size wrote it
            shards.save_dcp(dcp_build._sharded(torch.float32, 1, world).state_dict(), tmp / "prev-dcp")
        model = dcp_build._sharded(torch.float32, 2, world)  # theta_hat_{t+1}: the trained model in memory
        state = model.state_dict()
        prev = read_previous(str(tmp / job["prev"]), state)
        assert sum(p.numel() for p in prev.values()) == sum(t.to_local().numel() for t in state.values())
        extrapolate_shards_(prev=prev, state=state, alpha=ALPHA)

        def side(folder: Path) -> None:
            if job.get("kill"):  # every rank has written its shards; the commit has not happened
                os.kill(os.getpid(), signal.SIGKILL)

        shards.save_dcp(state, tmp / job["out"], side=side)
        full = _full(model)  # a collective
        if rank == 0:
            torch.save(full, tmp / f"{job['out']}.full.pt")
        dist.barrier()  # no rank tears gloo down while another still uses it (std::terminate in gloo)
    finally:
        dist.destroy_process_group()


def _phase(world: int, tmp: Path, **job) -> None:
    init = tmp / f"init-{job['out']}-{job.get('kill', 0)}"
    dcp_build.spawn(_phase_worker, (world, str(init), str(tmp), job), world)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """theta_hat_t as a Hugging Face folder and the consolidated weights of both rounds."""
    tmp = tmp_path_factory.mktemp("fsdp-phase")
    prev, cur = dcp_build._model(torch.float32, 1), dcp_build._model(torch.float32, 2)
    prev.save_pretrained(tmp / "prev-hf")
    want = extrapolate_state_dict(prev=prev.state_dict(), cur=cur.state_dict(), alpha=ALPHA)
    return tmp, want


def _same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    assert [n for n in want if not torch.equal(got[n], want[n])] == []


@pytest.mark.parametrize("world", [1, 2])
def test_sharded_phase_equals_consolidated_merge(pair, world):
    tmp, want = pair
    _phase(world, tmp, prev="prev-hf", out=f"hf-w{world}")  # round 0: theta_hat_0 is a Hugging Face folder
    _same(torch.load(tmp / f"hf-w{world}.full.pt"), want)
    _same(_read_dcp(tmp / f"hf-w{world}"), want)


@pytest.fixture(scope="module")
def world2(pair):
    """A world-2 round: its policy (``dcp-w2``) and theta_hat_t as that world wrote it (``prev-dcp``)."""
    tmp, want = pair
    _phase(2, tmp, prev="prev-hf", out="dcp-w2", save_prev=True)
    _same(_read_dcp(tmp / "dcp-w2"), want)
    return tmp, want


def test_two_to_one_between_rounds_through_dcp(world2):
    tmp, want = world2
    _phase(1, tmp, prev="prev-dcp", out="dcp-w1")  # the next round at world 1 reads theta_hat_t resharded
    _same(torch.load(tmp / "dcp-w1.full.pt"), want)


def test_kill9_of_a_rank_mid_phase_then_rerun_gives_the_same_bytes(world2):
    tmp, want = world2
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        _phase(2, tmp, prev="prev-dcp", out="killed", kill=1)
    assert not (tmp / "killed").exists()  # every shard was written, nothing committed
    _phase(2, tmp, prev="prev-dcp", out="killed")  # the rerun
    for name in ("__0_0.distcp", "__1_0.distcp"):
        assert (tmp / "killed" / name).read_bytes() == (tmp / "dcp-w2" / name).read_bytes()
    _same(_read_dcp(tmp / "killed"), want)


def test_dcp_run_equals_hf_run_on_one_process(tiny, reference_run, tmp_path, monkeypatch):
    import apo_merge.dcp
    from apo_trainer.loop import run
    from tests.trainer.conftest import tiny_config
    from tests.trainer.helpers import weights

    ref_out, ref_records = reference_run
    out = tmp_path / "out"
    exports, real_export = [], apo_merge.dcp.export_hf

    def counted(src, dst, *args, **kwargs):
        exports.append((Path(src).relative_to(out).as_posix(), Path(dst).name.startswith(".tmp-policy-hf-")))
        return real_export(src, dst, *args, **kwargs)

    monkeypatch.setattr(apo_merge.dcp, "export_hf", counted)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = run(tiny_config(tiny, out, alpha=0.3, checkpoint_format="dcp"), quiet=True)
    finally:
        torch.set_num_threads(before)
    assert [r["mean_score"] for r in records] == [r["mean_score"] for r in ref_records]
    for t in range(2):
        for part in ("trained", "policy"):
            assert (out / f"round-{t}" / part / ".metadata").is_file()
            assert not (out / f"round-{t}" / part / "model.safetensors").exists()
            _same(_read_dcp(out / f"round-{t}" / part), weights(ref_out / f"round-{t}" / part))
        assert (out / f"round-{t}" / "samples.jsonl").read_bytes() == (
            ref_out / f"round-{t}" / "samples.jsonl"
        ).read_bytes()
    _same(weights(out / "final-policy"), weights(ref_out / "round-1" / "policy"))
    assert (out / "final-policy" / "config.json").is_file() and (out / "final-policy" / "tokenizer.json").is_file()
    # round 1's sample, reference and train phases share one Hugging Face view of round 0's DCP policy (before,
    # each phase exported it again on every process), the final eval one of round 1's; final-policy is its own
    assert exports.count(("round-0/policy", True)) == 1 and exports.count(("round-1/policy", False)) == 1, exports
    assert len(exports) == len(set(exports)), exports
    assert exports == [("round-0/policy", True), ("round-1/policy", True), ("round-1/policy", False)], exports
    views = sorted(out.glob(".policy-hf-*"), key=lambda p: p.stat().st_mtime_ns)  # the newest two are kept
    assert [
        str((out / f"round-{t}" / "policy").resolve()) in (v / ".apo-source").read_text() for t, v in enumerate(views)
    ] == [True, True]


def test_dcp_format_refuses_peft():
    from apo_trainer.config import APOConfig
    from apo_trainer.errors import ConfigError

    cfg = APOConfig(model="m", prompts="p", output_dir="o", checkpoint_format="dcp", peft={"r": 2})
    with pytest.raises(ConfigError, match="checkpoint_format: dcp does not combine with peft"):
        cfg.validate()


def test_dcp_run_interrupted_mid_phases_resumes_to_the_same_tensors(tiny, reference_run, tmp_path, monkeypatch):
    from apo_trainer import store
    from apo_trainer.loop import run
    from tests.trainer.conftest import tiny_config
    from tests.trainer.helpers import weights

    ref_out, _ = reference_run
    out = tmp_path / "out"
    cfg = tiny_config(tiny, out, alpha=0.3, checkpoint_format="dcp", final_eval=False)

    def fail_at(*target):
        def hook(*at):
            if at == target:
                raise RuntimeError("injected fault")

        return hook

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for fault in ((0, "train", "mid"), (0, "extrapolate", "mid"), (1, "extrapolate", "mid")):
            monkeypatch.setattr(store, "fault_hook", fail_at(*fault))
            with pytest.raises(RuntimeError, match="injected fault"):
                run(cfg, quiet=True)
            assert store.RunStore(out).done(fault[0], fault[1]) is None
        monkeypatch.setattr(store, "fault_hook", None)
        run(cfg, quiet=True)  # resumes: the extrapolate phases read theta_hat_{t+1} back from DCP
    finally:
        torch.set_num_threads(before)
    assert not list(out.rglob(".tmp-*"))
    for t in range(2):
        _same(_read_dcp(out / f"round-{t}" / "policy"), weights(ref_out / f"round-{t}" / "policy"))
    _same(weights(out / "final-policy"), weights(ref_out / "round-1" / "policy"))


def test_policy_views_keep_the_newest_two(tmp_path):
    """A view is never replaced in place; exporting a new one removes all but it and the newest other one."""
    import os

    from apo_trainer.runtime import POLICY_VIEW, _drop_old_views

    views = [tmp_path / f"{POLICY_VIEW}-{i}" for i in range(4)]
    for i, v in enumerate(views):
        v.mkdir()
        (v / "model.safetensors").write_bytes(b"x")
        os.utime(v, ns=(i * 10**9, i * 10**9))
    (tmp_path / "round-0").mkdir()
    _drop_old_views(tmp_path, keep=views[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([views[1].name, views[3].name, "round-0"])
