"""Training runs executed on every rank of a RankPool."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh

import stashpoint
from stashpoint.demo.model import GPTConfig, make_model, shard_fsdp, train_step

CFG = GPTConfig()
GLOBAL_BATCH = 12


def _fsdp(world: int, lr: float, momentum: float):
    mesh = init_device_mesh("cpu", (world,))
    model = shard_fsdp(make_model(CFG), mesh)
    optim = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return model, optim


def _state(model, optim, step: int) -> dict:
    rng = torch.get_rng_state()
    return {"model": model, "optim": optim, "loader": {"step": step}, "rng": stashpoint.PerRank(rng)}


def train_and_save(rank, world, steps: int, save_at: int, path: str) -> list[float]:
    """Uninterrupted run of ``steps``; checkpoint after ``save_at`` steps."""
    model, optim = _fsdp(world, lr=0.1, momentum=0.9)
    losses = []
    for step in range(steps):
        losses.append(train_step(model, optim, CFG, step, GLOBAL_BATCH, rank, world))
        if step + 1 == save_at:
            stashpoint.save(_state(model, optim, save_at), path, step=save_at, timeout_s=60)
    return losses


def resume(rank, world, steps: int, path: str) -> dict:
    model, optim = _fsdp(world, lr=0.5, momentum=0.9)  # wrong lr: the load must restore it
    state = _state(model, optim, -1)
    result = stashpoint.load(state, path, per_rank="drop", timeout_s=60)
    start = state["loader"]["step"]
    lr = optim.param_groups[0]["lr"]
    losses = [train_step(model, optim, CFG, step, GLOBAL_BATCH, rank, world) for step in range(start, steps)]
    return {"start": start, "losses": losses, "lr": lr, "bytes_read": result.bytes_read}


def save_2d(rank, world, path: str) -> None:
    """FSDP over TP on a 2x2 mesh (gives _StridedShard placements), one step of AdamW."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = make_model(CFG)
    for block in model.blocks:
        plan = {n: ColwiseParallel() for n in ("q", "k", "v", "up")}
        plan.update({"o": RowwiseParallel(), "down": RowwiseParallel()})
        parallelize_module(block, mesh["tp"], plan)
        block.heads = CFG.heads  # heads stay whole: dims are sliced per rank, not per head
    shard_fsdp(model, mesh["dp"])
    placements = {n: str(p.placements) for n, p in model.named_parameters()}
    stashpoint.save({"model": model}, path, timeout_s=60)
    return placements


def load_1d_and_resave(rank, world, src: str, dst: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    model = shard_fsdp(make_model(CFG, seed=123), mesh)
    stashpoint.load({"model": model}, src, timeout_s=60)
    stashpoint.save({"model": model}, dst, timeout_s=60)
