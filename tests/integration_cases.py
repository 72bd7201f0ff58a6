"""Rank-pool tasks for the framework adapters: FSDP2 models saved and loaded through DCP's API
with stashpoint's StorageWriter/StorageReader, and through stashpoint's own API."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

import stashpoint
from stashpoint.integrations.dcp import StashpointReader, StashpointWriter

from interop_cases import _full, _sharded, fsdp_model

#: plain values saved beside the model: DCP flattens them, stashpoint keeps one JSON item
TRAIN = {"step": 5, "tag": "run-a", "losses": [2.5, 1.25], "betas": (0.9, 0.95)}
_GROUPS: dict[str, dist.ProcessGroup] = {}


def _state(model, optim, train: dict) -> dict:
    return {**_sharded(model, optim), "train": dict(train)}


def dcp_saves(rank: int, world: int, path: str, async_path: str) -> dict | None:
    """``dcp.save`` and ``dcp.async_save`` through StashpointWriter; rank 0 returns the saved state.

    The async save is started, then the model takes another optimizer step before it is
    waited for: the checkpoint must hold the state of the moment it was started.
    """
    model, optim = fsdp_model(world, seed=0)
    dcp.save(_state(model, optim, TRAIN), storage_writer=StashpointWriter(path, step=TRAIN["step"]))
    saved = copy.deepcopy(_full(model, optim))  # the step below changes some tensors in place
    # its own group, as torchtitan does: the save's collectives run in a thread while
    # FSDP2's forward and backward use the default group
    pending = dcp.async_save(
        _state(model, optim, TRAIN), storage_writer=StashpointWriter(async_path), process_group=_side_group()
    )
    model(torch.randn(4, 16)).square().sum().backward()
    optim.step()
    pending.result(timeout=120)
    return saved if rank == 0 else None


def _side_group() -> dist.ProcessGroup:
    if "side" not in _GROUPS:
        _GROUPS["side"] = dist.new_group(backend="gloo")
    return _GROUPS["side"]


def stashpoint_loads(rank: int, world: int, path: str) -> dict | None:
    """``stashpoint.load`` into a differently initialised FSDP2 model; rank 0 returns the state."""
    model, optim = fsdp_model(world, seed=1)
    state = {"model": model, "optim": optim, "train": {}}
    stashpoint.load(state, path)
    full = _full(model, optim)
    return {"state": full, "train": state["train"]} if rank == 0 else None


def stashpoint_saves(rank: int, world: int, path: str) -> None:
    model, optim = fsdp_model(world, seed=0)
    stashpoint.save({"model": model, "optim": optim, "train": dict(TRAIN)}, path, step=TRAIN["step"])


def dcp_loads(rank: int, world: int, path: str) -> dict:
    """``dcp.load`` through StashpointReader; rank 0 returns the state, or every rank how it failed.

    On failure, each rank reports whether its model and optimizer kept their values.
    """
    model, optim = fsdp_model(world, seed=1)
    before = _full(model, optim)
    state = _state(model, optim, {"step": 0, "tag": "", "losses": [0.0, 0.0], "betas": (0.0, 0.0)})
    try:
        dcp.load(state, storage_reader=StashpointReader(path, timeout_s=60))
    except CheckpointException as exc:
        errors = {r: type(e).__name__ for r, (e, _) in exc.failures.items()}
        return {"errors": errors, "unchanged": _same(before, _full(model, optim))}
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optim, state["optim"])
    full = _full(model, optim)
    return {"state": full, "train": state["train"]} if rank == 0 else {}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
