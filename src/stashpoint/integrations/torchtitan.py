"""A torchtitan checkpoint manager that saves stashpoint checkpoints, asynchronously.

Select it in the trainer's config (torchtitan builds whatever ``checkpoint`` config it is
given)::

    from stashpoint.integrations.torchtitan import StashpointCheckpointManager
    config.checkpoint = StashpointCheckpointManager.Config(enable=True, folder="checkpoint",
                                                           interval=500, mode="lazy")

It keeps torchtitan's contract (``BaseCheckpointManager``: ``save``, ``load``,
``maybe_wait_for_staging``, ``maybe_wait_for_saving``, ``close``) and its policies (interval,
first and last step, ``keep_latest_k``, ``load_step``, ``exclude_from_loading``,
``initial_load_path``, model-only seed and final checkpoints).  Saves go through
:class:`stashpoint.CheckpointManager` with ``mode="lazy"`` by default: the call returns at
once, the copies to host memory overlap the next forward and backward, and
:meth:`maybe_wait_for_staging`, which the trainer calls right before ``optimizers.step()``
(and a step pre-hook on the optimizers, should a loop not call it), orders the copies
before the step that changes the tensors.  A background writer process checksums,
writes and commits; resuming picks the newest checkpoint that is whole, at any world size.

The state is laid out as torchtitan lays it out: the model's FQNs at the top level, then
``optimizer``, ``lr_scheduler``, ``dataloader`` and ``train_state`` (each through its own
``state_dict``/``load_state_dict``).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torchtitan.components.checkpointer.base import (
    DATALOADER,
    LR_SCHEDULER,
    MODEL,
    OPTIMIZER,
    BaseCheckpointManager,
    ModelWrapper,
)
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.tools import filesystem

import stashpoint
from stashpoint.engine.async_save import SaveHandle
from stashpoint.errors import CheckpointNotFoundError, InvalidOptionError
from stashpoint.manager import CheckpointManager, RetentionPolicy, SavePolicy
from stashpoint.manager.housekeeping import checkpoint_name
from stashpoint.storage import resolve
from stashpoint.vocab import ManagerMode, PerRankChoice, choose

#: what ``per_rank`` may say for per-rank items (each rank's data-loader position) saved at
#: another world size
LOAD_PER_RANK = ("error", "drop", "rank0")


class _Stateful:
    """One of torchtitan's stateful components, seen only through ``state_dict``/``load_state_dict``.

    ``OptimizersContainer`` is a ``torch.optim.Optimizer`` over several models' parameters;
    wrapped, stashpoint takes its flat FQN-keyed state as torchtitan defines it.
    """

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def state_dict(self) -> dict[str, Any]:
        return self.obj.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.obj.load_state_dict(state_dict)


class StashpointCheckpointManager(BaseCheckpointManager):
    """torchtitan's checkpoint manager contract, backed by :class:`stashpoint.CheckpointManager`."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseCheckpointManager.Config):
        mode: ManagerMode = "lazy"
        """``lazy`` (copies overlap the next step), ``eager`` (copied before save returns), ``sync``."""

        timeout_s: float = 600.0
        """Bound on every collective and wait of a save or load."""

        per_rank: PerRankChoice = "error"
        """Per-rank state (data-loader positions) saved at another world size: ``error``,
        ``drop`` (start those components afresh) or ``rank0``."""

        def __post_init__(self) -> None:
            BaseCheckpointManager.Config.__post_init__(self)
            choose("mode", self.mode, ManagerMode)
            choose("per_rank", self.per_rank, PerRankChoice, allowed=LOAD_PER_RANK)
            if self.last_save_in_hf or self.initial_load_in_hf:
                raise InvalidOptionError(
                    "StashpointCheckpointManager writes and reads stashpoint checkpoints; for HF "
                    "safetensors use stashpoint.convert.export_hf / load_hf (last_save_in_hf and "
                    "initial_load_in_hf must be False)"
                )

    def __init__(
        self,
        config: Config,
        *,
        dataloader: Any | None,
        model_parts: list[nn.Module],
        optimizers: Any,
        lr_schedulers: Any,
        states: dict[str, Any],
        sd_adapter: Any | None = None,
        base_folder: str = "",
    ) -> None:
        self.enable = config.enable
        if not self.enable:
            return
        self.config, self.save_future = config, None
        self.folder = filesystem.join(base_folder, config.folder)
        self.states = states
        self.states.update(
            {
                MODEL: ModelWrapper(model_parts),
                OPTIMIZER: optimizers,
                DATALOADER: dataloader,
                LR_SCHEDULER: lr_schedulers,
            }
        )
        self.export_dtype = TORCH_DTYPE_MAP[config.export_dtype]
        self.manager = CheckpointManager(
            self.folder,
            save_policy=SavePolicy(every_steps=config.interval),
            retention=RetentionPolicy(keep_last=config.keep_latest_k or None),
            mode=config.mode,
            timeout_s=config.timeout_s,
        )
        self._staging: SaveHandle | None = None
        self._hook = None
        if isinstance(optimizers, torch.optim.Optimizer):
            self._hook = optimizers.register_step_pre_hook(lambda *_: self.maybe_wait_for_staging())

    def __del__(self) -> None:
        self.close()

    # -- the state, as torchtitan lays it out ------------------------------------------------

    def _state(self, *, model_only: bool = False, exclude: tuple[str, ...] = ()) -> tuple[dict, dict]:
        """The state to save or load, and the model's own flat state dict within it."""
        model_sd = self.states[MODEL].state_dict()
        state: dict[str, Any] = dict(model_sd)
        if not model_only:
            for name, obj in self.states.items():
                if name != MODEL and obj is not None and name not in exclude:
                    state[name] = _Stateful(obj)
        return state, model_sd

    def _exported_model(self) -> dict:
        """The model alone, floating tensors in ``export_dtype`` (the final checkpoint)."""
        out = {}
        for k, v in self.states[MODEL].state_dict().items():
            convert = isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != self.export_dtype
            out[k] = v.to(self.export_dtype) if convert else v
        return out

    # -- saving ----------------------------------------------------------------------------------

    def _should_save(self, curr_step: int, last_step: bool) -> bool:
        if self.config.load_only:
            return False
        if curr_step == 1 and self.config.enable_first_step_checkpoint:
            return True
        return last_step or curr_step % self.config.interval == 0

    @torch.no_grad()
    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        if not self._should_save(curr_step, last_step):
            return False
        self.maybe_wait_for_saving()
        if last_step:  # synchronous, as torchtitan does it: training is over
            self.manager.wait()
            state = self._exported_model() if self.config.last_save_model_only else self._state()[0]
            path = filesystem.join(self.folder, checkpoint_name(curr_step))
            stashpoint.save(state, path, step=curr_step, overwrite=True, timeout_s=self.config.timeout_s)
            return True
        result = self.manager.save(curr_step, self._state()[0])
        if isinstance(result, SaveHandle) and not result.skipped:
            self._staging = result
            self.save_future = _future_of(result)
        return True

    def _maybe_wait_for_staging(self) -> None:
        staging, self._staging = self._staging, None
        if staging is not None:
            staging.wait_staged(self.config.timeout_s)

    def _wait_for_saving(self) -> None:
        future, self.save_future = self.save_future, None
        future.result(timeout=self.config.timeout_s)

    # -- loading ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _load(self, step: int = -1) -> bool:
        """Restore ``step`` (``-1``: the newest whole checkpoint, else ``initial_load_path``)."""
        if step != -1:
            path = filesystem.join(self.folder, checkpoint_name(step))
            storage, where = resolve(path)
            if not storage.exists(where):
                raise CheckpointNotFoundError(f"checkpoint.load_step={step}: nothing at {path}")
            return self._load_path(path, model_only=step == 0)
        latest = self.manager.latest()
        if latest is not None and latest.step == 0:  # a seed checkpoint holds the model only
            return self._load_path(latest.path, model_only=True)
        if latest is not None:
            state, model_sd = self._load_state(model_only=False)
            if self.manager.load_latest(state, per_rank=self.config.per_rank) is not None:
                self.states[MODEL].load_state_dict(model_sd)
                return True
        if not self.config.initial_load_path:
            return False  # a fresh start
        return self._load_path(self.config.initial_load_path, model_only=self.config.initial_load_model_only)

    def _load_path(self, path: str, *, model_only: bool) -> bool:
        state, model_sd = self._load_state(model_only=model_only)
        stashpoint.load(state, path, per_rank=self.config.per_rank, timeout_s=self.config.timeout_s)
        self.states[MODEL].load_state_dict(model_sd)
        return True

    def _load_state(self, *, model_only: bool) -> tuple[dict, dict]:
        """What a load fills; afterwards the model's part is handed back to the model (tensors
        a ``state_dict`` hook produced are not the parameters themselves)."""
        for name in self.config.exclude_from_loading:
            if name not in self.states:
                raise InvalidOptionError(f"exclude_from_loading names {name!r}, which is not a saved state")
        return self._state(model_only=model_only, exclude=tuple(self.config.exclude_from_loading))

    def _close(self) -> None:
        if getattr(self, "_hook", None) is not None:
            self._hook.remove()
            self._hook = None
        if getattr(self, "manager", None) is not None:
            self.manager.close()


def _future_of(handle: SaveHandle) -> Future:
    """A ``concurrent.futures.Future`` that settles when the save commits or fails."""
    future: Future = Future()

    def settle(done: SaveHandle) -> None:
        exc = done.exception()
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(None)

    handle.add_done_callback(settle)
    return future


__all__ = ["StashpointCheckpointManager"]
