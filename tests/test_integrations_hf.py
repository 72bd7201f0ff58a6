"""The HuggingFace Trainer adapter: a real Trainer on a tiny GPT-2, interrupted and resumed."""

from __future__ import annotations

import os

import pytest
import torch

import stashpoint

transformers = pytest.importorskip("transformers")
from stashpoint.integrations.hf_trainer import StashpointTrainer  # noqa: E402

STEPS, STOP_AT = 8, 5  # 3 update steps per epoch: the stop is 2 batches into the second epoch
#: the only files a run may leave: stashpoint checkpoints and the manager's telemetry
OURS = {"index.json", "telemetry.jsonl"}


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StopAt(transformers.TrainerCallback):
    """Saves and stops at ``step``, as a job that is interrupted there."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = control.should_training_stop = True


def trainer(out: str, init_seed: int, callbacks=(), **options) -> StashpointTrainer:
    torch.manual_seed(init_seed)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    settings = dict(max_steps=STEPS, save_strategy="steps", save_steps=3, save_total_limit=2) | options
    args = transformers.TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=7,
        learning_rate=1e-3,
        warmup_steps=2,
        disable_tqdm=True,
        **settings,
    )
    model = transformers.GPT2LMHeadModel(config)  # dropout 0.1: losses depend on the RNG states
    data = Tokens()
    return StashpointTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=list(callbacks)
    )


def losses(t: StashpointTrainer) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in t.state.log_history if "loss" in e]


def test_interrupted_and_resumed_run_matches_the_uninterrupted_one(tmp_path):
    whole = trainer(str(tmp_path / "whole"), init_seed=1)
    whole.train()

    first = trainer(str(tmp_path / "run"), init_seed=1, callbacks=[StopAt(STOP_AT)])
    first.train()
    assert first.state.global_step == STOP_AT
    saved = stashpoint.load_full(first.checkpoint_path(STOP_AT), keys=["trainer_state"])["trainer_state"]
    assert saved["global_step"] == STOP_AT and len(saved["log_history"]) == STOP_AT

    resumed = trainer(str(tmp_path / "run"), init_seed=2)  # other weights: the checkpoint must replace them
    resumed.train(resume_from_checkpoint=True)

    assert len(losses(whole)) == STEPS
    assert losses(resumed) == losses(whole)  # step for step, exactly
    want, got = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert resumed.lr_scheduler.state_dict() == whole.lr_scheduler.state_dict()
    # retention is save_total_limit=2; the Trainer wrote none of its own files
    assert [c.step for c in resumed.checkpoint_manager.checkpoints()] == [6, 8]
    for root, _dirs, files in os.walk(tmp_path):
        strays = [f for f in files if f not in OURS and not f.endswith(".safetensors")]
        assert not strays, (root, strays)


def test_resume_from_an_explicit_checkpoint_path(tmp_path):
    first = trainer(str(tmp_path / "run"), init_seed=1, callbacks=[StopAt(3)])
    first.train()
    path = first.checkpoint_path(3)
    again = trainer(str(tmp_path / "other"), init_seed=2, callbacks=[StopAt(4)])
    again.train(resume_from_checkpoint=path)
    assert again.state.global_step == 4
    assert losses(again)[:3] == losses(first)
    with pytest.raises(stashpoint.errors.CheckpointNotFoundError, match="empty"):
        trainer(str(tmp_path / "empty"), init_seed=1).train(resume_from_checkpoint=True)


def test_the_best_checkpoint_is_kept_and_loaded_at_the_end(tmp_path):
    # "best" is the highest loss: an early checkpoint, so the end must go back to it
    best_at_end = dict(eval_strategy="steps", eval_steps=2, save_steps=2, save_total_limit=1)
    best_at_end.update(load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    t = trainer(str(tmp_path / "run"), init_seed=1, **best_at_end)
    t.train()
    evals = {e["step"]: e["eval_loss"] for e in t.state.log_history if "eval_loss" in e}
    best = max(evals, key=evals.get)
    assert best < STEPS
    assert t.state.best_model_checkpoint == t.checkpoint_path(best)
    kept = {c.step for c in t.checkpoint_manager.checkpoints()}
    assert kept == {best, STEPS}  # keep_last=1, and the best by eval_loss
    name = "model.transformer.h.0.mlp.c_fc.weight"
    saved = stashpoint.load_full(t.checkpoint_path(best), keys=[name])[name]
    assert torch.equal(saved, t.model.transformer.h[0].mlp.c_fc.weight)
