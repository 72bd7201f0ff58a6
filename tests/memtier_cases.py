"""Trainer processes for the memory-tier tests: real process groups, real signals, real SIGKILLs."""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from stashpoint import CheckpointManager
from stashpoint.demo.model import GPTConfig, make_model, shard_fsdp, train_step
from stashpoint.engine import memtier
from stashpoint.engine.snapshot import MemorySnapshots
from stashpoint.engine.staging import ThreadCopyEngine
from stashpoint.manager.memory import MemoryPolicy
from stashpoint.manager.policy import SavePolicy

CFG = GPTConfig()
GLOBAL_BATCH = 12


def _setup(rank: int, world: int, init_file: str, shm: str) -> None:
    os.environ["STASHPOINT_SHM_DIR"] = shm
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _model(world: int):
    torch.manual_seed(0)
    model = make_model(CFG)
    if world > 1:
        model = shard_fsdp(model, init_device_mesh("cpu", (world,)))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _digest(model) -> list[float]:
    out = []
    for _, p in sorted(model.named_parameters()):
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(float(t.detach().double().sum()))
    return out


def train_job(rank, world, init_file, durable, shm, steps, durable_every, kill_at, results) -> None:
    """Train to ``steps``, resuming from whatever the manager finds; SIGKILL rank 1 after
    the snapshot of ``kill_at`` is sealed (the others then fail in their next collective)."""
    _setup(rank, world, init_file, shm)
    model, optim = _model(world)
    state = {"model": model, "optim": optim, "loader": {"step": 0}}
    policy = MemoryPolicy(every_steps=1, if_busy="wait", reattach_s=120, signal=None)
    mgr = CheckpointManager(
        durable, memory=policy, save_policy=SavePolicy(every_steps=durable_every), timeout_s=20
    )
    t0 = time.perf_counter()
    info = mgr.load_latest(state)
    resumed = None if info is None else (info.tier, info.step, time.perf_counter() - t0)
    losses = {}
    try:
        for step in range(state["loader"]["step"], steps):
            losses[step] = train_step(model, optim, CFG, step, GLOBAL_BATCH, rank, world)
            state["loader"]["step"] = step + 1
            handle = mgr.maybe_save(step + 1, state)
            if kill_at is not None and step + 1 == kill_at and rank == world - 1:
                handle.wait(30)
                os.kill(os.getpid(), signal.SIGKILL)
        mgr.close()
    except Exception as exc:  # a peer was killed: report, leave the snapshots for the restart
        results.put((rank, "failed", type(exc).__name__))
        os.kill(os.getpid(), signal.SIGKILL)
    results.put((rank, "done", {"resumed": resumed, "losses": losses, "digest": _digest(model)}))


def kill_mid_copy(root: str, shm: str) -> None:
    """Seal a snapshot of step 1, then die while the copy of step 2 is under way."""
    os.environ["STASHPOINT_SHM_DIR"] = shm
    state = {"w": torch.arange(4096, dtype=torch.float32), "loader": {"step": 1}}
    snaps = MemorySnapshots(root, reattach_s=2.0, timeout_s=20)
    snaps.snapshot(state, 1, mode="eager").wait(20)
    state["w"] += 1
    state["more"] = torch.ones(4096)
    state["loader"]["step"] = 2
    snaps.snapshot(state, 2, mode="lazy", copy_engine=ThreadCopyEngine(delay_s=5.0))
    time.sleep(0.5)  # the copy has started and will not finish
    os.kill(os.getpid(), signal.SIGKILL)


def snapshot_then_die(durable: str, shm: str, steps: int) -> None:
    """Snapshots only (no durable save), then SIGKILL: the keeper persists at the breakpoint."""
    os.environ["STASHPOINT_SHM_DIR"] = shm
    model, optim = _model(1)
    state = {"model": model, "optim": optim, "loader": {"step": 0}}
    policy = MemoryPolicy(every_steps=1, if_busy="wait", reattach_s=1.0, signal=None)
    mgr = CheckpointManager(durable, memory=policy, save_policy=SavePolicy(every_steps=10_000))
    for step in range(steps):
        train_step(model, optim, CFG, step, GLOBAL_BATCH, 0, 1)
        state["loader"]["step"] = step + 1
        handle = mgr.maybe_save(step + 1, state)
    handle.wait(30)
    os.kill(os.getpid(), signal.SIGKILL)


def preempted_job(rank, world, init_file, durable, shm, results) -> None:
    """Train until the preemption signal (sent to one rank by the test); all ranks stop together."""
    _setup(rank, world, init_file, shm)
    model, optim = _model(world)
    state = {"model": model, "optim": optim, "loader": {"step": 0}}
    policy = MemoryPolicy(every_steps=1, if_busy="wait", signal="SIGTERM", grace_s=30)
    mgr = CheckpointManager(durable, memory=policy, save_policy=SavePolicy(every_steps=10_000), timeout_s=30)
    for step in range(10_000):
        train_step(model, optim, CFG, step, GLOBAL_BATCH, rank, world)
        state["loader"]["step"] = step + 1
        mgr.maybe_save(step + 1, state)
        results.put((rank, "step", step + 1))
        if mgr.preempted(step + 1, state):
            mgr.close()
            results.put((rank, "stopped", step + 1))
            return


def stuck_after_signal(durable: str, shm: str, results) -> None:
    """Snapshots, then a long step that never reaches the safe point: the keeper persists."""
    os.environ["STASHPOINT_SHM_DIR"] = shm
    model, optim = _model(1)
    state = {"model": model, "optim": optim, "loader": {"step": 0}}
    policy = MemoryPolicy(every_steps=1, if_busy="wait", signal="SIGUSR1", grace_s=1.0, reattach_s=60)
    mgr = CheckpointManager(durable, memory=policy, save_policy=SavePolicy(every_steps=10_000))
    for step in range(3):
        train_step(model, optim, CFG, step, GLOBAL_BATCH, 0, 1)
        state["loader"]["step"] = step + 1
        handle = mgr.maybe_save(step + 1, state)
    handle.wait(30)
    results.put(("ready", memtier.memory_root(memtier.job_key(durable))))
    time.sleep(120)  # "stuck" in a step: killed by the test
