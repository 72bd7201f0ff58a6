"""Lightning checkpoints written as stashpoint checkpoints (``pytorch_lightning`` 2.x).

* :class:`StashpointCheckpointIO`, a ``CheckpointIO`` plugin: ``Trainer(plugins=[...])``.
  Lightning's checkpoint dict (weights, optimizer and scheduler states, loop
  progress, callback states, hyper-parameters) is saved as it is, tensors as tensors
  and the rest as JSON (see :mod:`stashpoint.integrations.tree`), and read back from
  the path alone: ``trainer.fit(model, ckpt_path=PATH)`` resumes from it.  A
  checkpoint "file" is a stashpoint checkpoint directory (``epoch=0-step=10.ckpt/``).
* :class:`StashpointDDPStrategy`: Lightning's strategies hand the dict to the plugin
  on global rank 0 alone, but a stashpoint save is a collective in which every rank
  writes its share; this DDP strategy calls the plugin on every rank
  (``Trainer(strategy=StashpointDDPStrategy())``; the plugin is its default).
* :class:`StashpointModelParallelStrategy`: the sharded strategy (FSDP2, TP) bypasses
  ``CheckpointIO``; this one saves the live sharded module and optimizers and loads
  them in place.

Nothing is pickled: a value of the checkpoint dict that JSON cannot hold (say an
object in ``save_hyperparameters``) raises ``InvalidStateError`` naming where it is,
unless the plugin was made with ``allow_pickle=True``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy

import stashpoint
from stashpoint.engine.async_save import SaveHandle
from stashpoint.errors import InvalidOptionError
from stashpoint.integrations.rng import capture_rng, restore_rng
from stashpoint.integrations.tree import load_tree, tree_state
from stashpoint.manager.housekeeping import delete_checkpoint
from stashpoint.storage import resolve
from stashpoint.vocab import ManagerMode, choose

#: the item holding every rank's RNG states (saved by StashpointDDPStrategy)
RNG_ITEM = "rng_states"


class StashpointCheckpointIO(CheckpointIO):
    """Saves, loads and removes Lightning checkpoints as stashpoint checkpoints.

    ``mode="sync"`` (the default) returns from a save once it is committed;
    ``"eager"`` returns once the tensors are copied to host memory and commits in the
    background (the next save, load, removal or teardown waits for it).
    """

    def __init__(self, *, mode: ManagerMode = "sync", allow_pickle: bool = False, timeout_s: float = 600.0):
        self.mode = choose("mode", mode, ManagerMode, allowed=("sync", "eager"))
        self.allow_pickle, self.timeout_s = allow_pickle, timeout_s
        self._pending: SaveHandle | None = None
        self._every_rank = False  # set while a strategy calls the plugin on every rank

    @contextmanager
    def on_every_rank(self):
        """Declares that every rank calls :meth:`save_checkpoint`; each rank's RNG states are saved too."""
        self._every_rank = True
        try:
            yield
        finally:
            self._every_rank = False

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to ``path``, replacing what is there (a collective in a process group)."""
        where = os.fspath(path)
        if _world_size() > 1 and not self._every_rank:
            raise InvalidOptionError(
                f"{where}: StashpointCheckpointIO saves with every rank, but this strategy calls it on "
                "rank 0 alone; use stashpoint.integrations.lightning.StashpointDDPStrategy"
            )
        self.wait()
        state = tree_state(checkpoint, where, self.allow_pickle)
        if self._every_rank:
            state[RNG_ITEM] = stashpoint.PerRank(capture_rng())
        common = dict(overwrite=True, timeout_s=self.timeout_s, allow_pickle=self.allow_pickle)
        if self.mode == "sync":
            stashpoint.save(state, where, **common)
        else:
            self._pending = stashpoint.async_save(state, where, mode="eager", **common)

    def restore_rng(self, path) -> None:
        """Set this rank's RNGs as the checkpoint holds them for this world size (a collective)."""
        self.wait()
        state = {RNG_ITEM: stashpoint.PerRank(capture_rng())}  # left as they are when not in the checkpoint
        stashpoint.load(state, path, strict=False, per_rank="drop", timeout_s=self.timeout_s)
        restore_rng(state[RNG_ITEM].value)

    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint dict saved at ``path``: CPU tensors, or on ``map_location`` (a device)."""
        self.wait()
        checkpoint = load_tree(path, allow_pickle=self.allow_pickle)
        if not isinstance(map_location, (str, torch.device)):
            return checkpoint
        return _move(checkpoint, torch.device(map_location))

    def remove_checkpoint(self, path) -> None:
        """Delete the checkpoint at ``path`` (hidden first, so a crash never leaves half of it in view)."""
        self.wait()
        _remove(path)

    def wait(self) -> None:
        """Wait for a save still committing (``mode="eager"``); raises what it failed with."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait(self.timeout_s)

    def teardown(self) -> None:
        self.wait()


