"""``save_state`` / ``load_state`` for an ``accelerate.Accelerator``, through stashpoint.

Drop-in replacements for ``accelerator.save_state(path)`` and
``accelerator.load_state(path)`` that write one stashpoint checkpoint instead of
accelerate's files (accelerate's own save hooks can only take the model weights
over: the optimizer, scheduler, scaler and RNG files would still be ``torch.save``
pickles).  The checkpoint holds what ``accelerator.prepare`` registered, under the
names accelerate gives its files: ``model``, ``model_1``, ..., ``optimizer``, ...,
``scheduler``, ..., ``scaler``, the objects passed to ``register_for_checkpointing``
(``custom_0``, ...), ``accelerator.step`` and every rank's RNG states.  Both are
collectives: every process calls them.

The objects come from the accelerator's registries (``_models``, ``_optimizers``,
``_schedulers``, ``_custom_objects``), which accelerate keeps for its own
``save_state``; it has no public accessor for them.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from torch import nn

import stashpoint
from stashpoint.engine.async_save import SaveHandle
from stashpoint.engine.telemetry import LoadResult, SaveResult
from stashpoint.errors import InvalidStateError
from stashpoint.integrations.rng import capture_rng, restore_rng
from stashpoint.vocab import ManagerMode, choose


def _numbered(name: str, i: int) -> str:
    """accelerate's naming: ``model``, ``model_1``, ``model_2``, ..."""
    return name if i == 0 else f"{name}_{i}"


def _owner(optimizer: torch.optim.Optimizer, models: list[nn.Module], where: str) -> nn.Module:
    """The model whose parameters ``optimizer`` updates."""
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for model in models:
        if any(id(p) in ids for p in model.parameters()):
            return model
    raise InvalidStateError(f"{where}: the optimizer updates none of the prepared models' parameters")


def accelerator_state(accelerator: Accelerator) -> dict:
    """The stashpoint state of what ``accelerator`` checkpoints (also the target of a load)."""
    models = list(accelerator._models)
    state: dict = {_numbered("model", i): m for i, m in enumerate(models)}
    for i, wrapped in enumerate(accelerator._optimizers):
        optimizer = getattr(wrapped, "optimizer", wrapped)  # the step that runs a lazy save's hook
        name = _numbered("optimizer", i)
        state[name] = stashpoint.OptimizerState(optimizer, _owner(optimizer, models, name))
    for i, scheduler in enumerate(accelerator._schedulers):
        state[_numbered("scheduler", i)] = scheduler
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler
    for i, obj in enumerate(accelerator._custom_objects):
        state[f"custom_{i}"] = obj
    state["step"] = accelerator.step
    state["rng"] = stashpoint.PerRank(capture_rng())
    return state


def save_state(
    accelerator: Accelerator,
    path: str | os.PathLike[str],
    *,
    mode: ManagerMode = "sync",
    overwrite: bool = False,
    timeout_s: float = 600.0,
) -> SaveResult | SaveHandle:
    """Save the accelerator's state to ``path``, a stashpoint checkpoint (a collective).

    ``mode="sync"`` returns once the checkpoint is committed; ``"eager"`` and ``"lazy"``
    save asynchronously and return a :class:`~stashpoint.SaveHandle` (see
    :func:`stashpoint.async_save`).  ``accelerator.save_iteration`` advances as with
    ``accelerator.save_state``.
    """
    choose("mode", mode, ManagerMode)
    state = accelerator_state(accelerator)
    common = dict(step=accelerator.step, overwrite=overwrite, timeout_s=timeout_s)
    if mode == "sync":
        out = stashpoint.save(state, path, **common)
    else:
        out = stashpoint.async_save(state, path, mode=mode, **common)
    accelerator.project_configuration.iteration += 1
    return out


def load_state(
    accelerator: Accelerator, path: str | os.PathLike[str], *, timeout_s: float = 600.0
) -> LoadResult:
    """Load a checkpoint written by :func:`save_state` into the accelerator's objects (a collective).

    Everything is checked and read before anything changes; ``accelerator.step`` and
    this process's RNG states are restored too.  The RNG states of a checkpoint saved
    by another number of processes are left out (each process keeps its own).
    """
    state = accelerator_state(accelerator)
    result = stashpoint.load(state, path, per_rank="drop", timeout_s=timeout_s)
    accelerator.step = state["step"]
    restore_rng(state["rng"].value)
    return result


__all__ = ["accelerator_state", "load_state", "save_state"]
