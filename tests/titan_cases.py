"""Rank-pool tasks: a tiny FSDP2 model trained with torchtitan's own containers
(``OptimizersContainer``, ``LRSchedulersContainer``, ``ModelWrapper`` inside the manager) and
checkpointed by StashpointCheckpointManager, in the order torchtitan's trainer calls it."""

from __future__ import annotations

import copy

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torchtitan.components.optimizer import LRSchedulersContainer
from torchtitan.components.optimizer.optimizer import default_adamw

from stashpoint.integrations.torchtitan import StashpointCheckpointManager

from interop_cases import _full


class TrainState(Stateful):
    """What torchtitan's Trainer saves of itself: the step counter and tokens seen."""

    def __init__(self) -> None:
        self.step, self.ntokens_seen = 0, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step, self.ntokens_seen = state_dict["step"], state_dict["ntokens_seen"]


def parts(world: int | None, seed: int):
    """A tiny model (FSDP2 over ``world`` ranks; plain when None) and torchtitan's containers."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 7))
    if world is not None:
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    config = default_adamw(lr=0.01)
    config.implementation = "for-loop"
    optimizers = config.build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=optimizers, training_steps=10)
    return model, optimizers, schedulers


def build(config, model, optimizers, schedulers, state: TrainState, base: str):
    """The manager, built as torchtitan's Trainer builds whatever its checkpoint config names."""
    return config.build(
        dataloader=None,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=schedulers,
        states={"train_state": state},
        sd_adapter=None,
        base_folder=base,
    )


def _snapshot(model, optimizers, schedulers, state: TrainState) -> dict:
    """The whole training state, gathered (a collective); tensors copied."""
    out = copy.deepcopy(_full(model, optimizers.optimizers[0]))
    out["train_state"] = state.state_dict()
    out["lr_scheduler"] = schedulers.state_dict()
    out["lr"] = [g["lr"] for g in optimizers.optimizers[0].param_groups]
    return out


def train(rank: int, world: int, base: str, seed: int, last: int, snapshot_at: int, mode: str) -> dict:
    """Resume from ``base`` if it holds a checkpoint, train to step ``last`` (saving every 2 steps,
    the final step model-only), and return rank 0's snapshots: after the load, at
    ``snapshot_at`` and at the end."""
    model, optimizers, schedulers = parts(world, seed)
    state = TrainState()
    config = StashpointCheckpointManager.Config(
        enable=True, folder="ckpt", interval=2, mode=mode, timeout_s=120, initial_load_model_only=False
    )
    checkpointer = build(config, model, optimizers, schedulers, state, base)
    out = {"resumed": checkpointer.load(step=-1)}
    out["loaded"] = _snapshot(model, optimizers, schedulers, state)
    while state.step < last:
        state.step += 1
        g = torch.Generator().manual_seed(100 * state.step + rank)
        model(torch.randn(3, 12, generator=g)).square().mean().backward()
        state.ntokens_seen += 3
        checkpointer.maybe_wait_for_staging()  # the trainer's order: right before the step
        optimizers.step()
        schedulers.step()
        optimizers.zero_grad()
        checkpointer.save(state.step, last_step=state.step == 10)
        if state.step == snapshot_at:
            out["at"] = _snapshot(model, optimizers, schedulers, state)
    checkpointer.maybe_wait_for_saving()
    out["end"] = _snapshot(model, optimizers, schedulers, state)
    checkpointer.close()
    return out if rank == 0 else {}
