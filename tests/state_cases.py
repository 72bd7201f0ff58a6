"""DDP, per-rank state and coordination checks, run on every rank of a RankPool."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import stashpoint


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))


def _stepped(model: torch.nn.Module) -> torch.optim.Optimizer:
    """An Adam optimizer for ``model`` after one step, so it has state."""
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    return opt


def save_ddp(rank, world, path: str) -> dict:
    model = DDP(_net(0))
    opt = _stepped(model)
    state = {
        "model": model,
        "optim": opt,
        "loader": {"epoch": 2, "offset": 100 * rank},  # differs per rank
        "rng": torch.get_rng_state(),  # differs per rank after different draws
        "seed": 1234,
    }
    torch.manual_seed(rank)
    state["rng"] = torch.get_rng_state()
    result = stashpoint.save(state, path, timeout_s=60)
    return {"written": result.bytes_written, "weight": model.module[0].weight.detach().clone()}


def load_plain(rank, world, path: str, policy) -> dict:
    """Load a DDP checkpoint into a plain module at another world size."""
    model = _net(99)
    opt = _stepped(model)
    state = {
        "model": model,
        "optim": opt,
        "loader": {},
        "rng": torch.zeros(5056, dtype=torch.uint8),
        "seed": 0,
    }
    before = model[0].weight.detach().clone()
    try:
        stashpoint.load(state, path, per_rank=_policy(policy), timeout_s=60)
    except stashpoint.errors.StashpointError as exc:
        unchanged = torch.equal(model[0].weight, before) and state["loader"] == {} and state["seed"] == 0
        return {"error": type(exc).__name__, "message": str(exc), "unchanged": unchanged}
    return {
        "loader": state["loader"],
        "seed": state["seed"],
        "weight": model[0].weight.detach().clone(),
        "rng_set": bool(state["rng"].any()),
    }


def _policy(name):
    if name == "sum_offsets":
        return lambda fqn, values, rank, world: (
            {"epoch": values[0]["epoch"], "offset": sum(v["offset"] for v in values)}
            if fqn == "loader"
            else values[0]
        )
    return name


def mismatched_save(rank, world, path: str) -> str:
    """Ranks disagree on a tensor's dtype: every rank gets a named error, none hangs."""
    x = torch.zeros(4, dtype=torch.float32 if rank == 0 else torch.bfloat16)
    try:
        stashpoint.save(
            {
                "x": torch.distributed.tensor.DTensor.from_local(
                    x,
                    torch.distributed.device_mesh.init_device_mesh("cpu", (world,)),
                    [torch.distributed.tensor.Shard(0)],
                    run_check=False,
                    shape=(8,),
                    stride=(1,),
                )
            },
            path,
            timeout_s=30,
        )
    except stashpoint.errors.StashpointError as exc:
        return type(exc).__name__
    return "saved"


def one_rank_fails_to_flatten(rank, world, path: str) -> str:
    """A bad state on one rank only: that rank's own error, RemoteRankError elsewhere."""
    state = {"x": torch.ones(2)}
    if rank == 1:
        state[""] = 1  # invalid name
    try:
        stashpoint.save(state, path, timeout_s=30)
    except stashpoint.errors.StashpointError as exc:
        dist.barrier()
        return type(exc).__name__
    return "saved"


def reinit_group(rank, world, path: str) -> bool:
    """Save, tear the process group down, build a new one, save again: no stale control group."""
    import os

    stashpoint.save({"x": torch.ones(4)}, path + "-a", timeout_s=30)
    store_file = path + "-rdzv2"
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    stashpoint.save({"x": torch.ones(4) * 2}, path + "-b", timeout_s=30)
    ok = os.path.exists(path + "-b/index.json")
    return ok
