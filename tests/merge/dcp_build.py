"""Small DCP checkpoints of a Llama-shaped model, saved by 1 or 2 gloo processes under FSDP2 ``fully_shard``.

``build`` saves several checkpoints from one process group (one spawn); ``load_full`` loads a DCP folder into an
FSDP2 model at a given world size and writes the gathered full state dict, so that tests see what ``dcp.load``
really put into the shards.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=96,
    max_position_embeddings=64,
)


def _model(dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # a different "round" per seed, within one model
            p.add_((torch.randn(p.shape, generator=gen) * 0.02).to(dtype))
    return model


def _sharded(dtype: torch.dtype, seed: int, world: int):
    from torch.distributed.fsdp import fully_shard

    model = _model(dtype, seed)
    if world > 0:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def spawn(fn, args: tuple, nprocs: int) -> None:
    """``mp.spawn(fn, args, nprocs)`` whose workers leave through ``os._exit`` once ``fn`` has returned: gloo's
    threads can abort the interpreter's finalization ("terminate called without an active exception", SIGABRT)
    after all the work is done, which would fail a run that succeeded."""
    mp.spawn(_exit_after, args=(fn, *args), nprocs=nprocs, join=True)


def _exit_after(rank: int, fn, *args) -> None:
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _init(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _build_worker(rank: int, world: int, init_file: str, specs: list[tuple]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    _init(rank, world, init_file)
    try:
        for folder, seed, dtype, optim in specs:
            model = _sharded(dtype, seed, world)
            state = {"model": model.state_dict()}
            if optim:
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
                model(torch.arange(8).reshape(1, 8)).logits.float().sum().backward()
                opt.step()
                state["optimizer"] = get_optimizer_state_dict(model, opt)
            dcp.save(state, checkpoint_id=folder)
        dist.barrier()  # no rank tears gloo down while another still uses it (std::terminate in gloo)
    finally:
        dist.destroy_process_group()


def build(world: int, specs: list[tuple[Path, int, torch.dtype, bool]]) -> None:
    """Save one DCP checkpoint per ``(folder, seed, dtype, with_optimizer)`` from ``world`` FSDP2 processes."""
    with tempfile.TemporaryDirectory() as tmp:
        specs = [(str(f), s, d, o) for f, s, d, o in specs]
        spawn(_build_worker, (world, os.path.join(tmp, "init"), specs), world)


def _load_worker(rank: int, world: int, init_file: str, jobs: list[tuple]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    _init(rank, world, init_file)
    try:
        for folder, dtype, out in jobs:
            model = _sharded(dtype, 12345, world)  # other values everywhere: the load must overwrite them all
            state = {"model": model.state_dict()}
            dcp.load(state, checkpoint_id=folder)
            model.load_state_dict(state["model"])
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                torch.save({k: v.clone() for k, v in full.items()}, out)
        dist.barrier()  # no rank tears gloo down while another still uses it (std::terminate in gloo)
    finally:
        dist.destroy_process_group()


def load_full(world: int, jobs: list[tuple[Path, torch.dtype, Path]]) -> None:
    """For each ``(dcp folder, dtype, out file)``: dcp.load into an FSDP2 model at ``world``, save its full state."""
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(str(f), d, str(o)) for f, d, o in jobs]
        spawn(_load_worker, (world, os.path.join(tmp, "init"), jobs), world)
