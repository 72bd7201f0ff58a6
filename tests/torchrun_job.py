"""A job run under torchrun by tests/test_torchrun.py: the last worker SIGKILLs itself in
the first attempt, torchrun restarts every worker, and they resume from memory."""

from __future__ import annotations

import json
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from stashpoint import CheckpointManager
from stashpoint.manager.memory import MemoryPolicy
from stashpoint.manager.policy import SavePolicy


def main(durable: str, out: str, steps: int, kill_at: int) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))  # slow starts on a busy machine
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"model": model, "optim": optim, "loader": {"step": 0}}
    policy = MemoryPolicy(every_steps=1, if_busy="wait", reattach_s=300, signal=None)
    mgr = CheckpointManager(durable, memory=policy, save_policy=SavePolicy(every_steps=100), timeout_s=300)
    info = mgr.load_latest(state)
    for step in range(state["loader"]["step"], steps):
        x = torch.full((4, 16), float(step))
        optim.zero_grad()
        model(x).pow(2).mean().backward()
        optim.step()
        state["loader"]["step"] = step + 1
        handle = mgr.maybe_save(step + 1, state)
        if attempt == 0 and rank == world - 1 and step + 1 == kill_at:
            handle.wait(60)
            os.kill(os.getpid(), signal.SIGKILL)
    mgr.close()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        resumed = None if info is None else [info.tier, info.step]
        json.dump({"attempt": attempt, "resumed": resumed, "weight": model.weight.sum().item()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