def _remove(path) -> None:
    storage, full = resolve(os.fspath(path))
    parent, name = os.path.split(full.rstrip("/"))
    delete_checkpoint(storage, parent, name)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _move(value: object, device: Any) -> object:
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_move(v, device) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value.to(device) if isinstance(value, torch.Tensor) else value


class StashpointDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose checkpoints are stashpoint saves by every rank (see the module's doc)."""

    strategy_name = "stashpoint_ddp"

    def __init__(self, *args, checkpoint_io: CheckpointIO | None = None, **kwargs) -> None:
        super().__init__(*args, checkpoint_io=checkpoint_io or StashpointCheckpointIO(), **kwargs)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None
    ) -> None:
        io = self.checkpoint_io
        if not isinstance(io, StashpointCheckpointIO):  # another plugin writes on rank 0 alone
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        with io.on_every_rank():
            io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint dict; each rank's RNG states are restored as they were saved."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if isinstance(self.checkpoint_io, StashpointCheckpointIO):
            self.checkpoint_io.restore_rng(checkpoint_path)
        return checkpoint


class StashpointModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2, tensor parallel) checkpointing through stashpoint.

    Lightning's sharded strategies bypass ``CheckpointIO``.  This one saves the live,
    sharded module and optimizers on every rank (each writes its shards) beside the
    rest of Lightning's checkpoint dict, and loads them in place: a checkpoint saved
    with one mesh loads into another, at any world size.  Each rank's RNG states are
    saved and restored too.
    """

    strategy_name = "stashpoint_model_parallel"

    def __init__(self, *args, allow_pickle: bool = False, timeout_s: float = 600.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.allow_pickle, self.timeout_s = allow_pickle, timeout_s

    def _options(self) -> dict:
        return {"timeout_s": self.timeout_s, "allow_pickle": self.allow_pickle}

    def _live_state(self) -> dict:
        """The module and optimizers themselves, as stashpoint saves and loads them."""
        model = self.lightning_module
        state: dict = {"model": model}
        for i, optimizer in enumerate(self.optimizers):
            optimizer = getattr(optimizer, "_optimizer", optimizer)  # under a LightningOptimizer
            state[f"optimizer_{i}"] = stashpoint.OptimizerState(optimizer, model)
        state[RNG_ITEM] = stashpoint.PerRank(capture_rng())
        return state

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None
    ) -> None:
        where = os.fspath(self.broadcast(filepath))  # every rank saves to rank 0's path
        rest = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        state = {**tree_state(rest, where, self.allow_pickle), **self._live_state()}
        stashpoint.save(state, where, overwrite=True, **self._options())

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load the module, optimizers and RNG states in place; the rest of the checkpoint dict."""
        where = os.fspath(self.broadcast(checkpoint_path))
        state = self._live_state()
        stashpoint.load(state, where, per_rank="drop", **self._options())
        restore_rng(state[RNG_ITEM].value)
        return load_tree(where, allow_pickle=self.allow_pickle)

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            _remove(filepath)


__all__ = ["StashpointCheckpointIO", "StashpointDDPStrategy", "StashpointModelParallelStrategy"]
