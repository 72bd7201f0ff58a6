"""A job run by tests/test_torchrun_nodeloss.py under two torchrun agents, each a simulated node
with its own memory root: the first attempt snapshots (protected by a replica on the other
node) and waits; the test kills one node; the surviving agent restarts its workers, which
resume on the smaller world from the protected memory tier."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from datetime import timedelta

import torch.distributed as dist

import node_loss_cases
from stashpoint import CheckpointManager, MemoryPolicy, Replicate
from stashpoint.manager.policy import SavePolicy


def main(durable: str, out: str, steps: int) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    state = node_loss_cases._state(world)
    policy = MemoryPolicy(
        every_steps=1, slots=3, if_busy="wait", reattach_s=120, signal=None, protection=Replicate(copies=1)
    )  # nodes from torchrun's LOCAL_WORLD_SIZE
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr = CheckpointManager(durable, memory=policy, save_policy=SavePolicy(every_steps=100), timeout_s=60)
        info = mgr.load_latest(state)
    report = {
        "attempt": attempt,
        "world": world,
        "resumed": None if info is None else [info.tier, info.step, node_loss_cases._exact(state)],
        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
    }
    if info is not None:  # resumed after the loss of a node: done
        mgr.close()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
        dist.destroy_process_group()
        return
    for step in range(1, steps + 1):
        node_loss_cases._set(state, step, rank, world)
        mgr.maybe_save(step, state).wait(60)
    mgr.wait()
    dist.barrier()  # every snapshot is protected on the other node
    with open(os.path.join(out, f"ready{rank}.json"), "w") as f:
        json.dump(report, f)
    while True:  # training goes on until a node is lost: this collective then fails
        dist.barrier()
        time.sleep(0.2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
