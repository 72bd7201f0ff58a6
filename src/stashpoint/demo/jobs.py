"""The demo's training jobs, run on every rank (see :mod:`stashpoint.demo.run`).

Imports of torch and the package happen inside the functions: ``stashpoint demo``
must start without importing torch, and each rank is a fresh process.
"""

from __future__ import annotations

import os
import signal
import time

GLOBAL_BATCH = 12  # divisible by 1, 2, 3, 4: every world size sees the same data


def _model_and_optim(world: int):
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from stashpoint.demo.model import GPTConfig, make_model, shard_fsdp

    cfg = GPTConfig()
    model = shard_fsdp(make_model(cfg), init_device_mesh("cpu", (world,)))
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    return cfg, model, optim


def _state(model, optim, step: int) -> dict:
    import torch

    import stashpoint

    return {
        "model": model,
        "optim": optim,
        "loader": {"next_step": step, "global_batch": GLOBAL_BATCH},
        "rng": stashpoint.PerRank(torch.get_rng_state()),
    }


def _manager(root: str, durable_every: int):
    from stashpoint import CheckpointManager
    from stashpoint.manager.memory import MemoryPolicy
    from stashpoint.manager.policy import SavePolicy

    memory = MemoryPolicy(every_steps=1, if_busy="wait", reattach_s=120, signal=None)
    return CheckpointManager(root, memory=memory, save_policy=SavePolicy(every_steps=durable_every))


def reference(rank: int, world: int, steps: int) -> list[float]:
    """The uninterrupted run, without checkpoints."""
    from stashpoint.demo.model import train_step

    cfg, model, optim = _model_and_optim(world)
    return [train_step(model, optim, cfg, step, GLOBAL_BATCH, rank, world) for step in range(steps)]


def resilient(rank: int, world: int, steps: int, root: str, durable_every: int, kill_at: int | None) -> dict:
    """Train with a memory snapshot every step and a durable checkpoint every
    ``durable_every``, resuming from whatever the manager finds; with ``kill_at`` the
    last rank SIGKILLs itself once the snapshot of that step is sealed."""
    import torch

    from stashpoint.demo.model import train_step

    cfg, model, optim = _model_and_optim(world)
    mgr = _manager(root, durable_every)
    state = _state(model, optim, 0)
    t0 = time.perf_counter()
    info = mgr.load_latest(state)
    resumed = None if info is None else {"tier": info.tier, "step": info.step, "s": time.perf_counter() - t0}
    if info is not None:
        torch.set_rng_state(state["rng"].value)
    start = state["loader"]["next_step"]
    losses = {}
    for step in range(start, steps):
        losses[step] = train_step(model, optim, cfg, step, GLOBAL_BATCH, rank, world)
        state = _state(model, optim, step + 1)
        handle = mgr.maybe_save(step + 1, state)
        if kill_at == step + 1 and rank == world - 1:
            handle.wait(60)
            os.kill(os.getpid(), signal.SIGKILL)
    mgr.close()
    return {"resumed": resumed, "losses": losses}


def resume_elsewhere(rank: int, world: int, steps: int, path: str) -> dict:
    """A job at another world size resumes from a durable checkpoint (resharded)."""
    import stashpoint
    from stashpoint.demo.model import train_step

    cfg, model, optim = _model_and_optim(world)
    state = _state(model, optim, 0)
    # RNG state was saved per rank at another world size: every rank starts from rank 0's
    loaded = stashpoint.load(state, path, per_rank="rank0")
    start = state["loader"]["next_step"]
    losses = [train_step(model, optim, cfg, s, GLOBAL_BATCH, rank, world) for s in range(start, steps)]
    return {"start": start, "losses": losses, "loaded": loaded}
