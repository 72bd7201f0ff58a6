"""Framework adapters on every rank of a RankPool: accelerate and Lightning over gloo.

Each function runs a real framework in the pool's process group (the frameworks find
it initialised and use it) and returns what the test compares across runs.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

SEED_DATA = 1234


@contextmanager
def launched_as(rank: int, world: int):
    """The environment ``torchrun`` gives a process, for as long as the framework runs."""
    env = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world, "NODE_RANK": 0}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))


def bits(module_or_tensors) -> dict[str, bytes]:
    """Every tensor's bytes, by name: equal bits, not just close values."""
    items = module_or_tensors.items() if isinstance(module_or_tensors, dict) else module_or_tensors
    return {k: v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() for k, v in items}


def optimizer_bits(optimizer: torch.optim.Optimizer) -> dict[str, bytes]:
    sd = optimizer.state_dict()
    return bits({f"{p}.{k}": v for p, s in sd["state"].items() for k, v in s.items() if torch.is_tensor(v)})


# --- accelerate ------------------------------------------------------------------------------


class Counter:
    """An object registered with ``accelerator.register_for_checkpointing``."""

    def __init__(self) -> None:
        self.seen = 0

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, sd: dict) -> None:
        self.seen = sd["seen"]


def _accelerate_job(init_seed: int):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny_net(init_seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    return accelerator, model, optimizer, scheduler, counter


def _accelerate_steps(job, n: int) -> list[float]:
    """Batches drawn from the global RNGs, dropout: the losses depend on every RNG state."""
    accelerator, model, optimizer, scheduler, counter = job
    losses = []
    for _ in range(n):
        x = torch.randn(4, 8) * float(np.random.uniform(0.5, 1.5)) + random.random()
        with accelerator.accumulate(model):  # counts accelerator.step
            loss = model(x).pow(2).mean()
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        counter.seen += len(x)
        losses.append(loss.item())
    return losses


def _accelerate_outcome(job) -> tuple:
    accelerator, model, optimizer, scheduler, counter = job
    return bits(model.state_dict()), optimizer_bits(optimizer), scheduler.state_dict(), counter.seen


def accelerate_save_resume(rank: int, world: int, path: str, steps: int, save_at: int) -> dict:
    """Train, save at ``save_at``, go on; then a fresh job loads and goes on: both runs' results."""
    from accelerate.state import AcceleratorState

    from stashpoint.integrations.accelerate import load_state, save_state

    with launched_as(rank, world):
        try:
            torch.manual_seed(SEED_DATA + rank)
            np.random.seed(rank)
            random.seed(rank)
            job = _accelerate_job(init_seed=1)
            _accelerate_steps(job, save_at)
            save_state(job[0], path)
            reference = _accelerate_steps(job, steps - save_at)
            want = _accelerate_outcome(job)

            torch.manual_seed(99)  # another job: other weights, other RNG states
            resumed = _accelerate_job(init_seed=2)
            load_state(resumed[0], path)
            step_after_load = resumed[0].step
            losses = _accelerate_steps(resumed, steps - save_at)
            got = _accelerate_outcome(resumed)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    return {
        "reference": reference,
        "resumed": losses,
        "same_state": want == got,
        "step_after_load": step_after_load,
        "files": sorted(os.listdir(path)),
    }
