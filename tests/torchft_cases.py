"""Child-process bodies for tests/test_integration_torchft.py (spawned: picklable, top level)."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torchft import Manager, ProcessGroupGloo
from torchft.ddp import DistributedDataParallel
from torchft.optim import OptimizerWrapper

from stashpoint import CheckpointManager, SavePolicy
from stashpoint.integrations.torchft import StashpointTransport
from stashpoint.manager.memory import MemoryPolicy

HEALED_AT = 2  # replica group 0 trains alone up to this step, then group 1 joins
LAST = 4
TIMEOUT = timedelta(seconds=30)


def adamw_model(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def trained_state(seed: int, steps: int) -> dict:
    model, optim = adamw_model(seed)
    for _ in range(steps):
        optim.zero_grad()
        model(torch.randn(8, 16)).pow(2).mean().backward()
        optim.step()
    return {"model": model.state_dict(), "optim": optim.state_dict()}


def serve_snapshot(durable: str, shm: str, step: int, results, stop) -> None:
    """A healthy replica: snapshots ``step`` into its memory tier, then serves it to a peer."""
    os.environ["STASHPOINT_SHM_DIR"] = shm
    state = trained_state(0, 2)
    policy = MemoryPolicy(every_steps=1, if_busy="wait", signal=None)
    mgr = CheckpointManager(durable, memory=policy, save_policy=SavePolicy(every_steps=10_000))
    mgr.maybe_save(step, state).wait(30)
    transport = StashpointTransport(memory_root=mgr.memory_root, timeout=TIMEOUT)
    transport.send_checkpoint([1], step, {"user": {"default": state}, "torchft": {"step": step}}, TIMEOUT)
    results.put((transport.metadata(), transport.last_source, state))
    stop.wait(60)
    transport.disallow_checkpoint()
    transport.shutdown()
    mgr.close()


def copy_in_a_world(rank: int, init_file: str, shm: str, results, stop) -> None:
    """Rank 0 of a two-rank gloo world sends a copy of its state; rank 1 calls no collective."""
    os.environ["STASHPOINT_SHM_DIR"] = shm
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    if rank == 0:
        state = trained_state(3, 2)
        transport = StashpointTransport(timeout=TIMEOUT)
        transport.send_checkpoint([1], 2, state, TIMEOUT)
        results.put((transport.metadata(), transport.last_source, state))
    stop.wait(60)
    if rank == 0:
        transport.shutdown()
    dist.destroy_process_group()


def _manager(replica: int, lighthouse: str, store: dist.TCPStore, model, optim, transport) -> Manager:
    def load(sd: dict) -> None:
        model.load_state_dict(sd["model"])
        optim.load_state_dict(sd["optim"])

    return Manager(
        pg=ProcessGroupGloo(),
        min_replica_size=1,
        load_state_dict=load,
        state_dict=lambda: {"model": model.state_dict(), "optim": optim.state_dict()},
        replica_id=f"group{replica}",
        store_addr="localhost",
        store_port=store.port,
        rank=0,
        world_size=1,
        lighthouse_addr=lighthouse,
        checkpoint_transport=transport,
        timeout=TIMEOUT,
        quorum_timeout=TIMEOUT,
        connect_timeout=TIMEOUT,
    )


def replica_group(replica: int, lighthouse: str, shm: str, durable: str, events, results) -> None:
    """One replica group of one rank training with torchft's Manager; group 1 starts later and heals.

    ``events``: (group 0 reached HEALED_AT, group 1's Manager is up, the parent has the results).
    """
    ready, joined, done = events
    os.environ["STASHPOINT_SHM_DIR"] = os.path.join(shm, f"group{replica}")  # a node of its own
    os.makedirs(os.environ["STASHPOINT_SHM_DIR"])
    store = dist.TCPStore(host_name="localhost", port=0, is_master=True, wait_for_workers=False)
    model, optim = adamw_model(seed=100 + replica)  # different weights: only healing makes them agree
    policy = MemoryPolicy(every_steps=1, if_busy="wait", signal=None)
    ckpt = CheckpointManager(durable, memory=policy, save_policy=SavePolicy(every_steps=10_000))
    transport = StashpointTransport(memory_root=ckpt.memory_root, timeout=TIMEOUT)
    if replica == 1 and not ready.wait(90):  # everything imported and built: join now
        raise TimeoutError("replica group 0 never reached the healing step")
    manager = _manager(replica, lighthouse, store, model, optim, transport)
    ddp, wrapped = DistributedDataParallel(manager, model), OptimizerWrapper(manager, optim)
    if replica == 1:
        joined.set()
    torch.manual_seed(7)  # the same batches in both groups
    healed_ms = None
    while manager.current_step() < LAST:
        if replica == 0 and manager.current_step() == HEALED_AT:
            ready.set()
            if not joined.wait(60):
                raise TimeoutError("replica group 1 never started")
        wrapped.zero_grad()  # starts the quorum: group 1 heals here
        started = time.perf_counter()
        if replica == 1 and healed_ms is None:
            manager.wait_quorum()
            healed_ms = (time.perf_counter() - started) * 1e3
        ddp(torch.randn(8, 16)).pow(2).mean().backward()
        wrapped.step()
        state = {"model": model.state_dict(), "optim": optim.state_dict()}
        handle = ckpt.maybe_save(manager.current_step(), state)
        handle.wait(30)  # sealed before the next quorum, so a peer healing then is served from it
    final = {"model": model.state_dict(), "optim": optim.state_dict()}
    results.put((replica, transport.last_source, healed_ms, final))
    done.wait(60)  # the parent has the tensors (shared with it by file descriptor)
    manager.shutdown(wait=False)
    ckpt.close()
