"""torchtitan's checkpoint manager contract backed by stashpoint: a tiny FSDP2 model trained
with torchtitan's own optimizer and LR-scheduler containers on real gloo rank pools, saved
asynchronously (lazy copies ordered by maybe_wait_for_staging), resumed bit-exactly at the same
and at another world size, step counter included."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

import stashpoint
from stashpoint.errors import CheckpointNotFoundError, InvalidOptionError

titan = pytest.importorskip("torchtitan", reason="pip install 'stashpoint[torchtitan]'")
from torchtitan.components.checkpointer import ModelWrapper  # noqa: E402

from stashpoint.integrations.torchtitan import StashpointCheckpointManager  # noqa: E402
from test_interop_dist import flat_tensors, same_bits  # noqa: E402

import titan_cases  # noqa: E402  (needs torchtitan)


def tensors(snapshot: dict) -> dict[str, torch.Tensor]:
    return flat_tensors({k: snapshot[k] for k in ("model", "optim")})


def plain(snapshot: dict) -> tuple:
    return snapshot["train_state"], snapshot["lr_scheduler"], snapshot["lr"]


def test_save_lazily_resume_bit_exact_at_same_and_other_world_size(pools, tmp_path):
    base = str(tmp_path)
    # run A: steps 1..5, checkpoints at 2 and 4; step 5 changes the tensors right after
    # the lazy save of step 4 was started
    a = pools(2).run(titan_cases.train, base, 0, 5, 4, "lazy")[0]
    assert a["resumed"] is False and a["at"]["train_state"] == {"step": 4, "ntokens_seen": 12}

    # at world size 3: the newest checkpoint, resharded, is the state of step 4 exactly
    # (a load only: "sync" starts no writer processes)
    b = pools(3).run(titan_cases.train, base, 1, 4, -1, "sync")[0]
    assert b["resumed"] is True
    same_bits(tensors(b["loaded"]), tensors(a["at"]))
    assert plain(b["loaded"]) == plain(a["at"])

    # at world size 2, a resumed run goes on exactly as the uninterrupted one did, and its
    # final checkpoint (step 10) holds the model only
    c = pools(2).run(titan_cases.train, base, 1, 10, 5, "lazy")[0]
    same_bits(tensors(c["loaded"]), tensors(a["at"]))
    same_bits(tensors(c["at"]), tensors(a["end"]))
    assert plain(c["at"]) == plain(a["end"])
    steps = [int(p.name.split("-")[1]) for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("step-")]
    assert sorted(steps) == [2, 4, 6, 8, 10]
    final = stashpoint.read_index(tmp_path / "ckpt" / "step-000000010")
    assert final.metadata.step == 10 and not any(k.startswith("optimizer") for k in final.items)
    full = stashpoint.read_index(tmp_path / "ckpt" / "step-000000008")
    assert {"optimizer.state.0.weight.exp_avg", "train_state", "lr_scheduler"} <= set(full.items)


def test_config_refuses_what_it_cannot_do():
    with pytest.raises(InvalidOptionError, match="mode"):
        StashpointCheckpointManager.Config(enable=True, mode="later")
    with pytest.raises(InvalidOptionError, match="last_save_in_hf"):
        StashpointCheckpointManager.Config(enable=True, last_save_in_hf=True)
    disabled = StashpointCheckpointManager.Config().build(
        dataloader=None, model_parts=[], optimizers=None, lr_schedulers=None, states={}, sd_adapter=None
    )
    assert disabled.save(1) is False and disabled.load() is False


def _single(tmp_path, seed: int, **options):
    """One process: a plain module, torchtitan's containers, and the manager in sync mode."""
    model, optimizers, schedulers = titan_cases.parts(None, seed)
    state = titan_cases.TrainState()
    config = StashpointCheckpointManager.Config(
        enable=True, folder="ckpt", interval=1, mode="sync", **options
    )
    manager = titan_cases.build(config, model, optimizers, schedulers, state, str(tmp_path))
    return manager, model, optimizers, schedulers, state


def test_initial_load_from_a_dcp_seed_then_a_chosen_step_with_exclusions(tmp_path):
    warnings.simplefilter("ignore")  # dcp warns that no process group is initialised
    seed_model, _, _ = titan_cases.parts(None, 0)
    # torchtitan's seed checkpoint: the model's flat state dict, written by DCP
    dcp.save(ModelWrapper(seed_model).state_dict(), checkpoint_id=str(tmp_path / "seed"))

    manager, model, optimizers, schedulers, state = _single(
        tmp_path, 1, initial_load_path=str(tmp_path / "seed")
    )
    assert manager.load() is True  # nothing in the folder yet: the seed, model only, read in place
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), seed_model.parameters()))
    after_first = None
    for step in (1, 2):
        state.step = step
        model(torch.randn(2, 12)).square().mean().backward()
        optimizers.step()
        schedulers.step()
        optimizers.zero_grad()
        assert manager.save(step) is True
        after_first = after_first or [p.detach().clone() for p in model.parameters()]
    manager.close()

    manager, model, optimizers, schedulers, state = _single(
        tmp_path, 2, exclude_from_loading=["lr_scheduler"]
    )
    assert manager.load(step=1) is True
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), after_first))
    assert state.step == 1 and schedulers.state_dict()["last_epoch"] == 0  # excluded: untouched
    with pytest.raises(CheckpointNotFoundError):
        manager.load(step=7)
    manager.close()
