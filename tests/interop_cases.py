"""Rank-pool tasks for interop tests: FSDP2 models saved and loaded by DCP and by stashpoint."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import stashpoint
from stashpoint.convert import load_hf


def fsdp_model(world: int, seed: int, stepped: bool = True):
    """A small MLP with dims that do not divide by 2 or 3, FSDP2-sharded, after one AdamW step."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 10))
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    if stepped:
        model(torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))).square().sum().backward()
        optim.step()
    return model, optim


def _full(model, optim) -> dict:
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        "model": get_model_state_dict(model, options=opts),
        "optim": get_optimizer_state_dict(model, optim, options=opts),
    }


def _sharded(model, optim) -> dict:
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}


def dcp_save(rank: int, world: int, path: str) -> None:
    model, optim = fsdp_model(world, seed=0)
    dcp.save(_sharded(model, optim), checkpoint_id=path)


def stashpoint_save(rank: int, world: int, path: str) -> None:
    model, optim = fsdp_model(world, seed=0)
    stashpoint.save({"model": model, "optim": optim}, path)


def stashpoint_load(rank: int, world: int, path: str) -> dict | None:
    """Load into a differently initialised model; rank 0 returns the full state."""
    model, optim = fsdp_model(world, seed=1)
    res = stashpoint.load({"model": model, "optim": optim}, path)
    full = _full(model, optim)
    return {"state": full, "bytes_read": res.bytes_read} if rank == 0 else {"bytes_read": res.bytes_read}


def dcp_load(rank: int, world: int, path: str) -> dict | None:
    model, optim = fsdp_model(world, seed=1)
    state = _sharded(model, optim)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optim, state["optim"])
    full = _full(model, optim)  # a collective: every rank gathers
    return full if rank == 0 else None


def hf_load(rank: int, world: int, path: str) -> dict:
    model, _ = fsdp_model(world, seed=1, stepped=False)
    res = load_hf(model, path)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=opts)
    return {"state": full if rank == 0 else None, "bytes_read": res.bytes_read}
