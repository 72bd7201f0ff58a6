"""torchtitan's checkpoint manager contract backed by stashpoint: a tiny FSDP2 model trained
with torchtitan's own optimizer and LR-scheduler containers on real gloo rank pools, saved
asynchronously (lazy copies ordered by maybe_wait_for_staging), resumed bit-exactly at the same
and at another world size, step counter included."""

from __future__ import annotations

import pytest
import torch

import stashpoint
from stashpoint.errors import InvalidOptionError

titan = pytest.importorskip("torchtitan", reason="pip install 'stashpoint[torchtitan]'")

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
    b = pools(3).run(titan_cases.train, base, 1, 4, -1, "lazy")[0]
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
