"""FSDP2 training saved at one world size and resumed at another reproduces the run."""

from __future__ import annotations

import math

import torch

import stashpoint
from stashpoint.demo.model import make_model

import train_cases

STEPS, SAVE_AT = 8, 4


def test_fsdp2_resume_at_other_world_sizes(pools, tmp_path):
    path = str(tmp_path / "step4")
    reference = pools(2).run(train_cases.train_and_save, STEPS, SAVE_AT, path)[0]
    assert all(math.isfinite(x) for x in reference)
    for world in (3, 1, 4):
        results = pools(world).run(train_cases.resume, STEPS, path)
        for r in results:
            assert r["start"] == SAVE_AT
            assert r["lr"] == 0.1  # optimizer hyper-parameters come from the checkpoint
            resumed = r["losses"]
            assert len(resumed) == STEPS - SAVE_AT
            for want, got in zip(reference[SAVE_AT:], resumed):
                assert abs(want - got) <= 1e-6, (world, reference[SAVE_AT:], resumed)


def test_2d_fsdp_tp_checkpoint_holds_the_true_weights(pools, tmp_path):
    src, dst = str(tmp_path / "2d"), str(tmp_path / "1d")
    placements = pools(4).run(train_cases.save_2d, src)[0]
    assert any("_StridedShard" in p or "_S(" in p for p in placements.values()), placements
    truth = {f"model.{k}": v for k, v in make_model(train_cases.CFG).state_dict().items()}
    saved = stashpoint.load_full(src)
    assert set(saved) == set(truth)
    for name, want in truth.items():
        assert torch.equal(saved[name], want), name
    # and back: 2-D -> FSDP at 3 ranks -> saved again -> same weights
    pools(3).run(train_cases.load_1d_and_resave, src, dst)
    again = stashpoint.load_full(dst)
    for name, want in truth.items():
        assert torch.equal(again[name], want), name
