"""A HuggingFace ``Trainer`` that checkpoints through stashpoint.

:class:`StashpointTrainer` is a drop-in ``transformers.Trainer``: when the Trainer
decides to save (``save_strategy``, ``save_steps``), one stashpoint checkpoint
``OUTPUT_DIR/step-NNNNNNNNN`` is written asynchronously through a
:class:`~stashpoint.CheckpointManager` (lazy mode by default: the copies overlap the
next forward and backward).  It holds the model, the optimizer, the LR scheduler, the
gradient scaler, the trainer state (global step, log history, callback states: the
data position follows from them) and every rank's RNG states.  The Trainer's own
files (``model.safetensors``, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``,
``trainer_state.json``) are not written, and nothing is pickled.

``trainer.train(resume_from_checkpoint=True)`` resumes from the newest good checkpoint
in ``output_dir`` (a damaged one is skipped with a warning); a path resumes from that
checkpoint.  ``save_total_limit`` becomes the retention's ``keep_last`` and, with
``load_best_model_at_end``, the best checkpoint by ``metric_for_best_model`` is kept
too; pass ``checkpoint_config=ManagerConfig(...)`` to choose yourself.

For a Trainer subclass of another library (TRL's ``SFTTrainer``, ...) put the mixin in
front: ``class MyTrainer(StashpointTrainerMixin, SFTTrainer): pass``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import transformers
from transformers import Trainer
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import compare_trainer_and_checkpoint_args

import stashpoint
from stashpoint.errors import CheckpointNotFoundError
from stashpoint.integrations.rng import capture_rng, restore_rng
from stashpoint.manager import CheckpointManager, ManagerConfig, RetentionPolicy
from stashpoint.manager.housekeeping import checkpoint_name

#: the Trainer methods overridden here, as transformers 5 splits its training loop
_SEAMS = (
    "_init_training_state", "_prepare_for_training", "_run_epoch", "_save_checkpoint", "_load_rng_state",
)
if not all(hasattr(Trainer, name) for name in _SEAMS):
    raise ImportError(
        f"stashpoint.integrations.hf_trainer needs transformers 5 (pip install 'stashpoint[hf]'); "
        f"transformers {transformers.__version__} lacks some of {', '.join(_SEAMS)}"
    )

#: TrainerState fields that differ between ranks; ``init_training_references`` sets them
_PER_PROCESS_FIELDS = ("is_local_process_zero", "is_world_process_zero")


def default_config(args) -> ManagerConfig:
    """The manager's options from ``TrainingArguments``: lazy saves, HF's retention."""
    keep_best, metric, mode = 0, None, "min"
    if args.load_best_model_at_end and args.metric_for_best_model:
        name = args.metric_for_best_model
        keep_best, metric = 1, name if name.startswith("eval_") else f"eval_{name}"
        mode = "max" if args.greater_is_better else "min"
    keep = RetentionPolicy(keep_last=args.save_total_limit, keep_best=keep_best, metric=metric, mode=mode)
    return ManagerConfig(retention=keep, mode="lazy")


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer under accelerate's wrapper: its step is the one that runs the hooks."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class StashpointTrainerMixin:
    """Replaces the Trainer's checkpoint saving and resuming with stashpoint's."""

    def __init__(self, *args, checkpoint_config: ManagerConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoint_config = checkpoint_config
        self._manager: CheckpointManager | None = None
        #: what ``train`` was asked to resume from (True: the newest), then the path found
        self._resume_from: str | bool | None = None
        self._rng_to_restore: dict | None = None

    @property
    def checkpoint_manager(self) -> CheckpointManager:
        """The manager of ``output_dir`` (started on first use: every rank uses it together)."""
        if self._manager is None:
            config = self.checkpoint_config or default_config(self.args)
            self._manager = CheckpointManager(self.args.output_dir, config)
        return self._manager

    def checkpoint_path(self, step: int) -> str:
        """Where the checkpoint of ``step`` is (or would be) written."""
        return os.path.join(self.args.output_dir, checkpoint_name(step))

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint`` is True (the newest) or a stashpoint checkpoint.

        Returns once every save has committed.
        """
        self._resume_from = resume_from_checkpoint or None
        try:
            return super().train(resume_from_checkpoint=None, trial=trial, **kwargs)
        finally:
            self._resume_from, self._rng_to_restore = None, None
            if self._manager is not None:
                self._manager.wait()

    # ------------------------------------------------------------------ saving

    def _save_checkpoint(self, model, trial) -> None:
        """One stashpoint checkpoint instead of the Trainer's files."""
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        step = self.state.global_step
        best = self.state.best_global_step
        if best and (best == step or best in {c.step for c in self.checkpoint_manager.checkpoints()}):
            self.state.best_model_checkpoint = self.checkpoint_path(best)
        self._export_callback_states()
        state = self._stash_state()
        state["trainer_state"] = self._trainer_state_values()
        self.checkpoint_manager.save(step, state, metrics=self._metrics_at(step))

    def _stash_state(self) -> dict:
        """What a checkpoint holds besides the trainer state (also the target of a resume)."""
        state: dict = {"model": self.model}
        if self.args.save_only_model:
            return state
        state["optimizer"] = _torch_optimizer(self.optimizer)
        state["lr_scheduler"] = self.lr_scheduler
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            state["scaler"] = scaler
        state["rng"] = stashpoint.PerRank(capture_rng())
        return state

    def _export_callback_states(self) -> None:
        """The states of stateful callbacks into ``self.state``, as ``Trainer._save_checkpoint`` does."""
        for cb in [*self.callback_handler.callbacks, self.control]:
            if not isinstance(cb, ExportableState):
                continue
            name = cb.__class__.__name__
            if isinstance(self.state.stateful_callbacks[name], list):
                self.state.stateful_callbacks[name].append(cb.state())
            else:
                self.state.stateful_callbacks[name] = cb.state()

    def _trainer_state_values(self) -> dict:
        """The trainer state as the JSON ``trainer_state.json`` would hold (the same on every rank)."""
        values = json.loads(json.dumps(dataclasses.asdict(self.state)))
        for name in _PER_PROCESS_FIELDS:
            values.pop(name, None)
        return values

    def _metrics_at(self, step: int) -> dict:
        """The evaluation metrics logged at ``step`` (they drive the retention's ``keep_best``)."""
        for entry in reversed(self.state.log_history):
            if entry.get("step") == step and any(k.startswith("eval_") for k in entry):
                return {k: v for k, v in entry.items() if isinstance(v, (int, float))}
        return {}

    # ------------------------------------------------------------------ resuming

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ) -> tuple[int, int]:
        """A fresh state, or the checkpoint's: (epochs trained, batches to skip in the current epoch)."""
        steps_per_epoch = num_update_steps_per_epoch
        fresh = super()._init_training_state(max_steps, steps_per_epoch, num_train_epochs, None, trial)
        if self._resume_from is None:
            return fresh
        holder: dict = {"trainer_state": {}}
        self._resume_from = self._load_trainer_state(holder)
        self.state = TrainerState(**holder["trainer_state"])
        compare_trainer_and_checkpoint_args(self.args, self.state)
        self._load_callback_state()
        epochs_trained = self.state.global_step // steps_per_epoch
        steps_in_epoch = 0
        if not self.args.ignore_data_skip:
            steps_in_epoch = self.state.global_step % steps_per_epoch
            steps_in_epoch *= self.args.gradient_accumulation_steps
        self.state.init_training_references(self, max_steps, num_train_epochs, trial)
        return epochs_trained, steps_in_epoch

    def _load_trainer_state(self, holder: dict) -> str:
        """Load the trainer state into ``holder``; the path of the checkpoint it came from."""
        if self._resume_from is True:
            found = self.checkpoint_manager.load_latest(holder)
            if found is None:
                raise CheckpointNotFoundError(f"no checkpoint to resume from in {self.args.output_dir}")
            return found.path
        path = os.fspath(self._resume_from)
        stashpoint.load(holder, path)
        return path

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """The Trainer's preparation, then the model, optimizer, scheduler and RNG states loaded."""
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        if self._resume_from is not None:
            state = self._stash_state()
            stashpoint.load(state, self._resume_from, per_rank="drop")
            if "rng" in state:  # restored where the Trainer restores it: after skipping batches
                self._rng_to_restore = state["rng"].value
        return model, train_dataloader

    def _run_epoch(self, *args, **kwargs):
        """The Trainer's epoch, told where it resumes from (it skips batches and restores RNG)."""
        if self._resume_from is not None:
            kwargs["resume_from_checkpoint"] = self._resume_from
        return super()._run_epoch(*args, **kwargs)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if self._rng_to_restore is not None:
            restore_rng(self._rng_to_restore)
            self._rng_to_restore = None

    def _load_best_model(self) -> None:
        """The model of the best checkpoint (``load_best_model_at_end``)."""
        self.checkpoint_manager.wait()
        stashpoint.load({"model": self.model}, self.state.best_model_checkpoint)


class StashpointTrainer(StashpointTrainerMixin, Trainer):
    """``transformers.Trainer`` saving and resuming through stashpoint (see the module's doc)."""


__all__ = ["StashpointTrainer", "StashpointTrainerMixin", "default_config"]
