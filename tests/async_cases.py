"""Asynchronous saves across ranks (run on every rank of a RankPool)."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh

import stashpoint
from stashpoint.demo.model import GPTConfig, make_model, shard_fsdp, train_step


def async_train_save(rank, world, path: str, mode: str) -> list[float]:
    """FSDP2 at ``world`` ranks: a lazy async save, then the optimizer step right away."""
    cfg = GPTConfig()
    model = shard_fsdp(make_model(cfg), init_device_mesh("cpu", (world,)))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, optim, cfg, 0, 12, rank, world)
    snapshot = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    engine = stashpoint.engine.staging.ThreadCopyEngine(delay_s=0.002) if mode == "lazy" else None
    handle = stashpoint.async_save(
        {"model": model, "optim": optim, "loader": {"step": 1}}, path, mode=mode, copy_engine=engine
    )
    train_step(model, optim, cfg, 1, 12, rank, world)  # changes every parameter
    handle.wait(60)
    return {k: v for k, v in snapshot.items()} if rank == 0 else None
